"""Network namespaces and taps: create, enter (setns on one thread, always back home), delete,
sysctls, tap fds. hived._sys (cffi) provides setns/unshare/mount, which Python 3.11 lacks."""

from __future__ import annotations

import contextlib
import errno
import os

from hived.net.errors import NetworkError

NETNS_DIR = "/run/netns"
TUN_PATH = "/dev/net/tun"


def _sys():
    try:
        from hived import _sys
    except ImportError:
        raise NetworkError("native module hived._sys is not compiled: run `pip install -e .` "
                           "(or `python _native/sys_build.py`)") from None
    return _sys


def _errcheck(rc: int, what: str) -> int:
    if rc < 0:
        e = _sys().ffi.errno
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return rc


def netns_path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def netns_exists(name: str) -> bool:
    return os.path.exists(netns_path(name))


def list_netns() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


class _Stranded(BaseException):
    """A thread is not in its own network namespace: the worker must never be used again.

    A BaseException, so that no `except Exception` on the way swallows it."""


@contextlib.contextmanager
def entered(name: str):
    """Run the block with the calling thread inside netns `name` (other threads unaffected).

    Sockets and tap fds opened inside stay bound to that namespace after the block.
    """
    s = _sys()
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            target = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NetworkError(f"network namespace {name} does not exist") from None
        try:
            # safe: moves only this thread, and the finally below moves it back (or raises _Stranded)
            _errcheck(s.lib.setns(target, s.lib.CLONE_NEWNET), f"setns into {name}")
        finally:
            os.close(target)
        try:
            yield
        finally:
            _go_home(s, home, f"return from netns {name}")
    finally:
        os.close(home)


def _go_home(s, home: int, what: str) -> None:
    """Move this thread back into its own netns `home` (an fd held open since it left)."""
    # safe: `home` is this thread's own netns, held open by the caller since before it left
    if s.lib.setns(home, s.lib.CLONE_NEWNET) < 0:
        raise _Stranded(f"cannot {what}: {os.strerror(s.ffi.errno)}")


def _share_netns_dir() -> None:
    """Make /run/netns a shared mount, as iproute2 does, so other mount namespaces see ours."""
    s = _sys()
    os.makedirs(NETNS_DIR, mode=0o755, exist_ok=True)
    flags = s.lib.MS_SHARED | s.lib.MS_REC
    # safe: changes only the propagation of /run/netns (as iproute2 does); nothing is mounted
    if s.lib.mount(b"none", NETNS_DIR.encode(), s.ffi.NULL, flags, s.ffi.NULL) == 0:
        return
    if s.ffi.errno != errno.EINVAL:  # EINVAL: not a mount point yet
        _errcheck(-1, f"make {NETNS_DIR} shared")
    # safe: binds /run/netns onto itself, only to make it a mount point (as iproute2 does)
    _errcheck(s.lib.mount(NETNS_DIR.encode(), NETNS_DIR.encode(), b"none",
                          s.lib.MS_BIND | s.lib.MS_REC, s.ffi.NULL), f"bind-mount {NETNS_DIR}")
    # safe: as above, propagation only
    _errcheck(s.lib.mount(b"none", NETNS_DIR.encode(), s.ffi.NULL, flags, s.ffi.NULL),
              f"make {NETNS_DIR} shared")


_netns_dir_ready = False


def create_netns(name: str) -> None:
    """Create the named network namespace /run/netns/<name> (like `ip netns add`)."""
    global _netns_dir_ready
    s = _sys()
    if not _netns_dir_ready:
        _share_netns_dir()
        _netns_dir_ready = True
    path = netns_path(name)
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0)
    os.close(fd)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        # safe: CLONE_NEWNET moves only this thread into a new netns; the setns below returns it
        if s.lib.unshare(s.lib.CLONE_NEWNET) < 0:
            e = s.ffi.errno
            os.unlink(path)
            raise OSError(e, f"unshare(CLONE_NEWNET) for {name}: {os.strerror(e)}")
        try:
            # safe: binds this thread's brand-new netns onto the file we just created (O_EXCL)
            _errcheck(s.lib.mount(b"/proc/thread-self/ns/net", path.encode(), b"none",
                                  s.lib.MS_BIND, s.ffi.NULL), f"bind-mount netns {name}")
        except OSError:
            os.unlink(path)
            raise
        finally:
            _go_home(s, home, f"leave new netns {name}")
    finally:
        os.close(home)


def delete_netns(name: str) -> bool:
    """Remove the named namespace (like `ip netns del`); False if it did not exist."""
    s = _sys()
    path = netns_path(name)
    if not os.path.lexists(path):
        return False
    # safe: detaches only the bind mount that names the namespace (the netns dies with its last user)
    if s.lib.umount2(path.encode(), s.lib.MNT_DETACH) < 0 and s.ffi.errno not in (errno.EINVAL,
                                                                                  errno.ENOENT):
        _errcheck(-1, f"unmount netns {name}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return True


def write_sysctls(values: dict[str, str | int]) -> None:
    """Write net sysctls in the calling thread's namespace (e.g. {"net.ipv4.ip_forward": 1})."""
    for key, value in values.items():
        path = "/proc/sys/" + key.replace(".", "/")
        try:
            with open(path, "w") as f:
                f.write(str(value))
        except OSError as exc:
            raise NetworkError(f"cannot set sysctl {key}={value}: {exc.strerror}") from None


def tap_open(name: str, *, create: bool = False, persist: bool = False) -> int:
    """Attach to tap `name` in the calling thread's netns; returns an O_CLOEXEC fd.

    Flags IFF_TAP | IFF_NO_PI | IFF_VNET_HDR. create=True makes the tap (and fails with
    EBUSY if it exists); persist=True keeps it after the last fd closes.
    """
    s = _sys()
    # safe: the C side bounds the name to IFNAMSIZ and opens the fd O_CLOEXEC
    fd = s.lib.hived_tap_open(name.encode(), int(create), int(persist))
    if fd < 0:
        raise OSError(-fd, f"tap {name}: {os.strerror(-fd)}")
    return fd
