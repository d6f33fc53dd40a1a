"""What a cell image is made of: the recipe's constants, its errors, and the hash of its inputs
(kernel package, modules, init.sh, debootstrap set, the guest's .py files, FORMAT_VERSION)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from hived.errors import ActionableError

FORMAT_VERSION = 3  # 3: erofs + overlay modules, crun (build containers)

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
# Wanted kernel modules; their dependencies (from .modinfo) are added and the
# load order is worked out at build time. Those built into the kernel are skipped.
# Modules only a cell with a network needs (init.sh loads them only with hived.ip=);
# with the dependencies they alone pull in (virtio_net: net_failover, failover), they
# are listed in the initramfs's lib/modules/net. They come last in MODULES.
NET_MODULES = ("virtio_net",)
# erofs (build images, checkouts) and overlay (their writable layers) for build containers.
MODULES = ("virtio_ring", "virtio", "virtio_mmio", "virtio_console", "virtio_blk", "erofs", "overlay") + NET_MODULES
# Kconfig symbol of each wanted module (=y: built in, =m: ship the .ko).
MODULE_CONFIG = {
    "virtio_ring": "CONFIG_VIRTIO",
    "virtio": "CONFIG_VIRTIO",
    "virtio_mmio": "CONFIG_VIRTIO_MMIO",
    "virtio_console": "CONFIG_VIRTIO_CONSOLE",
    "virtio_blk": "CONFIG_VIRTIO_BLK",
    "virtio_net": "CONFIG_VIRTIO_NET",
    "net_failover": "CONFIG_NET_FAILOVER",
    "failover": "CONFIG_FAILOVER",
    "erofs": "CONFIG_EROFS_FS",
    "overlay": "CONFIG_OVERLAY_FS",
    "libcrc32c": "CONFIG_LIBCRC32C",
}
# What init.sh relies on being built into the kernel.
REQUIRED_BUILTIN = (
    "CONFIG_BLK_DEV_INITRD",
    "CONFIG_INET",  # hived.ip= (eth0 configured by init.sh)
    "CONFIG_DEVTMPFS",
    "CONFIG_EXT4_FS",
    "CONFIG_TMPFS",
    "CONFIG_SERIAL_8250_CONSOLE",
    "CONFIG_MAGIC_SYSRQ",
)

SUITE = "bookworm"
VARIANT = "minbase"
# crun runs each build in an OCI container inside the cell (hived/cell/container.py).
INCLUDE = ("python3", "python3-msgpack", "crun")
MIRROR = "http://deb.debian.org/debian"

# Measured under TCG: the uncompressed initramfs (~2.3 MB) unpacks faster than
# gunzip of the ~1 MB gzip one (see the report in tests/test_image.py).
INITRD_COMPRESSION = "none"  # or "gzip"
# busybox applets init.sh uses (linked as /bin/<applet>).
BUSYBOX_APPLETS = (
    "sh", "mount", "umount", "insmod", "usleep", "sleep", "reboot", "sync",
    "env", "switch_root", "cat", "ls", "mkdir", "ip",
)

BUILD_USER = "build"
BUILD_UID = 1000
BUILD_GID = 1000
ROOT_LABEL = "hived-root"
ROOT_HEADROOM = 0.20
IMAGE_FILES = ("vmlinuz", "initrd.img", "root.ext4")
DEFAULT_DEST = "/var/lib/hived/images"
# Complete images kept after a build (the newest ones; `current` always stays).
KEEP_IMAGES = 3
# Rough space a build needs under the destination (staging tree, debootstrap
# tarball, the image itself).
NEEDED_FREE_BYTES = 1 << 30

# tool -> Debian package providing it
TOOLS = {
    "apt-get": "apt",
    "apt-cache": "apt",
    "dpkg-deb": "dpkg",
    "debootstrap": "debootstrap",
    "mke2fs": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "busybox": "busybox-static",
    "chroot": "coreutils",
    "tar": "tar",
    "cc": "gcc",
}

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the hived package
INIT_SH = PACKAGE_DIR / "guest" / "init.sh"
BUILDINIT_C = PACKAGE_DIR / "guest" / "buildinit.c"
BUILDINIT_PATH = "opt/hived/bin/hived-buildinit"  # in the root image; PID 1 of build containers

_HEX_NAME = re.compile(r"^[0-9a-f]{16}$")


class ImageError(ActionableError):
    """A build or lookup failure, shown as one line: `<what> failed: <why>; <todo>`."""

    def __init__(self, what: str, why: str, todo: str):
        Exception.__init__(self, what, why, todo)
        self.what, self.why, self.todo = what, why, todo

    def __str__(self) -> str:
        return f"{self.what} failed: {self.why}; {self.todo}"


class ImageMissing(ImageError):
    """No image for the current inputs has been built."""


def default_dest() -> Path:
    return Path(os.environ.get("HIVED_IMAGE_DIR") or DEFAULT_DEST)


# --------------------------------------------------------------------------
# inputs and their hash


@dataclass(frozen=True)
class Kernel:
    package: str  # e.g. linux-image-6.1.0-56-cloud-amd64
    version: str  # Debian version, e.g. 6.1.192-2


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# What the cell daemon imports inside the guest. Only these are copied in and hashed,
# so a change to the box daemon or the CLI does not rebuild (and strand) the image.
GUEST_FILES = ("__init__.py", "native.py", "ratelimit.py", "ratelimit_py.py", "protocol/*.py", "cell/*.py")


def python_files(package_dir: Path | None = None) -> list[Path]:
    """The hived package's pure-Python files the guest needs, relative to the package dir."""
    root = package_dir or PACKAGE_DIR
    return sorted(
        p.relative_to(root)
        for pattern in GUEST_FILES
        for p in root.glob(pattern)
        if p.is_file()
    )


def local_inputs(package_dir: Path | None = None, init_sh: bytes | None = None) -> dict:
    """Every input except the kernel (which needs apt to resolve)."""
    root = package_dir or PACKAGE_DIR
    if init_sh is None:
        init_sh = INIT_SH.read_bytes()
    return {
        "format": FORMAT_VERSION,
        "modules": list(MODULES),
        "init_sh_sha256": _sha256_bytes(init_sh),
        "buildinit_c_sha256": _sha256_file(BUILDINIT_C),
        "initrd_compression": INITRD_COMPRESSION,
        "debootstrap": {
            "suite": SUITE,
            "variant": VARIANT,
            "include": list(INCLUDE),
            "mirror": MIRROR,
        },
        "python_files": {
            str(rel): _sha256_file(root / rel) for rel in python_files(root)
        },
    }


def image_inputs(kernel: Kernel, local: dict | None = None) -> dict:
    inputs = dict(local if local is not None else local_inputs())
    inputs["kernel"] = {"package": kernel.package, "version": kernel.version}
    return inputs


def inputs_hash(inputs: dict) -> str:
    """The image directory name: 16 hex digits of sha256 over the canonical JSON."""
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()
    return _sha256_bytes(blob)[:16]


def local_key(local: dict) -> str:
    return inputs_hash({"local": local})


def _debootstrap_key() -> str:
    blob = json.dumps([SUITE, VARIANT, sorted(INCLUDE), MIRROR]).encode()
    return _sha256_bytes(blob)[:12]
