"""The guest kernel from Debian's package: apt look-up, download, kconfig checks, ELF modinfo
(module dependencies without modules.dep), and extraction of vmlinuz and the modules."""

from __future__ import annotations

import gzip
import lzma
import os
import re
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hived.image.spec import (
    KERNEL_META_PACKAGE,
    MODULE_CONFIG,
    MODULES,
    NET_MODULES,
    REQUIRED_BUILTIN,
    ImageError,
    Kernel,
)
from hived.image.tools import _last_error_line, _Log, _require_tools, _run

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
