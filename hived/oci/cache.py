"""The box's build-image cache: OCI images pulled once, kept as read-only filesystem images.

Layout under the root (default /var/lib/hived/oci, one per box):

    index.json              refs -> manifest digest, images (size, last use, config);
                            replaced atomically (write, fsync, rename, fsync dir)
    .lock                   flock: index changes, across processes (box daemon, CLI)
    blobs/sha256/<hex>      verified layer blobs (shared between images)
    images/<hex>/           one per image manifest digest, complete or absent:
        rootfs.erofs        the merged layers (rootfs.ext4 where mkfs.erofs is missing)
        image.json          digest, refs, layers, config (entrypoint, env, workdir, user)
    tmp/pull-<pid>-<rand>/  a pull in progress (flock'ed .lock inside); renamed into
                            images/ when complete, removed by the next start otherwise
    tmp/del-*/              being removed (renamed out of images/ first)

Rules:
* Nothing is visible under its final name before it is complete and verified: blobs are
  hashed while they stream and renamed into blobs/ after; an image directory is built in
  tmp/ and renamed into images/ in one step, then the index names it.
* Leases: `acquire()` opens the image file and holds a shared flock on it until
  `release()`; removal takes an exclusive non-blocking flock first, so an image in use by
  any process (box daemon, CLI) is never evicted or removed. A dead process's leases go
  with it (the kernel drops its locks).
* Size bound (`max_bytes`, stored in the index so every process uses the box's value):
  after each pull, least recently used images (last pull or acquire) that are not in use
  are evicted until images + blobs fit.
* Who may use a cached image is the registry's to say, per build: a cached reference (tag or
  digest) is served without asking the registry only when its image is known public in its
  repository — resolved there without credentials at most PUBLIC_TTL_S ago (`index.json`
  "public", by "registry/repository@digest": registries grant repositories) — or when the
  same credentials resolved it there less than AUTH_TTL_S ago (in memory only, keyed by a
  keyed hash of the credentials). Otherwise the registry is asked
  once with the build's own credentials (one manifest GET of the reference: a refusal is
  that build's error) and the cached image is used if the answer names it. So one
  customer's pull never lets another customer without access run a private image, by tag
  or by digest. `refresh=True` always re-resolves a tag.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import hmac
import json
import logging
import os
import secrets
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hived.cachedir import CacheDir, try_lock
from hived.fsutil import fsync_dir as _fsync_dir
from hived.fsutil import write_json_atomic as _write_json_atomic
from hived.oci import reference
from hived.oci.errors import CacheError, InUse, NotCached, OciError, UnsupportedImage
from hived.oci.layers import TreeBuilder
from hived.oci.registry import (
    DEFAULT_PLATFORM,
    Credentials,
    Descriptor,
    ImageManifest,
    Progress,
    RegistryClient,
)

log = logging.getLogger(__name__)

DEFAULT_ROOT = "/var/lib/hived/oci"
FS_FILES = {"erofs": "rootfs.erofs", "ext4": "rootfs.ext4"}
MANIFEST_FILE = "manifest.json"  # the image manifest's bytes, as verified against its digest
CONFIG_FILE = "config.json"      # the image config's bytes, as verified against its digest
PARALLEL_BLOBS = 3
PUBLIC_TTL_S = 3600.0  # a reference resolved without credentials is served to anyone this long
AUTH_TTL_S = 60.0      # credentials that resolved a reference may use its cached image this long

# Where else blobs may come from: given a manifest digest, sources with the registry client's
# fetch_blob_bytes / fetch_blob / close (hived/box/peers.py), each verified like a registry.
PeerSources = Callable[[str], Awaitable[list]]


@dataclass(frozen=True)
class ImageConfig:
    """What a build container needs from the image config."""

    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    env: list[str] = field(default_factory=list)
    workdir: str = ""
    user: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_image_config(cls, doc: Any) -> ImageConfig:
        c = doc.get("config") if isinstance(doc, dict) else None
        c = c if isinstance(c, dict) else {}

        def strings(v: Any) -> list[str] | None:
            return [str(x) for x in v] if isinstance(v, list) else None

        labels = c.get("Labels") if isinstance(c.get("Labels"), dict) else {}
        return cls(strings(c.get("Entrypoint")), strings(c.get("Cmd")), strings(c.get("Env")) or [],
                   str(c.get("WorkingDir") or ""), str(c.get("User") or ""),
                   {str(k): str(v) for k, v in labels.items()})

    @classmethod
    def from_dict(cls, d: dict) -> ImageConfig:
        return cls(d.get("entrypoint"), d.get("cmd"), list(d.get("env") or []), d.get("workdir", ""),
                   d.get("user", ""), dict(d.get("labels") or {}))


@dataclass(frozen=True)
class CachedImage:
    digest: str  # image manifest digest (the platform's, not the index's)
    path: Path  # the read-only filesystem image
    size: int  # bytes of that file
    config: ImageConfig
    fs_type: str = "erofs"
    refs: tuple[str, ...] = ()
    layers: tuple[str, ...] = ()
    created: float = 0.0
    last_used: float = 0.0
    in_use: bool = False

    def to_json(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        d["refs"] = list(self.refs)
        d["layers"] = list(self.layers)
        return d


def _hex(digest: str) -> str:
    return digest.split(":", 1)[1]



def _first_error(e: BaseException) -> BaseException:
    """The error that matters inside (nested) exception groups: an OciError, else the first."""
    if isinstance(e, BaseExceptionGroup):
        leaves = []

        def walk(g: BaseExceptionGroup) -> None:
            for x in g.exceptions:
                if isinstance(x, BaseExceptionGroup):
                    walk(x)
                else:
                    leaves.append(x)

        walk(e)
        for x in leaves:
            if isinstance(x, OciError):
                return x
        return leaves[0] if leaves else e
    return e


class ImageCache(CacheDir):
    """See the module doc. One object per process; all methods but `pull` are synchronous.
    Index, locks, leases, trash and eviction: hived/cachedir.py."""

    what = "image cache"
    error = CacheError
    not_cached = NotCached

    min_free_bytes = 64 << 20  # besides the layers, free space a pull needs before it starts

    def __init__(self, root: str | os.PathLike = DEFAULT_ROOT, *, max_bytes: int | None = None,
                 fs_type: str = "auto", insecure: tuple[str, ...] = (), ssl: Any = None,
                 platform: str = DEFAULT_PLATFORM):
        self.fs_type = fs_type
        self.insecure = tuple(insecure)
        self.ssl = ssl
        self.platform = platform
        self._inflight: dict[str, asyncio.Future] = {}
        # (keyed hash of credentials, "registry/repository@digest") -> monotonic deadline
        self._authorised: dict[tuple[str, str], float] = {}
        self._cred_key = secrets.token_bytes(32)  # per process: the hashes mean nothing elsewhere
        self._basic_hosts: set[str] = set()  # registries that asked for Basic auth (no secret in it)
        super().__init__(root, ("blobs/sha256", "images"), max_bytes)

    # ------------------------------------------------------------------ state on disk

    def _empty_index(self) -> dict:
        return {**super()._empty_index(), "images": {}, "refs": {}}

    def _image_dir(self, digest: str) -> Path:
        return self.root / "images" / _hex(digest)

    def _image_file(self, digest: str, entry: dict) -> Path:
        return self._image_dir(digest) / entry.get("file", FS_FILES["erofs"])

    def _blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / _hex(digest)

    def _reconcile(self, index: dict) -> None:
        """Index <-> images/: drop entries without files, adopt complete dirs it lacks."""
        images = index["images"]
        for digest in list(images):
            if not self._image_file(digest, images[digest]).is_file():
                log.warning("image cache: %s is gone from disk; dropping it", digest)
                del images[digest]
        for d in (self.root / "images").iterdir():
            digest = f"sha256:{d.name}"
            if digest in images:
                continue
            try:
                meta = json.loads((d / "image.json").read_text())
                if meta.get("digest") != digest or not (d / meta["file"]).is_file():
                    raise ValueError("incomplete")
            except (OSError, ValueError, KeyError):
                log.warning("image cache: removing stray %s", d)
                self._detach(d)
                continue
            now = time.time()
            images[digest] = {k: meta[k] for k in ("file", "fs", "size", "layers", "config", "created",
                                                   "index_digests", "config_digest") if k in meta}
            images[digest]["last_used"] = now
            for r in meta.get("refs", []):
                index["refs"].setdefault(r, digest)
        index["refs"] = {r: dg for r, dg in index["refs"].items() if dg in images}
        index["public"] = {r: e for r, e in index.get("public", {}).items() if e.get("digest") in images}

    def _entry_image(self, index: dict, digest: str) -> CachedImage:
        e = index["images"][digest]
        refs = tuple(sorted(r for r, dg in index["refs"].items() if dg == digest))
        return CachedImage(digest=digest, path=self._image_file(digest, e), size=int(e.get("size", 0)),
                           config=ImageConfig.from_dict(e.get("config") or {}), fs_type=e.get("fs", "erofs"),
                           refs=refs, layers=tuple(e.get("layers") or ()), created=e.get("created", 0.0),
                           last_used=e.get("last_used", 0.0), in_use=self._in_use(digest, self._image_file(digest, e)))

    def _find(self, index: dict, ref_or_digest: str) -> str | None:
        """Manifest digest for a reference, a digest (image or index) or a unique hex prefix."""
        images = index["images"]
        text = ref_or_digest.strip()
        if text.startswith("sha256:") or (len(text) >= 12 and all(c in "0123456789abcdef" for c in text)):
            want = text if text.startswith("sha256:") else f"sha256:{text}"
            if want in images:
                return want
            hits = [dg for dg, e in images.items() if dg.startswith(want) or want in e.get("index_digests", [])]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise CacheError(f"{text} matches {len(hits)} images", "give more digits")
            if text.startswith("sha256:"):
                return None
        r = reference.parse(text)
        if r.digest:
            if r.digest in images:
                return r.digest
            hits = [dg for dg, e in images.items() if r.digest in e.get("index_digests", [])]
            return hits[0] if hits else None
        return index["refs"].get(str(r))

    # ------------------------------------------------------------------ leases

    def acquire(self, ref_or_digest: str) -> Path:
        """Lease a cached image: returns its file, kept (never evicted) until `release`."""
        with self._locked():
            index = self._load()
            digest = self._find(index, ref_or_digest)
            if digest is None:
                raise NotCached(f"{ref_or_digest} is not in the image cache")
            path = self._lease(index, digest)
            index["images"][digest]["last_used"] = time.time()
            self._save(index, durable=False)
            return path

    def _lease(self, index: dict, digest: str) -> Path:
        return self._take_lease(digest, self._image_file(digest, index["images"][digest]), digest)

    def release(self, ref_digest_or_path: str | os.PathLike) -> None:
        """Give back one lease taken by `acquire` (by ref, digest or the path it returned)."""
        key = os.fspath(ref_digest_or_path)
        digest = None
        for dg in self._leases:
            if key.startswith(str(self._image_dir(dg))):
                digest = dg
        if digest is None:
            with self._locked():
                digest = self._find(self._load(), key)
        self._drop_lease(digest, key)

    @contextlib.contextmanager
    def leased(self, ref_or_digest: str) -> Iterator[Path]:
        path = self.acquire(ref_or_digest)
        try:
            yield path
        finally:
            self.release(path)

    # ------------------------------------------------------------------ queries

    def get(self, ref_or_digest: str) -> CachedImage | None:
        with self._locked():
            index = self._load()
            digest = self._find(index, ref_or_digest)
            return self._entry_image(index, digest) if digest else None

    def list(self) -> list[CachedImage]:
        with self._locked():
            index = self._load()
            out = [self._entry_image(index, dg) for dg in index["images"]]
        return sorted(out, key=lambda i: i.last_used, reverse=True)

    def usage(self) -> int:
        """Bytes on disk: image files and blobs."""
        total = 0
        for sub in ("images", "blobs/sha256"):
            for dirpath, _dirs, files in os.walk(self.root / sub):
                for f in files:
                    with contextlib.suppress(FileNotFoundError):
                        total += os.lstat(os.path.join(dirpath, f)).st_size
        return total

    # ------------------------------------------------------------------ removal

    def remove(self, ref_or_digest: str) -> list[str]:
        """By reference: untag, and remove the image when no reference is left. By digest:
        remove the image and all its references. Returns the digests removed."""
        with self._locked():
            index = self._load()
            digest = self._find(index, ref_or_digest)
            if digest is None:
                raise NotCached(f"{ref_or_digest} is not in the image cache", "`hived image ls` shows what is")
            by_ref = not (ref_or_digest.startswith("sha256:") or digest.startswith(f"sha256:{ref_or_digest}"))
            if by_ref:
                r = reference.parse(ref_or_digest)
                if not r.digest:
                    index["refs"].pop(str(r), None)
                    if any(dg == digest for dg in index["refs"].values()):
                        self._save(index)
                        return []
            if not self._remove_image(index, digest):
                raise InUse(f"{digest} is in use by a cell")
            self._drop_unreferenced_blobs(index)
            self._save(index)
            return [digest]

    def _remove_image(self, index: dict, digest: str) -> bool:
        entry = index["images"].get(digest)
        if entry is None:
            return True
        if self._leases.get(digest):
            return False
        fd = try_lock(self._image_file(digest, entry))
        if fd is None:
            return False
        try:
            self._detach(self._image_dir(digest))
        finally:
            if fd >= 0:
                os.close(fd)
        del index["images"][digest]
        index["refs"] = {r: dg for r, dg in index["refs"].items() if dg != digest}
        index["public"] = {r: e for r, e in index.get("public", {}).items() if e.get("digest") != digest}
        return True

    def _drop_unreferenced_blobs(self, index: dict) -> int:
        wanted = {_hex(d) for e in index["images"].values() for d in e.get("layers") or ()}
        freed = 0
        for p in (self.root / "blobs" / "sha256").iterdir():
            if p.name not in wanted:
                with contextlib.suppress(FileNotFoundError):
                    freed += p.stat().st_size
                    p.unlink()
        return freed

    def _evict(self, index: dict, protect: set[str]) -> list[str]:
        def remove(digest: str) -> bool:
            if not self._remove_image(index, digest):
                return False
            self._drop_unreferenced_blobs(index)
            return True

        return self._evict_lru([(e.get("last_used", 0), dg) for dg, e in index["images"].items()], self.usage,
                               remove, protect, str)

    def gc(self) -> dict:
        """Leftover temp dirs, missing or stray images, unreferenced blobs, then the size bound."""
        with self._locked():
            index = self._load()
            self._clean_tmp()
            self._reconcile(index)
            freed = self._drop_unreferenced_blobs(index)
            evicted = self._evict(index, set())
            self._save(index)
            return {"evicted": evicted, "blob_bytes_freed": freed, "bytes": self.usage(),
                    "max_bytes": self.max_bytes}

    # ------------------------------------------------------------------ pull

    async def pull(self, ref: str, credentials: Credentials | None = None, *, refresh: bool = False,
                   acquire: bool = False, progress: Progress | None = None,
                   peers: PeerSources | None = None, operator: bool = False) -> CachedImage:
        """The image for ref, from the cache when there, else pulled, verified and converted.

        acquire=True also leases it (release with `release(image.path)`), so no concurrent
        eviction can remove it between the pull and its use.

        peers: where else the blobs may come from (boxes of the hive, hived/box/peers.py). The
        manifest is always resolved at the registry with these credentials (so the registry
        still decides who may use the image); the config and layers are then tried from each
        peer in turn, each verified against the manifest's digests exactly as a registry's are,
        and the registry serves whatever no peer could.

        operator=True: the box's operator asks (`hived image pull --cached`, root on the box,
        whose files the cache's are anyway): a cached reference is served without asking
        the registry whether these credentials may have it. Never for a build.
        """
        r = reference.parse(ref)
        who = self._who(credentials)
        cached = not refresh or bool(r.digest)
        if cached:  # known public, or these credentials resolved it just now: no registry
            hit = self._hit(r, acquire, allowed=lambda index, digest: operator
                            or self._may_skip_registry(index, r, who, digest))
            if hit is not None:
                return hit
        client = RegistryClient(credentials, insecure=self.insecure, ssl=self.ssl, platform=self.platform,
                                basic_hosts=self._basic_hosts)
        owned = True
        try:
            if cached and self._cached_digest(r) is not None:
                # cached, but the registry decides whether this build may use it: one manifest
                # GET with its credentials (an index's own digest names the image too)
                top = await client.manifest_digest(r)
                hit = self._hit(r, acquire, top_digest=top)
                if hit is not None:
                    self._authorised_now(r, who, hit.digest)
                    return hit
            if os.geteuid() != 0:
                raise CacheError(f"{r} is not cached, and turning an image into a filesystem image needs root "
                                 "(file owners, device nodes)", "pull as root (the box daemon runs as root)")
            manifest = await client.resolve(r, progress)
            hit = self._hit(r, acquire, manifest)
            if hit is not None:
                self._authorised_now(r, who, hit.digest)
                return hit
            task = self._inflight.get(manifest.digest)
            if task is None:  # the task owns the client from here (it may outlive this call)
                task = asyncio.ensure_future(self._fetch_any(client, r, manifest, progress, peers))
                owned = False
                self._inflight[manifest.digest] = task
                task.add_done_callback(self._pull_done)
            await asyncio.shield(task)
        finally:
            if owned:
                await client.close()
        hit = self._hit(r, acquire, manifest)
        if hit is None:  # evicted in between by a smaller bound: should not happen
            raise CacheError(f"{r} vanished from the cache right after its pull", "pull again")
        self._authorised_now(r, who, hit.digest)
        return hit

    # ------------------------------------------------------------------ who may use a cached image

    def _who(self, credentials: Credentials | None) -> str:
        """"" for anonymous; else a keyed hash of the credentials (never the password itself)."""
        if credentials is None:
            return ""
        secret = f"{credentials.username}\0{credentials.password}".encode()
        return hmac.new(self._cred_key, secret, hashlib.sha256).hexdigest()

    @staticmethod
    def _grant(r: reference.Reference, digest: str) -> str:
        """What the registry grants is a repository (its token scopes, its ACLs): an image
        served from a repository may be served from it again, by tag or by digest."""
        return f"{r.registry}/{r.repository}@{digest}"

    def _may_skip_registry(self, index: dict, r: reference.Reference, who: str, digest: str) -> bool:
        grant = self._grant(r, digest)
        public = index.get("public", {}).get(grant)
        if public and public.get("digest") == digest and time.time() - public.get("at", 0) < PUBLIC_TTL_S:
            return True
        deadline = self._authorised.get((who, grant)) if who else None
        return deadline is not None and time.monotonic() < deadline

    def _authorised_now(self, r: reference.Reference, who: str, digest: str) -> None:
        """The registry just let `who` have r (as digest): anonymous means public (on disk, so
        every process of this box knows), credentials are remembered in memory for AUTH_TTL_S."""
        grant = self._grant(r, digest)
        if not who:
            with self._locked():
                index = self._load()
                if digest in index["images"]:
                    index.setdefault("public", {})[grant] = {"digest": digest, "at": time.time()}
                    self._save(index, durable=False)
            return
        now = time.monotonic()
        if len(self._authorised) > 4096:  # bounded: drop what has expired (or all, if nothing has)
            self._authorised = {k: v for k, v in self._authorised.items() if v > now}
            if len(self._authorised) > 4096:
                self._authorised.clear()
        self._authorised[(who, grant)] = now + AUTH_TTL_S

    def _cached_digest(self, r: reference.Reference) -> str | None:
        with self._locked():
            return self._find(self._load(), str(r))

    async def _fetch_any(self, client: RegistryClient, r: reference.Reference, manifest: ImageManifest,
                         progress: Progress | None, peers: PeerSources | None) -> None:
        """Peers first (each a whole attempt: a wrong byte or a lost peer throws that attempt's
        work dir away), then the registry."""
        sources = []
        if peers is not None:
            try:
                sources = await peers(manifest.digest)
            except Exception as exc:  # no peers is not an error: the registry is there
                log.warning("image cache: %s: asking for peers failed: %s", r, exc)
        for source in sources:
            try:
                await self._fetch_and_build(source, r, manifest, progress)
            except (asyncio.CancelledError, CacheError):  # CacheError: this box's disk, no source helps
                await client.close()  # this task owns the registry client (see pull)
                raise
            except Exception as exc:
                log.warning("image cache: %s from peer %s failed (%s): trying the next source", r,
                            getattr(source, "name", "?"), exc)
                failed = getattr(source, "failed", None)
                if failed is not None:
                    failed(exc)
                continue
            succeeded = getattr(source, "succeeded", None)
            if succeeded is not None:
                succeeded()
            log.info("image cache: %s came from peer %s", r, getattr(source, "name", "?"))
            await client.close()
            return
        await self._fetch_and_build(client, r, manifest, progress)

    def peer_file(self, kind: str, digest: str) -> Path | None:
        """The verified bytes a peer may be served: an image's manifest or config, or a layer
        blob. None when this cache does not hold it."""
        with self._locked():
            index = self._load()
            images = index["images"]
            if kind == "manifest" and digest in images:
                path = self._image_dir(digest) / MANIFEST_FILE
            elif kind == "config":
                hits = [dg for dg, e in images.items() if e.get("config_digest") == digest]
                path = self._image_dir(hits[0]) / CONFIG_FILE if hits else None
            elif kind == "layer" and any(digest in (e.get("layers") or ()) for e in images.values()):
                path = self._blob_path(digest)
            else:
                path = None
        return path if path is not None and path.is_file() else None

    def servable(self) -> list[str]:
        """Manifest digests of the images peers can be served (pulled with their config kept)."""
        with self._locked():
            index = self._load()
            return [dg for dg, e in index["images"].items()
                    if e.get("config_digest") and (self._image_dir(dg) / CONFIG_FILE).is_file()]

    def _pull_done(self, task: asyncio.Future) -> None:
        for dg, t in list(self._inflight.items()):
            if t is task:
                del self._inflight[dg]
        if not task.cancelled():
            task.exception()  # retrieved here: the waiters (if any are left) raise it themselves

    def _hit(self, r: reference.Reference, acquire: bool, manifest: ImageManifest | None = None, *,
             top_digest: str | None = None, allowed=None) -> CachedImage | None:
        """The cached image for r (recording r as its reference), or None: by the manifest the
        registry resolved, by the top-level digest it serves for r now, or by r itself when
        allowed(index, digest) says this build may skip the registry."""
        with self._locked():
            index = self._load()
            if manifest is not None:
                digest = manifest.digest if manifest.digest in index["images"] else None
            elif top_digest is not None:
                digest = self._find(index, top_digest)
            else:
                digest = self._find(index, str(r))
                if digest is not None and allowed is not None and not allowed(index, digest):
                    return None
            if digest is None:
                return None
            entry = index["images"][digest]
            if not self._image_file(digest, entry).is_file():
                return None
            new_ref = index["refs"].get(str(r)) != digest
            index["refs"][str(r)] = digest
            if manifest is not None and manifest.index_digest:
                ids = entry.setdefault("index_digests", [])
                if manifest.index_digest not in ids:
                    ids.append(manifest.index_digest)
                    new_ref = True
            entry["last_used"] = time.time()
            if acquire:
                self._lease(index, digest)
            self._save(index, durable=new_ref)
            return self._entry_image(index, digest)

    async def _fetch_and_build(self, client: RegistryClient, r: reference.Reference, manifest: ImageManifest,
                               progress: Progress | None) -> None:
        layer_bytes = sum(d.size for d in manifest.layers)
        if layer_bytes > self.max_bytes:
            raise CacheError(f"{r} has {layer_bytes} bytes of layers, more than the cache bound {self.max_bytes}",
                             "raise the image cache's max_bytes or use a smaller image")
        work, lock_fd = self._workdir("pull")
        ok = False
        try:
            free = shutil.disk_usage(self.root).free
            if free < layer_bytes + self.min_free_bytes:
                raise CacheError(f"only {free >> 20} MiB free under {self.root}, {r} needs more than "
                                 f"{(layer_bytes + self.min_free_bytes) >> 20} MiB",
                                 "free disk space or lower the cache bound")
            config_raw = await client.fetch_blob_bytes(r, manifest.config)
            config = self._check_config(r, manifest, config_raw)
            sem = asyncio.Semaphore(PARALLEL_BLOBS)

            async def fetch(desc: Descriptor) -> None:
                async with sem:
                    await self._fetch_layer(client, r, desc, work, progress)

            async with asyncio.TaskGroup() as tg:
                for desc in {d.digest: d for d in manifest.layers}.values():
                    tg.create_task(fetch(desc))
            if progress:
                progress("convert", {"digest": manifest.digest})
            fs_type, fs_file, size = await asyncio.to_thread(self._build, r, manifest, config, work)
            meta = {"digest": manifest.digest, "refs": [str(r)], "file": fs_file, "fs": fs_type, "size": size,
                    "layers": [d.digest for d in manifest.layers], "config_digest": manifest.config.digest,
                    "config": asdict(ImageConfig.from_image_config(config)), "created": time.time(),
                    "index_digests": [manifest.index_digest] if manifest.index_digest else []}
            (work / "image" / MANIFEST_FILE).write_bytes(manifest.raw)  # what peers are served
            (work / "image" / CONFIG_FILE).write_bytes(config_raw)
            _write_json_atomic(work / "image" / "image.json", meta)
            await asyncio.to_thread(self._commit, r, manifest, work, meta)  # evictions delete in there
            ok = True
            if progress:
                progress("done", {"digest": manifest.digest, "size": size})
        except BaseException as exc:
            e = _first_error(exc)
            if isinstance(e, OSError) and not isinstance(e, OciError):
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise CacheError(f"disk full under {self.root} while pulling {r}",
                                     "free disk space or lower the cache bound (nothing partial was kept)") from None
                raise CacheError(f"pulling {r} failed on the cache disk: {e.strerror or e} ({e.filename or ''})",
                                 "check the cache directory's disk and permissions") from None
            if e is not exc and isinstance(e, OciError | asyncio.CancelledError):
                raise e from None
            raise
        finally:
            os.close(lock_fd)
            await client.close()
            if ok:  # the image is in place: delete the unpacked tree off the critical path
                trash = self.root / "tmp" / f"del-{work.name}"
                os.rename(work, trash)  # a crash before the rmtree ends: the next start removes it
                threading.Thread(target=shutil.rmtree, args=(trash, True), name="hived-oci-rm", daemon=True).start()
            else:
                await asyncio.to_thread(shutil.rmtree, work, True)

    async def _fetch_layer(self, client: RegistryClient, r: reference.Reference, desc: Descriptor,
                           work: Path, progress: Progress | None) -> None:
        """Get the blob into work/: a hard link of blobs/<hex> when a cached image has it (gc
        cannot take it away then), else downloaded and verified. Linked into blobs/ at commit."""
        mine = work / f"layer-{_hex(desc.digest)}"
        final = self._blob_path(desc.digest)
        try:
            os.link(final, mine)
            if os.stat(mine).st_size == desc.size:
                if progress:
                    progress("blob-done", {"digest": desc.digest, "total": desc.size, "cached": True})
                return
            log.warning("image cache: blob %s has the wrong size on disk; fetching it again", desc.digest)
            mine.unlink()
            with contextlib.suppress(FileNotFoundError):
                final.unlink()
        except FileNotFoundError:
            pass
        partial = work / f"partial-{_hex(desc.digest)}"
        await client.fetch_blob(r, desc, partial, progress)
        os.rename(partial, mine)

    def _check_config(self, r: reference.Reference, manifest: ImageManifest, raw: bytes) -> dict:
        try:
            doc = json.loads(raw)
        except ValueError:
            raise UnsupportedImage(f"{r}: the image config is not JSON") from None
        if not isinstance(doc, dict):
            raise UnsupportedImage(f"{r}: the image config is not a JSON object")
        want_os, want_arch = self.platform.split("/")[:2]
        if doc.get("os", want_os) != want_os or doc.get("architecture", want_arch) != want_arch:
            raise UnsupportedImage(f"{r} is a {doc.get('os')}/{doc.get('architecture')} image, not {self.platform}")
        rootfs = doc.get("rootfs") if isinstance(doc.get("rootfs"), dict) else {}
        diff_ids = rootfs.get("diff_ids")
        if not isinstance(diff_ids, list) or len(diff_ids) != len(manifest.layers):
            raise UnsupportedImage(f"{r}: the config lists {len(diff_ids or [])} layers, the manifest "
                                   f"{len(manifest.layers)}")
        return doc

    # ------------------------------------------------------------------ conversion (in a thread)

    def _build(self, r: reference.Reference, manifest: ImageManifest, config: dict,
               work: Path) -> tuple[str, str, int]:
        t0 = time.monotonic()
        tree = work / "tree"
        tree.mkdir(mode=0o755)
        builder = TreeBuilder(tree, max_bytes=self.max_bytes)
        diff_ids = config["rootfs"]["diff_ids"]
        for i, desc in enumerate(manifest.layers):
            builder.apply_file(work / f"layer-{_hex(desc.digest)}", f"{i + 1}/{len(manifest.layers)} "
                               f"({desc.digest[:19]})", diff_ids[i])
        builder.finish()
        t1 = time.monotonic()
        out = work / "image"
        out.mkdir()
        fs_type = self._fs_type()
        fs_file = FS_FILES[fs_type]
        target = out / fs_file
        if fs_type == "erofs":
            _run(["mkfs.erofs", "--quiet", f"-U{uuid.UUID(_hex(manifest.digest)[:32])}",
                  str(target), str(tree)], "mkfs.erofs")
        else:
            _mkfs_ext4(target, tree, _hex(manifest.digest))
        fd = os.open(target, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(target, 0o444)
        size = target.stat().st_size
        log.info("image cache: %s unpacked (%d files, %d bytes) in %.2f s, %s image (%d bytes) in %.2f s",
                 r, builder.entries, builder.bytes, t1 - t0, fs_type, size, time.monotonic() - t1)
        return fs_type, fs_file, size

    def _fs_type(self) -> str:
        return self._pick_fs_type(self.fs_type)

    def _commit(self, r: reference.Reference, manifest: ImageManifest, work: Path, meta: dict) -> None:
        final = self._image_dir(manifest.digest)
        with self._locked():
            for d in manifest.layers:  # blobs gc took away meanwhile come back from our links
                with contextlib.suppress(FileExistsError):
                    os.link(work / f"layer-{_hex(d.digest)}", self._blob_path(d.digest))
            index = self._load()
            try:
                os.rename(work / "image", final)
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                # Another process finished the same image first: keep theirs.
            _fsync_dir(final.parent)
            if manifest.digest not in index["images"]:
                index["images"][manifest.digest] = {k: meta[k] for k in ("file", "fs", "size", "layers", "config",
                                                                         "created", "index_digests", "config_digest")}
            index["images"][manifest.digest]["last_used"] = time.time()
            index["refs"][str(r)] = manifest.digest
            self._evict(index, {manifest.digest})
            self._save(index)


def _run(cmd: list[str], what: str) -> None:
    import subprocess

    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                       check=False)
    if p.returncode != 0:
        lines = (p.stderr or p.stdout).strip().splitlines()
        if any("No space left" in line for line in lines):
            raise OSError(errno.ENOSPC, "No space left on device", cmd[-2])
        raise CacheError(f"{what} failed (exit {p.returncode}): {lines[-1] if lines else 'no output'}",
                         f"check that {what} works on this box (hived doctor)")


def _mkfs_ext4(target: Path, tree: Path, digest_hex: str) -> None:
    """Fallback when erofs-utils is missing: a read-only-mounted ext4 with no journal."""
    blocks = 0
    inodes = 16
    for dirpath, dirs, files in os.walk(tree):
        inodes += len(dirs) + len(files)
        blocks += 1
        for f in files:
            st = os.lstat(os.path.join(dirpath, f))
            if stat.S_ISREG(st.st_mode):
                blocks += (st.st_size + 4095) // 4096
    size_kib = int((blocks * 4 * 1.10) + inodes * 0.25 + 16 * 1024)
    _run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", "-N", str(inodes + 1024),
          "-O", "^has_journal,^resize_inode", "-U", str(uuid.UUID(digest_hex[:32])), "-L", "hived-build",
          "-E", "root_owner=0:0", "-d", str(tree), str(target), f"{size_kib}k"], "mke2fs")
