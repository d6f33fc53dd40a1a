"""cffi (API mode) builder for ``hived._sys``: syscalls Python 3.11 lacks.

setup.py builds it through ``cffi_modules=[..., "_native/sys_build.py:ffibuilder"]``.
Run directly (``python _native/sys_build.py``) it compiles in a temporary
directory and copies the extension into ``hived/`` (gitignored), so it can be
used and tested in place without pip.

What it exposes (``from hived._sys import ffi, lib``):
  lib.setns(fd, nstype), lib.unshare(flags)      libc; errno in ffi.errno
  lib.mount(src, target, fstype, flags, data)    libc (netns bind mounts)
  lib.umount2(target, flags)                     libc
  lib.hived_tap_open(name, create, persist)      fd (O_CLOEXEC) or -errno
  lib.hived_tap_set_offload(fd, flags)           0 or -errno
and the constants below, whose values cffi takes from the system headers
(<sched.h>, <sys/mount.h>, <linux/if_tun.h>, <net/if.h>) at build time.
The C lives in ``_native/sys_src.c``.
"""

import os
import sys

import cffi

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SOURCE = os.path.join(HERE, "sys_src.c")

CDEF = """
#define CLONE_NEWNET ...
#define CLONE_NEWNS ...
#define CLONE_NEWUTS ...
#define MS_BIND ...
#define MS_REC ...
#define MS_SHARED ...
#define MS_PRIVATE ...
#define MNT_DETACH ...
#define IFNAMSIZ ...
#define IFF_TAP ...
#define IFF_NO_PI ...
#define IFF_VNET_HDR ...
#define TUN_F_CSUM ...
#define TUN_F_TSO4 ...
#define TUN_F_TSO6 ...
#define TUN_F_TSO_ECN ...
#define HIVED_TAP_FLAGS ...

int setns(int fd, int nstype);
int unshare(int flags);
int mount(const char *source, const char *target, const char *filesystemtype,
          unsigned long mountflags, const void *data);
int umount2(const char *target, int flags);

int hived_tap_open(const char *name, int create, int persist);
int hived_tap_set_offload(int fd, unsigned int flags);
"""


def _read_source() -> str:
    with open(SOURCE, encoding="utf-8") as f:
        return f.read()


ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "hived._sys",
    _read_source(),
    extra_compile_args=["-Wall"],
)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from inplace import build_inplace

    print(build_inplace(ffibuilder, verbose="-q" not in sys.argv[1:]))
