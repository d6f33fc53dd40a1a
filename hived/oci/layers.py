"""Apply OCI image layers (tar, tar+gzip, tar+zstd), in order, to one directory tree.

The tree is private to one pull and only this code writes to it, so paths are resolved as
strings, but never through the kernel's symlink resolution: every symlink met on the way
to an entry's parent is resolved by hand *inside* the root (chroot semantics, like
containerd), and the entry itself is never followed. So a layer that makes `etc -> /` and
then writes `etc/passwd` writes `<root>/passwd`, never the host's.

Rules (OCI image spec, "Applying changesets"):
* `.wh.NAME` removes NAME (and everything under it) left by lower layers;
  `.wh..wh..opq` in DIR hides everything lower layers left in DIR. Whiteouts never touch
  what the same layer adds. Other `.wh..wh.*` names (aufs metadata) are ignored.
* A directory over a directory merges (metadata from the newer); anything else replaces.
* Hard links name a path in the tree (this layer or a lower one); not a directory.
* Names are cleaned lexically; one that climbs above the root (`../x`, `a/../../x`), or a
  hard link whose target does, fails the layer. A leading "/" means the root.
* Numeric owner, mode (with set-id bits), mtime, xattrs (PAX SCHILY.xattr.*) and device
  nodes are kept: this runs as root, and the result becomes a read-only filesystem image.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import BinaryIO

from hived.oci.errors import DigestMismatch, LayerError, UnsupportedImage

log = logging.getLogger(__name__)

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
MAX_SYMLINK_HOPS = 40
READ_BUF = 1 << 20


def clean_name(name: str, layer: str, what: str = "entry") -> list[str]:
    """Tar member name -> path components under the root; raises on escape."""
    comps: list[str] = []
    for c in name.split("/"):
        if c in ("", "."):
            continue
        if c == "..":
            if not comps:
                raise LayerError(f"layer {layer}: {what} {name!r} escapes the image root (path traversal)")
            comps.pop()
            continue
        if "\0" in c:
            raise LayerError(f"layer {layer}: {what} {name!r} has a NUL byte")
        comps.append(c)
    return comps


class HashingReader:
    """A read-only stream that hashes what passes through (the layer's diff_id)."""

    def __init__(self, raw: BinaryIO, algorithm: str = "sha256"):
        self.raw = raw
        self.hash = hashlib.new(algorithm)
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.hash.update(data)
        self.count += len(data)
        return data

    def drain(self) -> None:
        while self.read(READ_BUF):
            pass

    def digest(self) -> str:
        return f"{self.hash.name}:{self.hash.hexdigest()}"


@contextlib.contextmanager
def open_layer(path: Path):
    """The uncompressed tar stream of a layer blob, by its magic bytes (media types lie)."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"\x1f\x8b":
        with gzip.open(path, "rb") as g:
            yield g
    elif magic == b"\x28\xb5\x2f\xfd":
        if shutil.which("zstd") is None:
            raise UnsupportedImage("a layer is zstd-compressed and zstd is not installed",
                                   "install Debian's zstd package on this box")
        p = subprocess.Popen(["zstd", "-dcq", "--", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            yield p.stdout
        finally:
            p.stdout.close()
            err = p.stderr.read().decode(errors="replace").strip()
            p.stderr.close()
            if p.wait() != 0 and err:
                raise LayerError(f"zstd could not decompress {path.name}: {err}")
    else:
        with open(path, "rb", buffering=READ_BUF) as f:
            yield f


class TreeBuilder:
    """Applies layers to `root` (an empty directory) and keeps count of what it wrote."""

    def __init__(self, root: Path, *, max_bytes: int = 1 << 40, max_entries: int = 4_000_000):
        self.root = os.fspath(root)
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.bytes = 0
        self.entries = 0
        self.dir_times: dict[str, int] = {}
        self.xattr_failures = 0
        self._created: set[str] = set()
        self._layer = ""

    # -------------------------------------------------------------- public

    def apply_file(self, blob: Path, layer: str, diff_id: str | None = None) -> str:
        """Apply one layer blob; returns (and, given diff_id, checks) its uncompressed digest."""
        with open_layer(blob) as raw:
            reader = HashingReader(raw)
            try:
                self.apply(reader, layer)
            except (tarfile.TarError, EOFError, gzip.BadGzipFile, ValueError) as e:
                raise LayerError(f"layer {layer} is not a valid tar stream: {e}") from None
            reader.drain()
        got = reader.digest()
        if diff_id is not None and got != diff_id:
            raise DigestMismatch(f"layer {layer} unpacks to {got}, the image config says {diff_id}")
        return got

    def apply(self, stream: BinaryIO, layer: str) -> None:
        self._layer = layer
        self._created = set()
        tf = tarfile.open(fileobj=stream, mode="r|", bufsize=READ_BUF)  # noqa: SIM115 - closed below
        try:
            for member in tf:
                self.entries += 1
                if self.entries > self.max_entries:
                    raise LayerError(f"the image has more than {self.max_entries} files")
                self._entry(tf, member)
        finally:
            tf.close()

    def finish(self) -> None:
        """Directory mtimes last (creating children changes them); deepest first."""
        for path in sorted(self.dir_times, key=lambda p: p.count("/"), reverse=True):
            ns = self.dir_times[path]
            try:
                if stat.S_ISDIR(os.lstat(path).st_mode):
                    os.utime(path, ns=(ns, ns), follow_symlinks=False)
            except FileNotFoundError:
                pass

    # -------------------------------------------------------------- resolution

    def _resolve_dir(self, comps: list[str], create: bool, name: str) -> str | None:
        """Real path of the directory `comps` names, symlinks resolved inside the root."""
        stack: list[str] = []
        todo = list(reversed(comps))
        hops = 0
        while todo:
            c = todo.pop()
            if c in ("", "."):
                continue
            if c == "..":
                if stack:
                    stack.pop()
                continue
            path = os.path.join(self.root, *stack, c)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if not create:
                    return None
                os.mkdir(path, 0o755)
                self._created.add(path)
                stack.append(c)
                continue
            if stat.S_ISDIR(st.st_mode):
                stack.append(c)
            elif stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise LayerError(f"layer {self._layer}: too many symlinks on the way to {name!r}")
                target = os.readlink(path)
                if target.startswith("/"):
                    stack = []
                todo.extend(reversed(target.split("/")))
            else:
                if not create:
                    return None
                raise LayerError(f"layer {self._layer}: {name!r}: {'/'.join(stack + [c])} is not a directory")
        return os.path.join(self.root, *stack) if stack else self.root

    def _remove(self, path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)

    # -------------------------------------------------------------- entries

    def _entry(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        comps = clean_name(m.name, self._layer)
        if not comps:  # "./": the root directory itself
            if m.isdir():
                self._meta(self.root, m, is_dir=True)
            return
        base = comps[-1]
        if base.startswith(WHITEOUT):
            self._whiteout(comps, m.name)
            return
        parent = self._resolve_dir(comps[:-1], True, m.name)
        path = os.path.join(parent, base)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if m.isdir():
            if st is None or not stat.S_ISDIR(st.st_mode):
                if st is not None:
                    os.unlink(path)
                os.mkdir(path, 0o700)
            self._created.add(path)
            self._meta(path, m, is_dir=True)
            return
        if m.islnk():
            self._hardlink(m, path, st)
            return
        if st is not None:
            self._remove(path)
        if m.isreg():
            self._file(tf, m, path)
        elif m.issym():
            os.symlink(m.linkname, path)
            self._meta(path, m, is_link=True)
        elif m.ischr() or m.isblk():
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            os.mknod(path, kind | 0o600, os.makedev(m.devmajor, m.devminor))
            self._meta(path, m)
        elif m.isfifo():
            os.mkfifo(path, 0o600)
            self._meta(path, m)
        else:
            log.warning("layer %s: skipping %r of unsupported tar type %r", self._layer, m.name, m.type)
            return
        self._created.add(path)

    def _whiteout(self, comps: list[str], name: str) -> None:
        parent = self._resolve_dir(comps[:-1], False, name)
        if parent is None:
            return
        base = comps[-1]
        if base == OPAQUE:
            self._opaque(parent)
            return
        if base.startswith(WHITEOUT + WHITEOUT):
            return
        victim = base[len(WHITEOUT):]
        if victim in ("", ".", ".."):
            raise LayerError(f"layer {self._layer}: bad whiteout {name!r}")
        path = os.path.join(parent, victim)
        if path not in self._created:
            self._remove(path)

    def _opaque(self, directory: str) -> None:
        with os.scandir(directory) as it:
            entries = list(it)
        for e in entries:
            if e.path in self._created:
                if e.is_dir(follow_symlinks=False):
                    self._opaque(e.path)
                continue
            self._remove(e.path)

    def _hardlink(self, m: tarfile.TarInfo, path: str, st: os.stat_result | None) -> None:
        tcomps = clean_name(m.linkname, self._layer, "hard link target")
        if not tcomps:
            raise LayerError(f"layer {self._layer}: hard link {m.name!r} points at the root")
        tparent = self._resolve_dir(tcomps[:-1], False, m.linkname)
        target = os.path.join(tparent, tcomps[-1]) if tparent else None
        try:
            tst = os.lstat(target) if target else None
        except FileNotFoundError:
            tst = None
        if tst is None:
            raise LayerError(f"layer {self._layer}: hard link {m.name!r} -> {m.linkname!r}: target does not exist")
        if stat.S_ISDIR(tst.st_mode):
            raise LayerError(f"layer {self._layer}: hard link {m.name!r} -> {m.linkname!r} is a directory")
        if st is not None:
            if os.path.samestat(st, tst):
                self._created.add(path)
                return
            self._remove(path)
        os.link(target, path, follow_symlinks=False)
        self._created.add(path)

    def _file(self, tf: tarfile.TarFile, m: tarfile.TarInfo, path: str) -> None:
        self.bytes += m.size
        if self.bytes > self.max_bytes:
            raise LayerError(f"the image unpacks to more than {self.max_bytes} bytes",
                             "raise the cache's size bound or use a smaller image")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            src = tf.extractfile(m)
            left = m.size
            while left > 0:
                chunk = src.read(min(left, READ_BUF))
                if not chunk:
                    raise LayerError(f"layer {self._layer}: {m.name!r} is cut short")
                left -= len(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
            self._meta(fd, m, fd_path=path)
        finally:
            os.close(fd)

    def _meta(self, target: str | int, m: tarfile.TarInfo, *, is_dir: bool = False, is_link: bool = False,
              fd_path: str | None = None) -> None:
        path = fd_path if isinstance(target, int) else target
        if isinstance(target, int):
            os.fchown(target, m.uid, m.gid)
            os.fchmod(target, m.mode & 0o7777)  # after chown, which clears set-id bits
        else:
            os.chown(target, m.uid, m.gid, follow_symlinks=False)
            if not is_link:
                os.chmod(target, m.mode & 0o7777)
        for key, value in m.pax_headers.items():
            if key.startswith("SCHILY.xattr."):
                name = key[len("SCHILY.xattr."):]
                try:
                    os.setxattr(target if isinstance(target, int) else path, name,
                                value.encode("utf-8", "surrogateescape"),
                                **({} if isinstance(target, int) else {"follow_symlinks": False}))
                except OSError as e:
                    self.xattr_failures += 1
                    log.warning("layer %s: xattr %s on %r not kept: %s", self._layer, name, m.name, e.strerror)
        ns = int(m.mtime * 1_000_000_000)
        if is_dir:
            self.dir_times[path] = ns
        elif isinstance(target, int):
            os.utime(target, ns=(ns, ns))
        else:
            os.utime(target, ns=(ns, ns), follow_symlinks=False)
