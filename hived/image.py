"""`hived image build`: the cell image, built from Debian packages only.

An image is a directory named by a hash of its inputs, holding

    vmlinuz        the kernel of Debian's linux-image-cloud-amd64
    initrd.img     a newc cpio: static busybox, the virtio modules, /init
                   (hived/guest/init.sh)
    root.ext4      debootstrap'ed bookworm (minbase + python3, python3-msgpack),
                   slimmed, with the build user (uid 1000, home /work) and the
                   hived package's pure-Python files byte-compiled in /opt/hived;
                   no journal: it is mounted read-only
    manifest.json  inputs, hashes, sizes, kernel version, build time; written
                   last, so its presence means the image is complete

Layout under the destination root ($HIVED_IMAGE_DIR or /var/lib/hived/images):

    <hash>/                 one complete image per input set (the 3 newest are kept)
    current -> <hash>       the newest build (symlink, replaced atomically)
    cache/debs/             downloaded kernel packages
    cache/debootstrap-*.tar debootstrap results, keyed by suite/variant/include/mirror
    .build-<hash>-<pid>/    a build in progress (renamed to <hash> when done)
    .lock                   serialises builds

The hash covers the kernel package name and version, the module list, init.sh,
the debootstrap suite/variant/include list/mirror, the guest's .py files of the
hived package (GUEST_FILES) and FORMAT_VERSION. A rebuild after a change to the
guest code reuses the kernel package and the debootstrap tarball.

Runs as root on Debian (debootstrap, chroot); needs apt, debootstrap,
e2fsprogs and busybox-static. The initramfs cpio is written here, not by cpio(1).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import gzip
import hashlib
import json
import lzma
import math
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from hived.errors import ActionableError

# Bump whenever the build recipe in this file changes (slimming, users, mke2fs
# options, initramfs layout...): this module is not among the hashed guest files.
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

PACKAGE_DIR = Path(__file__).resolve().parent
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


# --------------------------------------------------------------------------
# running tools


def _require_tools(names: list[str] | tuple[str, ...]) -> None:
    for name in names:
        if shutil.which(name) is None:
            pkg = TOOLS.get(name, name)
            raise ImageError(
                "tool check", f"{name} is not installed", f"run `apt-get install {pkg}`"
            )


def _last_error_line(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith(("E:", "Error", "error", "mke2fs:", "tar:")) or "failed" in ln.lower():
            return ln
    return lines[-1] if lines else "no output"


class _Log:
    """Full output of every tool run, kept in the build dir (cache/last-build.log)."""

    def __init__(self, path: Path | None):
        self.path = path

    def write(self, text: str) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8", errors="replace") as f:
            f.write(text)


def _run(
    cmd: list[str],
    what: str,
    todo: str,
    log: _Log | None = None,
    *,
    cwd: Path | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    env = dict(os.environ, LC_ALL="C", DEBIAN_FRONTEND="noninteractive")
    try:
        p = subprocess.run(
            cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
        )
    except FileNotFoundError:
        pkg = TOOLS.get(cmd[0], cmd[0])
        raise ImageError("tool check", f"{cmd[0]} is not installed",
                         f"run `apt-get install {pkg}`") from None
    if log is not None:
        log.write(f"$ {' '.join(cmd)}\n{p.stdout}\n[exit {p.returncode}]\n")
    if check and p.returncode != 0:
        if "No space left on device" in p.stdout:
            raise ImageError(what, "disk full (No space left on device)",
                             "free space or set HIVED_IMAGE_DIR to a bigger disk")
        raise ImageError(what, f"{cmd[0]} exited {p.returncode}: {_last_error_line(p.stdout)}",
                         todo)
    return p


# --------------------------------------------------------------------------
# kernel


_NO_LISTS = ("Unable to locate package", "No packages found", "has no installation candidate",
             "Can't select candidate", "Unable to find a source package")


def _apt_update(log: _Log | None) -> None:
    _run(["apt-get", "update", "-q"], "apt-get update",
         "check the network and /etc/apt/sources.list", log)


def resolve_kernel(log: _Log | None = None, *, update: bool = True) -> Kernel:
    """The versioned package behind linux-image-cloud-amd64 and its candidate version.

    One `apt-cache show` of the meta package (its Depends pins the exact version; each
    apt-cache run costs ~0.5-1 s here); `apt-cache show` of the versioned package only
    when the pin is missing. No lists: `apt-get update` once, then retry.
    """
    _require_tools(["apt-cache"])
    todo = "run `apt-get update` and check that bookworm main is in the apt sources"
    for attempt in (1, 2):
        meta = _run(["apt-cache", "show", "--no-all-versions", KERNEL_META_PACKAGE],
                    "kernel lookup", todo, log, check=False)
        m = re.search(r"^Depends:.*?\b(linux-image-[^\s,()]+)(?:\s*\(=\s*([^)\s]+)\))?",
                      meta.stdout, re.M)
        if m and m.group(2):
            return Kernel(m.group(1), m.group(2))
        if m:
            show = _run(["apt-cache", "show", "--no-all-versions", m.group(1)],
                        "kernel lookup", todo, log, check=False)
            v = re.search(r"^Version:\s*(\S+)", show.stdout, re.M)
            if v:
                return Kernel(m.group(1), v.group(1))
        if attempt == 1 and update:
            _apt_update(log)
            continue
        why = _last_error_line(meta.stdout) if meta.returncode else \
            f"no versioned linux-image package behind {KERNEL_META_PACKAGE}"
        raise ImageError("kernel lookup", why, todo)
    raise AssertionError("unreachable")


def fetch_kernel(kernel: Kernel, cache_dir: Path, log: _Log | None = None) -> tuple[Path, bool]:
    """apt-get download the kernel package into cache_dir/debs; (path, was_cached)."""
    debs = cache_dir / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    name = f"{kernel.package}_{kernel.version.replace(':', '%3a')}_amd64.deb"
    final = debs / name
    if final.is_file():
        p = _run(["dpkg-deb", "--field", str(final), "Version"], "kernel check", "", log,
                 check=False)
        if p.returncode == 0 and p.stdout.strip() == kernel.version:
            return final, True
        final.unlink()
    todo = "check the network and the apt sources, then rerun `hived image build`"
    with tempfile.TemporaryDirectory(dir=debs, prefix=".dl-") as tmp:
        cmd = ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root",
               f"{kernel.package}={kernel.version}"]
        p = _run(cmd, "kernel download", todo, log, cwd=Path(tmp), check=False)
        if p.returncode != 0 and any(s in p.stdout for s in _NO_LISTS):
            _apt_update(log)
            p = _run(cmd, "kernel download", todo, log, cwd=Path(tmp), check=False)
        if p.returncode != 0:
            if "No space left on device" in p.stdout:
                raise ImageError("kernel download", "disk full (No space left on device)",
                                 "free space or set HIVED_IMAGE_DIR to a bigger disk")
            raise ImageError("kernel download", _last_error_line(p.stdout), todo)
        got = list(Path(tmp).glob("*.deb"))
        if len(got) != 1:
            raise ImageError("kernel download", f"expected one .deb, got {len(got)}", todo)
        os.replace(got[0], final)
    return final, False


def parse_kconfig(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(CONFIG_\w+)=(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def _module_name(filename: str) -> str:
    return filename.split(".ko")[0].replace("-", "_")


def _read_module(path: Path) -> bytes:
    """A module's ELF bytes, decompressed (busybox insmod takes plain .ko only)."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        _require_tools(["zstd"])
        p = subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=False)
        if p.returncode != 0:
            raise ImageError("module decompress", f"zstd -d {path.name} failed",
                             "check the kernel package")
        return p.stdout
    return data


def modinfo(elf: bytes) -> dict[str, list[str]]:
    """key -> values from a module's .modinfo section (like `modinfo`, stdlib only)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF module")
    e_shoff, = struct.unpack_from("<Q", elf, 0x28)
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        off = e_shoff + i * e_shentsize
        name, = struct.unpack_from("<I", elf, off)
        sh_offset, sh_size = struct.unpack_from("<QQ", elf, off + 0x18)
        return name, sh_offset, sh_size

    _, stroff, _ = section(e_shstrndx)
    info: dict[str, list[str]] = {}
    for i in range(e_shnum):
        name_off, off, size = section(i)
        end = elf.index(b"\0", stroff + name_off)
        if elf[stroff + name_off:end] != b".modinfo":
            continue
        for item in elf[off:off + size].split(b"\0"):
            if b"=" in item:
                k, v = item.decode(errors="replace").split("=", 1)
                info.setdefault(k, []).append(v)
    return info


@dataclass
class KernelParts:
    release: str  # e.g. 6.1.0-56-cloud-amd64
    vmlinuz: Path
    config: dict[str, str]
    modules: list[tuple[str, bytes]]  # (name, decompressed .ko) in load order
    builtin: list[str]  # wanted modules that are built in
    net_only: list[str] = field(default_factory=list)  # needed only with a network


def extract_kernel(deb: Path, workdir: Path, log: _Log | None = None) -> KernelParts:
    todo = "check the kernel package (rerun with --force to download it again)"
    _run(["dpkg-deb", "-x", str(deb), str(workdir)], "kernel unpack", todo, log)
    vmlinuz = sorted((workdir / "boot").glob("vmlinuz-*"))
    if len(vmlinuz) != 1:
        raise ImageError("kernel unpack", f"{len(vmlinuz)} boot/vmlinuz-* in {deb.name}", todo)
    release = vmlinuz[0].name[len("vmlinuz-"):]
    config_path = workdir / "boot" / f"config-{release}"
    if not config_path.is_file():
        raise ImageError("kernel unpack", f"no boot/config-{release} in {deb.name}", todo)
    config = parse_kconfig(config_path.read_text(errors="replace"))
    for sym in REQUIRED_BUILTIN:
        if config.get(sym) != "y":
            raise ImageError("kernel check", f"{sym} is not built into {release}",
                             "pick a kernel with it built in")

    moddir = next((d for d in (workdir / "lib/modules" / release,
                               workdir / "usr/lib/modules" / release) if d.is_dir()), None)
    if moddir is None:
        raise ImageError("kernel unpack", f"no lib/modules/{release} in {deb.name}", todo)
    index: dict[str, Path] = {}
    for p in moddir.rglob("*.ko*"):
        if re.search(r"\.ko(\.xz|\.gz|\.zst)?$", p.name):
            index[_module_name(p.name)] = p
    builtin_list = moddir / "modules.builtin"
    builtin_mods = set()
    if builtin_list.is_file():
        builtin_mods = {_module_name(Path(x).name) for x in builtin_list.read_text().split()}

    order: list[tuple[str, bytes]] = []
    builtin: list[str] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name in chain:
            raise ImageError("module order", f"dependency cycle {' -> '.join(chain + (name,))}",
                             "check the module list")
        sym = MODULE_CONFIG.get(name)
        if (sym and config.get(sym) == "y") or name in builtin_mods:
            seen.add(name)
            builtin.append(name)
            return
        if sym and config.get(sym) != "m":
            raise ImageError("kernel check", f"{name}: {sym} is not set in {release}",
                             "pick a kernel with virtio support")
        path = index.get(name)
        if path is None:
            raise ImageError("kernel check", f"module {name} not found in {deb.name}",
                             "check MODULES in hived/image.py")
        elf = _read_module(path)
        info = modinfo(elf)
        for dep in ",".join(info.get("depends", [])).split(","):
            if dep:
                visit(dep.replace("-", "_"), chain + (name,))
        vermagic = (info.get("vermagic") or [""])[0].split()
        if vermagic and vermagic[0] != release:
            raise ImageError("kernel check", f"{name} is built for {vermagic[0]}, not {release}",
                             todo)
        seen.add(name)
        order.append((name, elf))

    net_start = None
    for name in MODULES:
        if name in NET_MODULES and net_start is None:
            net_start = len(order)  # what is loaded from here on only the network needs
        visit(name, ())
    net_only = [n for n, _ in order[net_start:]] if net_start is not None else []
    return KernelParts(release, vmlinuz[0], config, order, builtin, net_only)


# --------------------------------------------------------------------------
# initramfs


class Newc:
    """Writer for the SVR4 'newc' cpio format the kernel unpacks as initramfs."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.ino = 300000

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:
        self.ino += 1
        namez = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(namez), 0)
        self.buf += b"070701" + b"".join(b"%08X" % f for f in fields)
        self.buf += namez
        self.buf += b"\0" * (-len(self.buf) % 4)
        self.buf += data
        self.buf += b"\0" * (-len(self.buf) % 4)

    def dir(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm, nlink=2)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, nlink=1)
        self.buf += b"\0" * (-len(self.buf) % 512)
        return bytes(self.buf)


def _elf_is_static(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            return False
        e_phoff, = struct.unpack_from("<Q", head, 0x20)
        e_phentsize, e_phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(e_phoff)
        table = f.read(e_phentsize * e_phnum)
    return all(struct.unpack_from("<I", table, i * e_phentsize)[0] != 3  # PT_INTERP
               for i in range(e_phnum))


def find_busybox() -> Path:
    todo = "run `apt-get install busybox-static`"
    for cand in (shutil.which("busybox"), "/bin/busybox", "/usr/bin/busybox"):
        if cand and Path(cand).is_file():
            path = Path(cand).resolve()
            if not _elf_is_static(path):
                raise ImageError("busybox check", f"{path} is dynamically linked", todo)
            return path
    raise ImageError("tool check", "busybox is not installed", todo)


def build_initramfs(busybox: Path, modules: list[tuple[str, bytes]], init_sh: bytes,
                    compression: str = INITRD_COMPRESSION, net_only: list[str] | tuple = ()) -> bytes:
    listing = subprocess.run([str(busybox), "--list"], capture_output=True, text=True,
                             check=False).stdout.split()
    missing = [a for a in BUSYBOX_APPLETS if a not in listing]
    if missing:
        raise ImageError("busybox check", f"{busybox} lacks applets {', '.join(missing)}",
                         "run `apt-get install busybox-static`")
    c = Newc()
    for d in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3, 0o666)
    c.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in BUSYBOX_APPLETS:
        c.symlink(f"bin/{applet}", "busybox")
    for name, elf in modules:
        c.file(f"lib/modules/{name}.ko", elf)
    c.file("lib/modules/order", "".join(f"{n}\n" for n, _ in modules).encode())
    c.file("lib/modules/net", "".join(f"{n}\n" for n in net_only).encode())
    c.file("init", init_sh, 0o755)
    data = c.finish()
    if compression == "gzip":
        return gzip.compress(data, compresslevel=9, mtime=0)
    if compression != "none":
        raise ValueError(f"unknown initramfs compression {compression!r}")
    return data


# --------------------------------------------------------------------------
# root filesystem


def debootstrap_tarball(cache_dir: Path, workdir: Path, log: _Log | None = None, *,
                        refresh: bool = False) -> tuple[Path, bool]:
    """The cached debootstrap result for SUITE/VARIANT/INCLUDE/MIRROR; (path, was_cached)."""
    tarball = cache_dir / f"debootstrap-{SUITE}-{VARIANT}-{_debootstrap_key()}.tar"
    if tarball.is_file() and not refresh:
        return tarball, True
    target = workdir / "debootstrap"
    cmd = ["debootstrap", f"--variant={VARIANT}", f"--include={','.join(INCLUDE)}",
           SUITE, str(target), MIRROR]
    todo = f"check the network and that {MIRROR} is reachable, then rerun `hived image build`"
    p = _run(cmd, "debootstrap", todo, log, check=False)
    if p.returncode != 0:
        why = _last_error_line(p.stdout)
        dlog = target / "debootstrap" / "debootstrap.log"
        if dlog.is_file():
            log_text = dlog.read_text(errors="replace")
            if log is not None:
                log.write(f"--- debootstrap.log\n{log_text}\n")
            if "No space left on device" in log_text:
                why = "disk full (No space left on device)"
        if "No space left on device" in p.stdout:
            why = "disk full (No space left on device)"
        raise ImageError("debootstrap", why, todo)
    tmp = tarball.with_name(f".{tarball.name}.{os.getpid()}")
    _run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", str(target),
          "-cf", str(tmp), "."], "debootstrap cache", "check free space in the cache dir", log)
    os.replace(tmp, tarball)
    shutil.rmtree(target)
    return tarball, False


def _rm(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _empty_dir(path: Path) -> None:
    if path.is_dir():
        for child in path.iterdir():
            _rm(child)


def slim_rootfs(root: Path) -> None:
    """Drop what a read-only build cell never reads: apt state, docs, man pages, locales."""
    for sub in ("var/lib/apt/lists", "var/cache/apt", "usr/share/man", "usr/share/info",
                "usr/share/lintian", "usr/share/linda", "var/cache/man", "var/log",
                "usr/share/bash-completion", "tmp", "var/tmp", "run",
                "dev", "debootstrap"):
        _empty_dir(root / sub)
    _rm(root / "debootstrap")
    (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
    (root / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
    # /usr/share/doc: keep only the copyright files
    doc = root / "usr/share/doc"
    if doc.is_dir():
        for pkg in doc.iterdir():
            if pkg.is_dir() and not pkg.is_symlink():
                for child in pkg.iterdir():
                    if child.name != "copyright":
                        _rm(child)
            elif not pkg.is_symlink():
                _rm(pkg)
    # translations; locale.alias stays (glibc reads it), C.utf8 is in /usr/lib/locale
    locale = root / "usr/share/locale"
    if locale.is_dir():
        for child in locale.iterdir():
            if child.name != "locale.alias":
                _rm(child)
    for pattern in ("var/lib/dpkg/*-old", "var/cache/debconf/*-old", "var/cache/ldconfig/aux-cache",
                    "etc/*-"):
        for p in root.glob(pattern):
            _rm(p)
    for p in (root / "etc/machine-id",):
        if p.exists():
            p.write_text("")


def add_build_user(root: Path) -> None:
    """uid/gid 1000 'build', home /work; /etc/passwd, group and shadow edited in place."""
    def add(path: Path, line: str, mode: int) -> None:
        text = path.read_text() if path.exists() else ""
        lines = [ln for ln in text.splitlines() if ln and ln.split(":")[0] != BUILD_USER]
        for ln in lines:
            fields = ln.split(":")
            if path.name in ("passwd", "group") and len(fields) > 2 and \
                    fields[2] == str(BUILD_UID):
                raise ImageError("root filesystem", f"id {BUILD_UID} already taken in "
                                 f"{path.name}: {ln}", "check the debootstrap result")
        lines.append(line)
        path.write_text("\n".join(lines) + "\n")
        path.chmod(mode)

    etc = root / "etc"
    add(etc / "passwd", f"{BUILD_USER}:x:{BUILD_UID}:{BUILD_GID}:hived build:/work:/bin/sh",
        0o644)
    add(etc / "group", f"{BUILD_USER}:x:{BUILD_GID}:", 0o644)
    add(etc / "shadow", f"{BUILD_USER}:!::0:99999:7:::", 0o640)
    if (etc / "gshadow").exists():
        add(etc / "gshadow", f"{BUILD_USER}:!::", 0o640)


def install_hived(root: Path, package_dir: Path | None = None) -> list[str]:
    """Copy the pure-Python files to /opt/hived/hived and byte-compile with the guest python."""
    src = package_dir or PACKAGE_DIR
    dest = root / "opt/hived/hived"
    if dest.exists():
        shutil.rmtree(dest)
    files = python_files(src)
    for rel in files:
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        shutil.copyfile(src / rel, out)
        out.chmod(0o644)
    for d in [root / "opt/hived", *dest.rglob("*")]:
        if d.is_dir():
            d.chmod(0o755)
    _run(["chroot", str(root), "/usr/bin/python3", "-m", "compileall", "-q",
          "--invalidation-mode", "unchecked-hash", "/opt/hived"],
         "byte-compile", "check the hived sources for syntax errors", None)
    return [str(r) for r in files]


def compile_buildinit(root: Path, log: _Log | None = None) -> Path:
    """The build containers' init (hived/guest/buildinit.c), static so any image can run it."""
    out = root / BUILDINIT_PATH
    out.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    _run(["cc", "-static", "-Os", "-s", "-Wall", "-Werror", "-o", str(out), str(BUILDINIT_C)],
         "compile hived-buildinit", "run `apt-get install gcc libc6-dev`", log)
    out.chmod(0o755)
    return out


def finish_rootfs(root: Path) -> None:
    for d, mode in (("work", 0o755), ("tmp", 0o1777), ("run", 0o755), ("var/tmp", 0o1777),
                    ("proc", 0o555), ("sys", 0o555), ("dev", 0o755), ("root", 0o700)):
        p = root / d
        p.mkdir(parents=True, exist_ok=True)
        p.chmod(mode)
    os.chown(root / "work", BUILD_UID, BUILD_GID)
    (root / "etc/hostname").write_text("cell\n")
    (root / "etc/hosts").write_text("127.0.0.1\tlocalhost cell\n::1\tlocalhost ip6-localhost\n")
    (root / "etc/fstab").write_text("# mounted by the hived initramfs\n")


def tree_usage(root: Path, block: int = 4096) -> tuple[int, int]:
    """(bytes the tree needs in `block`-sized blocks, inode count); hard links count once."""
    used, inodes = 0, 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames, "."] if dirpath == str(root) else [*dirnames,
                                                                              *filenames]:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            inodes += 1
            if stat.S_ISREG(st.st_mode):
                used += math.ceil(st.st_size / block) * block
            elif stat.S_ISDIR(st.st_mode):
                used += max(block, math.ceil(st.st_size / block) * block)
            elif stat.S_ISLNK(st.st_mode) and st.st_size >= 60:
                used += block
    return used, inodes


def make_root_ext4(root: Path, out: Path, image_hash: str, log: _Log | None = None) -> dict:
    used, inodes = tree_usage(root)
    n_inodes = int(inodes * (1 + ROOT_HEADROOM)) + 1024
    # data + inode tables (256 B each), + headroom, + fixed room for ext4 metadata
    size = int((used + n_inodes * 256) * (1 + ROOT_HEADROOM)) + (16 << 20)
    size = math.ceil(size / (1 << 20)) << 20
    fs_uuid = str(uuid.UUID(hashlib.sha256(image_hash.encode()).hexdigest()[:32]))
    with open(out, "wb") as f:
        f.truncate(size)
    _run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-N", str(n_inodes),
          "-m", "0", "-O", "^has_journal", "-L", ROOT_LABEL, "-U", fs_uuid,
          "-E", f"hash_seed={fs_uuid},assume_storage_prezeroed=1",
          "-d", str(root), str(out)],
         "mke2fs", "check free space under the image dir", log)
    _run(["e2fsck", "-fn", str(out)], "root.ext4 check", "report a bug in hived image build",
         log)
    return {"used_bytes": used, "inodes": inodes, "inode_count": n_inodes, "size_bytes": size,
            "label": ROOT_LABEL, "uuid": fs_uuid}


# --------------------------------------------------------------------------
# the build


class _Progress:
    def __init__(self, total: int, out: TextIO | None):
        self.total, self.n, self.out = total, 0, out
        self.times: dict[str, float] = {}

    def _w(self, text: str) -> None:
        if self.out is not None:
            self.out.write(text)
            self.out.flush()

    @contextlib.contextmanager
    def step(self, key: str, label: str) -> Iterator[dict]:
        self.n += 1
        self._w(f"[{self.n}/{self.total}] {label} ... ")
        t0 = time.monotonic()
        note: dict = {}
        try:
            yield note
        except BaseException:
            self._w("failed\n")
            raise
        dt = time.monotonic() - t0
        self.times[key] = round(dt, 2)
        extra = f" ({note['note']})" if note.get("note") else ""
        self._w(f"{dt:.1f} s{extra}\n")


def _complete(d: Path) -> bool:
    return (d / "manifest.json").is_file() and all((d / f).is_file() for f in IMAGE_FILES)


@contextlib.contextmanager
def _locked(dest_root: Path) -> Iterator[None]:
    with open(dest_root / ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _set_current(dest_root: Path, name: str) -> None:
    tmp = dest_root / f".current.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(name, tmp)
    os.replace(tmp, dest_root / "current")


def build_image(dest_root: Path | str | None = None, force: bool = False, *,
                out: TextIO | None = sys.stderr, cache_dir: Path | None = None) -> Path:
    """The image dir for the current inputs, built first unless it is already complete.

    Progress goes to `out` (stderr); failures raise ImageError. `force` rebuilds
    even a complete image and reruns debootstrap instead of using its cache.
    """
    dest_root = Path(dest_root) if dest_root is not None else default_dest()
    try:
        dest_root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ImageError("image dir", f"cannot create {dest_root}: {e.strerror}",
                         "run as root or set HIVED_IMAGE_DIR / --dest") from None
    cache_dir = cache_dir or dest_root / "cache"
    local = local_inputs()
    kernel = resolve_kernel()
    inputs = image_inputs(kernel, local)
    h = inputs_hash(inputs)
    final = dest_root / h
    if _complete(final) and not force:
        current = dest_root / "current"
        if not current.is_symlink() or os.readlink(current) != h:
            _set_current(dest_root, h)
        return final
    with _locked(dest_root):
        if _complete(final) and not force:
            _set_current(dest_root, h)
            return final
        try:
            return _build(dest_root, cache_dir, kernel, inputs, local, h, force, out)
        except ImageError as e:
            log = cache_dir / "last-build.log"
            if log.is_file() and e.what not in ("tool check", "build"):
                e.todo += f" (full log: {log})"
            raise
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise ImageError("build", f"disk full under {dest_root}",
                                 "free space or set HIVED_IMAGE_DIR to a bigger disk") from None
            raise


def _build(dest_root: Path, cache_dir: Path, kernel: Kernel, inputs: dict, local: dict,
           h: str, force: bool, out: TextIO | None) -> Path:
    if os.geteuid() != 0:
        raise ImageError("build", "debootstrap and chroot need root", "run it as root")
    _require_tools(["apt-get", "dpkg-deb", "debootstrap", "mke2fs", "e2fsck", "chroot", "tar", "cc"])
    busybox = find_busybox()
    for stale in dest_root.glob(".build-*"):
        shutil.rmtree(stale, ignore_errors=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(dest_root).free
    if free < NEEDED_FREE_BYTES:
        raise ImageError("build", f"only {free >> 20} MiB free under {dest_root}, "
                         f"need about {NEEDED_FREE_BYTES >> 20} MiB",
                         "free space or set HIVED_IMAGE_DIR to a bigger disk")
    init_sh = INIT_SH.read_bytes()
    log = _Log(cache_dir / "last-build.log")
    log.path.write_text(f"hived image build {h} {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
    t_start = time.monotonic()
    build = Path(tempfile.mkdtemp(prefix=f".build-{h}-", dir=dest_root))
    try:
        work, img = build / "work", build / "image"
        work.mkdir()
        img.mkdir(mode=0o755)
        prog = _Progress(6, out)
        with prog.step("kernel", f"kernel {kernel.package} {kernel.version}") as note:
            deb, cached = fetch_kernel(kernel, cache_dir, log)
            kp = extract_kernel(deb, work / "kernel", log)
            shutil.copyfile(kp.vmlinuz, img / "vmlinuz")
            note["note"] = ("cached .deb, " if cached else "") + \
                f"modules {' '.join(n for n, _ in kp.modules)}"
        with prog.step("initrd", f"initramfs ({INITRD_COMPRESSION})"):
            (img / "initrd.img").write_bytes(build_initramfs(busybox, kp.modules, init_sh,
                                                             net_only=kp.net_only))
            shutil.rmtree(work / "kernel")
        with prog.step("debootstrap", f"debootstrap {SUITE} ({VARIANT})") as note:
            tarball, cached = debootstrap_tarball(cache_dir, work, log, refresh=force)
            note["note"] = "cached" if cached else "cached for next time"
        root = work / "root"
        with prog.step("rootfs", "root tree: unpack, slim, build user, hived + compileall"):
            root.mkdir()
            _run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", str(root),
                  "-xpf", str(tarball)], "unpack debootstrap cache",
                 "rerun with --force to redo debootstrap", log)
            slim_rootfs(root)
            add_build_user(root)
            finish_rootfs(root)
            if not (root / "usr/bin/python3").exists():
                raise ImageError("root filesystem", "no /usr/bin/python3 after debootstrap",
                                 "rerun with --force")
            install_hived(root)
            compile_buildinit(root, log)
        with prog.step("mke2fs", "root.ext4 (mke2fs -d, no journal)") as note:
            rootinfo = make_root_ext4(root, img / "root.ext4", h, log)
            note["note"] = f"{rootinfo['size_bytes'] >> 20} MiB, " \
                f"{rootinfo['used_bytes'] >> 20} MiB used"
            shutil.rmtree(root)
        with prog.step("manifest", "manifest + install"):
            files = {}
            for f in IMAGE_FILES:
                st = (img / f).stat()
                files[f] = {"size": st.st_size, "disk_bytes": st.st_blocks * 512,
                            "sha256": _sha256_file(img / f)}
            manifest = {
                "format": FORMAT_VERSION,
                "hash": h,
                "local_key": local_key(local),
                "inputs": inputs,
                "kernel": {"meta_package": KERNEL_META_PACKAGE, "package": kernel.package,
                           "version": kernel.version, "release": kp.release},
                "modules": [n for n, _ in kp.modules],
                "modules_builtin": kp.builtin,
                "modules_net_only": kp.net_only,
                "initrd": {"compression": INITRD_COMPRESSION,
                           "busybox": str(busybox), "busybox_sha256": _sha256_file(busybox)},
                "root": rootinfo,
                "debootstrap": {"tarball": tarball.name},
                "files": files,
                "steps_seconds": prog.times,
                "build_seconds": round(time.monotonic() - t_start, 2),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            tmp = img / ".manifest.json"
            tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, img / "manifest.json")
            final = dest_root / h
            old = None
            if final.exists():  # --force over a complete image
                old = dest_root / f".build-old-{h}-{os.getpid()}"
                os.rename(final, old)
            os.rename(img, final)
            _set_current(dest_root, h)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            prune_images(dest_root)
        return final
    finally:
        shutil.rmtree(build, ignore_errors=True)


def prune_images(dest_root: Path, keep: int = KEEP_IMAGES) -> list[str]:
    """Remove all but the `keep` newest complete images (never `current`); names removed.

    A running cell is not disturbed: QEMU holds its files open.
    """
    current = dest_root / "current"
    cur_name = os.readlink(current) if current.is_symlink() else None
    images = []
    for d in dest_root.iterdir():
        if _HEX_NAME.match(d.name) and d.is_dir() and not d.is_symlink():
            try:
                built = json.loads((d / "manifest.json").read_text()).get("built_at", "")
            except (OSError, ValueError):
                built = ""  # incomplete leftovers go first
            images.append((d.name == cur_name, built, d))
    images.sort(key=lambda t: (t[0], t[1]), reverse=True)
    removed = []
    for is_current, _, d in images[max(keep, 1):]:
        if not is_current:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d.name)
    return removed


# --------------------------------------------------------------------------
# lookup


def find_image(dest_root: Path | str | None = None, *, required: bool = False) -> Path | None:
    """The complete image built from the current hived code, init.sh and recipe.

    Matches on every input except the kernel version, so that an `apt-get update`
    bringing a newer kernel does not strand running hosts; `hived image build`
    picks the new kernel up. Prefers `current`, then the newest build. Needs no
    apt and no root. With required=True a miss raises ImageMissing naming the fix.
    """
    dest_root = Path(dest_root) if dest_root is not None else default_dest()
    key = local_key(local_inputs())
    best: tuple[str, Path] | None = None
    current = dest_root / "current"
    cur_name = os.readlink(current) if current.is_symlink() else None
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for d in dest_root.iterdir():
            if not _HEX_NAME.match(d.name) or not _complete(d):
                continue
            try:
                m = json.loads((d / "manifest.json").read_text())
            except (OSError, ValueError):
                continue
            if m.get("local_key") != key:
                continue
            rank = ("1" if d.name == cur_name else "0") + str(m.get("built_at", ""))
            if best is None or rank > best[0]:
                best = (rank, d)
    if best is not None:
        return best[1]
    if required:
        raise ImageMissing("cell image lookup",
                           f"no image for the current hived code in {dest_root}",
                           "run `hived image build`")
    return None


def read_manifest(image_dir: Path | str) -> dict:
    return json.loads((Path(image_dir) / "manifest.json").read_text())


# --------------------------------------------------------------------------
# per-cell scratch disk


def scratch_disk(path: Path | str, size_bytes: int, *, uid: int = BUILD_UID,
                 gid: int = BUILD_GID) -> Path:
    """Create a sparse ext4 file at `path` whose root directory is owned by uid:gid.

    No journal (the disk dies with the cell) and no inode-table zeroing: the file is
    freshly truncated, so its blocks read as zeros, and assume_storage_prezeroed
    marks the tables as zeroed so the guest kernel starts no ext4lazyinit thread.
    About 10-40 ms for a few GiB; the file takes ~1-2% of its size on disk at first.
    """
    path = Path(path)
    if size_bytes < (8 << 20):
        raise ValueError("scratch disk must be at least 8 MiB")
    size_bytes -= size_bytes % 4096
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size_bytes)
    finally:
        os.close(fd)
    try:
        _run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", "-O", "^has_journal",
              "-E", f"root_owner={uid}:{gid},lazy_itable_init=1,assume_storage_prezeroed=1,"
              "nodiscard", str(path)],
             "scratch disk", "check free space and that e2fsprogs is installed")
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    return path


# --------------------------------------------------------------------------
# kernel command line for the guest


_TSC_RE = (
    re.compile(rb"tsc: Refined TSC clocksource calibration: (\d+)\.(\d+) MHz"),
    re.compile(rb"tsc: Detected (\d+)\.(\d+) MHz processor"),
)


@functools.lru_cache(maxsize=1)
def host_tsc_khz() -> int | None:
    """The host's TSC frequency in kHz as its kernel found it, or None if unknown.

    Read from sysfs where the kernel exports it, else from the kernel log (/dev/kmsg,
    non-destructive; needs root or dmesg_restrict=0).
    """
    with contextlib.suppress(OSError, ValueError):
        return int(Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz").read_text())
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    found: list[int | None] = [None, None]
    try:
        for _ in range(100000):
            try:
                rec = os.read(fd, 8192)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EPIPE:  # record overwritten while reading: skip it
                    continue
                break
            if b"tsc:" not in rec:
                continue
            for i, pattern in enumerate(_TSC_RE):
                m = pattern.search(rec)
                if m:
                    found[i] = int(m.group(1)) * 1000 + int(m.group(2).ljust(3, b"0")[:3])
    finally:
        os.close(fd)
    return found[0] or found[1]


def guest_kernel_args(accel: str = "tcg") -> str:
    """Kernel arguments a cell should get on this host, besides console/reboot/panic/quiet.

    cryptomgr.notests: skip the crypto self-tests (~0.2 s of a TCG boot; nothing in a
    cell depends on them).
    Under TCG, also tsc_early_khz=<host TSC rate> (+ tsc=reliable when the host TSC is
    invariant): the guest's TSC runs at the host's rate, but the guest kernel has to
    calibrate it against the PIT, which fails now and then on a busy host, and with
    no HPET/PM timer on microvm the kernel then marks the TSC unstable and hangs in
    early boot (2 of 30 boots on a quiet host here, 3 of 8 with both cores busy;
    0 of 52 with tsc_early_khz). tsc=reliable keeps the clocksource watchdog, whose
    jiffies run late on a busy TCG host, from demoting the TSC to jiffies.
    """
    args = ["cryptomgr.notests"]
    if accel != "tcg" or os.uname().machine != "x86_64":
        return " ".join(args)
    khz = host_tsc_khz()
    if khz:
        args.append(f"tsc_early_khz={khz}")
        with contextlib.suppress(OSError):
            flags = re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
            if flags and {"constant_tsc", "nonstop_tsc"} <= set(flags.group(1).split()):
                args.append("tsc=reliable")
    return " ".join(args)


# --------------------------------------------------------------------------
# CLI
