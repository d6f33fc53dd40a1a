"""Small crash-safe file helpers shared by the box's on-disk caches (hived/oci, hived/repos)."""

import contextlib
import errno
import json
import os
import uuid
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, doc: Any, durable: bool = True) -> None:
    """Write then rename: readers see the old or the new file, never a mix. durable=False
    skips the fsyncs (for data a power cut may lose, such as last-use times; a cache must
    then survive an empty index by rebuilding it from what is on disk)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def copy_sparse(src_fd: int, dst_fd: int, size: int, chunk: int = 1 << 20) -> int:
    """Copy the first `size` bytes of `src_fd` into `dst_fd` at the same offsets, writing only the
    data regions (SEEK_DATA / SEEK_HOLE): holes stay holes. `dst_fd` is cut to `size` first.
    Works across filesystems (memfd <-> disk), where copy_file_range may not. Returns the bytes
    written."""
    os.ftruncate(dst_fd, 0)
    os.ftruncate(dst_fd, size)
    written = 0
    pos = 0
    while pos < size:
        try:
            start = os.lseek(src_fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                break
            raise
        if start >= size:
            break
        end = min(os.lseek(src_fd, start, os.SEEK_HOLE), size)
        while start < end:
            data = os.pread(src_fd, min(chunk, end - start), start)
            if not data:
                raise OSError(errno.EIO, f"source shrank while being copied (at byte {start} of {size})")
            n = os.pwrite(dst_fd, data, start)
            start += n
            written += n
        pos = end
    return written
