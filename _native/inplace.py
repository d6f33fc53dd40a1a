"""Compile a cffi builder in place into hived/, for working on native code without pip.

Used only when a builder runs as a script (`python _native/kvm_build.py`); setuptools
builds the same modules through `cffi_modules` in setup.py.
"""

import os
import shutil
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_inplace(ffibuilder, verbose: bool = True) -> str:
    """Compile in a temporary directory and install the .so into hived/."""
    with tempfile.TemporaryDirectory(prefix="hived-native-build-") as tmp:
        built = os.path.join(tmp, ffibuilder.compile(tmpdir=tmp, verbose=verbose))
        target = os.path.join(ROOT, "hived", os.path.basename(built))
        # Copy then rename: a process that has the old .so mapped keeps it intact.
        staging = target + ".tmp"
        shutil.copyfile(built, staging)
        os.chmod(staging, 0o755)
        os.replace(staging, target)
    return target
