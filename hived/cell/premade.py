"""A build container made while the cell is warm, so a build only has to be handed to it.

Guest side (stdlib only). Under TCG `crun create` + `crun start` cost most of a warm
start (~300 ms on a booted cell, most of a second on a fresh clone whose translation
cache is empty). Nothing of that depends on the build except its command, environment,
cwd and checkout, so once the cell is warm (a template: before its snapshot point, so every
clone has it in memory already and crun never runs in a clone) the agent makes the container
with everything else — root overlay (image or cell root) + home, /proc, /dev, /sys, /tmp,
namespaces (the cell's network and hostname are shared: nothing in it is per cell), cgroup,
uid 1000, no capabilities, no_new_privs — and starts it (`crun run --detach`,
one crun process for create + start): its init (hived-buildinit with no program) blocks
reading fd 4. At `run` the agent mounts the
checkout into the container's mount namespace at the build's cwd (container.mount_into),
writes the build (cwd, argv, env) on fd 4 and closes it; the init enters the cwd and runs
the build as its child with exactly that argv and environment, as it would have with crun
given them (its PATH is the build's own).

A cell runs one build, so a pre-made container serves one build only and nothing of
another build can be in it. What it cannot carry is refused (`fits`) and the build falls
back to an ordinary start, as it does when the pre-made container went bad (its init
died, its make or the checkout mount failed): the pre-made one is killed and deleted
first and never seen by the build.
"""

import asyncio
import contextlib
import os
import signal
import subprocess
import time

from hived.cell import container

ID = "premade"
PREMADE_ENV = {"PATH": "/usr/bin:/bin"}  # the waiting init's own; the build's replaces it


class PremadeContainer:
    """One container made ahead for the cell's one build; `agent` runs crun and reaps."""

    def __init__(self, agent) -> None:
        self.agent = agent
        self.pid: int | None = None  # its init, our child once crun run --detach exited
        self.image_fs = ""
        self.stdout_r = self.stderr_r = self.report_r = self.command_w = None
        self.dead = ""       # why it cannot be used any more ("" while it waits)
        self.made_s = 0.0    # how long making it took
        self.on_exit = None  # the build's reaper, once a build took it over
        self.created = False  # crun ran: it may have state to delete

    async def make(self) -> None:
        """Create and start it; on failure it is `dead` with the reason (the build falls back)."""
        t0 = time.monotonic()
        fds = []
        try:
            self.image_fs = container.image_fs_type()
            paths = container.prepare_root(self.image_fs, "pre")
            config = container.bundle_config([], PREMADE_ENV, "/", {}, paths, cgroup=f"/hived/{ID}")
            bundle = container.write_bundle(config, "pre.bundle")
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            rep_r, rep_w = os.pipe2(os.O_CLOEXEC)
            cmd_r, cmd_w = os.pipe2(os.O_CLOEXEC)
            fds = [out_w, err_w, rep_w, cmd_r]
            self.stdout_r, self.stderr_r, self.report_r, self.command_w = out_r, err_r, rep_r, cmd_w
        except (container.ContainerError, OSError) as exc:
            self.dead = f"cannot set it up: {exc}"
            return
        pidfile = container.RUN / f"{ID}.pid"

        def fds_3_and_4() -> None:  # in the child: crun --preserve-fds 2 hands fds 3 and 4 to the init
            os.dup2(rep_w, 3)  # dup2 clears close-on-exec; every other fd of the agent has it set
            os.dup2(cmd_r, 4)

        self.created = True
        try:  # create + start in one crun process (`run --detach`): one exec of crun less under TCG
            status, err = await self.agent.crun(
                "run", "--detach", "--bundle", str(bundle), "--pid-file", str(pidfile), "--preserve-fds", "2", ID,
                log_name=ID, stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w, preexec_fn=fds_3_and_4,
                close_fds=False)
        finally:
            for fd in fds:
                os.close(fd)
        if status != 0:
            self.dead = f"crun run failed ({_describe(status)}): {err or 'no message'}"
            return
        try:
            self.pid = int(pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError) as exc:
            self.dead = f"no pid file from crun run: {exc}"
            return
        self.agent.children[self.pid] = self._reaped
        self.made_s = time.monotonic() - t0

    def _reaped(self, status: int, ru) -> None:
        if self.pid is not None and self.on_exit is not None:
            self.on_exit(status, ru)  # it runs the build: its end is the build's
            return
        self.dead = self.dead or f"its init ended before any build (wait status {status})"
        self.pid = None

    def fits(self, msg, cwd: str) -> str:
        """"" when this container can run the build `msg` exactly as an ordinary start would;
        otherwise why not."""
        if self.dead:
            return self.dead
        if self.pid is None:
            return "not made"
        if _exited(self.pid):
            return "its init ended before any build"
        if (msg.get("image_fs") or "") != self.image_fs:
            return f"made on image filesystem {self.image_fs or 'none'!r}, the build names {msg.get('image_fs')!r}"
        if any(key in container.RLIMITS for key in msg["limits"]):
            return "the build sets rlimits, which a container takes at create"
        if not cwd.startswith("/"):
            return f"cwd {cwd!r} is not absolute"
        return ""

    async def hand_over(self, msg, cwd: str, env: dict[str, str]) -> None:
        """Give it the build: the checkout at cwd, then cwd, argv and env on fd 4. Raises
        ContainerError (the build then falls back)."""
        spec = container.command_spec(msg["argv"], env, cwd)
        if msg.get("source_fs"):
            src = container.prepare_source(msg["source_fs"])
            container.mount_into(self.pid, src, cwd)
        fd, self.command_w = self.command_w, None
        try:
            await _write_all(fd, spec)
        except OSError as exc:
            raise container.ContainerError(f"cannot hand the build to the pre-made container: {exc}") from None
        finally:
            os.close(fd)

    def take_pipes(self) -> tuple[int, int, int]:
        """(stdout, stderr, report) read ends, now the build's."""
        fds = self.stdout_r, self.stderr_r, self.report_r
        self.stdout_r = self.stderr_r = self.report_r = None
        return fds

    async def discard(self) -> None:
        """Kill and delete it before an ordinary start: nothing of it may outlive into the build."""
        self.dead = self.dead or "discarded"
        pid, self.pid = self.pid, None
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # its pid namespace dies with it
        for fd in (self.stdout_r, self.stderr_r, self.report_r, self.command_w):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.stdout_r = self.stderr_r = self.report_r = self.command_w = None
        if not self.created:
            return
        await self.agent.crun("delete", "--force", ID, log_name=ID, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def _write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to a pipe without blocking the agent's loop (the reader may be slow)."""
    os.set_blocking(fd, False)
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            ready = loop.create_future()
            loop.add_writer(fd, ready.set_result, None)
            try:
                await ready
            finally:
                loop.remove_writer(fd)


def _describe(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    return f"killed by signal {-code}" if code < 0 else f"exit {code}"


def _exited(pid: int) -> bool:
    """The process is gone or a zombie not reaped yet (its SIGCHLD still on the way)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except (OSError, IndexError):
        return True
