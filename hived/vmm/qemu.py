"""QEMU `microvm` driver.

The cell's channel: virtio-serial port `hived.0` on a Unix socket the box listens on
(QEMU connects at start, before the guest runs, so nothing is lost and nobody polls);
vhost-vsock where /dev/vhost-vsock exists is the faster path on hosts that have it
(guest CID = a number derived from the cell id; not available on this machine kind).
"""

import asyncio
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

from hived.protocol.channel import Channel
from hived.protocol.session import Session
from hived.vmm.base import CellSpec, VmmDriver, VmmError
from hived.vmm.qmp import Qmp, QmpError

QEMU = "qemu-system-x86_64"
SOCKET_PATH_MAX = 107  # sun_path


def qemu_binary() -> str:
    path = shutil.which(QEMU)
    if path is None:
        raise VmmError(f"{QEMU} not found: install Debian package qemu-system-x86")
    return path


@functools.lru_cache(maxsize=1)
def host_tsc_khz() -> int:
    """The host's TSC rate: under TCG the guest's rdtsc reads the host's TSC.

    Told this, the guest skips calibrating its TSC against the PIT, which fails when
    the host is busy ("Unable to calibrate against PIT") and then hangs the boot in
    timer setup with nothing on the console. Sources, best first: the kernel's own
    calibration in the kernel log, then /proc/cpuinfo (right on VMs and on hosts with
    a constant TSC at nominal speed).
    """
    try:
        log = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=2).stdout
        for pattern in (r"tsc: Refined TSC clocksource calibration: ([0-9.]+) MHz",
                        r"tsc: Detected ([0-9.]+) MHz"):
            found = re.findall(pattern, log)
            if found:
                return int(float(found[-1]) * 1000)
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", f.read(), re.M)
        return int(float(m.group(1)) * 1000) if m else 0
    except OSError:
        return 0


def guest_cmdline(spec: CellSpec) -> str:
    """The guest kernel command line (pure apart from the cached host TSC rate)."""
    # cryptomgr.notests: the kernel's crypto self-tests cost ~0.4 s of every boot.
    args = ["console=ttyS0", "reboot=t", "panic=-1", "quiet", "loglevel=3", "cryptomgr.notests",
            f"hived.mode={spec.mode}", f"hived.cell={spec.cell_id}", "hived.debug=1"]
    if spec.accelerator != "kvm":
        khz = host_tsc_khz()
        # See host_tsc_khz(); tsc=reliable also stops the clocksource watchdog from
        # dropping the TSC when a busy host delays the emulated timers.
        args += ["no_timer_check", "tsc=reliable"] + ([f"tsc_early_khz={khz}"] if khz else [])
    if spec.extra_cmdline:
        args.append(spec.extra_cmdline)
    return " ".join(args)


def build_cmdline(spec: CellSpec, chan: Path, qmp: Path, console: Path, scratch: Path, pidfile: Path):
    """The QEMU argv for a cell (pure: tested without starting anything)."""
    append = guest_cmdline(spec)
    throttle = ""
    if spec.disk_bytes_s:
        throttle += f",throttling.bps-total={spec.disk_bytes_s}"
    if spec.disk_iops:
        throttle += f",throttling.iops-total={spec.disk_iops}"
    argv = [
        qemu_binary(),
        "-name", f"hived-{spec.cell_id},debug-threads=on",
        "-M", "microvm,x-option-roms=off,rtc=on,pit=on,pic=on,isa-serial=on",
        # TCG's translation cache defaults to 1 GiB; 128 MiB keeps the VMM inside its
        # memory limit (guest + overhead) with no measurable slowdown for one build.
        "-accel", "kvm" if spec.accelerator == "kvm" else "tcg,tb-size=128",
        "-cpu", "host" if spec.accelerator == "kvm" else "max",
        "-smp", str(spec.vcpus),
        "-m", f"{spec.memory_mib}M",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", str(spec.kernel),
        "-initrd", str(spec.initrd),
        "-append", append,
        "-chardev", f"file,id=con,path={console}",
        "-serial", "chardev:con",
        # Only the build's own disk is throttled: the read-only root is shared and cached.
        "-drive", f"id=root,file={spec.rootfs},format=raw,if=none,readonly=on",
        "-device", "virtio-blk-device,drive=root",
        "-drive", f"id=scratch,file={scratch},format=raw,if=none,discard=unmap{throttle}",
        "-device", "virtio-blk-device,drive=scratch",
        "-device", "virtio-serial-device,max_ports=2",
        "-chardev", f"socket,id=chan,path={chan}",
        "-device", "virtserialport,chardev=chan,name=hived.0",
        "-qmp", f"unix:{qmp},server=on,wait=off",
        "-pidfile", str(pidfile),
    ]
    return argv


class QemuMicrovm(VmmDriver):
    name = "qemu-microvm"

    def __init__(self) -> None:
        self.spec: CellSpec | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self._listener: socket.socket | None = None
        self.channel: Channel | None = None

    # paths, all named after the cell inside its own directory
    def _p(self, name: str) -> Path:
        return self.spec.cell_dir / name

    async def prepare(self, spec: CellSpec) -> None:
        self.spec = spec
        for need in (spec.kernel, spec.initrd, spec.rootfs):
            if not need.exists():
                raise VmmError(f"cell image file {need} is missing: run `hived image build`")
        chan = self._p("chan.sock")
        if len(str(chan)) > SOCKET_PATH_MAX:
            raise VmmError(f"socket path {chan} is longer than {SOCKET_PATH_MAX} bytes: "
                           "use a shorter state_dir")
        spec.cell_dir.mkdir(parents=True, exist_ok=False)
        await _make_scratch(self._p("scratch.ext4"), spec.scratch_mib)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._listener.bind(str(chan))
        self._listener.listen(1)
        self._listener.setblocking(False)

    async def launch(self) -> int:
        spec = self.spec
        argv = build_cmdline(spec, self._p("chan.sock"), self._p("qmp.sock"),
                             self._p("console.log"), self._p("scratch.ext4"), self._p("qemu.pid"))
        procs = [str(p) for p in spec.cgroup_procs]

        def enter_cgroup() -> None:
            # Runs in the child between fork and exec: the VMM is in its cgroup before
            # it runs any guest code.
            for path in procs:
                with open(path, "w") as f:
                    f.write("0")

        try:
            with open(self._p("qemu.stderr"), "wb") as stderr:
                self.proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                    stderr=stderr, preexec_fn=enter_cgroup if procs else None,
                    start_new_session=True,
                )
        except OSError as exc:
            raise VmmError(f"cannot start {argv[0]}: {exc}") from None
        return self.proc.pid

    async def accept(self, timeout: float) -> Channel:
        loop = asyncio.get_running_loop()
        exited = loop.create_task(self.proc.wait())
        accepted = loop.create_task(loop.sock_accept(self._listener))
        hello = None
        try:
            done, _ = await asyncio.wait({exited, accepted}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if accepted not in done:
                raise VmmError(self._why_no_hello("QEMU never connected the cell channel", exited))
            conn, _ = accepted.result()
            session = Session("box", "box", {"cell"})
            _, channel = await loop.create_unix_connection(
                lambda: Channel(session, hello_timeout=None, queue_max=32), sock=conn)
            self.channel = channel
            hello = loop.create_task(channel.handshake())
            done, _ = await asyncio.wait({exited, hello}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if hello not in done:
                raise VmmError(self._why_no_hello("the guest never said hello", exited, timeout))
            hello.result()
            return channel
        finally:
            for task in (exited, accepted, hello):
                if task is not None and not task.done():
                    task.cancel()
            self._listener.close()

    def _why_no_hello(self, what: str, exited, timeout: float | None = None) -> str:
        if exited.done():
            detail = f"QEMU exited with status {exited.result()}"
            err = _tail(self._p("qemu.stderr"), 5)
            if err:
                detail += f"; QEMU said: {err}"
        else:
            detail = f"no hello within {timeout:g} s" if timeout else "timed out"
        console = self.console_tail(8)
        return f"{what} ({detail}); console: {console or '(empty)'}"

    async def pin_vcpus(self, cores: tuple[int, ...]) -> dict[int, int]:
        """vCPU thread ids come from QMP (query-cpus-fast); each is pinned to one core."""
        if not cores:
            return {}
        path = self._p("qmp.sock")
        deadline = asyncio.get_running_loop().time() + 5
        while not path.exists():  # QEMU makes the socket while it starts
            if self.proc.returncode is not None or asyncio.get_running_loop().time() > deadline:
                raise VmmError(f"QMP socket {path} did not appear: {_tail(self._p('qemu.stderr'), 3)}")
            await asyncio.sleep(0.005)
        try:
            qmp = await Qmp.connect(str(path))
            try:
                cpus = await qmp.execute("query-cpus-fast")
            finally:
                qmp.close()
        except (QmpError, OSError, ValueError, TimeoutError) as exc:
            raise VmmError(f"cannot read vCPU threads over QMP ({path}): {exc}") from None
        threads = {}
        for cpu in cpus:
            index, tid = cpu["cpu-index"], cpu["thread-id"]
            os.sched_setaffinity(tid, {cores[index % len(cores)]})
            threads[index] = tid
        return threads

    async def wait_exit(self) -> int:
        return await self.proc.wait()

    async def destroy(self) -> None:
        if self.channel is not None:
            self.channel.close("cell destroyed")
        if self._listener is not None:
            self._listener.close()
        if self.proc is not None and self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await self.proc.wait()
        if self.spec is not None:
            shutil.rmtree(self.spec.cell_dir, ignore_errors=True)

    def console_tail(self, lines: int = 20) -> str:
        if self.spec is None:
            return ""
        return _tail(self._p("console.log"), lines)


def _tail(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip())


async def _make_scratch(path: Path, size_mib: int) -> None:
    """A sparse ext4 scratch disk owned by the build user (uid 1000) at its root."""
    with open(path, "wb") as f:
        f.truncate(size_mib << 20)
    proc = await asyncio.create_subprocess_exec(
        "mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal",
        "-E", "root_owner=1000:1000,lazy_itable_init=1,nodiscard", str(path),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise VmmError(f"mke2fs for scratch disk {path} failed: {err.decode().strip()} "
                       "(is the disk full? is e2fsprogs installed?)")
