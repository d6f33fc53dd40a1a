"""The cell daemon: PID 1 of the guest once the initramfs hands over.

It opens the host channel (virtio-serial port `hived.0`; vsock where the VMM offers
it), says hello, announces itself with `cell.hello` (the host never polls a guest that
is not listening yet), then runs exactly one build: in a crun container (see
container.py) as the unprivileged `build` user, stream stdout/stderr as bounded
`output` chunks with back-pressure, report `exit` with usage, honour `cancel` and
`shutdown`. When the host goes away, the build is killed and the guest powers off: a cell never outlives its box daemon.

Being PID 1, it reaps every child (orphans included) from one SIGCHLD handler, so
it must not use asyncio's child watchers.
"""

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time

from hived import __version__
from hived.cell import container, identity
from hived.protocol.channel import Channel, ChannelClosed
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

    def is_closing(self) -> bool:
        return self._rt.is_closing()


class _ReadSide(asyncio.Protocol):
    """Bytes that arrive before the channel has its transport wait here (the read pipe
    starts reading before the write side exists, and pause_reading() does not stop that
    on every 3.11 release)."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.early: list[bytes] | None = []
        self.silent_until_spoken_to = None  # the transport of a channel that speaks once its peer has

    def attached(self) -> None:
        early, self.early = self.early, None
        for data in early:
            self.channel.data_received(data)

    def data_received(self, data: bytes) -> None:
        if self.silent_until_spoken_to is not None:
            transport, self.silent_until_spoken_to = self.silent_until_spoken_to, None
            self.channel.connection_made(transport)  # our hello, to the host that spoke first
        if self.early is not None:
            self.early.append(data)
        else:
            self.channel.data_received(data)

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        self.channel.connection_lost(exc)


class _WriteSide(asyncio.BaseProtocol):
    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def pause_writing(self) -> None:
        self.channel.pause_writing()

    def resume_writing(self) -> None:
        self.channel.resume_writing()

    def connection_lost(self, exc) -> None:
        self.channel.connection_lost(exc)


class PortLink:
    """The virtio-serial port and the channel that speaks on it (replaced in a restored clone)."""

    def __init__(self, transport: PipePairTransport, reader: _ReadSide, writer: _WriteSide) -> None:
        self.transport, self.reader, self.writer = transport, reader, writer

    def for_next_host(self, session: Session) -> Channel:
        """A fresh channel on the same open port, silent until a host says hello.

        The snapshot point of a template: the box that made the template is gone once a
        clone runs, and the clone's box is a new peer on a new host socket (the port itself
        stays open: QEMU connects the clone's socket before restoring, so the guest never
        sees the port close). Speaking only when spoken to means the template's box never
        gets this hello, and every clone's box does.
        """
        channel = Channel(session, hello_timeout=None, queue_max=64)
        self.reader.channel = self.writer.channel = channel
        self.reader.silent_until_spoken_to = self.transport
        return channel


async def open_port_channel(path: str, session: Session) -> tuple[Channel, PortLink]:
    loop = asyncio.get_running_loop()
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    channel = Channel(session, hello_timeout=30.0, queue_max=64)
    rt, reader = await loop.connect_read_pipe(lambda: _ReadSide(channel), os.fdopen(fd, "rb", 0))
    wfd = os.dup(fd)
    wt, writer = await loop.connect_write_pipe(lambda: _WriteSide(channel), os.fdopen(wfd, "wb", 0))
    transport = PipePairTransport(rt, wt)
    channel.connection_made(transport)
    reader.attached()
    return channel, PortLink(transport, reader, writer)


class Build:
    """The cell's one build: a crun container, its two output streams, and its end."""

    def __init__(self, agent: "Agent", msg) -> None:
        self.agent = agent
        self.id = msg["build_id"]
        self.msg = msg
        self.pid: int | None = None  # the container's init (hived-buildinit), our child once crun exits
        self.status: tuple[int, object] | None = None
        self.reaped = asyncio.Event()
        self.seq = 0
        self.send_lock = asyncio.Lock()  # output frames leave in the order of their seq
        self.output_bytes = 0
        self.stream_bytes = {1: 0, 2: 0}
        self.cut_bytes = 0      # read but not sent: over the output limit
        self.undrained = False  # the pipes were still open long after the build ended
        self.output_limit = int(msg["limits"].get("output_bytes", 0)) or None
        self.end_reason: str | None = None  # timeout / cancelled / output_limit
        self.end_message = ""
        self.started = 0.0
        self.report_r: int | None = None  # hived-buildinit's fd 3, read end

    def _env(self) -> dict[str, str]:
        env = dict(DEFAULT_ENV)
        for item in self.msg.get("image_env") or []:
            key, sep, value = item.partition("=")
            if sep and key:
                env[key] = value
        env.update(self.msg["env"])
        return env

    async def _crun(self, *args: str, **popen) -> tuple[int, str]:
        """Run crun to its end (reaped by the agent's SIGCHLD handler); (wait status, its log)."""
        log_path = container.RUN / "crun.log"
        with contextlib.suppress(FileNotFoundError):
            log_path.unlink()
        proc = subprocess.Popen([CRUN, f"--log=file:{log_path}", "--cgroup-manager=cgroupfs", *args], **popen)
        status, _ = await self.agent.wait_child(proc)
        try:
            text = log_path.read_text(errors="replace").strip()
        except OSError:
            text = ""
        return status, text

    async def _spawn(self) -> str | None:
        """Set up and start the container; None, or why it could not start."""
        msg = self.msg
        cwd = msg["cwd"] or "/work"
        try:
            paths = container.prepare_filesystems(msg.get("image_fs") or "", msg.get("source_fs") or "")
            config = container.bundle_config(msg["argv"], self._env(), cwd, msg["limits"], paths,
                                             cgroup=f"/hived/{self.id}", hostname=self.agent.cell_id)
            bundle = container.write_bundle(config)
        except (container.ContainerError, OSError) as exc:
            return f"cannot set up the build container: {exc}"
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        self.report_r = report_r
        pidfile = container.RUN / "container.pid"

        def report_fd_3() -> None:  # in the child: crun --preserve-fds 1 hands fd 3 to the container
            os.dup2(report_w, 3)  # dup2 clears close-on-exec; every other fd of the agent has it set

        try:
            status, err = await self._crun(
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
        status, err = await self._crun("start", self.id, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if status != 0:
            self.kill("spawn_failed", f"crun start failed ({_describe(status)}): {err or 'no message'}")
        return None

    def _reaped(self, status: int, ru) -> None:
        self.status = (status, ru)
        self.reaped.set()

    async def run(self) -> None:
        msg = self.msg
        self.started = time.monotonic()
        stdout_r, self.stdout_w = os.pipe2(os.O_CLOEXEC)
        stderr_r, self.stderr_w = os.pipe2(os.O_CLOEXEC)
        stdout, stderr = os.fdopen(stdout_r, "rb", 0), os.fdopen(stderr_r, "rb", 0)
        why = await self._spawn()
        if why is not None:
            stdout.close()
            stderr.close()
            await self.agent.send_exit(self.id, 127, 0, "spawn_failed", why, {})
            return
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
                    # One sender at a time, and the seq taken when the frame is written: two
                    # streams waiting for the host must not overtake each other. send() waits
                    # while the host is not reading: that is the back-pressure.
                    async with self.send_lock:
                        seq, self.seq = self.seq, self.seq + 1
                        await self.agent.channel.send("output", build_id=self.id, stream=stream,
                                                      seq=seq, data=data)
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
            "output_chunks": float(self.seq),
            "output_cut_bytes": float(self.cut_bytes),
        }
        if self.undrained:
            usage["output_undrained"] = 1.0
        report = self._build_report()
        if report is not None and report[0] == "exec" and self.end_reason is None:
            argv0 = self.msg["argv"][:1]
            await self.agent.send_exit(self.id, 127, 0, "spawn_failed",
                                       f"cannot start {argv0}: {container.exec_error(report[1])}", usage)
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
        await self.agent.send_exit(self.id, code, sig, reason, message, usage)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit {os.WEXITSTATUS(status)}"


class Agent:
    def __init__(self, cell_id: str, template: bool = False) -> None:
        self.cell_id = cell_id
        self.template = template  # booted to be snapshotted: becomes a cell only once restored
        self.channel: Channel | None = None
        self.build: Build | None = None
        self.children: dict[int, object] = {}  # pid -> callback(wait status, rusage)

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

    async def wait_child(self, proc: subprocess.Popen) -> tuple[int, object]:
        """The wait status of a child just spawned (registered before the loop can reap it)."""
        fut = asyncio.get_running_loop().create_future()

        def done(status: int, ru) -> None:
            proc.returncode = status  # keep Popen from waiting on a reaped pid
            if not fut.done():
                fut.set_result((status, ru))

        self.children[proc.pid] = done
        return await fut

    async def send_exit(self, build_id, code, sig, reason, message, usage) -> None:
        await self.channel.send("exit", build_id=build_id, code=code, signal=sig, reason=reason,
                                message=message[:4096], usage=usage)

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGCHLD, self.reap)
        port = find_port()
        session = Session("cell", self.cell_id, {"box"})
        self.channel, link = await open_port_channel(port, session)
        t_agent = uptime()
        await self.channel.handshake()
        boot = {"agent": t_agent, "hello": uptime()}
        for stage in ("init", "modules", "net", "root"):
            value = os.environ.get(f"HIVED_T_{stage.upper()}")
            if value:
                boot[stage] = float(value)
        if self.template:
            boot = await self.wait_for_restore(link, boot)
        await self.channel.send("cell.hello", cell_id=self.cell_id, kernel=os.uname().release,
                                boot=boot, agent_version=__version__)
        try:
            while True:
                msg = await self.channel.recv()
                await self.handle(msg)
        except ChannelClosed as exc:
            log(f"host channel closed ({exc.reason}); powering off")
            if self.build:
                self.build.kill("cancelled", "host went away")

    async def wait_for_restore(self, link: PortLink, boot: dict) -> dict:
        """The snapshot point, then (in each clone) becoming a cell of its own.

        The box pauses the VM once it has `cell.template`: from here on everything runs
        once per clone. Nothing per cell has been touched yet (no scratch disk, network,
        hostname; the build runs later in a container of its own).
        """
        await self.channel.send("cell.template", kernel=os.uname().release, boot=boot,
                                agent_version=__version__)
        self.channel = link.for_next_host(Session("cell", "clone", {"box"}))
        await self.channel.handshake()
        msg = await self.channel.recv()
        if msg.name != "cell.restore":
            raise RuntimeError(f"a restored clone expects cell.restore first, got {msg.name}")
        t0 = uptime()
        self.cell_id = msg["cell_id"]
        self.channel.session.name = self.cell_id
        try:
            steps = identity.become(msg)
        except identity.IdentityError as exc:
            raise RuntimeError(f"restored clone {self.cell_id} cannot become a cell: {exc}") from None
        return {"restore": t0, **steps, "hello": uptime()}

    async def handle(self, msg) -> None:
        if msg.name == "run":
            if self.build is not None:
                await self.channel.send("error", code="busy", fatal=False, ref=msg["build_id"],
                                        message="this cell already ran its one build")
                return
            self.build = Build(self, msg)
            asyncio.get_running_loop().create_task(self.build.run())
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
    agent = Agent(cell_id, template=template)
    try:
        asyncio.run(agent.main())
    except Exception as exc:  # PID 1 must not die with a traceback only: say why, then stop
        log(f"fatal: {type(exc).__name__}: {exc}")
    power_off()


if __name__ == "__main__":
    main()
