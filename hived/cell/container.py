"""The build's container inside the cell: filesystems and the OCI bundle crun runs.

Guest side (stdlib only). Layout in the cell:

    /work                      the cell's scratch disk (ext4, per cell)
      .hived/ (root, 0700)     root.upper, root.work: the container root's writable layer
                               src.upper, src.work: the checkout's writable layer
                               home/ (uid 1000): the container's /work
    /run/hived/lower           the cell's own root, bound alone (no submounts)
    /run/hived/image           the build image (drive `hived-image`, erofs/ext4, read-only)
    /run/hived/rootfs          overlay: image (or the cell root) + root.upper
    /run/hived/pre.rootfs      the same for the pre-made container (pre.upper; premade.py)
    /run/hived/src.lower       the checkout (drive `hived-source`, read-only)
    /run/hived/src             overlay: checkout + src.upper, bound at the build's cwd
    /run/hived/bundle          config.json for crun (pre.bundle: the pre-made container's)

The container: uid/gid 1000, no capabilities, no_new_privs, own pid/mount/ipc/uts/
cgroup namespaces and a cgroup of its own; the network namespace is the cell's (the
cell is the network boundary: its netns on the box isolates it). PID 1 is
hived-buildinit (hived/guest/buildinit.c), which runs the build as its child and
reports the build's wait status on fd 3.
"""

import ctypes
import errno
import fcntl
import json
import os
from pathlib import Path

BUILD_UID = BUILD_GID = 1000
RUN = Path("/run/hived")
WORK = Path("/work")
STATE = WORK / ".hived"
BUILDINIT = "/opt/hived/bin/hived-buildinit"
INIT_IN_CONTAINER = "/.hived/init"
IMAGE_SERIAL = "hived-image"
SOURCE_SERIAL = "hived-source"
BLKFLSBUF = 0x1261  # drop a block device's cached pages
MS_RDONLY, MS_NODEV, MS_NOSUID, MS_BIND = 0x1, 0x4, 0x2, 0x1000
# Filesystem magics, to know a build image's filesystem before any build names it.
EROFS_MAGIC_AT, EROFS_MAGIC = 1024, b"\xe2\xe1\xf5\xe0"   # erofs_super_block.magic, le32 0xE0F5E1E2
EXT4_MAGIC_AT, EXT4_MAGIC = 1024 + 56, b"\x53\xef"          # ext4 s_magic, le16 0xEF53
# Mounting into another mount namespace (Linux >= 5.2: the clone of a tree, attached there).
SYS_OPEN_TREE, SYS_MOVE_MOUNT = 428, 429  # x86_64
OPEN_TREE_CLONE, AT_RECURSIVE, AT_FDCWD = 0x1, 0x8000, -100
MOVE_MOUNT_F_EMPTY_PATH = 0x4
CLONE_NEWNS = 0x20000
RLIMITS = {"nofile": "RLIMIT_NOFILE", "nproc": "RLIMIT_NPROC", "fsize": "RLIMIT_FSIZE"}


class ContainerError(Exception):
    """The container could not be set up; the message says what and why."""


_libc = ctypes.CDLL(None, use_errno=True)


def mount(source: str, target: Path, fstype: str | None, flags: int = 0, data: str = "") -> None:
    target.mkdir(parents=True, exist_ok=True)
    rc = _libc.mount(source.encode(), str(target).encode(), fstype.encode() if fstype else None,
                     ctypes.c_ulong(flags), data.encode() if data else None)
    if rc != 0:
        err = ctypes.get_errno()
        raise ContainerError(f"mount {source} ({fstype or 'bind'}) on {target}: {os.strerror(err)}")


def find_disk(serial: str, sys_block: Path = Path("/sys/block")) -> str:
    """The /dev node of the virtio disk the box gave this serial (names depend on probe order)."""
    for dev in sorted(sys_block.glob("vd*")):
        try:
            if (dev / "serial").read_text().strip() == serial:
                return f"/dev/{dev.name}"
        except OSError:
            continue
    raise ContainerError(f"no disk with serial {serial!r} in this cell (the box attaches it at boot)")


def drop_cached(dev: str) -> None:
    """The box wrote the source slot after the guest scanned it: forget what the guest read."""
    fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, BLKFLSBUF, 0)
    finally:
        os.close(fd)


def _dir(path: Path, uid: int = 0, mode: int = 0o755) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, uid)
    os.chmod(path, mode)
    return path


def _overlay(lower: Path, name: str, target: Path, owner: int = 0, flags: int = MS_NODEV) -> None:
    upper = _dir(STATE / f"{name}.upper", owner)
    work = _dir(STATE / f"{name}.work")
    mount("overlay", target, "overlay", flags,
          f"lowerdir={lower},upperdir={upper},workdir={work}")


def prepare_root(image_fs: str, name: str = "root") -> dict:
    """Mount a container's root (the image, or the cell's own root, under an overlay whose
    upper layer is STATE/<name>.upper) and the build's home; the paths for the bundle."""
    _dir(STATE, 0, 0o700)
    home = _dir(STATE / "home", BUILD_UID)
    if image_fs:
        lower = RUN / "image"
        if not os.path.ismount(lower):  # the pre-made container's, when a build falls back
            mount(find_disk(IMAGE_SERIAL), lower, image_fs, MS_RDONLY | MS_NODEV)
    else:
        lower = RUN / "lower"
        if not os.path.ismount(lower):
            mount("/", lower, None, MS_BIND)  # not recursive: only the root filesystem itself
    rootfs = RUN / ("rootfs" if name == "root" else f"{name}.rootfs")
    _overlay(lower, name, rootfs)
    return {"rootfs": rootfs, "home": home, "source": None}


def prepare_source(source_fs: str) -> Path:
    """Mount the checkout (the source slot the box filled at assignment) under a writable overlay."""
    dev = find_disk(SOURCE_SERIAL)
    drop_cached(dev)
    mount(dev, RUN / "src.lower", source_fs, MS_RDONLY | MS_NODEV)
    _overlay(RUN / "src.lower", "src", RUN / "src", owner=BUILD_UID, flags=MS_NODEV | MS_NOSUID)
    return RUN / "src"


def prepare_filesystems(image_fs: str, source_fs: str) -> dict:
    """Mount the container's root and the checkout; returns the paths for the bundle."""
    paths = prepare_root(image_fs)
    if source_fs:
        paths["source"] = prepare_source(source_fs)
    return paths


def fs_type_of(head: bytes) -> str:
    """"erofs", "ext4" or "" from a filesystem's first 2 KiB (pure)."""
    if head[EROFS_MAGIC_AT:EROFS_MAGIC_AT + 4] == EROFS_MAGIC:
        return "erofs"
    if head[EXT4_MAGIC_AT:EXT4_MAGIC_AT + 2] == EXT4_MAGIC:
        return "ext4"
    return ""


def image_fs_type() -> str:
    """The build image's filesystem, read from its drive; "" when the cell has no build image."""
    try:
        dev = find_disk(IMAGE_SERIAL)
    except ContainerError:
        return ""
    with open(dev, "rb") as f:
        kind = fs_type_of(f.read(2048))
    if not kind:
        raise ContainerError(f"the build image drive {dev} holds neither erofs nor ext4")
    return kind


def _in_namespace_of(pid: int, ns_name: str, nstype: int, action, what: str) -> None:
    """Run `action()` (syscalls only) in a forked child that joined namespace `ns_name` of
    process `pid` (a pre-made container's init); raises ContainerError naming `what`.

    A child, not this process: setns(CLONE_NEWNS) is refused to a process with threads and
    changes the caller's root and cwd, and any setns would change what the agent itself sees.
    """
    try:
        ns = os.open(f"/proc/{pid}/ns/{ns_name}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ContainerError(f"the container's init ({pid}) is gone: {exc.strerror}") from None
    why_r, why_w = os.pipe2(os.O_CLOEXEC)
    child = os.fork()
    if child == 0:  # only syscalls here, then _exit: nothing of the agent's loop runs in the child
        why = ""
        try:
            if _libc.setns(ns, nstype) != 0:
                why = f"setns: {os.strerror(ctypes.get_errno())}"
            else:
                why = action() or ""
        except OSError as exc:
            why = f"{exc.strerror}: {exc.filename}" if exc.filename else str(exc.strerror)
        except BaseException as exc:  # noqa: BLE001 - the child must reach _exit whatever happens
            why = repr(exc)
        finally:
            os.write(why_w, why.encode()[:4096])
            os._exit(1 if why else 0)
    os.close(why_w)
    os.close(ns)
    try:
        # The agent's SIGCHLD handler runs on its loop, which cannot run before this returns.
        _, status = os.waitpid(child, 0)
        why = os.read(why_r, 4096).decode(errors="replace")
    finally:
        os.close(why_r)
    if status != 0:
        raise ContainerError(f"cannot {what} in the container: {why or f'status {status}'}")


def mount_into(pid: int, source: Path, target: str) -> None:
    """Mount `source` (a mount of ours) at `target` inside the mount namespace of process
    `pid` (a pre-made container's init), as crun's bind at create time would have.

    The clone of the tree (open_tree) is made here, where `source` is visible, and attached
    there (move_mount) by a child in the container's mount namespace (_in_namespace_of).
    """
    tree = _libc.syscall(SYS_OPEN_TREE, AT_FDCWD, str(source).encode(),
                         OPEN_TREE_CLONE | AT_RECURSIVE | os.O_CLOEXEC)
    if tree < 0:
        raise ContainerError(f"open_tree {source}: {os.strerror(ctypes.get_errno())}")

    def attach() -> str:
        os.makedirs(target, exist_ok=True)  # as crun makes a bind's destination
        if _libc.syscall(SYS_MOVE_MOUNT, tree, b"", AT_FDCWD, target.encode(), MOVE_MOUNT_F_EMPTY_PATH) != 0:
            return f"move_mount: {os.strerror(ctypes.get_errno())}"
        return ""

    try:
        _in_namespace_of(pid, "mnt", CLONE_NEWNS, attach, f"mount {source} at {target}")
    finally:
        os.close(tree)


def bundle_config(argv: list[str], env: dict[str, str], cwd: str, limits: dict, paths: dict,
                  cgroup: str) -> dict:
    """The OCI runtime config (pure: tested without a guest)."""
    caps = {k: [] for k in ("bounding", "effective", "inheritable", "permitted", "ambient")}
    rlimits = [{"type": RLIMITS[k], "hard": int(v), "soft": int(v)} for k, v in limits.items() if k in RLIMITS]
    nosuid = ["nosuid", "nodev"]
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": [*nosuid, "noexec"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": [*nosuid, "noexec", "mode=1777"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": [*nosuid, "noexec"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": [*nosuid, "noexec", "ro"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup2", "source": "cgroup",
         "options": [*nosuid, "noexec", "ro"]},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": [*nosuid, "mode=1777"]},
        {"destination": "/work", "type": "bind", "source": str(paths["home"]), "options": ["rbind", *nosuid]},
        {"destination": INIT_IN_CONTAINER, "type": "bind", "source": BUILDINIT, "options": ["bind", "ro", "nodev"]},
        {"destination": "/etc/resolv.conf", "type": "bind", "source": "/etc/resolv.conf",
         "options": ["bind", "ro", *nosuid]},
    ]
    if not os.path.exists("/etc/resolv.conf"):
        mounts.pop()
    if paths.get("source") is not None:
        mounts.append({"destination": cwd, "type": "bind", "source": str(paths["source"]),
                       "options": ["rbind", *nosuid]})
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": BUILD_UID, "gid": BUILD_GID, "additionalGids": []},
            "args": [INIT_IN_CONTAINER, *argv],
            "env": [f"{k}={v}" for k, v in env.items()],
            "cwd": cwd,
            "capabilities": caps,
            "noNewPrivileges": True,
            "rlimits": rlimits,
        },
        "root": {"path": str(paths["rootfs"]), "readonly": False},
        "mounts": mounts,
        "linux": {
            # No network or UTS namespace: the build shares the cell's, and the cell is the boundary.
            # Its hostname is the cell's (the cell id, set before cell.hello); without capabilities
            # the build cannot change it. A container made in a template so needs no renaming.
            "namespaces": [{"type": t} for t in ("pid", "mount", "ipc", "cgroup")],
            "cgroupsPath": cgroup,
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
                            "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        },
    }


def write_bundle(config: dict, name: str = "bundle") -> Path:
    bundle = _dir(RUN / name, 0, 0o700)
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


def parse_report(text: str) -> tuple[str, int] | None:
    """hived-buildinit's one line on fd 3: ("status", wait status), ("exec", errno) or
    ("chdir", errno): the build's cwd could not be entered (a pre-made container's)."""
    words = text.split()
    if len(words) != 2 or words[0] not in ("status", "exec", "chdir"):
        return None
    try:
        return words[0], int(words[1])
    except ValueError:
        return None


def command_spec(argv: list[str], env: dict[str, str], cwd: str) -> bytes:
    """The build as a pre-made container's init reads it on fd 4 (buildinit.c read_command)."""
    parts = [cwd, str(len(argv)), *argv, *(f"{k}={v}" for k, v in env.items())]
    for part in parts:
        if "\0" in part:
            raise ContainerError("the build's argv, env or cwd holds a NUL byte")
    return b"".join(part.encode() + b"\0" for part in parts)


def exec_error(err: int) -> str:
    return os.strerror(err) if err else errno.errorcode.get(err, str(err))
