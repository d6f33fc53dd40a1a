"""cffi (API mode) builder for ``hived._kvm``, the KVM probe.

setup.py builds it through ``cffi_modules=["_native/kvm_build.py:ffibuilder"]``.
Run directly (``python _native/kvm_build.py``) it compiles in a temporary
directory and copies the extension into ``hived/`` (gitignored), so the probe
can be used and tested in place without pip.

The C lives in ``_native/kvm_probe_src.c``; it includes <linux/kvm.h>
(Debian: linux-libc-dev), so KVM numbers come from the kernel header.
"""

import os
import sys

import cffi

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SOURCE = os.path.join(HERE, "kvm_probe_src.c")

CDEF = """
#define HIVED_KVM_REASON_LEN ...
#define HIVED_KVM_MAX_EXITS ...
#define HIVED_KVM_MAX_EXT ...
#define HIVED_LOOP_N ...
#define HIVED_MIN_MIPS ...
#define KVM_API_VERSION ...

struct hived_kvm_result {
    int present;
    int api_version;
    int n_ext;
    int ext[...];
    int vm_created;
    int vcpu_created;
    int real_mode_ok;
    int long_mode_ok;
    int guest_runs;
    int timed_out;
    int n_exits;
    int exits[...];
    int err;
    double guest_mips;
    double loop_cpu_ms;
    double elapsed_ms;
    char reason[...];
};

int hived_kvm_probe(const char *dev_path, int timeout_ms, struct hived_kvm_result *out);
int hived_kvm_n_ext(void);
const char *hived_kvm_ext_name(int i);
const char *hived_kvm_exit_name(int reason);
"""


def _read_source() -> str:
    with open(SOURCE, encoding="utf-8") as f:
        return f.read()


ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "hived._kvm",
    _read_source(),
    extra_compile_args=["-Wall"],
)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from inplace import build_inplace

    print(build_inplace(ffibuilder, verbose="-q" not in sys.argv[1:]))
