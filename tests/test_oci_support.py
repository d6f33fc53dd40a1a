"""Helpers for the build-image tests (no tests here): layer tars, a push client, and a real
registry (Debian's docker-registry, the reference v2 registry) on 127.0.0.1.

Everything started here is stopped by the context managers that start it, on failure too.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import gzip
import hashlib
import http.server
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from ports import free_port

from hived.oci import reference
from hived.oci.registry import MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST, Credentials, RegistryClient

REGISTRY_BIN = "/usr/bin/docker-registry"
MTIME = 1_700_000_000


def need_registry() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (ownership in layers, loop mounts)")
    if not os.path.exists(REGISTRY_BIN):
        pytest.skip("docker-registry not installed (apt-get install --no-install-recommends docker-registry)")


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------- layers


class Layer:
    """Build an uncompressed layer tar in memory."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.tf = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115

    def _info(self, name, kind, mode, uid=0, gid=0, **kw) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type = kind
        ti.mode = mode
        ti.uid, ti.gid = uid, gid
        ti.mtime = kw.pop("mtime", MTIME)
        for k, v in kw.items():
            setattr(ti, k, v)
        return ti

    def dir(self, name, mode=0o755, uid=0, gid=0, **kw) -> Layer:
        self.tf.addfile(self._info(name, tarfile.DIRTYPE, mode, uid, gid, **kw))
        return self

    def file(self, name, data: bytes = b"", mode=0o644, uid=0, gid=0, xattrs=None, **kw) -> Layer:
        ti = self._info(name, tarfile.REGTYPE, mode, uid, gid, size=len(data), **kw)
        if xattrs:
            ti.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
        self.tf.addfile(ti, io.BytesIO(data))
        return self

    def symlink(self, name, target, uid=0, gid=0) -> Layer:
        self.tf.addfile(self._info(name, tarfile.SYMTYPE, 0o777, uid, gid, linkname=target))
        return self

    def hardlink(self, name, target) -> Layer:
        self.tf.addfile(self._info(name, tarfile.LNKTYPE, 0o644, linkname=target))
        return self

    def whiteout(self, name) -> Layer:
        d, _, base = name.rpartition("/")
        return self.file(f"{d}/.wh.{base}" if d else f".wh.{base}", b"", 0o600)

    def opaque(self, directory) -> Layer:
        return self.file(f"{directory}/.wh..wh..opq", b"", 0o600)

    def chardev(self, name, major, minor, mode=0o666) -> Layer:
        self.tf.addfile(self._info(name, tarfile.CHRTYPE, mode, devmajor=major, devminor=minor))
        return self

    def bytes(self) -> bytes:
        self.tf.close()
        return self.buf.getvalue()


@dataclass
class Image:
    """An image ready to push: config, manifest, blobs by digest."""

    config: bytes
    manifest: bytes
    blobs: dict[str, bytes]
    layer_digests: list[str]
    media_type: str = MEDIA_OCI_MANIFEST
    children: list[Image] = field(default_factory=list)  # an index's manifests

    @property
    def digest(self) -> str:
        return sha256(self.manifest)


def make_image(layers: list[bytes], *, arch="amd64", config_extra: dict | None = None,
               compress="gzip") -> Image:
    blobs, descs, diff_ids = {}, [], []
    for tar in layers:
        diff_ids.append(sha256(tar))
        if compress == "gzip":
            blob, mt = gzip.compress(tar, compresslevel=1, mtime=0), "application/vnd.oci.image.layer.v1.tar+gzip"
        elif compress == "zstd":
            blob = subprocess.run(["zstd", "-q", "-c", "-1"], input=tar, capture_output=True, check=True).stdout
            mt = "application/vnd.oci.image.layer.v1.tar+zstd"
        else:
            blob, mt = tar, "application/vnd.oci.image.layer.v1.tar"
        d = sha256(blob)
        blobs[d] = blob
        descs.append({"mediaType": mt, "digest": d, "size": len(blob)})
    cfg = {"architecture": arch, "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids},
           "config": {"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["make"], "Env": ["PATH=/usr/bin:/bin", "A=1"],
                      "WorkingDir": "/src", "User": "1000:1000"}}
    if config_extra:
        cfg["config"].update(config_extra)
    config = json.dumps(cfg, sort_keys=True).encode()
    blobs[sha256(config)] = config
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MEDIA_OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(config),
                   "size": len(config)},
        "layers": descs}, sort_keys=True).encode()
    return Image(config, manifest, blobs, [d["digest"] for d in descs])


def make_index(images: dict[str, Image]) -> Image:
    """An OCI index over {"linux/amd64": image, ...}, plus an attestation-like unknown entry."""
    entries = []
    for platform, img in images.items():
        os_, arch = platform.split("/")
        entries.append({"mediaType": MEDIA_OCI_MANIFEST, "digest": img.digest, "size": len(img.manifest),
                        "platform": {"os": os_, "architecture": arch}})
    first = next(iter(images.values()))
    entries.append({"mediaType": MEDIA_OCI_MANIFEST, "digest": first.digest, "size": len(first.manifest),
                    "platform": {"os": "unknown", "architecture": "unknown"},
                    "annotations": {"vnd.docker.reference.type": "attestation-manifest"}})
    raw = json.dumps({"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": entries}).encode()
    return Image(b"", raw, {}, [], MEDIA_OCI_INDEX, list(images.values()))


# ---------------------------------------------------------------------------------------- push


async def push(ref_text: str, image: Image, credentials: Credentials | None = None) -> str:
    """Push with the registry API (HEAD/POST/PUT blob, PUT manifest); returns the manifest digest."""
    ref = reference.parse(ref_text)
    async with RegistryClient(credentials) as client:
        for child in image.children:
            await _push_one(client, ref, child, child.digest)
        await _push_one(client, ref, image, ref.reference)
    return image.digest


async def _push_one(client: RegistryClient, ref, image: Image, tag: str) -> None:
    actions = ("pull", "push")
    repo = ref.repository
    for digest, data in image.blobs.items():
        resp = await client.request("HEAD", ref, f"/v2/{repo}/blobs/{digest}", actions=actions)
        resp.release()
        if resp.status == 200:
            continue
        resp = await client.request("POST", ref, f"/v2/{repo}/blobs/uploads/", actions=actions)
        location = resp.headers.get("Location", "")
        resp.release()
        assert resp.status == 202, f"upload start: {resp.status}"
        if "://" not in location:
            location = client.base_url(ref) + location
        location += ("&" if "?" in location else "?") + f"digest={digest}"
        resp = await client.request("PUT", ref, location, data=data, actions=actions,
                                    headers={"Content-Type": "application/octet-stream"})
        body = await resp.text()
        resp.release()
        assert resp.status == 201, f"blob upload: {resp.status} {body}"
    resp = await client.request("PUT", ref, f"/v2/{repo}/manifests/{tag}", data=image.manifest, actions=actions,
                                headers={"Content-Type": image.media_type})
    body = await resp.text()
    resp.release()
    assert resp.status == 201, f"manifest upload: {resp.status} {body}"


# ---------------------------------------------------------------------------------------- registry


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never a proxy


class Registry:
    """docker-registry serving 127.0.0.1:<port> from `storage`, with optional auth."""

    def __init__(self, workdir: Path, *, users: dict[str, str] | None = None, token_auth: TokenServer | None = None):
        self.workdir = workdir
        self.storage = workdir / "storage"
        self.storage.mkdir(parents=True, exist_ok=True)
        self.users = users
        self.token = token_auth
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log = workdir / "registry.log"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def blob_file(self, digest: str) -> Path:
        hexd = digest.split(":")[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def _config(self) -> str:
        lines = ["version: 0.1", "log:", "  level: error", "  accesslog:", "    disabled: true",
                 "storage:", "  filesystem:", f"    rootdirectory: {self.storage}", "  delete:", "    enabled: true",
                 "http:", f"  addr: 127.0.0.1:{self.port}", "  secret: hived-test-secret"]
        if self.users is not None:
            htpasswd = self.workdir / "htpasswd"
            entries = []
            for user, password in self.users.items():
                p = subprocess.run(["htpasswd", "-nbB", user, password], capture_output=True, text=True, check=True)
                entries.append(p.stdout.strip())
            htpasswd.write_text("\n".join(entries) + "\n")
            lines += ["auth:", "  htpasswd:", "    realm: hived-test", f"    path: {htpasswd}"]
        if self.token is not None:
            lines += ["auth:", "  token:", f"    realm: {self.token.url}", f"    service: {self.token.service}",
                      f"    issuer: {self.token.issuer}", f"    rootcertbundle: {self.token.cert}"]
        return "\n".join(lines) + "\n"

    def start(self) -> Registry:
        for _attempt in range(3):
            if not self.port:
                self.port = free_port()
            cfg = self.workdir / "config.yml"
            cfg.write_text(self._config())
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(cfg)], stdout=log, stderr=log,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    _NO_PROXY.open(f"http://{self.host}/v2/", timeout=1).close()
                    return self
                except urllib.error.HTTPError:
                    return self  # 401: up, wants auth
                except OSError:
                    time.sleep(0.05)
            self.stop()
            if "address already in use" in self.log.read_text(errors="replace"):
                self.port = 0
                continue
            break
        raise RuntimeError(f"docker-registry did not start: {self.log.read_text(errors='replace')[-2000:]}")

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None


@contextlib.contextmanager
def running_registry(workdir: Path, **kw):
    reg = Registry(workdir, **kw)
    try:
        yield reg.start()
    finally:
        reg.stop()


# ---------------------------------------------------------------------------------------- token auth


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """A Docker token service on loopback: Basic auth in, RS256 JWT (x5c header) out.

    Keys and the certificate come from openssl(1); the registry trusts the certificate
    (rootcertbundle) and checks the signature, issuer, audience and expiry.
    """

    def __init__(self, workdir: Path, users: dict[str, str], *, acl: dict[str, list[str]] | None = None,
                 public: tuple[str, ...] = ()):
        """acl: user -> repository globs that user may access (a user not in it: every one);
        public: repository globs anyone may pull without credentials."""
        self.users = users
        self.acl = acl or {}
        self.public = public
        self.service = "hived-test-registry"
        self.issuer = "hived-test-issuer"
        self.key = workdir / "token.key"
        self.cert = workdir / "token.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(self.key),
                        "-out", str(self.cert), "-days", "2", "-subj", "/CN=hived-test-token"],
                       check=True, capture_output=True)
        der = subprocess.run(["openssl", "x509", "-in", str(self.cert), "-outform", "DER"],
                             check=True, capture_output=True).stdout
        self.x5c = base64.b64encode(der).decode()
        self.requests: list[dict] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                server.handle(self)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def sign(self, claims: dict) -> str:
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.key)], input=signing_input.encode(),
                             check=True, capture_output=True).stdout
        return f"{signing_input}.{_b64url(sig)}"

    def handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        q = parse_qs(urlsplit(h.path).query)
        auth = h.headers.get("Authorization", "")
        user = None
        if auth.startswith("Basic "):
            u, _, p = base64.b64decode(auth[6:]).decode().partition(":")
            if self.users.get(u) == p:
                user = u
        self.requests.append({"scope": q.get("scope", []), "service": q.get("service", []), "user": user})
        scopes = [sc.partition(":")[2].rpartition(":") for sc in q.get("scope", [])]
        anonymous_ok = scopes and all(acts == "pull" and any(fnmatch.fnmatchcase(name, g) for g in self.public)
                                      for name, _, acts in scopes)
        if user is None and not auth and anonymous_ok:
            user = ""  # a public repository: a pull token for anyone
        if user is None:
            body = b'{"details":"incorrect username or password"}'
            h.send_response(401)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
            return
        access = []
        for scope in q.get("scope", []):
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            allowed = self.acl.get(user) if user else list(self.public)
            if allowed is not None and not any(fnmatch.fnmatchcase(name, g) for g in allowed):
                continue  # a token without this repository: the registry says insufficient_scope
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        token = self.sign({"iss": self.issuer, "sub": user, "aud": self.service, "exp": now + 300,
                           "nbf": now - 10, "iat": now, "jti": os.urandom(8).hex(), "access": access})
        body = json.dumps({"token": token, "expires_in": 300}).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def __enter__(self) -> TokenServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


# ---------------------------------------------------------------------------------------- mounts


@contextlib.contextmanager
def mounted(image: Path, fstype: str, workdir: Path):
    """Mount a filesystem image read-only on a temp dir; always unmounted again."""
    mnt = workdir / f"mnt-{os.urandom(4).hex()}"
    mnt.mkdir()
    p = subprocess.run(["mount", "-o", "loop,ro", "-t", fstype, str(image), str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        mnt.rmdir()
        pytest.skip(f"cannot loop-mount {fstype} here: {p.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        with contextlib.suppress(OSError):
            mnt.rmdir()


def tree_files(root: Path) -> list[str]:
    """Every path under root, relative, sorted (for 'nothing left behind' checks)."""
    out = []
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            out.append(os.path.relpath(os.path.join(dirpath, n), root))
    return sorted(out)


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
