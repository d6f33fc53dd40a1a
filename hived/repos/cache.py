"""The box's repository cache: one bare mirror per repository, read-only checkout images per commit.

A build names a repository URL and a revision. The box resolves the revision against its
mirror of that repository (fetching only when the revision is missing, or on `refresh`), then
hands the cell the checked-out tree as a read-only disk image (erofs; ext4 where erofs-utils
is missing) that the VMM attaches as a drive. Images are content-addressed by commit: the
same commit is one image, shared by every cell that builds it. For builds that need `.git`,
`bundle()` makes a git bundle of the commit's history (one file; `git clone x.bundle` in the
cell) - slower for the cell, see the benchmark in `bench.py`.

Layout under the root (default /var/lib/hived/repos, one per box):

    index.json            mirrors, images, bundles (size, last use, which repositories a commit
                          was verified in), auth flags; replaced atomically (write, fsync, rename)
    .lock                 flock: index changes, across processes (box daemon, CLI)
    locks/<key>.use       shared flock by whoever reads mirror <key>; eviction takes it exclusively
    locks/<key>.fetch     exclusive flock by the one process fetching into mirror <key>
    mirrors/<key>.git/    bare mirror of one repository (<key>: hash of its normalised URL);
                          hived-mirror.json inside says which URL
    images/<commit>/      checkout.erofs (or .ext4) + meta.json: complete or absent
    bundles/<commit>/     repo.bundle + meta.json: complete or absent
    tmp/<op>-<pid>-<rnd>/ work in progress (flock'ed .lock inside); removed by the next start
    home/                 the (empty) HOME git runs with
    <scratch_dir>/hived-tree-<pid>-<rnd>/   a checkout mkfs is reading (default /dev/shm when a
                          tmpfs: creating many files there is several times faster than on a
                          busy disk); removed when the image is made, or at the next start

Rules:
* Nothing is visible under its final name before it is complete: a new mirror is fetched in
  tmp/ and renamed into mirrors/; an image or bundle is made in tmp/ and renamed into place,
  in the same index-lock section that records it. Fetches into an existing mirror rely on
  git's own guarantees: objects arrive as packs written to tmp_pack_* and renamed (index
  last) only when complete and connected; refs move in one `--atomic` transaction after
  that. A fetch that dies leaves at most temp packs and lock files, which are removed under
  the fetch lock before the mirror is used for the next fetch (a marker file says a fetch
  did not finish). Readers resolve a commit first and only read objects reachable from it,
  so a concurrent fetch never changes what they see.
* One fetch per mirror at a time (an asyncio lock in the process, the .fetch flock across
  processes); one build per image or bundle in the process (a second process building the
  same commit loses the rename and keeps the first one's).
* Leases: `acquire()` (or `acquire=True`) holds a shared flock on the image or bundle file
  until `release()`; eviction takes an exclusive non-blocking flock first, so nothing in use
  by any process is evicted. Mirrors are in use while anyone holds their .use or .fetch lock.
* Size bound (`max_bytes`, kept in the index): after each fetch or build, least recently used
  mirrors, images and bundles that are not in use go until the total fits. An image outlives
  its mirror: it is served by commit to every repository it was verified in.
* Access: once a repository needed credentials, a cached copy is served only after the
  caller's credentials were checked against the server (`git ls-remote`, remembered for
  `access_ttl_s` in memory): a cache shared by customers never hands one customer's private
  code to another who merely knows the URL.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hived.cachedir import CacheDir, try_lock
from hived.fsutil import fsync_dir as _fsync_dir
from hived.fsutil import pid_alive as _pid_alive
from hived.fsutil import write_json_atomic as _write_json_atomic
from hived.repos.errors import (
    BadBundle,
    CacheFull,
    GitError,
    InUse,
    InvalidRevision,
    InvalidUrl,
    NotCached,
    RepoCacheError,
    RepoError,
    RevisionNotFound,
)
from hived.repos.git import DEFAULT_SSH, GitFailed, GitRunner, classify, ensure_home, first_line, local_error
from hived.repos.url import ABBREV_SHA, DEFAULT_PROTOCOLS, FULL_SHA, Credentials, Remote, Rev, parse_rev, parse_url

log = logging.getLogger(__name__)

DEFAULT_ROOT = "/var/lib/hived/repos"
FS_FILES = {"erofs": "checkout.erofs", "ext4": "checkout.ext4"}
BUNDLE_FILE = "repo.bundle"
MIRROR_META = "hived-mirror.json"
FETCH_MARKER = "hived-fetching"
KINDS = {"image": "images", "bundle": "bundles"}
TREE_OWNER = (1000, 1000)  # the cell's build user (hived/cell/agent.py BUILD_UID): it owns the checkout
BRANCHES_AND_TAGS = ("+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*")


@dataclass(frozen=True)
class CheckoutImage:
    """A read-only filesystem image whose root is the checked-out tree of `commit`."""

    commit: str
    path: Path
    size: int
    fs_type: str = "erofs"
    tree: str = ""


@dataclass(frozen=True)
class CheckoutBundle:
    """A git bundle with the history of `commit` (its only ref: HEAD)."""

    commit: str
    path: Path
    size: int



def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)



def _tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


async def _flock(path: Path, mode: int) -> int:
    """Wait for path's flock without blocking the event loop (polls; cancel-safe)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    delay = 0.002
    try:
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.1)
    except BaseException:
        os.close(fd)
        raise


class RepoCache(CacheDir):
    """See the module doc. One object per process; `resolve`, `checkout_image` and `bundle` are
    coroutines, everything else is synchronous and quick. Index, locks, leases, trash and
    eviction: hived/cachedir.py."""

    what = "repository cache"
    error = RepoCacheError
    not_cached = NotCached
    remove_in_background = True  # mirrors and checkouts are large trees

    min_free_bytes = 256 << 20  # a fetch or build needs at least this much free space to start

    def __init__(self, root: str | os.PathLike = DEFAULT_ROOT, max_bytes: int | None = None, *,
                 protocols: tuple[str, ...] | list[str] = DEFAULT_PROTOCOLS, fs_type: str = "auto",
                 fetch_timeout_s: float = 900.0, local_timeout_s: float = 600.0, access_timeout_s: float = 30.0,
                 access_ttl_s: float = 300.0, ssh_command: str = DEFAULT_SSH, fsck: bool = True,
                 tree_owner: tuple[int, int] = TREE_OWNER, scratch_dir: str | os.PathLike | None = "auto",
                 scratch_max_bytes: int = 1 << 30):
        root = Path(root)
        self.protocols = tuple(protocols)
        self.fs_type = fs_type
        self.fetch_timeout_s = fetch_timeout_s
        self.local_timeout_s = local_timeout_s
        self.access_timeout_s = access_timeout_s
        self.access_ttl_s = access_ttl_s
        self.tree_owner = tree_owner
        # Where checkouts are written before mkfs reads them: a tmpfs creates files several times
        # faster than a busy disk ("auto": /dev/shm when it is a tmpfs). Trees bigger than
        # scratch_max_bytes, or that do not fit in its free space, use the cache's own tmp/.
        if scratch_dir == "auto":
            scratch_dir = _tmpfs("/dev/shm")
        self.scratch_dir = Path(scratch_dir) if scratch_dir else None
        self.scratch_max_bytes = scratch_max_bytes
        ensure_home(str(root / "home"))
        self.git = GitRunner(self.protocols, str(root / "home"), ssh_command, fsck)
        self.stats: collections.Counter[str] = collections.Counter()
        self.timings: dict[str, float] = {}  # the last fetch, checkout, mkfs, bundle (ms): for benchmarks
        self._locks: dict[str, asyncio.Lock] = {}
        self._lock_users: collections.Counter[str] = collections.Counter()
        self._locks_loop: asyncio.AbstractEventLoop | None = None
        self._fetches_done: collections.Counter[str] = collections.Counter()  # key -> good fetches so far
        self._access_ok: dict[str, float] = {}  # credentials fingerprint -> checked until (monotonic)
        self._packed_cache: dict[Path, tuple[tuple, dict]] = {}
        self._scratch_trees: dict[Path, list[Path]] = {}
        super().__init__(root, ("mirrors", "images", "bundles", "locks", "home"), max_bytes)
        if self.scratch_dir is not None:
            for d in self.scratch_dir.glob("hived-tree-*"):
                pid = d.name.split("-")[2]
                if pid.isdigit() and (int(pid) == os.getpid() or not _pid_alive(int(pid))):
                    shutil.rmtree(d, ignore_errors=True)

    # ------------------------------------------------------------------ public: the three questions

    async def resolve(self, url: str, rev: str | None = None, credentials: Credentials | None = None, *,
                      refresh: bool = False) -> str:
        """The commit id rev names in url's repository; fetches when the mirror lacks it (or,
        for a branch, tag or ref, when refresh=True). A commit id is never fetched again."""
        remote, creds = self._parse(url, credentials)
        r = parse_rev(rev)
        async with self._guard(f"resolving {r} in {remote}"), self._mirror_use(remote.key):
            await self._check_access(remote, creds)
            commit = await self._resolve(remote, creds, r, refresh)
            with self._locked():
                index = self._load()
                if remote.key in index["mirrors"]:
                    index["mirrors"][remote.key]["last_used"] = time.time()
                    self._save(index, durable=False)
            return commit

    async def checkout_image(self, url: str, rev: str | None = None, credentials: Credentials | None = None, *,
                             refresh: bool = False, acquire: bool = False, peers=None) -> CheckoutImage:
        """A read-only disk image of the tree at rev; acquire=True also leases it (release with
        `release(image.path)`) so it cannot be evicted before the cell has it attached.

        peers: `async (repo_key, commit) -> sources` (hived/box/peers.py), each with
        `fetch_checkout(repo_key, commit, dest, max_bytes)`: when this box's mirror does not
        have rev, the origin names the commit (`git ls-remote` with these credentials: it
        decides access) and the commit's history comes from a peer's bundle, verified by git,
        before the origin is fetched from."""
        return await self._artifact("images", url, rev, credentials, refresh, acquire, peers)

    async def bundle(self, url: str, rev: str | None = None, credentials: Credentials | None = None, *,
                     refresh: bool = False, acquire: bool = False) -> CheckoutBundle:
        """A git bundle of rev's history, HEAD at rev (for builds that need `.git`)."""
        return await self._artifact("bundles", url, rev, credentials, refresh, acquire)

    # ------------------------------------------------------------------ leases

    def acquire(self, commit: str, kind: str = "image") -> Path:
        """Lease a cached image (or bundle) of commit: kept, never evicted, until `release`."""
        kind = KINDS.get(kind, kind)
        with self._locked():
            index = self._load()
            entry = index[kind].get(commit)
            if entry is None:
                raise NotCached(f"no {kind[:-1]} of commit {commit} in the repository cache")
            path = self._lease(kind, commit, entry)
            entry["last_used"] = time.time()
            self._save(index, durable=False)
            return path

    def release(self, path_or_commit: str | os.PathLike, kind: str | None = None) -> None:
        """Give back one lease (by the path it returned, or by commit and kind)."""
        key = os.fspath(path_or_commit)
        found = None
        for k in self._leases:
            if (kind is None or KINDS.get(kind, kind) == k[0]) and (
                    key == k[1] or key.startswith(str(self.root / k[0] / k[1]) + os.sep)):
                found = k
                break
        self._drop_lease(found, key)

    @contextlib.contextmanager
    def leased(self, commit: str, kind: str = "image") -> Iterator[Path]:
        path = self.acquire(commit, kind)
        try:
            yield path
        finally:
            self.release(path)

    # ------------------------------------------------------------------ public: queries and upkeep

    def list(self) -> dict[str, list[dict]]:
        """What is cached, most recently used first (for operators; no credentials in it)."""
        with self._locked():
            index = self._load()
        out: dict[str, list[dict]] = {}
        for kind in ("mirrors", "images", "bundles"):
            rows = [{"name": name, **e} for name, e in index[kind].items()]
            out[kind] = sorted(rows, key=lambda e: e.get("last_used", 0), reverse=True)
        return out

    def usage(self) -> int:
        """Bytes the cache holds: mirrors, images and bundles (as recorded in the index)."""
        with self._locked():
            return self._usage(self._load())

    def remove(self, what: str, kind: str = "image") -> None:
        """Remove an image or bundle (by commit), or a mirror (kind="mirror", by URL)."""
        if kind == "mirror":
            name, table = parse_url(what, self.protocols)[0].key, "mirrors"
        else:
            name, table = what, KINDS.get(kind, kind)
        with self._locked():
            index = self._load()
            if name not in index[table]:
                raise NotCached(f"no {table[:-1]} {what} in the repository cache", "nothing to remove")
            if not self._remove(index, table, name):
                raise InUse(f"the {table[:-1]} {what} is in use")
            self._save(index)

    def gc(self) -> dict:
        """Leftover temp dirs, missing or stray entries, then the size bound."""
        with self._locked():
            index = self._load()
            self._clean_tmp()
            self._reconcile(index)
            evicted = self._evict(index, set())
            self._save(index)
            return {"evicted": evicted, "bytes": self._usage(index), "max_bytes": self.max_bytes}

    # ------------------------------------------------------------------ input, errors

    def _parse(self, url: str, credentials: Credentials | None) -> tuple[Remote, Credentials | None]:
        remote, in_url = parse_url(url, self.protocols)
        creds = credentials or in_url
        if creds is not None and remote.scheme not in ("http", "https"):
            raise InvalidUrl(f"credentials were given for {remote.normal}, but only http(s) repositories "
                             "take them (ssh uses the box's ssh keys)")
        return remote, creds

    @contextlib.asynccontextmanager
    async def _guard(self, what: str) -> AsyncIterator[None]:
        """Disk trouble as one precise line."""
        try:
            yield
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CacheFull(f"the repository cache disk is full ({self.root}) while {what}") from None
            raise RepoCacheError(f"{what} failed on the cache disk: {e.strerror or e} ({e.filename or ''})",
                                 "check the repository cache's disk and permissions") from None

    def _check_free(self, what: str) -> None:
        free = shutil.disk_usage(self.root).free
        if free < self.min_free_bytes:
            raise CacheFull(f"only {free >> 20} MiB free under {self.root} ({self.min_free_bytes >> 20} MiB "
                            f"needed to start {what})")

    # ------------------------------------------------------------------ locks

    def _lock(self, name: str) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._locks_loop is not loop:
            self._locks, self._locks_loop = {}, loop
            self._lock_users.clear()
        return self._locks.setdefault(name, asyncio.Lock())

    @contextlib.asynccontextmanager
    async def _exclusive(self, name: str) -> AsyncIterator[None]:
        """One coroutine at a time per name in this process; the lock goes when unused."""
        lock = self._lock(name)
        self._lock_users[name] += 1
        try:
            async with lock:
                yield
        finally:
            self._lock_users[name] -= 1
            if self._lock_users[name] <= 0 and self._locks.get(name) is lock:
                del self._lock_users[name]
                del self._locks[name]

    @contextlib.asynccontextmanager
    async def _mirror_use(self, key: str) -> AsyncIterator[None]:
        fd = await _flock(self.root / "locks" / f"{key}.use", fcntl.LOCK_SH)
        try:
            yield
        finally:
            os.close(fd)

    @contextlib.asynccontextmanager
    async def _mirror_write(self, key: str) -> AsyncIterator[None]:
        fd = await _flock(self.root / "locks" / f"{key}.fetch", fcntl.LOCK_EX)
        try:
            yield
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ the index

    def _empty_index(self) -> dict:
        return {**super()._empty_index(), "mirrors": {}, "images": {}, "bundles": {}, "auth": {}}

    def _mirror(self, key: str) -> Path:
        return self.root / "mirrors" / f"{key}.git"

    def _artifact_file(self, kind: str, commit: str, entry: dict) -> Path:
        return self.root / kind / commit / entry["file"]

    def _reconcile(self, index: dict) -> None:
        """Index <-> directories: drop entries without files, adopt complete dirs it lacks,
        remove incomplete ones (a crash between rename and index save)."""
        for kind in ("images", "bundles"):
            entries = index[kind]
            for commit in list(entries):
                if not self._artifact_file(kind, commit, entries[commit]).is_file():
                    log.warning("repository cache: %s of %s is gone from disk; dropping it", kind[:-1], commit)
                    del entries[commit]
            for d in (self.root / kind).iterdir():
                if d.name in entries:
                    continue
                try:
                    meta = json.loads((d / "meta.json").read_text())
                    if meta.get("commit") != d.name or not (d / meta["file"]).is_file():
                        raise ValueError("incomplete")
                except (OSError, ValueError, KeyError):
                    log.warning("repository cache: removing stray %s", d)
                    self._detach(d)
                    continue
                entries[d.name] = {k: meta[k] for k in ("file", "fs", "size", "tree", "repos", "created")
                                   if k in meta}
                entries[d.name]["last_used"] = time.time()
        mirrors = index["mirrors"]
        for key in list(mirrors):
            if not (self._mirror(key) / MIRROR_META).is_file():
                log.warning("repository cache: mirror %s is gone from disk; dropping it", key)
                del mirrors[key]
        for d in (self.root / "mirrors").iterdir():
            key = d.name.removesuffix(".git")
            if key in mirrors:
                continue
            try:
                meta = json.loads((d / MIRROR_META).read_text())
                if meta.get("key") != key or not d.name.endswith(".git"):
                    raise ValueError("not a mirror")
            except (OSError, ValueError):
                log.warning("repository cache: removing stray %s", d)
                self._detach(d)
                continue
            mirrors[key] = {"url": meta.get("url", ""), "size": _tree_bytes(d), "last_used": time.time(),
                            "fetched": meta.get("created", 0)}

    def _usage(self, index: dict) -> int:
        return sum(int(e.get("size", 0)) for kind in ("mirrors", "images", "bundles") for e in index[kind].values())

    # ------------------------------------------------------------------ eviction

    def _lease(self, kind: str, commit: str, entry: dict) -> Path:
        return self._take_lease((kind, commit), self._artifact_file(kind, commit, entry), f"{kind[:-1]} of {commit}")

    def _remove(self, index: dict, kind: str, name: str) -> bool:
        """Remove one entry unless it is in use (by any process). True when gone."""
        entry = index[kind].get(name)
        if entry is None:
            return True
        if kind == "mirrors":
            fds = []
            try:
                for lock in (f"{name}.use", f"{name}.fetch"):
                    fd = try_lock(self.root / "locks" / lock)
                    if fd is None:
                        return False
                    fds.append(fd)
                self._detach(self._mirror(name))
            finally:
                for fd in fds:
                    if fd >= 0:
                        os.close(fd)
        else:
            if self._leases.get((kind, name)):
                return False
            fd = try_lock(self._artifact_file(kind, name, entry))
            if fd is None:
                return False
            try:
                self._detach(self.root / kind / name)
            finally:
                if fd >= 0:
                    os.close(fd)
        del index[kind][name]
        return True

    def _evict(self, index: dict, protect: set[tuple[str, str]]) -> list[str]:
        entries = [(e.get("last_used", 0), (kind, name)) for kind in ("mirrors", "images", "bundles")
                   for name, e in index[kind].items()]
        evicted = self._evict_lru(entries, lambda: self._usage(index), lambda k: self._remove(index, *k), protect,
                                  lambda k: f"{k[0][:-1]} {k[1]}")
        return [f"{kind[:-1]}:{name}" for kind, name in evicted]

    # ------------------------------------------------------------------ access to private repositories

    def _auth_required(self, key: str) -> bool:
        with self._locked():
            return bool(self._load()["auth"].get(key))

    async def _check_access(self, remote: Remote, creds: Credentials | None) -> None:
        if not self._auth_required(remote.key):
            return
        fp = (creds or Credentials()).fingerprint(remote.key)
        now = time.monotonic()
        if self._access_ok.get(fp, 0) > now:
            return
        self.stats["access_checks"] += 1
        try:
            await self.git.run(["ls-remote", "--", remote.fetch_url, "HEAD"], timeout=self.access_timeout_s,
                               creds=creds, remote=remote)
        except GitFailed as e:
            raise classify(e, "checking access to", remote, "", creds) from None
        self._remember_access(fp)

    def _remember_access(self, fp: str) -> None:
        now = time.monotonic()
        if len(self._access_ok) > 4096:
            self._access_ok = {k: t for k, t in self._access_ok.items() if t > now}
        self._access_ok[fp] = now + self.access_ttl_s

    # ------------------------------------------------------------------ resolving and fetching

    async def _lookup(self, mirror: Path, r: Rev) -> str | None:
        """rev -> commit in the mirror, or None (mirror missing, rev missing)."""
        if not (mirror / MIRROR_META).is_file():
            return None
        if r.kind == "name":
            branch, tag = f"refs/heads/{r.name}", f"refs/tags/{r.name}"
            found = [(ref, v) for ref in (branch, tag) if (v := self._read_ref(mirror, ref)) is not None]
            if len(found) > 1:
                raise InvalidRevision(f"revision {r.name} is both a branch and a tag",
                                      f"name it fully: {branch} or {tag}")
            if found:
                target, (sha, is_commit) = found[0]
                if is_commit:
                    return sha
            elif ABBREV_SHA.match(r.name):
                target = r.name
            else:
                return None
        elif r.kind == "ref":
            target = r.local_ref
            v = self._read_ref(mirror, target)
            if v is None:
                return None
            if v[1]:
                return v[0]
        else:
            target = r.name
        try:
            out = await self.git.run(["rev-parse", "--verify", "--quiet", "--end-of-options", f"{target}^{{commit}}"],
                                     git_dir=mirror, timeout=self.local_timeout_s)
        except GitFailed as e:
            if e.returncode == 1 or e.returncode == 128:
                return None
            raise local_error(e, f"looking up {r} in mirror {mirror.name}") from None
        sha = out.decode().strip()
        return sha or None

    def _read_ref(self, mirror: Path, ref: str) -> tuple[str, bool] | None:
        """A ref's value read straight from the files backend (no process: the warm path), and
        whether it is known to be a commit (branches always are; tags when packed-refs says
        what they peel to). None when the ref does not exist."""
        loose = mirror / ref
        try:
            value = loose.read_text().strip()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            value = None
        if value is not None:
            if value.startswith("ref:") or not FULL_SHA.match(value):
                return value, False  # symbolic: git decides
            return value, ref.startswith("refs/heads/")
        packed = self._packed_refs(mirror)
        if ref not in packed:
            return None
        sha, peeled, fully = packed[ref]
        if peeled:  # an annotated tag and the non-tag object it peels to (when the file says "fully")
            return peeled, fully
        return sha, ref.startswith("refs/heads/")

    def _packed_refs(self, mirror: Path) -> dict[str, tuple[str, str, bool]]:
        """ref -> (object, peeled object or "", file is fully peeled), cached per file version."""
        path = mirror / "packed-refs"
        try:
            st = path.stat()
        except FileNotFoundError:
            return {}
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._packed_cache.get(mirror)
        if cached and cached[0] == stamp:
            return cached[1]
        refs: dict[str, tuple[str, str, bool]] = {}
        fully = False
        last = None
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("#"):
                fully = "fully-peeled" in line
            elif line.startswith("^") and last is not None:
                refs[last] = (refs[last][0], line[1:].strip(), fully)
            elif " " in line:
                sha, last = line.split(" ", 1)
                refs[last] = (sha, "", fully)
        if len(self._packed_cache) > 256:
            self._packed_cache.clear()
        self._packed_cache[mirror] = (stamp, refs)
        return refs

    async def _git_local(self, args: list[str], mirror: Path, what: str, **kw: Any) -> bytes:
        try:
            return await self.git.run(args, git_dir=mirror, timeout=self.local_timeout_s, **kw)
        except GitFailed as e:
            raise local_error(e, f"{what} ({mirror.name})") from None

    async def _resolve(self, remote: Remote, creds: Credentials | None, r: Rev, refresh: bool) -> str:
        """Caller holds the mirror's use lock."""
        mirror = self._mirror(remote.key)
        if r.kind == "commit":
            refresh = False
        seen = self._fetches_done[remote.key]
        if not refresh:
            sha = await self._lookup(mirror, r)
            if sha:
                return sha
        async with self._exclusive(f"mirror:{remote.key}"):
            # A fetch that ended while we waited (even one under way when we asked: refreshes
            # asked together share one fetch) serves us too.
            if not refresh or self._fetches_done[remote.key] > seen:
                sha = await self._lookup(mirror, r)
                if sha:
                    return sha
            async with self._mirror_write(remote.key):
                if not refresh:
                    sha = await self._lookup(mirror, r)  # another process fetched while we waited
                    if sha:
                        return sha
                extra = [r.extra_refspec] if r.extra_refspec else []
                await self._fetch(remote, creds, r, extra)
                self._fetches_done[remote.key] += 1
                sha = await self._lookup(mirror, r)
                if sha is None and r.kind == "commit":
                    # Not on any branch or tag: ask for the object itself (servers allow it for
                    # reachable commits in protocol v2) and keep it reachable under refs/hived/.
                    await self._fetch(remote, creds, r, [f"{r.name}:refs/hived/commits/{r.name}"], only_extra=True)
                    sha = await self._lookup(mirror, r)
        if sha is None:
            what = {"commit": "commit", "ref": "ref", "name": "branch, tag or commit"}[r.kind]
            raise RevisionNotFound(f"{remote.normal}: {what} {r.name} does not exist (fetched just now)")
        return sha

    async def _fetch(self, remote: Remote, creds: Credentials | None, r: Rev, extra: list[str],
                     only_extra: bool = False) -> None:
        """Fetch into the mirror (creating it if needed). Caller holds the use and fetch locks."""
        self._check_free(f"fetching {remote.normal}")
        refspecs = extra if only_extra else [*BRANCHES_AND_TAGS, *extra]
        args = ["fetch", "--quiet", "--atomic", "--no-auto-gc", "--no-write-fetch-head", "--no-recurse-submodules"]
        if not only_extra:
            args.append("--prune")
        args += ["--", remote.fetch_url, *refspecs]
        self.stats["fetches"] += 1
        t0 = time.monotonic()

        async def fetch(git_dir: Path) -> None:
            try:
                await self.git.run(args, git_dir=git_dir, timeout=self.fetch_timeout_s, creds=creds, remote=remote)
            except GitFailed as e:
                raise classify(e, "fetching", remote, r.name, creds) from None

        await self._into_mirror(remote, creds, fetch, from_origin=True)
        self.timings["fetch_ms"] = (time.monotonic() - t0) * 1000
        log.info("repository cache: fetched %s in %.0f ms", remote.normal, self.timings["fetch_ms"])
        if creds is not None:
            self._remember_access(creds.fingerprint(remote.key))

    # ------------------------------------------------------------------ box peers (hived/box/peers.py)

    def servable_checkouts(self, limit: int) -> list[tuple[str, str]]:
        """(repository key, commit) of the checkout images a peer could be sent as a bundle from
        this box's mirror of that repository, most recently used first, at most `limit`."""
        with self._locked():
            index = self._load()
            out = []
            for commit, e in sorted(index["images"].items(), key=lambda kv: -kv[1].get("last_used", 0)):
                out += [(key, commit) for key in e.get("repos") or () if key in index["mirrors"]]
                if len(out) >= limit:
                    break
            return out[:limit]

    async def peer_bundle(self, key: str, commit: str) -> Path | None:
        """A leased bundle of commit's history from mirror `key` (cached, or made now), for a
        peer the control plane vouched for; release with release(path). None when this box
        has no checkout image of that commit verified in that repository, or no mirror of it."""
        if not FULL_SHA.match(commit):
            return None
        with self._locked():
            index = self._load()
            mirror, image = index["mirrors"].get(key), index["images"].get(commit)
        if mirror is None or image is None or key not in (image.get("repos") or ()):
            return None
        remote, _ = self._parse(mirror["url"], None)
        if remote.key != key:
            return None
        async with self._guard(f"bundling {commit} for a peer"), self._mirror_use(key):
            hit = self._hit("bundles", commit, remote, True, verified=True)
            if hit is None:
                async with self._exclusive(f"bundles:{commit}"):
                    hit = self._hit("bundles", commit, remote, True, verified=True)
                    if hit is None:
                        await self._build_bundle(remote, commit)
                        hit = self._hit("bundles", commit, remote, True, verified=True)
        self.stats["peer_bundles"] += 1
        return hit.path if hit is not None else None

    async def _origin_commit(self, remote: Remote, creds: Credentials | None, r: Rev) -> str | None:
        """The commit rev names at the origin now (`git ls-remote` with the build's credentials:
        the origin decides who may have it); None when only a fetch can tell (an abbreviated
        id, a name that is both a branch and a tag, one it does not have)."""
        if r.kind == "commit":
            if not FULL_SHA.match(r.name):
                return None
            patterns = ["HEAD"]  # access only: a commit id names itself
        elif r.kind == "name":
            patterns = [f"refs/heads/{r.name}", f"refs/tags/{r.name}"]
        else:
            patterns = [r.remote_ref]
        asked = patterns if r.kind == "commit" else [*patterns, *(f"{p}^{{}}" for p in patterns)]
        self.stats["access_checks"] += 1
        try:
            out = await self.git.run(["ls-remote", "--", remote.fetch_url, *asked],
                                     timeout=self.access_timeout_s, creds=creds, remote=remote)
        except GitFailed as e:
            raise classify(e, "checking access to", remote, r.name, creds) from None
        if creds is not None:
            self._remember_access(creds.fingerprint(remote.key))
        if r.kind == "commit":
            return r.name
        refs: dict[str, str] = {}
        for line in out.decode(errors="replace").splitlines():
            sha, _, name = line.partition("\t")
            refs[name.strip()] = sha.strip()
        found = [p for p in patterns if p in refs]
        if len(found) != 1:
            return None
        sha = refs.get(found[0] + "^{}", refs[found[0]])  # an annotated tag: the commit it peels to
        return sha if FULL_SHA.match(sha) else None

    async def _from_peers(self, remote: Remote, creds: Credentials | None, r: Rev, peers) -> str | None:
        """The commit r names, its history put into the mirror from a peer's bundle; None when
        the mirror has it already or no peer could serve it (the origin is fetched then)."""
        mirror = self._mirror(remote.key)
        if await self._lookup(mirror, r):
            return None  # local already
        commit = await self._origin_commit(remote, creds, r)
        if commit is None:
            return None
        try:
            sources = await peers(remote.key, commit)
        except Exception as exc:  # no peers is not an error: the origin is there
            log.warning("repository cache: asking for peers of %s@%s failed: %s", remote, commit, exc)
            return None
        for source in sources:
            name = getattr(source, "name", "?")
            work, lock_fd = self._workdir("peer")
            try:
                self._check_free(f"fetching {commit} from peer {name}")
                bundle = work / BUNDLE_FILE
                t0 = time.monotonic()
                await source.fetch_checkout(remote.key, commit, bundle,
                                            max(0, shutil.disk_usage(self.root).free - self.min_free_bytes))
                await self._fetch_bundle(remote, creds, commit, bundle, name)
            except (asyncio.CancelledError, CacheFull):
                raise
            except Exception as exc:
                log.warning("repository cache: %s@%s from peer %s failed (%s): trying the next source", remote,
                            commit, name, exc)
                self.stats["peer_failed"] += 1
                failed = getattr(source, "failed", None)
                if failed is not None:
                    failed(exc)
                continue
            finally:
                os.close(lock_fd)
                await asyncio.shield(asyncio.to_thread(shutil.rmtree, work, True))
            self.stats["peer_fetches"] += 1
            self.timings["peer_fetch_ms"] = (time.monotonic() - t0) * 1000
            succeeded = getattr(source, "succeeded", None)
            if succeeded is not None:
                succeeded()
            log.info("repository cache: %s@%s came from peer %s in %.0f ms", remote, commit, name,
                     self.timings["peer_fetch_ms"])
            return commit
        return None

    async def _fetch_bundle(self, remote: Remote, creds: Credentials | None, commit: str, bundle: Path,
                            peer: str) -> None:
        """A peer's bundle into the mirror (made when missing), verified by git (pack checksum,
        every object's hash, fsck, connectivity) into a quarantine ref, kept only as
        refs/hived/commits/<commit> when that ref is exactly the commit asked for."""
        quarantine = f"refs/hived/peer/{uuid.uuid4().hex}"
        args = ["fetch", "--quiet", "--atomic", "--no-auto-gc", "--no-write-fetch-head", "--no-recurse-submodules",
                "--", str(bundle), f"+HEAD:{quarantine}"]
        env = {"GIT_ALLOW_PROTOCOL": "file"}  # the bundle on this box's disk, and nothing else

        async def fetch_into(git_dir: Path) -> None:
            try:
                await self.git.run(args, git_dir=git_dir, timeout=self.fetch_timeout_s, env=env)
                got = self._read_ref(git_dir, quarantine)
                if got is None or got[0] != commit:
                    raise BadBundle(f"peer {peer}'s bundle holds {got[0] if got else 'nothing'}, "
                                         f"not the commit asked for ({commit})")
                await self._git_local(["update-ref", f"refs/hived/commits/{commit}", commit], git_dir,
                                      f"keeping {commit} from peer {peer}")
            except GitFailed as e:
                raise BadBundle(f"peer {peer}'s bundle of {commit} failed git's checks: "
                                     f"{first_line(e.stderr)}") from None
            finally:
                with contextlib.suppress(RepoError):
                    await self._git_local(["update-ref", "-d", quarantine], git_dir, "dropping a quarantine ref")

        async with self._exclusive(f"mirror:{remote.key}"), self._mirror_write(remote.key):
            await self._into_mirror(remote, creds, fetch_into, from_origin=False)

    async def _into_mirror(self, remote: Remote, creds: Credentials | None, fetch, *, from_origin: bool) -> None:
        """`await fetch(git_dir)` into the mirror of `remote`, then its size, index entry and
        eviction. An existing mirror is fetched into under the repair marker (a fetch that fails
        or dies half way is undone: `_repair`); a missing one is made in a work directory and
        renamed into place only once the fetch worked. `from_origin`: the origin itself was
        fetched (the entry's `fetched` time; and a fetch that worked shows what the credentials
        may read). The caller holds the mirror's use and fetch locks."""
        mirror = self._mirror(remote.key)
        fetched = {"fetched": time.time()} if from_origin else {}  # a peer's bundle is not the origin
        if (mirror / MIRROR_META).is_file():
            marker = mirror / FETCH_MARKER
            if marker.exists():
                await asyncio.to_thread(_repair, mirror)
            marker.touch()
            try:
                await fetch(mirror)
            except BaseException:
                await asyncio.shield(asyncio.to_thread(_repair, mirror))
                raise
            marker.unlink()
            size = await asyncio.to_thread(_tree_bytes, mirror)
            with self._locked():
                index = self._load()
                entry = index["mirrors"].setdefault(remote.key, {"url": remote.normal})
                entry.update(size=size, last_used=time.time(), **fetched)
                if from_origin:
                    self._note_auth(index, remote, creds)
                self._evict(index, {("mirrors", remote.key)})
                self._save(index)
            return
        work, lock_fd = self._workdir("mirror")
        try:
            new = work / "m.git"
            await self._git_local(["init", "--quiet", "--bare", "--template=", str(new)], work, "git init", cwd=work)
            with open(new / "config", "a") as f:  # for operators running git by hand in it
                f.write("[gc]\n\tauto = 0\n[core]\n\tlogAllRefUpdates = false\n")
            await fetch(new)
            _write_json_atomic(new / MIRROR_META, {"key": remote.key, "url": remote.normal, "created": time.time()})
            size = await asyncio.to_thread(_tree_bytes, new)
            with self._locked():
                index = self._load()
                os.rename(new, mirror)  # the fetch lock is ours: nobody else creates it
                _fsync_dir(mirror.parent)
                index["mirrors"][remote.key] = {"url": remote.normal, "size": size, "last_used": time.time(),
                                                **fetched}
                # A new mirror follows ls-remote (or the origin's fetch), which just worked with these
                # credentials.
                self._note_auth(index, remote, creds)
                self._evict(index, {("mirrors", remote.key)})
                self._save(index)
        finally:
            os.close(lock_fd)
            await asyncio.shield(asyncio.to_thread(shutil.rmtree, work, True))

    def _note_auth(self, index: dict, remote: Remote, creds: Credentials | None) -> None:
        """A fetch that worked without credentials shows the repository is public (now)."""
        if creds is not None:
            index["auth"][remote.key] = True
        else:
            index["auth"].pop(remote.key, None)

    # ------------------------------------------------------------------ images and bundles

    async def _artifact(self, kind: str, url: str, rev: str | None, credentials: Credentials | None,
                        refresh: bool, acquire: bool, peers=None) -> Any:
        remote, creds = self._parse(url, credentials)
        r = parse_rev(rev)
        async with self._guard(f"making the {kind[:-1]} of {r} of {remote}"), self._mirror_use(remote.key):
            await self._check_access(remote, creds)
            if r.kind == "commit":
                hit = self._hit(kind, r.name, remote, acquire, verified=False)
                if hit is not None:
                    return hit
            commit = None
            if peers is not None and not refresh:
                commit = await self._from_peers(remote, creds, r, peers)
            if commit is None:
                commit = await self._resolve(remote, creds, r, refresh)
            hit = self._hit(kind, commit, remote, acquire, verified=True)
            if hit is not None:
                return hit
            async with self._exclusive(f"{kind}:{commit}"):
                hit = self._hit(kind, commit, remote, acquire, verified=True)
                if hit is not None:
                    return hit
                if kind == "images":
                    await self._build_image(remote, commit)
                else:
                    await self._build_bundle(remote, commit)
            hit = self._hit(kind, commit, remote, acquire, verified=True)
            if hit is None:
                raise RepoCacheError(f"the {kind[:-1]} of {commit} vanished from the cache right after it was made",
                                     "retry (the cache bound may be too small for it)")
            return hit

    def _hit(self, kind: str, commit: str, remote: Remote, acquire: bool, verified: bool) -> Any:
        with self._locked():
            index = self._load()
            entry = index[kind].get(commit)
            if entry is None:
                return None
            path = self._artifact_file(kind, commit, entry)
            if not path.is_file():
                return None
            repos = entry.setdefault("repos", [])
            durable = False
            if remote.key not in repos:
                if not verified:
                    return None  # never seen in this repository: resolve it in its mirror first
                repos.append(remote.key)
                durable = True
            now = time.time()
            entry["last_used"] = now
            if remote.key in index["mirrors"]:
                index["mirrors"][remote.key]["last_used"] = now
            if acquire:
                self._lease(kind, commit, entry)
            self._save(index, durable=durable)
            self.stats[f"{kind}_hits"] += 1
            if kind == "images":
                return CheckoutImage(commit, path, int(entry["size"]), entry.get("fs", "erofs"), entry.get("tree", ""))
            return CheckoutBundle(commit, path, int(entry["size"]))

    async def _commit_info(self, mirror: Path, commit: str) -> tuple[str, int]:
        """(tree id, committer time) of a commit."""
        raw = await self._git_local(["cat-file", "commit", commit], mirror, f"reading commit {commit}")
        tree, when = "", 0
        for line in raw.split(b"\n\n", 1)[0].decode(errors="replace").splitlines():
            if line.startswith("tree "):
                tree = line[5:].strip()
            elif line.startswith("committer "):
                with contextlib.suppress(ValueError, IndexError):
                    when = int(line.rsplit(" ", 2)[1])
        return tree, max(0, when)

    async def _build_image(self, remote: Remote, commit: str) -> None:
        mirror = self._mirror(remote.key)
        work, lock_fd = self._workdir("image")
        ok = False
        try:
            self._check_free(f"checking out {commit}")
            t0 = time.monotonic()
            tree_id, when = await self._commit_info(mirror, commit)
            tree = await self._checkout(mirror, commit, work)
            await self._shallow_git_dir(mirror, commit, tree, work / f"index-{tree.name}")
            t1 = time.monotonic()
            out = work / "out"
            out.mkdir()
            fs_type = self._fs_type()
            target = out / FS_FILES[fs_type]
            uid, gid = self.tree_owner
            fs_uuid = str(uuid.UUID(commit[:32]))
            if fs_type == "erofs":
                await _tool(["mkfs.erofs", "--quiet", f"-T{when}", f"-U{fs_uuid}", f"--force-uid={uid}",
                             f"--force-gid={gid}", str(target), str(tree)], "mkfs.erofs", self.local_timeout_s)
            else:
                await asyncio.to_thread(_own_tree, tree, uid, gid, when)
                await _tool(_mke2fs_cmd(target, tree, fs_uuid, uid, gid), "mke2fs", self.local_timeout_s,
                            env={"E2FSPROGS_FAKE_TIME": str(when), "PATH": os.environ.get("PATH", "/usr/bin")})
            await asyncio.to_thread(_fsync_file, target)
            os.chmod(target, 0o444)
            size = target.stat().st_size
            meta = {"commit": commit, "file": target.name, "fs": fs_type, "size": size, "tree": tree_id,
                    "repos": [remote.key], "created": time.time()}
            _write_json_atomic(out / "meta.json", meta)
            self._install("images", commit, out, meta, remote)
            ok = True
            self.stats["images_built"] += 1
            self.timings.update(checkout_ms=(t1 - t0) * 1000, mkfs_ms=(time.monotonic() - t1) * 1000)
            log.info("repository cache: %s at %s checked out in %.0f ms, %s image (%d bytes) in %.0f ms",
                     remote.normal, commit[:12], (t1 - t0) * 1000, fs_type, size, (time.monotonic() - t1) * 1000)
        finally:
            os.close(lock_fd)
            for d in self._scratch_trees.pop(work, []):
                await asyncio.shield(asyncio.to_thread(shutil.rmtree, d, True))
            await self._drop_work(work, ok)

    async def _checkout(self, mirror: Path, commit: str, work: Path) -> Path:
        """The checkout a clone would make (eol attributes applied; no filters: no config
        defines any), written by git through an index of our own; on the scratch tmpfs when
        it fits there."""
        scratch = None
        if self.scratch_dir is not None:
            out = await self._git_local(["ls-tree", "-r", "-l", "--full-tree", commit], mirror, "sizing the tree")
            need = sum(int(f[3]) for line in out.decode(errors="replace").splitlines()
                       if len(f := line.split(None, 4)) == 5 and f[3].isdigit())
            with contextlib.suppress(OSError):
                free = shutil.disk_usage(self.scratch_dir).free
                if need <= self.scratch_max_bytes and free > need * 1.2 + (64 << 20):
                    scratch = self.scratch_dir / f"hived-tree-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        for tree in ([scratch] if scratch else []) + [work / "tree"]:
            tree.mkdir(mode=0o755)
            if tree is scratch:
                self._scratch_trees.setdefault(work, []).append(tree)
                self.stats["scratch_checkouts"] += 1
            try:
                await self._git_local(["read-tree", "--reset", "-u", commit], mirror, f"checking out {commit}",
                                      env={"GIT_INDEX_FILE": str(work / f"index-{tree.name}"),
                                           "GIT_WORK_TREE": str(tree)})
                return tree
            except CacheFull:
                if tree is not scratch:
                    raise
                log.warning("repository cache: scratch %s full; checking %s out on the cache disk",
                            self.scratch_dir, commit)
                await asyncio.to_thread(shutil.rmtree, tree, True)
        raise AssertionError("unreachable")

    async def _shallow_git_dir(self, mirror: Path, commit: str, tree: Path, index: Path) -> None:
        """`tree/.git` as a depth-1 clone would leave it (HEAD detached at the commit, its objects
        only, marked shallow, the index of the checkout): build scripts ask git about the commit
        (`git rev-parse HEAD`, `git status`, version stamps), as on hosted CI."""
        dot = tree / ".git"
        for d in ("objects/pack", "objects/info", "refs/heads", "refs/tags", "info"):
            (dot / d).mkdir(parents=True)
        sha256 = len(commit) == 64
        (dot / "config").write_text(
            f"[core]\n\trepositoryformatversion = {1 if sha256 else 0}\n\tfilemode = true\n\tbare = false\n"
            + ("[extensions]\n\tobjectformat = sha256\n" if sha256 else ""))
        (dot / "HEAD").write_text(commit + "\n")
        (dot / "shallow").write_text(commit + "\n")
        (dot / "description").write_text("a depth-1 checkout made by hived\n")
        objects = await self._git_local(["rev-list", "--objects", "--no-object-names", "-n", "1", commit], mirror,
                                        f"listing the objects of {commit}")
        # Loose objects, not a pack: their bytes depend on the objects alone (a pack's deltas
        # depend on the mirror's history), so the image stays content-addressed.
        pack = index.with_name("dotgit.pack")
        fd = os.open(pack, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            await self._git_local(["pack-objects", "--quiet", "--stdout"], mirror, f"packing {commit} for its .git",
                                  stdin=objects, stdout_fd=fd)
        finally:
            os.close(fd)
        await self._git_local(["unpack-objects", "-q"], dot, f"unpacking {commit} into its .git",
                              stdin=pack.read_bytes())
        pack.unlink()
        # An index without stat data (read-tree without -u): the same bytes every time; git in
        # the cell refreshes it against the files on first use.
        await self._git_local(["read-tree", commit], dot, f"indexing {commit}",
                              env={"GIT_INDEX_FILE": str(dot / "index")})

    async def _build_bundle(self, remote: Remote, commit: str) -> None:
        mirror = self._mirror(remote.key)
        work, lock_fd = self._workdir("bundle")
        ok = False
        try:
            self._check_free(f"bundling {commit}")
            t0 = time.monotonic()
            out = work / "out"
            out.mkdir()
            target = out / BUNDLE_FILE
            if len(commit) == 64:
                header = f"# v3 git bundle\n@object-format=sha256\n{commit} HEAD\n\n"
            else:
                header = f"# v2 git bundle\n{commit} HEAD\n\n"
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, header.encode())
                await self._git_local(["pack-objects", "--revs", "--stdout", "--quiet", "--delta-base-offset"],
                                      mirror, f"bundling {commit}", stdin=f"{commit}\n".encode(), stdout_fd=fd)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.chmod(target, 0o444)
            size = target.stat().st_size
            meta = {"commit": commit, "file": BUNDLE_FILE, "size": size, "repos": [remote.key],
                    "created": time.time()}
            _write_json_atomic(out / "meta.json", meta)
            self._install("bundles", commit, out, meta, remote)
            ok = True
            self.stats["bundles_built"] += 1
            self.timings["bundle_ms"] = (time.monotonic() - t0) * 1000
        finally:
            os.close(lock_fd)
            await self._drop_work(work, ok)

    def _install(self, kind: str, commit: str, out: Path, meta: dict, remote: Remote) -> None:
        """Rename the finished dir into place and record it, in one index-lock section."""
        final = self.root / kind / commit
        with self._locked():
            index = self._load()
            try:
                os.rename(out, final)
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                # Another process made the same one first: keep theirs.
                meta = json.loads((final / "meta.json").read_text())
            _fsync_dir(final.parent)
            entry = index[kind].get(commit)
            if entry is None:
                entry = index[kind][commit] = {k: meta[k] for k in ("file", "fs", "size", "tree", "repos", "created")
                                               if k in meta}
            if remote.key not in entry.setdefault("repos", []):
                entry["repos"].append(remote.key)
            entry["last_used"] = time.time()
            self._evict(index, {(kind, commit), ("mirrors", remote.key)})
            self._save(index)

    async def _drop_work(self, work: Path, ok: bool) -> None:
        if ok:  # done: delete the checked-out tree off the critical path
            trash = self.root / "tmp" / f"del-{work.name}"
            os.rename(work, trash)  # a crash before the rmtree ends: the next start removes it
            threading.Thread(target=shutil.rmtree, args=(trash, True), name="hived-repos-rm", daemon=True).start()
        else:
            await asyncio.shield(asyncio.to_thread(shutil.rmtree, work, True))

    def _fs_type(self) -> str:
        return self._pick_fs_type(self.fs_type)


# ---------------------------------------------------------------------------------------- helpers


def _tmpfs(path: str) -> str | None:
    """path when it is a tmpfs mount point (from /proc/self/mountinfo), else None."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 8 and fields[4] == path and fields[fields.index("-") + 1] == "tmpfs":
                    return path if os.access(path, os.W_OK) else None
    except (OSError, ValueError, IndexError):
        pass
    return None


def _repair(mirror: Path) -> None:
    """After a fetch that did not finish (error, kill, crash): remove what it left behind, so the
    next fetch does not trip over stale lock files. Only called under the mirror's fetch lock,
    so no other git process is writing to it."""
    for name in ("packed-refs.lock", "HEAD.lock", "config.lock", "shallow.lock", "FETCH_HEAD.lock", "index.lock"):
        with contextlib.suppress(FileNotFoundError):
            (mirror / name).unlink()
    for p in (mirror / "refs").rglob("*.lock"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    # a peer's bundle being checked (loose: fetch writes new refs loose): never used, dropped
    shutil.rmtree(mirror / "refs" / "hived" / "peer", ignore_errors=True)
    objects = mirror / "objects"
    for pattern in ("pack/tmp_*", "pack/.tmp-*", "??/tmp_obj_*", "tmp_objdir-*", "incoming-*"):
        for p in objects.glob(pattern):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
    with contextlib.suppress(FileNotFoundError):
        (mirror / FETCH_MARKER).unlink()


async def _tool(cmd: list[str], what: str, timeout: float, env: dict[str, str] | None = None) -> None:
    proc = await asyncio.create_subprocess_exec(*cmd, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                                                env=env, start_new_session=True)
    proc.stdin.close()
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException as e:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(proc.wait())
        if isinstance(e, TimeoutError):
            raise GitError(f"{what} took longer than {timeout:.0f} s", "check the box's load and disk") from None
        raise
    if proc.returncode != 0:
        text = (out or b"").decode(errors="replace")
        if "no space left" in text.lower():
            raise OSError(errno.ENOSPC, "No space left on device", cmd[-2])
        raise GitError(f"{what} failed (exit {proc.returncode}): {first_line(text)}",
                       f"check that {what} works on this box (hived doctor)")


def _own_tree(tree: Path, uid: int, gid: int, when: int) -> None:
    """For the ext4 fallback (mke2fs -d copies owners and times from the tree)."""
    for dirpath, dirs, files in os.walk(tree):
        for name in (*dirs, *files):
            p = os.path.join(dirpath, name)
            os.lchown(p, uid, gid)
            os.utime(p, (when, when), follow_symlinks=False)
    os.lchown(tree, uid, gid)
    os.utime(tree, (when, when))


def _mke2fs_cmd(target: Path, tree: Path, fs_uuid: str, uid: int, gid: int) -> list[str]:
    blocks, inodes = 0, 16
    for _dirpath, dirs, files in os.walk(tree):
        inodes += len(dirs) + len(files)
        blocks += 1 + len(files)  # every file at least a block (small files do not share them)
    size_kib = int(_tree_bytes(tree) * 1.15 / 1024 + blocks * 4 + inodes * 0.25 + 8 * 1024)
    return ["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", "-N", str(inodes + 256),
            "-O", "^has_journal,^resize_inode", "-U", fs_uuid, "-L", "hived-src", "-E", f"root_owner={uid}:{gid}",
            "-d", str(tree), str(target), f"{size_kib}k"]


__all__ = ["CheckoutBundle", "CheckoutImage", "RepoCache", "RepoError"]
