"""QEMU `microvm` driver.

The cell's channel: virtio-serial port `hived.0` on a Unix socket QEMU serves in the cell's
directory (`server=on,wait=off`). The box connects to it, and a box daemon that starts again
connects to the same socket: the cell outlives the daemon (protocol v4: the resync marker,
`cell.adopt`). The guest's writes block while no box is connected, so nothing is lost before
the first connection either. vhost-vsock where /dev/vhost-vsock exists is the faster path on
hosts that have it (guest CID = a number derived from the cell id; not on this machine kind).
"""

import asyncio
import contextlib
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

from hived import fsutil
from hived.protocol.channel import Channel, ResyncChannel
from hived.protocol.session import Session
from hived.vmm.base import CellSpec, VmmDriver, VmmError
from hived.vmm.qmp import Qmp, QmpBlocking, QmpError

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
        args.append("hived.accel=tcg")  # the agent warms a clone's translations (warm_translations)
    if spec.net_cmdline:
        args.append(spec.net_cmdline)
    if spec.extra_cmdline:
        args.append(spec.extra_cmdline)
    return " ".join(args)


IMAGE_FDSET = 1  # -add-fd set holding the build image's file descriptor


def build_cmdline(spec: CellSpec, chan: Path, qmp: Path, console: Path, scratch: Path, pidfile: Path,
                  image_fd: int = -1, source: Path | None = None):
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
        *_memory_args(spec),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        # A clone's guest booted long ago, in its template, and never boots again (-no-reboot):
        # without -kernel and -initrd its QEMU neither reads them nor keeps them in memory for
        # fw_cfg (13.5 MiB of each idle clone's Pss). The device state does not include them.
        *([] if spec.restore else ["-kernel", str(spec.kernel), "-initrd", str(spec.initrd), "-append", append]),
        "-chardev", f"file,id=con,path={console}",
        "-serial", "chardev:con",
        # Only the build's own disk is throttled: the read-only root is shared and cached.
        "-drive", f"id=root,file={spec.rootfs},format=raw,if=none,readonly=on",
        "-device", "virtio-blk-device,drive=root",
        "-drive", f"id=scratch,file={scratch},format=raw,if=none,discard=unmap{throttle}",
        "-device", "virtio-blk-device,drive=scratch,serial=hived-scratch",
        "-device", "virtio-serial-device,max_ports=2",
        # QEMU serves the channel and takes the next box after one goes (server=on): the cell
        # outlives its daemon. wait=off: QEMU does not wait for a box before it runs the guest.
        "-chardev", f"socket,id=chan,path={chan},server=on,wait=off",
        "-device", "virtserialport,chardev=chan,name=hived.0",
        "-qmp", f"unix:{qmp},server=on,wait=off",
        "-pidfile", str(pidfile),
        "-sandbox", SANDBOX,
    ]
    if image_fd >= 0:
        # The box opened the cached image (it may live where the jailed VMM cannot look) and
        # holds a lease on it; QEMU gets the open file, read-only, through an fd set.
        argv += ["-add-fd", f"fd={image_fd},set={IMAGE_FDSET},opaque=hived-image",
                 "-drive", f"id=image,file=/dev/fdset/{IMAGE_FDSET},format=raw,if=none,readonly=on",
                 "-device", "virtio-blk-device,drive=image,serial=hived-image"]
    if source is not None:
        # Filled by the box at assignment (no hotplug on microvm); read-only to the guest.
        argv += ["-drive", f"id=source,file={source},format=raw,if=none,readonly=on",
                 "-device", "virtio-blk-device,drive=source,serial=hived-source"]
    if spec.restore:
        # Wait for the template's device state (restore()): capabilities must be set first.
        argv += ["-incoming", "defer"]
    if spec.tap_fd >= 0:
        # vhost needs /dev/vhost-net inside the jail: off until measured worth it.
        argv += ["-netdev", f"tap,id=n0,fd={spec.tap_fd},vhost=off",
                 "-device", f"virtio-net-device,netdev=n0,mac={spec.mac}"]
    return argv


def memory_path(spec: CellSpec) -> str:
    """Where QEMU finds the memfd holding the guest's RAM: by its fd number, through /proc.

    QEMU 7.2 opens a memory-backend-file path with O_RDWR even for a private mapping, so a
    clone must be able to open the template's memory for writing: a sealed memfd is the one
    kind of file that allows that and still refuses every write (F_SEAL_WRITE) while a
    private copy-on-write mapping works. The jail shows QEMU its own /proc/PID/fd as /fds.
    """
    return f"/fds/{spec.memory_fd}" if spec.vmm_uid else f"/proc/self/fd/{spec.memory_fd}"


def _memory_args(spec: CellSpec) -> list[str]:
    if spec.memory_fd < 0:
        return []
    share = "on" if spec.memory_shared else "off"
    return ["-object", f"memory-backend-file,id=mem,size={spec.memory_mib}M,share={share},"
            f"mem-path={memory_path(spec)}", "-machine", "memory-backend=mem"]


# QEMU's own seccomp filter: no obsolete syscalls, no privilege changes, no spawning
# processes, no resource control (the box pins threads from outside).
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"

# Runs as root inside a fresh mount namespace (util-linux `unshare --mount`), already in the
# cell's network namespace (`nsenter --net`, or `unshare --net` for a fresh one): joins the
# cell's cgroups, builds a root holding only what QEMU needs plus this cell's own files, enters
# it, drops to the cell's uid with no capabilities and no_new_privs, and becomes QEMU. The
# namespace dies with QEMU, so nothing here needs cleaning up on the host. Each command here
# is a process start (~1 ms, more on a busy host), so files are made by shell redirection, the
# symlinks by one `ln` and the device nodes by one `cp -a` (nodes on the jail's tmpfs, with the
# host's numbers, owners and modes; not a bind mount each); `unshare --propagation private`
# already made every mount private, and `mount --rbind -o ro` remounts read-only itself.
#   $1 jail  $2 cell dir  $3 image dir  $4 uid  $5 extra group or ""  $6 "fds" or ""
#   $7 cgroup files to write this pid to (space-separated) or ""  $8... QEMU argv
# With "fds", QEMU sees its own open files as /fds/N (the guest RAM of templates and clones is
# a memfd, which has no other path): this shell's pid is QEMU's, since each step execs the next.
JAIL_SCRIPT = r"""
set -eu
jail=$1 cell=$2 image=$3 uid=$4 group=$5 fds=$6 procs=$7; shift 7
for p in $procs; do echo $$ > "$p"; done
mount -t tmpfs -o size=1m,mode=0755,nosuid hvjail "$jail"
mkdir -p "$jail/usr" "$jail/etc" "$jail/dev" "$jail/tmp" "$jail$cell" "$jail$image" ${fds:+"$jail/fds"}
mount --rbind -o ro /usr "$jail/usr"
links=
for l in lib lib64 bin sbin; do
    if [ -L "/$l" ]; then links="$links usr/$l"; fi
done
if [ -n "$links" ]; then ln -s $links "$jail/"; fi
if [ -e /etc/ld.so.cache ]; then
    : > "$jail/etc/ld.so.cache"; mount --bind -o ro /etc/ld.so.cache "$jail/etc/ld.so.cache"
fi
devs=
for d in null zero urandom random kvm; do
    if [ -e "/dev/$d" ]; then devs="$devs /dev/$d"; fi
done
cp -a $devs "$jail/dev/"
mount --bind "$cell" "$jail$cell"
mount --bind -o ro "$image" "$jail$image"
if [ -n "$fds" ]; then mount --bind "/proc/$$/fd" "$jail/fds"; fi
groups=--clear-groups
if [ -n "$group" ]; then groups="--groups=$group"; fi
drop="--reuid=$uid --regid=$uid $groups --inh-caps=-all --bounding-set=-all --no-new-privs"
exec chroot "$jail" /usr/bin/setpriv $drop -- "$@"
"""


def confine(spec: CellSpec, argv: list[str], jail: Path) -> list[str]:
    """Wrap a QEMU argv so it runs jailed as the cell's uid, in the cell's network namespace and
    cgroups (see JAIL_SCRIPT). Nothing runs between fork and exec, so the box starts it with
    vfork: no copy of the box's page tables, no Python in the child (~20 ms less per start)."""
    group = ""
    if spec.accelerator == "kvm" and os.path.exists("/dev/kvm"):
        group = str(os.stat("/dev/kvm").st_gid)
    image_dirs = {spec.kernel.parent, spec.initrd.parent, spec.rootfs.parent}
    if len(image_dirs) != 1:
        raise VmmError(f"a confined cell needs kernel, initrd and root in one directory, got {image_dirs}")
    tools = {name: shutil.which(name) for name in ("unshare", "nsenter")}
    missing = [name for name, path in tools.items() if path is None]
    if missing:
        raise VmmError(f"{' and '.join(missing)} not found: install Debian package util-linux")
    procs = " ".join(str(p) for p in spec.cgroup_procs)
    if any(c.isspace() for p in spec.cgroup_procs for c in str(p)):
        raise VmmError(f"cgroup paths with white space are not supported: {procs!r}")
    # The cell's namespace joined by path (nsenter opens it), or a fresh, empty one (unshare).
    net = [tools["nsenter"], f"--net={spec.netns}", "--", tools["unshare"]] if spec.netns \
        else [tools["unshare"], "--net"]
    return [*net, "--mount", "--propagation", "private", "--", "/bin/sh", "-c", JAIL_SCRIPT, "hived-jail",
            str(jail), str(spec.cell_dir), str(image_dirs.pop()), str(spec.vmm_uid), group,
            "fds" if spec.memory_fd >= 0 else "", procs, *argv]


def network_namespace_step(netns: str):
    """The step that puts a VMM into its network namespace between fork and exec.

    `netns` is the cell's namespace (/run/netns/NAME): the VMM joins it (setns), so it sees
    only the cell's tap, veth and routes. "": the VMM gets a fresh namespace of its own
    (unshare), holding only a loopback that is down, which dies with it. Either way a VMM
    escape does not land on the host's network (Firecracker's jailer --netns). Unix sockets
    (QMP, the cell channel) are reached by path, which no network namespace changes.

    Returns (step, fd): the parent closes `fd` (-1: none) once the child is started.
    """
    try:
        from hived import _sys
    except ImportError:
        raise VmmError("native module hived._sys is not compiled: run `pip install -e .` "
                       "(each VMM enters its network namespace through it)") from None
    lib, ffi = _sys.lib, _sys.ffi
    if not netns:
        def fresh() -> None:
            # safe: runs in the forked child only, before exec; it moves no other process
            if lib.unshare(lib.CLONE_NEWNET) < 0:
                raise OSError(ffi.errno, f"unshare(CLONE_NEWNET): {os.strerror(ffi.errno)}")
        return fresh, -1
    try:
        # O_CLOEXEC: the namespace is joined before exec, so QEMU never holds this fd
        fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise VmmError(f"cell network namespace {netns} cannot be opened: {exc.strerror}") from None

    def join() -> None:
        # safe: runs in the forked child only, before exec; CLONE_NEWNET makes the kernel
        # refuse an fd that is not a network namespace
        if lib.setns(fd, lib.CLONE_NEWNET) < 0:
            raise OSError(ffi.errno, f"setns into {netns}: {os.strerror(ffi.errno)}")
    return join, fd


class QemuMicrovm(VmmDriver):
    name = "qemu-microvm"

    def __init__(self) -> None:
        self.spec: CellSpec | None = None
        self.cell_dir: Path | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.pid = 0
        self.pidfd = -1       # an adopted VMM (not our child): watched and killed through a pidfd
        self._gone: asyncio.Future | None = None  # resolved when the adopted VMM exits
        self.channel: Channel | None = None

    # paths, all named after the cell inside its own directory
    def _p(self, name: str) -> Path:
        return self.cell_dir / name

    async def prepare(self, spec: CellSpec) -> None:
        self.spec = spec
        self.cell_dir = spec.cell_dir
        for need in (spec.kernel, spec.initrd, spec.rootfs):
            if not need.exists():
                raise VmmError(f"cell image file {need} is missing: run `hived image build`")
        chan = self._p("chan.sock")
        if len(str(chan)) > SOCKET_PATH_MAX:
            raise VmmError(f"socket path {chan} is longer than {SOCKET_PATH_MAX} bytes: "
                           "use a shorter state_dir")
        spec.cell_dir.mkdir(parents=True, exist_ok=False)
        if spec.scratch_image_fd >= 0:
            _copy_scratch(spec.scratch_image_fd, self._p("scratch.ext4"), spec.scratch_mib)
        else:
            await _make_scratch(self._p("scratch.ext4"), spec.scratch_mib)
        if spec.source_slot_mib:
            with open(self._p("source.img"), "wb") as f:
                f.truncate(spec.source_slot_mib << 20)  # sparse: costs nothing until filled
        if spec.vmm_uid:
            # The confined VMM owns its cell's files and nothing else.
            (spec.cell_dir / "jail").mkdir()
            for path in (spec.cell_dir, self._p("scratch.ext4")):
                os.chown(path, spec.vmm_uid, spec.vmm_uid)
            if spec.source_slot_mib:
                os.chmod(self._p("source.img"), 0o644)  # root writes it, the VMM only reads
            os.chmod(spec.cell_dir, 0o700)

    async def launch(self) -> int:
        spec = self.spec
        image_fd = -1
        if spec.image_file is not None:
            try:
                image_fd = os.open(spec.image_file, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise VmmError(f"cannot open build image {spec.image_file}: {exc.strerror}") from None
        source = self._p("source.img") if spec.source_slot_mib else None
        argv = build_cmdline(spec, self._p("chan.sock"), self._p("qmp.sock"),
                             self._p("console.log"), self._p("scratch.ext4"), self._p("qemu.pid"),
                             image_fd=image_fd, source=source)
        procs = [str(p) for p in spec.cgroup_procs]
        enter_cell, netns_fd = None, -1
        try:
            if spec.vmm_uid:
                argv = confine(spec, argv, self._p("jail"))  # the jail joins cgroups and netns itself
            else:
                enter_netns, netns_fd = network_namespace_step(spec.netns)

                def enter_cell() -> None:
                    # Runs in the child between fork and exec: the VMM is in its cgroup and its
                    # network namespace before it runs any guest code.
                    for path in procs:
                        with open(path, "w") as f:
                            f.write("0")
                    enter_netns()
        except VmmError:
            if image_fd >= 0:
                os.close(image_fd)
            raise

        # the tap and image fds are O_CLOEXEC in the box: only this VMM inherits them
        pass_fds = tuple(fd for fd in (spec.tap_fd, image_fd, spec.memory_fd) if fd >= 0)
        try:
            with open(self._p("qemu.stderr"), "wb") as stderr:
                self.proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                    stderr=stderr, preexec_fn=enter_cell, start_new_session=True, pass_fds=pass_fds,
                )
        except (OSError, subprocess.SubprocessError) as exc:
            where = f"network namespace {spec.netns}" if spec.netns else "a network namespace of its own"
            raise VmmError(f"cannot start {argv[0]} in its cgroup and {where}: {exc}") from None
        finally:
            for fd in (image_fd, netns_fd):
                if fd >= 0:
                    os.close(fd)
        self.pid = self.proc.pid
        return self.proc.pid

    async def connect(self, timeout: float) -> Channel:
        """Connect to the channel QEMU serves (its socket appears while QEMU starts); the box's
        resync marker and hello go out at once, the guest reads them when its daemon opens the port."""
        loop = asyncio.get_running_loop()
        path = self._p("chan.sock")
        deadline = loop.time() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:  # not made, or not listening yet
                sock.close()
                if not self.alive() or loop.time() > deadline:
                    raise VmmError(f"cannot connect to the cell channel {path}: {exc.strerror}; "
                                   f"QEMU said: {_tail(self._p('qemu.stderr'), 3) or 'nothing'}") from None
                await asyncio.sleep(0.002)
            except OSError as exc:
                sock.close()
                raise VmmError(f"cannot connect to the cell channel {path}: {exc}") from None
        session = Session("box", "box", {"cell"})
        _, channel = await loop.create_unix_connection(
            lambda: ResyncChannel(session, hello_timeout=None, queue_max=32), sock=sock)
        self.channel = channel
        return channel

    async def accept(self, timeout: float) -> Channel:
        """The guest's hello on the connected channel (connect() first), or why there is none."""
        loop = asyncio.get_running_loop()
        if self.channel is None:
            await self.connect(timeout)
        exited = loop.create_task(self.wait_exit())
        hello = loop.create_task(self.channel.handshake())
        try:
            done, _ = await asyncio.wait({exited, hello}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if hello not in done:
                raise VmmError(self._why_no_hello("the guest never said hello", exited, timeout))
            hello.result()
            return self.channel
        finally:
            for task in (exited, hello):
                if not task.done():
                    task.cancel()

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.returncode is None
        return self.pid > 0 and os.path.exists(f"/proc/{self.pid}")

    def adopt(self, cell_dir: Path, pid: int, start_ticks: int) -> None:
        """Take over a VMM a previous box daemon started: the same process (pid and start time,
        so a reused pid is refused), watched through a pidfd since it is not our child."""
        self.cell_dir = cell_dir
        if process_start_ticks(pid) != start_ticks:
            raise VmmError(f"process {pid} is not the cell's VMM any more (it exited; the pid was reused)")
        try:
            self.pidfd = os.pidfd_open(pid)
        except OSError as exc:
            raise VmmError(f"cannot watch VMM process {pid}: {exc.strerror}") from None
        if process_start_ticks(pid) != start_ticks:  # reused between the check and the pidfd
            os.close(self.pidfd)
            self.pidfd = -1
            raise VmmError(f"process {pid} is not the cell's VMM any more (the pid was reused)")
        self.pid = pid
        loop = asyncio.get_running_loop()
        self._gone = loop.create_future()

        def exited() -> None:  # a pidfd is readable once its process has exited
            loop.remove_reader(self.pidfd)
            if not self._gone.done():
                self._gone.set_result(None)

        loop.add_reader(self.pidfd, exited)

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
            if not self.alive() or asyncio.get_running_loop().time() > deadline:
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
        return _pin(cpus, cores)

    async def wait_exit(self) -> int:
        """The VMM's exit status; -1 for an adopted VMM (not our child: its status is not ours to read)."""
        if self.proc is not None:
            return await self.proc.wait()
        if self._gone is not None:
            await asyncio.shield(self._gone)
        return -1

    async def _wait_qmp(self, timeout: float) -> str:
        path = self._p("qmp.sock")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not path.exists():  # QEMU makes the socket while it starts
            if not self.alive() or loop.time() > deadline:
                raise VmmError(f"QMP socket {path} did not appear: {_tail(self._p('qemu.stderr'), 3)}")
            await asyncio.sleep(0.002)
        return str(path)

    async def snapshot(self, state_fd: int, timeout: float) -> int:
        """Migrate the running template VM's device state into `state_fd`.

        x-ignore-shared: its RAM (the shared memfd) is not copied, only devices (~60 KB).
        QEMU's seccomp denies spawning, so `exec:` is out; the state file's fd is handed
        over the QMP socket (`getfd`) and migrated to with `fd:`. The VM is not paused first:
        migration stops it at the end, and a state saved from a running VM makes its clones
        run as soon as they are loaded.
        """
        path = await self._wait_qmp(5)

        def run() -> int:
            qmp = QmpBlocking(path, timeout)
            try:
                _migration_through(qmp, state_fd)
                qmp.execute("migrate", uri="fd:state")
                _wait_migration(qmp, timeout)
            finally:
                qmp.close()
            return os.fstat(state_fd).st_size

        try:
            return await asyncio.to_thread(run)
        except (QmpError, OSError, ValueError) as exc:
            raise VmmError(f"saving the template's device state failed: {exc}; "
                           f"QEMU said: {_tail(self._p('qemu.stderr'), 3) or 'nothing'}") from None

    async def save_scratch(self, fd: int) -> int:
        """The template's scratch disk, frozen by its guest at the snapshot point and flushed by
        QEMU at the end of the migration, copied into `fd` (holes kept) for its clones."""
        try:
            with open(self._p("scratch.ext4"), "rb") as f:
                return fsutil.copy_sparse(f.fileno(), fd, os.fstat(f.fileno()).st_size)
        except OSError as exc:
            raise VmmError(f"saving the template's scratch disk failed: {exc}") from None

    async def restore(self, state_fd: int, cores: tuple[int, ...], timeout: float) -> dict[int, int]:
        """Load a template's device state into this VMM (started with -incoming defer) and run it."""
        path = await self._wait_qmp(timeout)

        def run() -> dict[int, int]:
            qmp = QmpBlocking(path, timeout)
            try:
                _migration_through(qmp, state_fd)
                qmp.execute("migrate-incoming", uri="fd:state")
                _wait_migration(qmp, timeout)
                # A loaded VM stays paused (QEMU 7.2 only autostarts after `-incoming URI`).
                qmp.execute("cont")
                cpus = qmp.execute("query-cpus-fast") if cores else []
            finally:
                qmp.close()
            return _pin(cpus, cores)

        try:
            return await asyncio.to_thread(run)
        except (QmpError, OSError, ValueError) as exc:
            raise VmmError(f"restoring from the template failed: {exc}; "
                           f"QEMU said: {_tail(self._p('qemu.stderr'), 3) or 'nothing'}") from None

    def detach(self) -> None:
        """Let go of the VMM without ending it (the box daemon goes, the cell stays)."""
        if self.channel is not None:
            self.channel.close("box daemon detaching")
        if self.pidfd >= 0:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = -1

    async def destroy(self) -> None:
        if self.channel is not None:
            self.channel.close("cell destroyed")
        if self.proc is not None and self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await self.proc.wait()
        if self.pidfd >= 0:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)  # the pidfd cannot hit a reused pid
            except ProcessLookupError:
                pass
            await self.wait_exit()
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = -1
        if self.cell_dir is not None:
            shutil.rmtree(self.cell_dir, ignore_errors=True)

    def fill_source(self, checkout: Path) -> float:
        """Copy a checkout image into the source slot before `run`; returns the ms it took."""
        import time

        slot = self._p("source.img")
        size = os.stat(checkout).st_size
        if not self.spec.source_slot_mib:
            raise VmmError("this cell has no source slot (box.source_slot_mib = 0)")
        if size > self.spec.source_slot_mib << 20:
            raise VmmError(f"checkout image is {size >> 20} MiB, larger than the cell's source slot of "
                           f"{self.spec.source_slot_mib} MiB: raise box.source_slot_mib")
        t0 = time.monotonic()
        with open(checkout, "rb") as src, open(slot, "r+b") as dst:
            left = size
            while left:
                n = os.copy_file_range(src.fileno(), dst.fileno(), left)
                if n == 0:
                    raise VmmError(f"checkout image {checkout} shrank while being copied")
                left -= n  # no fsync: QEMU reads the slot through the same page cache
        return (time.monotonic() - t0) * 1000

    def console_tail(self, lines: int = 20) -> str:
        if self.cell_dir is None:
            return ""
        return _tail(self._p("console.log"), lines)


def process_start_ticks(pid: int) -> int:
    """When the process started (clock ticks since boot, /proc/PID/stat field 22); 0 if gone.
    With the pid it names one process for good: a pid can be reused, the pair cannot."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0
    # comm (field 2) may hold spaces and parentheses: count from the last ")"
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def _pin(cpus: list, cores: tuple[int, ...]) -> dict[int, int]:
    """Each vCPU thread (QMP query-cpus-fast) to one of the cell's cores, round robin."""
    threads = {}
    for cpu in cpus:
        index, tid = cpu["cpu-index"], cpu["thread-id"]
        os.sched_setaffinity(tid, {cores[index % len(cores)]})
        threads[index] = tid
    return threads


def _migration_through(qmp: QmpBlocking, state_fd: int) -> None:
    """Device state only (the RAM is the shared memfd), through `state_fd` handed over QMP."""
    qmp.execute("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
    qmp.execute("getfd", fd=state_fd, fdname="state")


def _wait_migration(qmp: QmpBlocking, timeout: float) -> None:
    import time

    deadline = time.monotonic() + timeout
    while True:
        info = qmp.execute("query-migrate")
        status = info.get("status", "")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise QmpError(f"migration {status}: {info.get('error-desc', 'no reason given')}")
        if time.monotonic() > deadline:
            raise QmpError(f"migration still {status or 'not started'} after {timeout:g} s")
        time.sleep(0.001)


def _tail(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip())


def _copy_scratch(image_fd: int, path: Path, size_mib: int) -> None:
    """A clone's scratch disk: its own copy of its template's (same size, same empty filesystem,
    which the clone's kernel has mounted already). Only the few MiB of metadata are written."""
    size = os.fstat(image_fd).st_size
    if size != size_mib << 20:
        raise VmmError(f"the template's scratch disk is {size} bytes, this cell's shape needs "
                       f"{size_mib << 20}: the template is stale")
    try:
        with open(path, "xb") as f:
            fsutil.copy_sparse(image_fd, f.fileno(), size)
    except OSError as exc:
        raise VmmError(f"copying the template's scratch disk to {path} failed: {exc} (is the disk full?)") from None


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
