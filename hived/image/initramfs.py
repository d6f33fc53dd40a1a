"""The initramfs: a newc cpio written here (not by cpio(1)): static busybox, the virtio
modules, /init."""

from __future__ import annotations

import gzip
import shutil
import stat
import struct
import subprocess
from pathlib import Path

from hived.image.spec import BUSYBOX_APPLETS, INITRD_COMPRESSION, ImageError

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
