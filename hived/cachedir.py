"""The scaffolding both content-addressed caches on a box stand on (build images in
hived/oci/cache.py, repository checkouts in hived/repos/cache.py).

A cache is a directory:

    index.json        what is cached, its size and last use (rewritten atomically)
    .lock             the index lock (flock): every change of the index happens under it
    tmp/<op>-<pid>-*  work in progress, each with a flock'ed .lock inside; crashed work is
                      removed at the next start (a live process's is left alone)
    tmp/del-*         entries being removed: renamed out of the way under the lock (atomic),
                      deleted once it is released

Entries are leased by a shared flock on their file: a lease keeps an entry from eviction and
removal in every process, and dies with the process that held it. Eviction is least recently
used first, down to `max_bytes`, never touching what is leased.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Hashable, Iterable, Iterator
from pathlib import Path

from hived.errors import ActionableError
from hived.fsutil import pid_alive, write_json_atomic

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 20 << 30
INDEX_VERSION = 1
FS_TOOLS = {"erofs": "mkfs.erofs", "ext4": "mke2fs"}


def try_lock(path: Path, mode: int = fcntl.LOCK_EX) -> int | None:
    """An fd holding path's flock (non-blocking); None when someone else holds it; -1 when
    the file does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return -1
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class CacheDir:
    """Index, lock, work and trash directories, leases, LRU eviction. Subclasses say what an
    empty index holds (`_empty_index`), how the index is rebuilt from the entries on disk
    (`_reconcile`), and which error they raise (`error`, `not_cached`)."""

    what = "cache"                    # for messages: "image cache", "repository cache"
    error: type[ActionableError] = ActionableError
    not_cached: type[ActionableError] = ActionableError
    remove_in_background = False      # delete trash in a thread (large trees) or at once

    def __init__(self, root: str | os.PathLike, subdirs: Iterable[str], max_bytes: int | None) -> None:
        self.root = Path(root)
        self._leases: dict[Hashable, list[int]] = {}
        self._trash: list[Path] = []
        for sub in (*subdirs, "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        with self._locked():
            index = self._load()
            if max_bytes is not None:
                index["max_bytes"] = int(max_bytes)
            self._reconcile(index)
            self._save(index)
            self._clean_tmp()
        self.max_bytes = int(index["max_bytes"])

    # -- what a subclass says ----------------------------------------------------------------
    def _empty_index(self) -> dict:
        return {"version": INDEX_VERSION, "max_bytes": getattr(self, "max_bytes", DEFAULT_MAX_BYTES)}

    def _reconcile(self, index: dict) -> None:
        raise NotImplementedError

    # -- the index ---------------------------------------------------------------------------
    @property
    def index_path(self) -> Path:
        return self.root / "index.json"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The index lock. Never await while holding it (flock is per open file: a second
        coroutine of this process would block the event loop). Directories removed meanwhile
        are only renamed under it and deleted after it is released."""
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
            trash, self._trash = self._trash, []
            if trash and self.remove_in_background:
                threading.Thread(target=lambda: [shutil.rmtree(d, ignore_errors=True) for d in trash],
                                 name="hived-cache-rm", daemon=True).start()
            else:
                for d in trash:
                    shutil.rmtree(d, ignore_errors=True)

    def _load(self) -> dict:
        try:
            doc = json.loads(self.index_path.read_text())
            if not isinstance(doc, dict) or doc.get("version") != INDEX_VERSION:
                raise ValueError("unknown index version")
            for k, v in self._empty_index().items():
                doc.setdefault(k, v)
            return doc
        except FileNotFoundError:
            return self._empty_index()
        except (ValueError, OSError) as e:
            log.warning("%s index %s unreadable (%s): rebuilding it from the entries on disk",
                        self.what, self.index_path, e)
        doc = self._empty_index()
        self._reconcile(doc)  # every complete entry describes itself on disk
        return doc

    def _save(self, index: dict, durable: bool = True) -> None:
        write_json_atomic(self.index_path, index, durable)

    # -- work and trash ----------------------------------------------------------------------
    def _workdir(self, op: str) -> tuple[Path, int]:
        """A fresh tmp/<op>-<pid>-<random> for one operation, and the fd holding its .lock
        (which tells `_clean_tmp` of every process that the work is alive)."""
        work = self.root / "tmp" / f"{op}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        work.mkdir()
        fd = os.open(work / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return work, fd

    def _clean_tmp(self) -> None:
        """Remove what crashed work left (not another live process's work dir)."""
        for d in (self.root / "tmp").iterdir():
            if not d.name.startswith("del-"):
                pid = d.name.split("-")[1] if d.name.count("-") >= 2 else ""
                fd = try_lock(d / ".lock")
                if fd is None:
                    continue  # live work
                if fd == -1 and pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid)):
                    continue  # just created, its lock not there yet
                if fd >= 0:
                    os.close(fd)
            self._detach(d, rename=False)
        for p in self.root.glob(".index.json.tmp-*"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def _detach(self, d: Path, rename: bool = True) -> None:
        """Rename d out of the way now (atomic); delete it once the index lock is released."""
        if rename:
            dest = self.root / "tmp" / f"del-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(d, dest)
            except FileNotFoundError:
                return
            d = dest
        if d.is_dir() and not d.is_symlink():
            self._trash.append(d)
        else:
            with contextlib.suppress(FileNotFoundError):
                d.unlink()

    # -- leases ------------------------------------------------------------------------------
    def _take_lease(self, key: Hashable, path: Path, name: str) -> Path:
        """Lease the entry whose file is `path` (a shared flock, checked to still be that
        file): it is kept, never evicted or removed, until released. `name` is for messages."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise self.not_cached(f"{name} was removed from the {self.what}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            if not os.path.samestat(os.fstat(fd), os.stat(path)):
                raise FileNotFoundError(path)
        except (BlockingIOError, FileNotFoundError):
            os.close(fd)
            raise self.not_cached(f"{name} is being removed from the {self.what}") from None
        self._leases.setdefault(key, []).append(fd)
        return path

    def _drop_lease(self, key: Hashable | None, what: str) -> None:
        fds = self._leases.get(key) if key is not None else None
        if not fds:
            raise self.error(f"{what} is not leased by this process", "release only what acquire returned")
        os.close(fds.pop())
        if not fds:
            del self._leases[key]

    def _in_use(self, key: Hashable, path: Path) -> bool:
        """Leased here or by any other process (a shared flock on its file)."""
        if self._leases.get(key):
            return True
        fd = try_lock(path)
        if fd is None:
            return True
        if fd >= 0:
            os.close(fd)
        return False

    def close(self) -> None:
        """Drop every lease this object holds."""
        for fds in self._leases.values():
            for fd in fds:
                os.close(fd)
        self._leases.clear()

    # -- eviction and tools ------------------------------------------------------------------
    def _evict_lru(self, entries: Iterable[tuple[float, Hashable]], used: Callable[[], int],
                   remove: Callable[[Hashable], bool], protect: set, label: Callable[[Hashable], str]) -> list:
        """Remove (last_used, key) entries oldest first while `used()` > max_bytes, skipping
        `protect` and whatever `remove` finds in use. Returns the keys removed."""
        evicted: list = []
        now = used()
        if now <= self.max_bytes:
            return evicted
        for _t, key in sorted(entries, key=lambda e: e[0]):
            if now <= self.max_bytes:
                break
            if key in protect:
                continue
            if remove(key):
                evicted.append(key)
                log.info("%s: evicted %s (least recently used; over %d bytes)", self.what, label(key),
                         self.max_bytes)
                now = used()
        if now > self.max_bytes:
            log.warning("%s: %d bytes used, bound %d: the rest is in use", self.what, now, self.max_bytes)
        return evicted

    def _pick_fs_type(self, wanted: str) -> str:
        """erofs where mkfs.erofs exists, else ext4; or the one asked for, if its tool exists."""
        if wanted in FS_TOOLS:
            if shutil.which(FS_TOOLS[wanted]) is None:
                raise self.error(f"{FS_TOOLS[wanted]} is not installed", "apt-get install erofs-utils e2fsprogs")
            return wanted
        for fs, tool in FS_TOOLS.items():
            if shutil.which(tool):
                return fs
        raise self.error("neither mkfs.erofs nor mke2fs is installed", "apt-get install erofs-utils")

    def _touch(self, entry: dict) -> None:
        entry["last_used"] = time.time()
