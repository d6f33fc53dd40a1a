"""A client for the OCI Distribution / Docker Registry HTTP API v2 (pull side).

What it does:
* GET a manifest with every Accept type it understands (OCI index and manifest, Docker
  manifest list and schema 2); an index is narrowed to one platform (linux/amd64 unless
  told otherwise); the manifest's digest is checked against the reference's digest, or
  against Docker-Content-Digest when pulled by tag.
* Stream blobs to disk while hashing them; more bytes than the descriptor says, fewer, or
  another digest is an error and the file is removed: no caller ever sees a bad blob.
* Authenticate the way registries ask (the 401's WWW-Authenticate): Bearer (a token from the
  realm, with the caller's credentials as Basic auth when given, cached per scope until
  it expires) or Basic. Credentials are only sent over TLS, or to loopback/insecure hosts.
* Follow redirects itself (blob stores): Authorization is dropped when the origin changes.

Plain HTTP is used for loopback registries and hosts listed in `insecure`; everything
else is HTTPS (system trust store, or the `ssl` context given).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import ipaddress
import json
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import aiohttp

from hived.oci.errors import (
    AuthError,
    DigestMismatch,
    NotFound,
    OciError,
    RegistryError,
    RegistryUnavailable,
    UnsupportedImage,
)
from hived.oci.reference import Reference, valid_digest

MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
                        "application/vnd.docker.distribution.manifest.v1+prettyjws")
MEDIA_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
INDEX_TYPES = (MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST)
MANIFEST_TYPES = (MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST)
ACCEPT = ", ".join((MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST, MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST))

DEFAULT_PLATFORM = "linux/amd64"
MAX_MANIFEST_BYTES = 4 << 20  # what containerd allows
MAX_CONFIG_BYTES = 16 << 20
MAX_LAYERS = 1000
MAX_BLOB_BYTES = 1 << 40
CHUNK = 256 << 10  # hashing a chunk stalls the event loop ~0.5 ms at most
MAX_REDIRECTS = 5
USER_AGENT = "hived-oci/1"

# progress(stage, info): stages "manifest", "blob" (digest, done, total), "blob-done", ...
Progress = Callable[[str, dict], None]


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: dict | None = None
    annotations: dict | None = None

    @classmethod
    def from_json(cls, d: Any, what: str) -> Descriptor:
        if not isinstance(d, dict):
            raise RegistryError(f"{what}: descriptor is not an object")
        digest, size = d.get("digest"), d.get("size")
        if not isinstance(digest, str) or not valid_digest(digest):
            raise RegistryError(f"{what}: bad digest {digest!r}")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_BLOB_BYTES:
            raise RegistryError(f"{what}: bad size {size!r}")
        media_type = d.get("mediaType", "")
        platform = d.get("platform") if isinstance(d.get("platform"), dict) else None
        annotations = d.get("annotations") if isinstance(d.get("annotations"), dict) else None
        return cls(str(media_type), digest, size, platform, annotations)


@dataclass(frozen=True)
class ImageManifest:
    """One platform's image manifest, verified against its digest."""

    digest: str
    media_type: str
    raw: bytes
    config: Descriptor
    layers: tuple[Descriptor, ...]
    index_digest: str | None = None  # the index (manifest list) it was picked from, if any


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="...",service="...",scope="a:b:pull,push"` -> ("bearer", {...})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {}
    for m in re.finditer(r'([A-Za-z0-9_-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))', rest):
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
    return scheme.lower(), params


def _is_loopback(host: str) -> bool:
    name = urlsplit(f"//{host}").hostname or ""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _origin(url: str) -> tuple[str, str]:
    u = urlsplit(url)
    return u.scheme, u.netloc


def _platform_matches(platform: dict | None, want_os: str, want_arch: str, want_variant: str | None) -> int:
    """0: no match; higher is better."""
    if not platform or platform.get("os") != want_os or platform.get("architecture") != want_arch:
        return 0
    variant = platform.get("variant")
    if want_variant:
        return 2 if variant == want_variant else 0
    return 2 if not variant else 1


class RegistryClient:
    """One client per pull (or per box): holds the HTTP session and the token cache."""

    def __init__(self, credentials: Credentials | None = None, *, insecure: Iterable[str] = (),
                 ssl: Any = None, platform: str = DEFAULT_PLATFORM,
                 connect_timeout: float = 15.0, read_timeout: float = 60.0, basic_hosts: set[str] | None = None):
        """basic_hosts: hosts known to want Basic auth, shared between clients (the image cache's):
        credentials go with the first request there, not after a 401 (one round trip less)."""
        self.credentials = credentials
        self.insecure = set(insecure)
        self._ssl = ssl
        parts = platform.split("/")
        if len(parts) not in (2, 3):
            raise ValueError(f"platform {platform!r}: want os/arch[/variant]")
        self.platform = (parts[0], parts[1], parts[2] if len(parts) == 3 else None)
        self._timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout,
                                              sock_connect=connect_timeout, sock_read=read_timeout)
        self._session: aiohttp.ClientSession | None = None
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}
        self._basic_hosts: set[str] = basic_hosts if basic_hosts is not None else set()

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _sess(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, headers={"User-Agent": USER_AGENT},
                auto_decompress=False,
                connector=aiohttp.TCPConnector(limit=8, ssl=True if self._ssl is None else self._ssl))
        return self._session

    def scheme(self, host: str) -> str:
        return "http" if host in self.insecure or _is_loopback(host) else "https"

    def base_url(self, ref: Reference) -> str:
        return f"{self.scheme(ref.api_host)}://{ref.api_host}"

    # ------------------------------------------------------------------ HTTP + auth

    async def request(self, method: str, ref: Reference, path_or_url: str, *,
                      headers: dict | None = None, data: bytes | None = None,
                      actions: tuple[str, ...] = ("pull",)) -> aiohttp.ClientResponse:
        """Send a request to ref's registry, answering auth challenges; the caller releases it.

        path_or_url: "/v2/..." or an absolute URL (upload locations). A 401 after
        authenticating is an AuthError; connection failures are RegistryUnavailable.
        """
        host = ref.api_host
        url = path_or_url if "://" in path_or_url else self.base_url(ref) + path_or_url
        scope = f"repository:{ref.repository}:{','.join(actions)}"
        authenticated = False
        while True:
            h = dict(headers or {})
            auth = self._auth_header(host, scope)
            if auth:
                h["Authorization"] = auth
            resp = await self._send(method, url, h, data, host)
            if resp.status != 401:
                return resp
            challenge = resp.headers.get("WWW-Authenticate", "")
            detail = await error_detail(resp)
            resp.release()
            if authenticated:
                self._tokens.pop((host, scope), None)
                if self.credentials is None:
                    raise AuthError(f"{ref.registry} requires credentials for {ref.repository} ({detail})",
                                    "pass the credentials of a user with pull access "
                                    "(hived image pull --user U --password-stdin)")
                if host in self._basic_hosts:
                    raise AuthError(f"{ref.registry} rejected the credentials of {self.credentials.username!r} "
                                    f"({detail})")
                raise AuthError(f"{ref.registry} refused {self.credentials.username!r} access to "
                                f"{ref.repository} ({detail})",
                                "check the credentials, and that the user may pull that repository")
            authenticated = True
            await self._authenticate(ref, scope, challenge)

    def _auth_header(self, host: str, scope: str) -> str | None:
        tok = self._tokens.get((host, scope))
        if tok and tok[1] > time.monotonic():
            return f"Bearer {tok[0]}"
        if host in self._basic_hosts and self.credentials is not None:
            return self.credentials.basic()
        return None

    def _may_send_secret(self, url: str) -> bool:
        u = urlsplit(url)
        return u.scheme == "https" or _is_loopback(u.netloc) or u.netloc in self.insecure

    async def _authenticate(self, ref: Reference, scope: str, challenge: str) -> None:
        host = ref.api_host
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            if self.credentials is None:
                raise AuthError(f"{ref.registry} requires credentials",
                                "pass credentials (hived image pull --user U --password-stdin)")
            if not self._may_send_secret(f"{self.scheme(host)}://{host}/"):
                raise AuthError(f"{ref.registry} asks for a password over plain HTTP", "use HTTPS for that registry")
            self._basic_hosts.add(host)
            return
        if scheme != "bearer":
            raise AuthError(f"{ref.registry} asks for {scheme or 'no'} authentication, which hived does not speak",
                            "use a registry with Basic or Bearer token auth")
        realm = params.get("realm", "")
        if urlsplit(realm).scheme not in ("http", "https"):
            raise RegistryError(f"{ref.registry} sent a token realm that is not a URL: {realm!r}")
        query = [("scope", scope)]
        if params.get("service"):
            query.insert(0, ("service", params["service"]))
        if params.get("scope") and params["scope"] != scope:
            query.append(("scope", params["scope"]))
        url = realm + ("&" if "?" in realm else "?") + urlencode(query)
        h = {}
        if self.credentials is not None:
            if not self._may_send_secret(realm):
                raise AuthError(f"token service {realm} is plain HTTP: hived will not send the password there",
                                "use an HTTPS token service")
            h["Authorization"] = self.credentials.basic()
        resp = await self._send("GET", url, h, None, urlsplit(realm).netloc)
        try:
            if resp.status in (401, 403):
                detail = await error_detail(resp)
                if self.credentials is None:
                    raise AuthError(f"{ref.registry}'s token service wants credentials ({detail})",
                                    "pass credentials (hived image pull --user U --password-stdin)")
                raise AuthError(f"{ref.registry}'s token service rejected the credentials of "
                                f"{self.credentials.username!r} ({detail})")
            if resp.status != 200:
                raise RegistryError(f"token service {realm} answered {resp.status}: {await error_detail(resp)}")
            body = await read_limited(resp, 1 << 20, "token response")
        finally:
            resp.release()
        try:
            doc = json.loads(body)
            token = doc.get("token") or doc.get("access_token")
            expires_in = int(doc.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"token service {realm} sent no token")
        # Renew a little early; never trust a token longer than an hour.
        ttl = max(5, min(expires_in, 3600) - 10)
        self._tokens[(host, scope)] = (token, time.monotonic() + ttl)

    async def _send(self, method: str, url: str, headers: dict, data: bytes | None,
                    host: str) -> aiohttp.ClientResponse:
        for _ in range(MAX_REDIRECTS + 1):
            try:
                resp = await self._sess().request(method, url, headers=headers, data=data, allow_redirects=False)
            except aiohttp.ClientConnectorCertificateError as e:
                raise RegistryUnavailable(f"TLS certificate of {host} is not trusted: {e.certificate_error}",
                                          "install the registry's CA certificate on this box") from None
            except aiohttp.ClientConnectorError as e:
                raise RegistryUnavailable(f"cannot connect to {host}: {e.os_error.strerror or e.os_error}") from None
            except TimeoutError:  # before OSError: TimeoutError is one
                raise RegistryUnavailable(f"{host} did not answer in time") from None
            except (aiohttp.ClientError, OSError) as e:
                raise RegistryUnavailable(f"connection to {host} failed: {type(e).__name__}: {e}") from None
            if resp.status in (301, 302, 303, 307, 308) and method in ("GET", "HEAD") \
                    and resp.headers.get("Location"):
                location = urljoin(url, resp.headers["Location"])
                resp.release()
                if _origin(location) != _origin(url):
                    headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
                url = location
                continue
            return resp
        raise RegistryError(f"{host}: more than {MAX_REDIRECTS} redirects")

    # ------------------------------------------------------------------ manifests

    async def resolve(self, ref: Reference, progress: Progress | None = None) -> ImageManifest:
        """The image manifest ref names for this client's platform, verified."""
        media_type, raw, digest = await self._get_manifest(ref, ref.reference)
        index_digest = None
        if media_type in INDEX_TYPES:
            index_digest = digest
            child = self._pick_platform(ref, raw)
            media_type, raw, digest = await self._get_manifest(ref, child.digest)
            if media_type in INDEX_TYPES:
                raise UnsupportedImage(f"{ref}: an index inside an index is not supported")
            if len(raw) != child.size:
                raise DigestMismatch(f"{ref}: manifest {child.digest} is {len(raw)} bytes, the index says {child.size}")
        manifest = self._parse_manifest(ref, media_type, raw, digest, index_digest)
        if progress:
            progress("manifest", {"digest": manifest.digest, "layers": len(manifest.layers),
                                  "bytes": sum(d.size for d in manifest.layers)})
        return manifest

    async def manifest_digest(self, ref: Reference) -> str:
        """The digest the registry serves for ref now (top level: an index's own digest)."""
        _media, _raw, digest = await self._get_manifest(ref, ref.reference)
        return digest

    async def _get_manifest(self, ref: Reference, reference: str) -> tuple[str, bytes, str]:
        path = f"/v2/{ref.repository}/manifests/{reference}"
        resp = await self.request("GET", ref, path, headers={"Accept": ACCEPT})
        try:
            await check_status(resp, ref, f"manifest {reference}")
            raw = await read_limited(resp, MAX_MANIFEST_BYTES, f"manifest of {ref}")
            ctype = resp.headers.get("Content-Type", "").split(";")[0].strip()
            header_digest = resp.headers.get("Docker-Content-Digest", "")
        finally:
            resp.release()
        if reference.startswith("sha"):
            algorithm = reference.split(":", 1)[0]
            digest = digest_of(raw, algorithm)
            if digest != reference:
                raise DigestMismatch(f"{ref}: the manifest served for {reference} has digest {digest}")
        else:
            digest = digest_of(raw)
            if header_digest.startswith("sha256:") and header_digest != digest:
                raise DigestMismatch(f"{ref}: manifest digest is {digest} but the registry says {header_digest}")
        try:
            doc = json.loads(raw)
        except ValueError:
            raise RegistryError(f"{ref}: the manifest is not JSON") from None
        if not isinstance(doc, dict):
            raise RegistryError(f"{ref}: the manifest is not a JSON object")
        media_type = doc.get("mediaType") or ctype
        if media_type in MEDIA_DOCKER_SCHEMA1 or doc.get("schemaVersion") == 1:
            raise UnsupportedImage(f"{ref} is a Docker schema 1 image (deprecated)",
                                   "re-push it with a current docker or buildah (schema 2 / OCI)")
        if media_type not in INDEX_TYPES + MANIFEST_TYPES:
            # OCI allows a missing mediaType: tell an index from a manifest by its fields.
            if not media_type and "manifests" in doc:
                media_type = MEDIA_OCI_INDEX
            elif not media_type and "layers" in doc:
                media_type = MEDIA_OCI_MANIFEST
            else:
                raise UnsupportedImage(f"{ref}: manifest type {media_type!r} is not a container image")
        return media_type, raw, digest

    def _pick_platform(self, ref: Reference, raw: bytes) -> Descriptor:
        doc = json.loads(raw)
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise RegistryError(f"{ref}: the image index has no manifests list")
        want_os, want_arch, want_variant = self.platform
        best, best_score, seen = None, 0, []
        for i, entry in enumerate(entries):
            d = Descriptor.from_json(entry, f"{ref} index entry {i}")
            if d.media_type and d.media_type not in MANIFEST_TYPES:
                continue
            if d.platform:
                seen.append("/".join(str(d.platform.get(k)) for k in ("os", "architecture", "variant")
                                     if d.platform.get(k)))
            score = _platform_matches(d.platform, want_os, want_arch, want_variant)
            if score > best_score:
                best, best_score = d, score
        if best is None:
            have = ", ".join(sorted(set(seen) - {"unknown/unknown"})) or "none"
            raise UnsupportedImage(f"{ref} has no {'/'.join(p for p in self.platform if p)} image (it has: {have})")
        return best

    def _parse_manifest(self, ref: Reference, media_type: str, raw: bytes, digest: str,
                        index_digest: str | None) -> ImageManifest:
        doc = json.loads(raw)
        if doc.get("schemaVersion") != 2:
            raise UnsupportedImage(f"{ref}: manifest schemaVersion {doc.get('schemaVersion')!r}, want 2")
        config = Descriptor.from_json(doc.get("config"), f"{ref} config")
        if config.media_type and config.media_type not in (MEDIA_OCI_CONFIG, MEDIA_DOCKER_CONFIG):
            raise UnsupportedImage(f"{ref} is not a container image (config type {config.media_type})",
                                   "pull a container image, not an artifact")
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise RegistryError(f"{ref}: the manifest has no layers list")
        if len(layers) > MAX_LAYERS:
            raise UnsupportedImage(f"{ref} has {len(layers)} layers (at most {MAX_LAYERS})")
        descs = tuple(Descriptor.from_json(d, f"{ref} layer {i}") for i, d in enumerate(layers))
        for d in descs:
            if d.media_type and "tar" not in d.media_type:
                raise UnsupportedImage(f"{ref}: layer {d.digest} has type {d.media_type}, not a tar layer")
        return ImageManifest(digest, media_type, raw, config, descs, index_digest)

    # ------------------------------------------------------------------ blobs

    async def fetch_blob_bytes(self, ref: Reference, desc: Descriptor, limit: int = MAX_CONFIG_BYTES) -> bytes:
        """A small blob (the image config) in memory, verified."""
        if desc.size > limit:
            raise UnsupportedImage(f"{ref}: blob {desc.digest} is {desc.size} bytes (at most {limit})")
        resp = await self.request("GET", ref, f"/v2/{ref.repository}/blobs/{desc.digest}")
        try:
            await check_status(resp, ref, f"blob {desc.digest}")
            data = await read_limited(resp, desc.size, f"blob {desc.digest}", exact=True)
        finally:
            resp.release()
        algorithm = desc.digest.split(":", 1)[0]
        got = digest_of(data, algorithm)
        if got != desc.digest:
            raise DigestMismatch(f"{ref}: blob {desc.digest} has digest {got}")
        return data

    async def fetch_blob(self, ref: Reference, desc: Descriptor, dest: Path,
                         progress: Progress | None = None) -> None:
        """Stream a blob into dest (which must not exist), hashing as it comes.

        On any failure (size, digest, connection) dest is removed before the error is raised.
        """
        algorithm = desc.digest.split(":", 1)[0]
        h = hashlib.new(algorithm)
        done = 0
        resp = await self.request("GET", ref, f"/v2/{ref.repository}/blobs/{desc.digest}")
        fd = -1
        try:
            await check_status(resp, ref, f"blob {desc.digest}")
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) != desc.size:
                raise DigestMismatch(f"{ref}: blob {desc.digest} is {length} bytes, the manifest says {desc.size}")
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                async for chunk in resp.content.iter_chunked(CHUNK):
                    done += len(chunk)
                    if done > desc.size:
                        raise DigestMismatch(f"{ref}: blob {desc.digest} is longer than the {desc.size} bytes "
                                             "the manifest says")
                    h.update(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
                    if progress:
                        progress("blob", {"digest": desc.digest, "done": done, "total": desc.size})
            except TimeoutError:  # before OSError: TimeoutError is one
                raise RegistryUnavailable(f"{ref.api_host} stalled while sending {desc.digest} "
                                          f"({done} of {desc.size} bytes)") from None
            except aiohttp.ClientError as e:  # OSError from os.write (disk full) goes up as it is
                raise RegistryUnavailable(f"connection to {ref.api_host} lost while downloading {desc.digest} "
                                          f"({done} of {desc.size} bytes): {type(e).__name__}") from None
            if done != desc.size:
                raise RegistryUnavailable(f"{ref.api_host} sent {done} of the {desc.size} bytes of {desc.digest}")
            got = f"{algorithm}:{h.hexdigest()}"
            if got != desc.digest:
                raise DigestMismatch(f"blob {desc.digest} of {ref} arrived with digest {got}")
            os.fsync(fd)
        except BaseException:
            if fd >= 0:
                os.close(fd)
                fd = -1
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(dest)
            raise
        finally:
            if fd >= 0:
                os.close(fd)
            resp.release()
        if progress:
            progress("blob-done", {"digest": desc.digest, "total": desc.size})


# ---------------------------------------------------------------------- helpers


async def read_limited(resp: aiohttp.ClientResponse, limit: int, what: str, exact: bool = False) -> bytes:
    buf = bytearray()
    try:
        async for chunk in resp.content.iter_chunked(CHUNK):
            buf += chunk
            if len(buf) > limit:
                if exact:
                    raise DigestMismatch(f"{what} is longer than the {limit} bytes it should be")
                raise RegistryError(f"{what} is larger than {limit} bytes")
    except TimeoutError:
        raise RegistryUnavailable(f"timed out reading {what}") from None
    except aiohttp.ClientError as e:
        raise RegistryUnavailable(f"connection lost while reading {what}: {type(e).__name__}") from None
    if exact and len(buf) != limit:
        raise RegistryUnavailable(f"{what}: got {len(buf)} of {limit} bytes")
    return bytes(buf)


async def error_detail(resp: aiohttp.ClientResponse) -> str:
    """`CODE: message` from a registry error body, or the HTTP status text."""
    try:
        body = await resp.content.read(64 << 10)
        doc = json.loads(body)
        errors = doc.get("errors") if isinstance(doc, dict) else None
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            e = errors[0]
            return f"{e.get('code', '?')}: {e.get('message', '')}".strip().rstrip(":")
        if isinstance(doc, dict) and doc.get("details"):
            return str(doc["details"])[:200]
    except (TimeoutError, ValueError, aiohttp.ClientError, UnicodeDecodeError):
        pass
    return f"HTTP {resp.status} {resp.reason or ''}".strip()


async def check_status(resp: aiohttp.ClientResponse, ref: Reference, what: str) -> None:
    if resp.status == 200:
        return
    detail = await error_detail(resp)
    if resp.status == 404:
        if what.startswith("manifest"):
            raise NotFound(f"{ref} not found on {ref.registry} ({detail})")
        raise RegistryError(f"{ref.registry} has no {what} although {ref}'s manifest names it ({detail})",
                            "re-push the image; the registry's storage is missing a blob")
    if resp.status == 403:
        raise AuthError(f"{ref.registry} denied access to {ref.repository} ({detail})",
                        "check that the user may pull that repository")
    if resp.status == 429:
        raise RegistryError(f"{ref.registry} is rate-limiting this box ({detail})",
                            "wait and pull again, or pull with credentials")
    if resp.status >= 500:
        raise RegistryError(f"{ref.registry} failed with {resp.status} on {what} ({detail})",
                            "retry later; the registry itself is failing")
    raise RegistryError(f"{ref.registry} answered {resp.status} to GET {what} ({detail})")


__all__ = ["ACCEPT", "Credentials", "Descriptor", "ImageManifest", "OciError", "Progress", "RegistryClient",
           "digest_of", "parse_challenge"]
