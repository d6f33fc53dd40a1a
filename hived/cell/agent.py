"""The cell daemon: PID 1 of the guest once the initramfs hands over.

It opens the host channel (virtio-serial port `hived.0`; vsock where the VMM offers
it), says hello, announces itself with `cell.hello` (the host never polls a guest that
is not listening yet), then runs exactly one build: in a crun container (see
container.py) as the unprivileged `build` user, stream stdout/stderr as bounded
`output` chunks with back-pressure, report `exit` with usage, honour `cancel` and
`shutdown`.

The cell outlives its box daemon (protocol v4): when the host goes away the build goes on,
its output waits (up to OUTPUT_WINDOW bytes not yet acknowledged by the box; beyond that
the build is held back), and the next daemon that connects adopts the cell (`cell.adopt`)
and gets everything from its last acknowledged chunk again. Every connection starts with
the resync marker (hived/protocol/resync.py). A cell with no host for ORPHAN_S powers off.

Being PID 1, it reaps every child (orphans included) from one SIGCHLD handler, so
it must not use asyncio's child watchers.
"""

import asyncio
import collections
import contextlib
import ctypes
import os
import select
import signal
import socket
import subprocess
import sys
import time

from hived import __version__
from hived.cell import container, identity, premade
from hived.protocol.channel import Channel, ChannelClosed
from hived.protocol.resync import MarkerScanner, ResyncError, marker
from hived.protocol.session import Session

PORT_NAME = "hived.0"
CRUN = "/usr/bin/crun"
CHUNK = 65536
DRAIN_IDLE_S = 30.0  # after the build's end, its output is read to EOF while it keeps moving
DEFAULT_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/work",
    "USER": "build",
    "LANG": "C.UTF-8",
}
RB_AUTOBOOT = 0x01234567  # with `reboot=t` and QEMU -no-reboot this ends the VMM
OUTPUT_WINDOW = 2 << 20  # output kept until the box acknowledges it; below the box's own hold (4 MiB)
ORPHAN_S = 300.0         # no box daemon for this long: the build is killed and the cell powers off
HOST_POLL_S = 0.02       # how often a cell without a host looks for one


def log(msg: str) -> None:
    # The serial console is the only log a cell has; the host keeps it per cell.
    try:
        with open("/dev/console", "w") as con:
            con.write(f"hived-agent: {msg}\n")
    except OSError:
        print(f"hived-agent: {msg}", file=sys.stderr)


def uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def kernel_args() -> dict[str, str]:
    with open("/proc/cmdline") as f:
        words = f.read().split()
    return dict(w.split("=", 1) for w in words if w.startswith("hived.") and "=" in w)


def find_port(name: str = PORT_NAME, wait_s: float = 5.0) -> str:
    """The virtio-serial port's device node, found by name (its number varies)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            for dev in os.listdir("/sys/class/virtio-ports"):
                with open(f"/sys/class/virtio-ports/{dev}/name") as f:
                    if f.read().strip() == name:
                        return f"/dev/{dev}"
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"no virtio-serial port named {name!r} (is virtio_console loaded?)")
        time.sleep(0.01)


def power_off() -> None:
    os.sync()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.reboot(RB_AUTOBOOT)
    os._exit(1)  # only if reboot failed: PID 1 exiting panics, and panic=-1 reboots


class PipePairTransport:
    """One duplex transport over a character device (read and write pipe transports on dups)."""

    def __init__(self, rt, wt) -> None:
        self._rt, self._wt = rt, wt

    def write(self, data: bytes) -> None:
        self._wt.write(data)

    def pause_reading(self) -> None:
        self._rt.pause_reading()

    def resume_reading(self) -> None:
        self._rt.resume_reading()

    def close(self) -> None:
        self._rt.close()
        self._wt.close()

    def abort(self) -> None:
        """Drop what is buffered: half a frame must not reach the next host (it resyncs anyway).

        Idempotent: the channel aborts a connection that sent a bad frame, and the agent drops
        the port again before it looks for the next host. asyncio's write pipe transport does
        not allow a second abort() once its connection_lost ran (its loop is gone: an
        AttributeError that killed the agent, and with it the cell and its build).
        """
        if not self._rt.is_closing():
            self._rt.close()
        if not self._wt.is_closing():
            self._wt.abort()

    def is_closing(self) -> bool:
        return self._rt.is_closing()


class _ReadSide(asyncio.Protocol):
    """The read half of one host connection. It ignores everything up to the host's resync
    marker (the tail of an earlier connection), then answers it with the same nonce and the
    channel's hello, and from then on feeds the channel. Bytes that arrive before the write
    half exists wait (the read pipe starts reading at once)."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.transport: PipePairTransport | None = None
        self.early: list[bytes] = []
        self.scanner: MarkerScanner | None = MarkerScanner()
        self.nonce = b""
        self.repeats: bytes | None = None  # the box's marker repeats not yet skipped

    def attached(self, transport: PipePairTransport) -> None:
        self.transport = transport
        early, self.early = self.early, []
        for data in early:
            self.data_received(data)

    def next_host(self, channel: Channel) -> None:
        """Same open port, a new peer: look for its marker again (a template's clone)."""
        self.channel = channel
        self.scanner = MarkerScanner()
        self.repeats = None

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            self.early.append(data)
            return
        if self.scanner is not None:
            try:
                rest = self.scanner.feed(data)
            except ResyncError as exc:
                log(f"host channel: {exc}")
                self.transport.abort()
                return
            if rest is None:
                return
            self.nonce = self.scanner.nonce
            self.transport.write(marker(self.nonce))
            self.scanner = None
            self.repeats = b""
            self.channel.connection_made(self.transport)  # our hello, after the echo
            data = rest
        if self.repeats is not None:
            # The box sends its marker again until it has our echo, and only then its hello:
            # drop those repeats (whole or cut) before the first frame.
            data = self.repeats + data
            again = marker(self.nonce)
            while data.startswith(again):
                data = data[len(again):]
            if len(data) < len(again) and again.startswith(data):
                self.repeats = data
                return
            self.repeats = None
        if data:
            self.channel.data_received(data)

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        self.channel.connection_lost(exc)


class _WriteSide(asyncio.BaseProtocol):
    def __init__(self, read_side: _ReadSide) -> None:
        self.read_side = read_side

    def pause_writing(self) -> None:
        self.read_side.channel.pause_writing()

    def resume_writing(self) -> None:
        self.read_side.channel.resume_writing()

    def connection_lost(self, exc) -> None:
        self.read_side.channel.connection_lost(exc)


class Port:
    """The virtio-serial port, open for the cell's whole life (only one opener is allowed, and
    closing it would tell the host the guest left); each host connection gets transports of
    its own on duplicates of it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self.transport: PipePairTransport | None = None
        self.reader: _ReadSide | None = None

    def host_connected(self) -> bool:
        """The port reports POLLHUP while no host has its end open (virtio_console)."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN | select.POLLOUT)
        return not any(ev & select.POLLHUP for _, ev in poller.poll(0))

    async def wait_host(self, give_up_s: float) -> bool:
        """Until a host has the port open again (True), or give_up_s went by (False)."""
        deadline = time.monotonic() + give_up_s
        while not self.host_connected():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(HOST_POLL_S)
        return True

    async def attach(self, session: Session) -> Channel:
        """Fresh transports and a channel that speaks once the host's marker arrives."""
        self.drop()
        loop = asyncio.get_running_loop()
        channel = Channel(session, hello_timeout=30.0, queue_max=64)
        reader = _ReadSide(channel)
        rt, _ = await loop.connect_read_pipe(lambda: reader, os.fdopen(os.dup(self.fd), "rb", 0))
        wt, _ = await loop.connect_write_pipe(lambda: _WriteSide(reader), os.fdopen(os.dup(self.fd), "wb", 0))
        self.transport, self.reader = PipePairTransport(rt, wt), reader
        reader.attached(self.transport)
        return channel

    def next_host(self, session: Session) -> Channel:
        """A fresh channel on the same transports, silent until a new host's marker.

        The snapshot point of a template: the box that made it is gone once a clone runs, and
        the clone's box is a new peer (QEMU connects it before restoring, so the guest may not
        see the port close at all). Only the marker tells the two apart.
        """
        channel = Channel(session, hello_timeout=30.0, queue_max=64)
        self.reader.next_host(channel)
        return channel

    def drop(self) -> None:
        if self.transport is not None:
            self.transport.abort()
            self.transport = self.reader = None


class OutputLog:
    """A build's output chunks from the first one the box has not acknowledged on.

    `put` waits while the unacknowledged bytes fill the window: that is the build's
    back-pressure, whether the host is slow or away."""

    def __init__(self, window: int = OUTPUT_WINDOW) -> None:
        self.window = window
        self.chunks: collections.deque = collections.deque()  # (seq, stream, data)
        self.first = 0      # seq of chunks[0]: everything below was acknowledged
        self.next = 0       # seq of the next chunk
        self.bytes = 0
        self.changed = asyncio.Event()  # a chunk added, or room made

    async def put(self, stream: int, data: bytes) -> int:
        while self.bytes and self.bytes + len(data) > self.window:
            self.changed.clear()
            await self.changed.wait()
        seq, self.next = self.next, self.next + 1
        self.chunks.append((seq, stream, data))
        self.bytes += len(data)
        self.changed.set()
        return seq

    def ack(self, upto: int) -> None:
        while self.chunks and self.chunks[0][0] < upto:
            self.bytes -= len(self.chunks.popleft()[2])
        self.first = self.chunks[0][0] if self.chunks else max(self.first, min(upto, self.next))
        self.changed.set()

    def since(self, seq: int):
        for chunk in self.chunks:
            if chunk[0] >= seq:
                yield chunk


class Build:
    """The cell's one build: a crun container, its two output streams, and its end."""

    def __init__(self, agent: "Agent", msg) -> None:
        self.agent = agent
        self.id = msg["build_id"]
        self.msg = msg
        self.pid: int | None = None  # the container's init (hived-buildinit), our child once crun exits
        self.status: tuple[int, object] | None = None
        self.reaped = asyncio.Event()
        self.log = OutputLog()
        self.exit_fields: dict | None = None   # kept until the cell dies: a new box gets it again
        self.output_bytes = 0
        self.stream_bytes = {1: 0, 2: 0}
        self.cut_bytes = 0      # read but not sent: over the output limit
        self.undrained = False  # the pipes were still open long after the build ended
        self.output_limit = int(msg["limits"].get("output_bytes", 0)) or None
        self.end_reason: str | None = None  # timeout / cancelled / output_limit
        self.end_message = ""
        self.started = 0.0
        self.report_r: int | None = None  # hived-buildinit's fd 3, read end
        self.timings: dict[str, float] = {}  # where the start went (usage spawn_*: the box's warm-start stages)

    def _env(self) -> dict[str, str]:
        env = dict(DEFAULT_ENV)
        for item in self.msg.get("image_env") or []:
            key, sep, value = item.partition("=")
            if sep and key:
                env[key] = value
        env.update(self.msg["env"])
        return env

    async def _spawn(self) -> str | None:
        """Set up and start the container; None, or why it could not start."""
        msg = self.msg
        cwd = msg["cwd"] or "/work"
        try:
            paths = container.prepare_filesystems(msg.get("image_fs") or "", msg.get("source_fs") or "")
            config = container.bundle_config(msg["argv"], self._env(), cwd, msg["limits"], paths,
                                             cgroup=f"/hived/{self.id}")
            bundle = container.write_bundle(config)
        except (container.ContainerError, OSError) as exc:
            return f"cannot set up the build container: {exc}"
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        self.report_r = report_r
        pidfile = container.RUN / "container.pid"

        def report_fd_3() -> None:  # in the child: crun --preserve-fds 1 hands fd 3 to the container
            os.dup2(report_w, 3)  # dup2 clears close-on-exec; every other fd of the agent has it set

        t_crun = time.monotonic()
        try:
            status, err = await self.agent.crun(
                "create", "--bundle", str(bundle), "--pid-file", str(pidfile), "--preserve-fds", "1", self.id,
                stdin=subprocess.DEVNULL, stdout=self.stdout_w, stderr=self.stderr_w, preexec_fn=report_fd_3,
                close_fds=False)  # close_fds would close fd 3 after preexec_fn
        finally:
            os.close(report_w)
            os.close(self.stdout_w)
            os.close(self.stderr_w)
        if status != 0:
            return f"crun create failed ({_describe(status)}): {err or 'no message'}"
        self.pid = int(pidfile.read_text().split()[0])
        self.agent.children[self.pid] = self._reaped
        status, err = await self.agent.crun("start", self.id, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.timings["spawn_crun_s"] = time.monotonic() - t_crun
        if status != 0:
            self.kill("spawn_failed", f"crun start failed ({_describe(status)}): {err or 'no message'}")
        return None

    async def _hand_to_premade(self) -> tuple[int, int] | None:
        """Give the build to the cell's pre-made container (hived/cell/premade.py); its
        (stdout, stderr) read ends, or None: start it the ordinary way."""
        t0 = time.monotonic()
        made = await self.agent.take_premade()
        self.timings["spawn_wait_s"] = time.monotonic() - t0
        if made is None:
            return None
        cwd = self.msg["cwd"] or "/work"
        why = made.fits(self.msg, cwd)
        if not why:
            made.on_exit = self._reaped  # before the build can end: it may run the moment it is written
            try:
                await made.hand_over(self.msg, cwd, self._env())
            except (container.ContainerError, OSError) as exc:
                why = str(exc)
                made.on_exit = None
                self.status = None  # its init's end, if that was it, was not the build's
                self.reaped.clear()
            else:
                self.pid = made.pid
                stdout_r, stderr_r, self.report_r = made.take_pipes()
                self.timings["spawn_premade"] = 1.0
                return stdout_r, stderr_r
        log(f"build {self.id}: an ordinary container start: the pre-made one {why}")
        await made.discard()
        return None

    def _reaped(self, status: int, ru) -> None:
        self.status = (status, ru)
        self.reaped.set()

    async def run(self) -> None:
        msg = self.msg
        self.started = time.monotonic()
        self.timings["spawn_premade"] = 0.0
        premade = await self._hand_to_premade()
        if premade is not None:
            stdout_r, stderr_r = premade
            stdout, stderr = os.fdopen(stdout_r, "rb", 0), os.fdopen(stderr_r, "rb", 0)
        else:
            stdout_r, self.stdout_w = os.pipe2(os.O_CLOEXEC)
            stderr_r, self.stderr_w = os.pipe2(os.O_CLOEXEC)
            stdout, stderr = os.fdopen(stdout_r, "rb", 0), os.fdopen(stderr_r, "rb", 0)
            why = await self._spawn()
            if why is not None:
                stdout.close()
                stderr.close()
                self.set_exit(127, 0, "spawn_failed", why, {})
                return
        self.timings["spawn_s"] = time.monotonic() - self.started
        with contextlib.suppress(ChannelClosed):  # a box that is away learns it from cell.adopted
            await self.agent.channel.send("started", build_id=self.id, pid=self.pid, uptime=uptime())
        loop = asyncio.get_running_loop()
        timer = None
        if msg["timeout_s"] > 0:
            timer = loop.call_later(msg["timeout_s"], self.kill, "timeout",
                                    f"build ran over its timeout of {msg['timeout_s']:g} s")
        readers = [loop.create_task(self._pump(stdout, 1)),
                   loop.create_task(self._pump(stderr, 2))]
        await self.reaped.wait()
        if timer:
            timer.cancel()
        await self._drain(readers)
        await self._report()

    async def _drain(self, readers) -> None:
        """Every byte the build wrote is sent before its exit. The container's processes die
        with its init, so both pipes reach EOF; what is still in them (and what waits for the
        host to read, which paces us) is sent first, however long that takes while it moves."""
        pending = set(readers)
        while pending:
            before = self.output_bytes
            _, pending = await asyncio.wait(pending, timeout=DRAIN_IDLE_S)
            if pending and self.output_bytes == before:
                self.undrained = True  # stuck: say so in the exit rather than hang
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                return

    async def _pump(self, pipe, stream: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=CHUNK * 4)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe)
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    return
                if self.output_limit is not None and self.output_bytes + len(data) > self.output_limit:
                    keep = max(0, self.output_limit - self.output_bytes)
                    self.cut_bytes += len(data) - keep
                    data = data[:keep]
                    self.kill("output_limit", f"build wrote more than {self.output_limit} bytes")
                self.output_bytes += len(data)
                self.stream_bytes[stream] += len(data)
                if data:
                    # One log, one sender (send_output): the seq is taken here, in the order the
                    # chunks go out. put() waits while the window is full: the back-pressure.
                    await self.log.put(stream, data)
                if self.end_reason == "output_limit":
                    return
        finally:
            transport.close()

    def kill(self, reason: str, message: str) -> None:
        """SIGKILL to the container's init: the kernel then kills its whole pid namespace."""
        if self.pid is None or self.status is not None:
            return
        if self.end_reason is None:
            self.end_reason, self.end_message = reason, message
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _build_report(self) -> tuple[str, int] | None:
        try:
            os.set_blocking(self.report_r, False)
            text = os.read(self.report_r, 256).decode(errors="replace")
        except (OSError, TypeError):
            return None
        finally:
            with contextlib.suppress(OSError, TypeError):
                os.close(self.report_r)
        return container.parse_report(text)

    async def _report(self) -> None:
        status, ru = self.status
        usage = {
            "wall_s": time.monotonic() - self.started,
            "utime_s": ru.ru_utime,
            "stime_s": ru.ru_stime,
            "maxrss_kb": float(ru.ru_maxrss),
            "output_bytes": float(self.output_bytes),
            "stdout_bytes": float(self.stream_bytes[1]),
            "stderr_bytes": float(self.stream_bytes[2]),
            "output_chunks": float(self.log.next),
            "output_cut_bytes": float(self.cut_bytes),
        }
        if self.undrained:
            usage["output_undrained"] = 1.0
        usage.update(self.timings)
        report = self._build_report()
        if report is not None and report[0] == "exec" and self.end_reason is None:
            argv0 = self.msg["argv"][:1]
            self.set_exit(127, 0, "spawn_failed", f"cannot start {argv0}: {container.exec_error(report[1])}", usage)
            return
        if report is not None and report[0] == "chdir" and self.end_reason is None:
            cwd = self.msg["cwd"] or "/work"
            self.set_exit(127, 0, "spawn_failed", f"cannot enter the build's cwd {cwd}: "
                          f"{container.exec_error(report[1])}", usage)
            return
        if report is not None and report[0] == "status" and self.end_reason is None:
            status = report[1]  # the build's own status, seen by its init (PID 1 of the container)
        if os.WIFSIGNALED(status):
            code, sig = -1, os.WTERMSIG(status)
            reason = self.end_reason or "signaled"
            message = self.end_message or f"killed by {signal.Signals(sig).name}"
        else:
            code, sig = os.WEXITSTATUS(status), 0
            reason = self.end_reason or "exited"
            message = self.end_message or f"exited with code {code}"
        self.set_exit(code, sig, reason, message, usage)

    def set_exit(self, code, sig, reason, message, usage) -> None:
        self.exit_fields = dict(build_id=self.id, code=code, signal=sig, reason=reason, message=message[:4096],
                                usage=usage)
        self.log.changed.set()

    async def send_output(self, channel: Channel, start: int) -> None:
        """Everything from seq `start` on, then new chunks as they come, then the exit: on one
        host connection (a new one starts a new sender from what that box asks for)."""
        seq = max(start, self.log.first)
        exit_sent = False
        with contextlib.suppress(ChannelClosed):
            while True:
                self.log.changed.clear()
                for chunk_seq, stream, data in list(self.log.since(seq)):
                    await channel.send("output", build_id=self.id, stream=stream, seq=chunk_seq, data=data)
                    seq = chunk_seq + 1
                if self.exit_fields is not None and seq >= self.log.next and not exit_sent:
                    await channel.send("exit", **self.exit_fields)
                    exit_sent = True
                if seq < self.log.next:
                    continue
                await self.log.changed.wait()


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit {os.WEXITSTATUS(status)}"


class AdoptRefused(Exception):
    """A box that started again asked for another cell or build than this one."""


class Agent:
    def __init__(self, cell_id: str, template: bool = False, faults: frozenset = frozenset(),
                 premade_on: bool = True, translated: bool = False) -> None:
        self.cell_id = cell_id
        self.template = template  # booted to be snapshotted: becomes a cell only once restored
        self.faults = faults      # hived.fault= on the kernel command line: failures tests inject
        self.premade_on = premade_on  # hived.premade=off: every build starts the ordinary way
        self.translated = translated  # hived.accel=tcg: guest code runs translated (warm_translations)
        self.premade_task: asyncio.Task | None = None  # making the build's container while warm
        self.template_premade: premade.PremadeContainer | None = None  # made before the snapshot point
        self.channel: Channel | None = None
        self.build: Build | None = None
        self.children: dict[int, object] = {}  # pid -> callback(wait status, rusage)
        self.port: Port | None = None
        self.sender: asyncio.Task | None = None  # the build's output sender on the current host link

    def reap(self) -> None:
        """Reap every exited child; orphans re-parented to PID 1 included."""
        while True:
            try:
                pid, status, ru = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            done = self.children.pop(pid, None)
            if done is not None:
                done(status, ru)

    async def crun(self, *args: str, log_name: str = "crun", **popen) -> tuple[int, str]:
        """Run crun to its end (reaped by the SIGCHLD handler); (wait status, its log)."""
        log_path = container.RUN / f"{log_name}.log"
        with contextlib.suppress(FileNotFoundError):
            log_path.unlink()
        proc = subprocess.Popen([CRUN, f"--log=file:{log_path}", "--cgroup-manager=cgroupfs", *args], **popen)
        status, _ = await self.wait_child(proc)
        try:
            text = log_path.read_text(errors="replace").strip()
        except OSError:
            text = ""
        return status, text

    def premake(self) -> None:
        """Make the build's container now that the cell is its own and warm (premade.py); a clone
        takes over the one its template made."""
        if self.premade_task is None and self.build is None:
            made, self.template_premade = self.template_premade, None
            self.premade_task = asyncio.get_running_loop().create_task(self._premake(self.channel, made))

    async def _make_premade(self) -> premade.PremadeContainer:
        """The build's container made now (in a booted cell, or in a template for all its clones);
        `dead` says why it is not there."""
        made = premade.PremadeContainer(self)
        if not self.premade_on:
            made.dead = "turned off (hived.premade=off)"
        else:
            try:
                await made.make()
            except Exception as exc:  # noqa: BLE001 - a build must still start the ordinary way
                made.dead = f"failed: {type(exc).__name__}: {exc}"
        if made.dead:
            log(f"no pre-made build container: {made.dead}")
        elif "premade-dies" in self.faults and made.pid is not None:
            os.kill(made.pid, signal.SIGKILL)  # injected: its init dies while the cell is warm ...
            while made.pid is not None:        # ... and is reaped (PremadeContainer._reaped)
                await asyncio.sleep(0.01)
        return made

    async def _premake(self, channel: Channel, from_template: premade.PremadeContainer | None = None
                       ) -> premade.PremadeContainer:
        if from_template is not None:  # nothing in it is per cell: it shares the cell's hostname
            made = from_template
            if not made.dead and made.pid is None:
                made.dead = "not made in the template"
            if not made.dead and self.translated:
                await self.warm_translations()
        else:
            made = await self._make_premade()
        # Only to the box that had our cell.hello: a box that adopted us meanwhile expects cell.adopted
        # first, and a v4 box takes cells as ready at hello.
        if channel is self.channel and channel.session.version >= 5:
            with contextlib.suppress(ChannelClosed):
                await channel.send("cell.ready", cell_id=self.cell_id, premade=not made.dead,
                                   made_ms=made.made_s * 1000, message=made.dead[:1024])
        return made

    async def warm_translations(self) -> None:
        """Under TCG (hived.accel=tcg), in a clone before cell.ready: run one short process.

        A clone's translation cache starts empty, so the first process a build starts would
        translate fork, exec, the dynamic loader and libc's start-up for it: +70 ms on a
        `true` build (submit -> exit p50 210 ms without this, 140 ms with; 2026-12-01). One
        /bin/true while the cell is idle pays that instead (~0.13 s of idle guest time, where
        making the container in the clone cost ~0.4 s; posix_spawn, not subprocess: fewer code
        paths of the agent's own to translate). KVM runs guest code natively: skipped.
        """
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        try:
            pid = os.posix_spawn("/bin/true", ["true"], {})
        except OSError as exc:
            log(f"warming the clone's translations: {exc}")
            return
        self.children[pid] = lambda status, ru: done.done() or done.set_result(status)
        await done

    async def take_premade(self) -> premade.PremadeContainer | None:
        """The pre-made container for the one build (made first if it is still being made)."""
        task, self.premade_task = self.premade_task, None
        return None if task is None else await task

    async def wait_child(self, proc: subprocess.Popen) -> tuple[int, object]:
        """The wait status of a child just spawned (registered before the loop can reap it)."""
        fut = asyncio.get_running_loop().create_future()

        def done(status: int, ru) -> None:
            proc.returncode = status  # keep Popen from waiting on a reaped pid
            if not fut.done():
                fut.set_result((status, ru))

        self.children[proc.pid] = done
        return await fut

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.port = Port(find_port())
        t_agent = uptime()
        said_hello = said_template = False
        restored = not self.template
        while True:
            channel = self.channel = await self.port.attach(Session("cell", self.cell_id, {"box"}))
            try:
                await channel.handshake()
                if not restored:
                    if not said_template:
                        boot = self.boot_stages(t_agent)
                        # Made here, the build's container is in every clone's memory already:
                        # crun never runs in a clone.
                        self.template_premade = await self._make_premade()
                        try:
                            identity.links_up()
                            identity.freeze_scratch()  # the box copies its disk for each clone
                        except identity.IdentityError as exc:
                            raise RuntimeError(f"template cannot reach its snapshot point: {exc}") from None
                        await channel.send("cell.template", kernel=os.uname().release, boot=boot,
                                           agent_version=__version__)
                        said_template = True
                        # The snapshot point: from here on everything runs once per clone.
                        channel = self.channel = self.port.next_host(Session("cell", "clone", {"box"}))
                        await channel.handshake()
                    boot = await self.become_clone(channel, boot if said_template else {})
                    restored = said_hello = True
                    await channel.send("cell.hello", cell_id=self.cell_id, kernel=os.uname().release,
                                       boot=boot, agent_version=__version__)
                    self.premake()
                elif not said_hello:
                    said_hello = True
                    await channel.send("cell.hello", cell_id=self.cell_id, kernel=os.uname().release,
                                       boot=self.boot_stages(t_agent), agent_version=__version__)
                    self.premake()
                else:
                    await self.adopted(channel, await channel.recv())
                while True:
                    await self.handle(await channel.recv())
            except ChannelClosed as exc:
                log(f"host channel closed ({exc.reason}); waiting up to {ORPHAN_S:g} s for a box daemon")
            except AdoptRefused as exc:
                log(f"refused adoption: {exc}")
            if self.sender is not None:
                self.sender.cancel()
            self.port.drop()
            await asyncio.sleep(HOST_POLL_S)  # the port reports the host gone a moment after EOF
            if not await self.port.wait_host(ORPHAN_S):
                log(f"no box daemon for {ORPHAN_S:g} s; powering off")
                if self.build:
                    self.build.kill("cancelled", "the box daemon went away and did not come back")
                return

    def boot_stages(self, t_agent: float) -> dict:
        boot = {"agent": t_agent, "hello": uptime()}
        for stage in ("init", "modules", "net", "root"):
            value = os.environ.get(f"HIVED_T_{stage.upper()}")
            if value:
                boot[stage] = float(value)
        return boot

    async def become_clone(self, channel: Channel, boot: dict) -> dict:
        """In each clone of a template: become a cell of its own (hived/cell/identity.py).

        Nothing per cell has been touched before this (no scratch disk, network, hostname; the
        build runs later in a container of its own).
        """
        msg = await channel.recv()
        if msg.name != "cell.restore":
            raise RuntimeError(f"a restored clone expects cell.restore first, got {msg.name}")
        t0 = uptime()
        self.cell_id = msg["cell_id"]
        channel.session.name = self.cell_id
        try:
            steps = identity.become(msg)
        except identity.IdentityError as exc:
            raise RuntimeError(f"restored clone {self.cell_id} cannot become a cell: {exc}") from None
        return {**boot, "restore": t0, **steps, "hello": uptime()}

    async def adopted(self, channel: Channel, msg) -> None:
        """A box daemon that started again takes this cell over (`cell.adopt`)."""
        if msg.name != "cell.adopt":
            raise AdoptRefused(f"a cell that had a box expects cell.adopt from the next one, got {msg.name}")
        build = self.build
        if msg["cell_id"] != self.cell_id or msg["build_id"] != (build.id if build else ""):
            await channel.send("error", code="not_found", fatal=True, ref=msg["build_id"],
                               message=f"this is cell {self.cell_id} running build "
                                       f"{build.id if build else '(none)'}, not cell {msg['cell_id']} "
                                       f"running {msg['build_id'] or '(none)'}")
            raise AdoptRefused(f"box asked for cell {msg['cell_id']} build {msg['build_id']!r}")
        state = "warm" if build is None else ("exited" if build.exit_fields is not None else "running")
        await channel.send("cell.adopted", cell_id=self.cell_id, build_id=build.id if build else "", state=state,
                           output_next=build.log.next if build else 0, output_kept=build.log.first if build else 0)
        if build is not None:
            log(f"adopted by a new box daemon: build {build.id} {state}, output again from "
                f"{max(msg['output_from'], build.log.first)} to {build.log.next}")
            build.log.ack(msg["output_from"])
            self.sender = asyncio.get_running_loop().create_task(build.send_output(channel, msg["output_from"]))

    async def handle(self, msg) -> None:
        if msg.name == "run":
            if self.build is not None:
                await self.channel.send("error", code="busy", fatal=False, ref=msg["build_id"],
                                        message="this cell already ran its one build")
                return
            self.build = Build(self, msg)
            loop = asyncio.get_running_loop()
            loop.create_task(self.build.run())
            self.sender = loop.create_task(self.build.send_output(self.channel, 0))
        elif msg.name == "output.ack":
            if self.build and self.build.id == msg["build_id"]:
                self.build.log.ack(msg["seq"])
        elif msg.name == "cancel":
            if self.build and self.build.id == msg["build_id"]:
                self.build.kill("cancelled", f"cancelled: {msg['reason']}")
        elif msg.name == "ping":
            await self.channel.send("pong", seq=msg["seq"])
        elif msg.name == "shutdown":
            log(f"shutdown: {msg['reason']}")
            if self.build:
                self.build.kill("cancelled", "cell shut down")
            power_off()
        elif msg.name == "error":
            log(f"host says {msg['code']}: {msg['message']}")


def main() -> None:
    args = kernel_args()
    cell_id = args.get("hived.cell", "unnamed")
    template = args.get("hived.mode") == "template"
    if not template:  # a clone of a template names itself once restored
        try:
            socket.sethostname(cell_id)
        except OSError:
            pass
    faults = frozenset(filter(None, args.get("hived.fault", "").split(",")))
    agent = Agent(cell_id, template=template, faults=faults, premade_on=args.get("hived.premade") != "off",
                  translated=args.get("hived.accel") == "tcg")
    try:
        asyncio.run(agent.main())
    except Exception as exc:  # PID 1 must not die with a traceback only: say why, then stop
        log(f"fatal: {type(exc).__name__}: {exc}")
    power_off()


if __name__ == "__main__":
    main()
