"""Build script for hived's native modules.

Two kinds of native code live under _native/:
  * cffi (API mode) for syscalls and ioctls Python lacks (KVM probe);
  * Cython for measured hot loops (frame splitting, token buckets), each with a
    pure-Python twin in hived/ chosen by HIVED_PUREPYTHON=1.

Debug switches (environment):
  HIVED_CYTHON_ANNOTATE=1   write Cython's HTML annotation next to the .pyx
  HIVED_CYTHON_TRACE=1      compile with line tracing (for coverage/profilers)
  HIVED_DEBUG=1             -O0 -g and a HIVED_DEBUG define
  HIVED_STRICT=1            -Werror on the generated C
"""

import os

from setuptools import Extension, setup

CYTHON_MODULES = {
    "hived._framing": "_native/framing.pyx",
    "hived._tokenbucket": "_native/tokenbucket.pyx",
}


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def cython_extensions():
    from Cython.Build import cythonize

    cflags = ["-O0", "-g", "-DHIVED_DEBUG=1"] if _flag("HIVED_DEBUG") else ["-O2"]
    if _flag("HIVED_STRICT"):
        cflags += ["-Wall", "-Werror", "-Wno-unreachable-code"]
    macros = [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")] if _flag("HIVED_CYTHON_TRACE") else []
    exts = [
        Extension(name, [src], extra_compile_args=cflags, define_macros=macros)
        for name, src in CYTHON_MODULES.items()
    ]
    directives = {"language_level": "3", "boundscheck": False, "wraparound": False}
    if _flag("HIVED_CYTHON_TRACE"):
        directives["linetrace"] = True
    return cythonize(exts, compiler_directives=directives, annotate=_flag("HIVED_CYTHON_ANNOTATE"))


setup(
    ext_modules=cython_extensions(),
    cffi_modules=["_native/kvm_build.py:ffibuilder", "_native/sys_build.py:ffibuilder"],
)
