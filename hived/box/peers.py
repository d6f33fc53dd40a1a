"""Box peers: build images from a neighbour in the hive instead of the registry.

    box A (fetcher)                       control plane                     box B (holder)
    holds.find {image:<digest>} ───────▶ who-has index ◀── holds.report (B's images, peer_addr)
    ◀──────── holds.found [B, ...] (least loaded first)
    peer link (protocol/peer.toml, its own version) ────────────────────────▶ PeerServer
      hello ⇄ hello; ◀ peer.challenge {nonce}; peer.auth {HMAC proof} ▶; ◀ peer.welcome {proof}
      blob.get {config|layer, digest} ▶;  ◀ blob.start, blob.chunk..., blob.end (rate-limited)

Trust: a peer is not trusted with content. The manifest is resolved at the registry with the
build's own credentials (so the registry still decides who may use an image, and a peer
cannot choose what is built); the config and every layer from a peer are hashed as they
stream into the cache's work dir and must match the manifest's digests and sizes, exactly as
a registry's bytes must; the erofs is then built locally from the verified layers. A wrong
byte, a lost peer or a stall fails that attempt (its work dir is thrown away: nothing
half-written is used), is counted (`hived_peer_fetches_total{result}`), and the next peer or
the registry serves the image. Why layers and not the holder's erofs: the erofs cannot be
checked against anything the registry signed; layers can, at the cost of a local conversion.

Checkouts (peer protocol v2): boxes report the checkout images they hold (repository key +
commit, for repositories whose mirror they keep) like build images. A fetcher first resolves
the revision at the git origin with the build's own credentials (`git ls-remote`: the origin
decides access and names the commit; hived/repos/cache.py), then asks its control plane
(`checkout.find`, main protocol v5) for holders; the control plane answers only for a build the
fetcher holds the lease of and whose repository it is, with a ticket per holder
(hived/tickets.py) made with a key only that holder and the control plane know. The holder
checks the ticket (for this fetcher: its certificate's CN) and sends a git bundle of the
commit's history from its mirror (`checkout.get` → blob.start/chunk/end). The fetcher lets git
verify it (every object's hash, connectivity) into a quarantine ref, uses it only if that ref is
exactly the commit it asked for, and builds the checkout image itself; any failure tries the
next holder, then the origin.

Membership: the peer link is TLS only, with the hive's CA and each box's own certificate
(hived/box/peertls.py): everything on it is encrypted; a fetcher must show a certificate of
the hive's CA (CN = its box id, O = the hive), and it checks the holder's is the box the
control plane named. Inside TLS both ends also prove they hold the hive's peer token (handed
out by the control plane in `peering.config`) with an HMAC over both nonces and the box id
their certificate names. Why both: a box certificate lives for years and the hive has no
revocation list, and its key is a file on the box's disk; the peer token is handed out only
to a box that has just authenticated to the control plane with its own box token (which the
hive's config can take away) and is kept in memory only. So a copied certificate and key
alone do not make a peer, nor does the token alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import logging
import os
import secrets
import ssl
from pathlib import Path

from prometheus_client import Counter

from hived import tickets
from hived.box.peertls import PeerTls, peer_identity
from hived.link import peer_address
from hived.oci.errors import DigestMismatch, OciError
from hived.protocol import peer_messages
from hived.protocol.channel import Channel, ChannelClosed
from hived.protocol.codec import Schema
from hived.protocol.errors import ProtocolError
from hived.protocol.session import Session
from hived.ratelimit import TokenBucket

log = logging.getLogger(__name__)

PEER = Schema(peer_messages)
CHUNK = 256 << 10            # bytes per blob.chunk (frames stay well under 1 MiB)
HANDSHAKE_TIMEOUT_S = 5.0
STALL_S = 10.0               # a holder silent this long mid-transfer is gone
IDLE_S = 60.0                # a fetcher's connection idle this long is closed
FIND_TIMEOUT_S = 2.0
REPORT_MAX = 256             # keys per holds.report (the message's bound)
CHECKOUTS_MAX = 4096         # checkouts reported at most (the most recently used)


class PeerFailed(OciError):
    """A peer could not serve (refused, gone, stalled, out of order): try the next source."""

    todo = "the next peer or the registry serves the image"


def proof(token: str, side: str, holder_nonce: bytes, fetcher_nonce: bytes, box_id: str) -> bytes:
    """HMAC-SHA256 over fixed-length nonces and the prover's name: replaying one side's proof
    on another connection (other nonces) or for the other side fails."""
    msg = side.encode() + b"\0" + holder_nonce + fetcher_nonce + box_id.encode()
    return hmac.new(token.encode(), msg, hashlib.sha256).digest()


class PeerMetrics:
    def __init__(self, registry) -> None:
        self.fetches = Counter("hived_peer_fetches_total",
                               "Attempts to get an image from a peer, by result (ok, bad_digest, failed)",
                               ["result"], registry=registry)
        self.fetched_bytes = Counter("hived_peer_fetched_bytes_total", "Verified bytes received from peers",
                                     registry=registry)
        self.served_bytes = Counter("hived_peer_served_bytes_total", "Bytes served to peers", registry=registry)
        self.refused = Counter("hived_peer_refused_total", "Peer connections refused (not of this hive)",
                               registry=registry)
        for result in ("ok", "bad_digest", "failed"):
            self.fetches.labels(result)


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"peer address {addr!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


class PeerDirectory:
    """This box's side of the hive's who-has index (through its control link) and its peer
    credentials. Reports what the image cache can serve, bounded per message."""

    def __init__(self, box, box_id: str, peer_addr: str, metrics: PeerMetrics, tls: PeerTls | None = None) -> None:
        self.box = box
        self.box_id = box_id
        self.peer_addr = peer_addr
        self.metrics = metrics
        self.tls = tls  # None: this box has no hive certificate and takes no part in the peer link
        self.hive = ""
        self.token = ""
        self.ticket_key: bytes | None = None  # checks the control plane's checkout tickets
        self.token_set = asyncio.Event()
        self._reported: dict[str, str] = {}
        self._finds: dict[str, asyncio.Future] = {}
        self._ids = itertools.count(1)

    # -- from the control link -----------------------------------------------------------------
    def on_message(self, msg) -> bool:
        """peering.config and holds.found; False for anything else."""
        if msg.name == "peering.config":
            self.hive, self.token = msg["hive"], msg["token"]
            self.token_set.set()
            return True
        if msg.name == "peering.tickets":
            self.ticket_key = msg["key"]
            return True
        if msg.name in ("holds.found", "checkout.found"):
            fut = self._finds.pop(msg["request_id"], None)
            if fut is not None and not fut.done():
                fut.set_result(list(msg["holders"]))
            if msg.name == "checkout.found" and msg["refused"]:
                log.warning("peers: the control plane does not vouch for a checkout fetch: %s", msg["refused"])
            return True
        return False

    def holdings(self) -> dict[str, str]:
        if not self.peer_addr:
            return {}  # serves nothing (no peer_listen)
        out = {}
        if self.box.config.oci_dir.is_dir():  # (else: no image cache yet)
            out.update((f"image:{dg}", "") for dg in self.box.images.servable())
        if self.box.config.repos_dir.is_dir():
            out.update((f"checkout:{key}@{commit}", "") for key, commit in self.box.repos.servable_checkouts(
                CHECKOUTS_MAX))
        return out

    def reports(self, full: bool) -> list[dict]:
        """holds.report messages: everything (full) or what changed since the last report."""
        now = self.holdings()
        if full:
            added, removed = now, []
        else:
            added = {k: v for k, v in now.items() if self._reported.get(k) != v}
            removed = [k for k in self._reported if k not in now]
        self._reported = now
        if not full and not added and not removed:
            return []
        items = list(added.items())
        out = []
        for i in range(0, max(len(items), len(removed), 1), REPORT_MAX):
            out.append({"full": full and i == 0, "added": dict(items[i:i + REPORT_MAX]),
                        "removed": removed[i:i + REPORT_MAX], "peer_addr": self.peer_addr})
        return out

    # -- asking ------------------------------------------------------------------------------------
    async def find(self, key: str) -> list[dict]:
        return await self._ask(3, "holds.find", key=key)

    async def _ask(self, version: int, name: str, **fields) -> list[dict]:
        link = getattr(self.box, "control_link", None)
        channel = getattr(link, "channel", None)
        if channel is None or not link.ready or channel.session.version < version or not self.token \
                or self.tls is None:
            return []
        key = fields.get("key") or f"checkout:{fields.get('repo_key')}@{fields.get('commit')}"
        request_id = f"f{next(self._ids)}"
        fut = self._finds[request_id] = asyncio.get_running_loop().create_future()
        try:
            await channel.send(name, request_id=request_id, **fields)
            async with asyncio.timeout(FIND_TIMEOUT_S):
                return await fut
        except (ChannelClosed, TimeoutError, ProtocolError) as exc:
            log.info("peers: who holds %s: no answer (%s)", key, exc)
            return []
        finally:
            self._finds.pop(request_id, None)

    async def image_sources(self, manifest_digest: str) -> list[PeerSource]:
        """For hived.oci.cache.ImageCache.pull(peers=...): the holders of an image, best first."""
        holders = await self.find(f"image:{manifest_digest}")
        return [PeerSource(self, h) for h in holders if isinstance(h.get("addr"), str) and h.get("box_id")]

    async def checkout_sources(self, build_id: str, lease: int, repo_key: str, commit: str) -> list[PeerSource]:
        """For hived.repos.cache.RepoCache.checkout_image(peers=...): holders of a checkout with
        the control plane's ticket each, best first; [] unless it vouches for this build."""
        holders = await self._ask(5, "checkout.find", build_id=build_id, lease=lease, repo_key=repo_key,
                                  commit=commit)
        return [PeerSource(self, h) for h in holders
                if isinstance(h.get("addr"), str) and h.get("box_id") and isinstance(h.get("ticket"), bytes)
                and isinstance(h.get("expires"), int)]



async def _into_new_file(dest: Path, receive) -> None:
    """`await receive(write)` into dest (which must not exist), fsynced; dest is removed on any
    failure, so nothing half-written is ever found there."""
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    ok = False
    try:
        def write(data: bytes) -> None:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]

        await receive(write)
        os.fsync(fd)
        ok = True
    finally:
        os.close(fd)
        if not ok:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dest)

class PeerSource:
    """One holder, seen through the registry client's blob interface (fetch_blob_bytes,
    fetch_blob, close), so the image cache verifies and builds from it as from a registry."""

    def __init__(self, directory: PeerDirectory, holder: dict) -> None:
        self.directory = directory
        self.name = str(holder["box_id"])
        self.addr = str(holder["addr"])
        self.holder = holder  # checkouts: its ticket and expires
        self.channel: Channel | None = None
        self._lock = asyncio.Lock()  # one transfer at a time on the one connection

    async def _connect(self) -> Channel:
        d = self.directory
        if d.tls is None:
            raise PeerFailed("this box has no hive certificate: it takes no part in the peer link")
        host, port = split_addr(self.addr)
        loop = asyncio.get_running_loop()
        session = Session("fetcher", d.box_id, {"holder"}, schema=PEER)
        async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
            try:
                _, channel = await loop.create_connection(
                    lambda: Channel(session, hello_timeout=HANDSHAKE_TIMEOUT_S), host, port, ssl=d.tls.client,
                    ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S)
            except ssl.SSLError as exc:  # e.g. a holder whose certificate is not of the hive's CA
                raise PeerFailed(f"peer {self.name} ({self.addr}): TLS refused: {exc.reason or exc}: "
                                 f"not a box of this hive, or we are not") from None
            try:
                who = peer_identity(channel.transport)
                if who != (self.name, d.tls.hive_org):
                    raise PeerFailed(f"peer at {self.addr} shows the certificate of {who!r}, not of box "
                                     f"{self.name!r} of {d.tls.hive_org!r}")
                await channel.handshake()
                challenge = await channel.recv()
                if challenge.name == "error":
                    raise PeerFailed(f"peer {self.name} refused us: {challenge['message']}")
                if challenge.name != "peer.challenge":
                    raise PeerFailed(f"peer {self.name} sent {challenge.name}, not peer.challenge")
                if challenge["hive"] != d.hive:
                    raise PeerFailed(f"peer {self.name} is of hive {challenge['hive']!r}, not {d.hive!r}")
                nonce = secrets.token_bytes(32)
                await channel.send("peer.auth", box_id=d.box_id, nonce=nonce,
                                   proof=proof(d.token, "fetcher", challenge["nonce"], nonce, d.box_id))
                welcome = await channel.recv()
                if welcome.name == "error":
                    raise PeerFailed(f"peer {self.name} refused us: {welcome['message']}")
                want = proof(d.token, "holder", challenge["nonce"], nonce, self.name)
                if welcome.name != "peer.welcome" or welcome["box_id"] != self.name \
                        or not hmac.compare_digest(want, welcome["proof"]):
                    raise PeerFailed(f"peer {self.name} did not prove it is of this hive")
            except ChannelClosed as exc:  # TLS 1.3: a refused certificate shows on the first read
                channel.close("handshake failed")
                tls = " (TLS refused: is this box's certificate of the hive's CA?)" if "SSL" in str(exc) else ""
                raise PeerFailed(f"peer {self.name} ({self.addr}) closed the link: {exc}{tls}") from None
            except BaseException:
                channel.close("handshake failed")
                raise
        return channel

    async def _get(self, kind: str, key: str, size: int | None, sink, *, request=None, max_size: int = 0) -> str:
        """Stream item `key` into sink(bytes); returns the digest of what arrived. size None:
        whatever blob.start says, at most max_size (checkouts). Any failure closes the
        connection (it is out of step) and raises PeerFailed or DigestMismatch."""
        async with self._lock:
            try:
                if self.channel is None or not self.channel.is_open:
                    self.channel = await self._connect()
                ch = self.channel
                if request is None:
                    await ch.send("blob.get", kind=kind, key=key)
                else:
                    if ch.session.version < 2:
                        raise PeerFailed(f"peer {self.name} speaks peer protocol v{ch.session.version}: "
                                         "no checkouts")
                    await ch.send(request[0], **request[1])
                async with asyncio.timeout(STALL_S):
                    start = await ch.recv()
                if start.name == "error":
                    raise PeerFailed(f"peer {self.name}: {start['code']}: {start['message']}")
                if start.name != "blob.start" or start["key"] != key:
                    raise PeerFailed(f"peer {self.name} answered {start.name} for {key}")
                if size is None:
                    size = start["size"]
                    if size > max_size:
                        raise PeerFailed(f"peer {self.name} offers {key} as {size} bytes, more than {max_size}")
                elif start["size"] != size:
                    raise DigestMismatch(f"peer {self.name} offers {key} as {start['size']} bytes, the manifest "
                                         f"says {size}")
                h = hashlib.sha256()
                done = 0
                while done < size:
                    async with asyncio.timeout(STALL_S):
                        msg = await ch.recv()
                    if msg.name != "blob.chunk" or msg["offset"] != done:
                        raise PeerFailed(f"peer {self.name} sent {msg.name} out of order for {key}")
                    data = msg["data"]
                    if done + len(data) > size:
                        raise DigestMismatch(f"peer {self.name} sent more than the {size} bytes of {key}")
                    h.update(data)
                    sink(data)
                    done += len(data)
                async with asyncio.timeout(STALL_S):
                    end = await ch.recv()
                if end.name != "blob.end":
                    raise PeerFailed(f"peer {self.name} sent {end.name} after the last byte of {key}")
                self.directory.metrics.fetched_bytes.inc(size)
                if request is not None and start["sha256"] != f"sha256:{h.hexdigest()}":
                    raise DigestMismatch(f"peer {self.name} sent {key} with digest sha256:{h.hexdigest()}, "
                                         f"not the {start['sha256']} it announced")
                return f"sha256:{h.hexdigest()}"
            except (PeerFailed, DigestMismatch):
                self._drop()
                raise
            except (ChannelClosed, OSError, ProtocolError, ValueError) as exc:
                self._drop()
                raise PeerFailed(f"peer {self.name} ({self.addr}): {exc}") from None
            except TimeoutError:
                self._drop()
                raise PeerFailed(f"peer {self.name} stalled for {STALL_S:g} s while sending {key}") from None
            except BaseException:
                self._drop()
                raise

    def _drop(self) -> None:
        if self.channel is not None:
            self.channel.close("transfer failed")
            self.channel = None

    # -- the registry client's interface (hived.oci.registry.RegistryClient) ----------------------
    async def fetch_blob_bytes(self, ref, desc, limit: int = 4 << 20) -> bytes:
        if desc.size > limit:
            raise PeerFailed(f"{desc.digest} is {desc.size} bytes (at most {limit})")
        buf = bytearray()
        got = await self._get("config", desc.digest, desc.size, buf.extend)
        if got != desc.digest:
            raise DigestMismatch(f"peer {self.name} sent {desc.digest} with digest {got}")
        return bytes(buf)

    async def fetch_blob(self, ref, desc, dest: Path, progress=None) -> None:
        """Into dest (which must not exist), verified; removed on any failure."""
        async def receive(write) -> None:
            got = await self._get("layer", desc.digest, desc.size, write)
            if got != desc.digest:
                raise DigestMismatch(f"peer {self.name} sent layer {desc.digest} with digest {got}")

        await _into_new_file(dest, receive)
        if progress:
            progress("blob-done", {"digest": desc.digest, "total": desc.size, "peer": self.name})

    async def fetch_checkout(self, repo_key: str, commit: str, dest: Path, max_bytes: int) -> None:
        """A git bundle of commit's history from repository repo_key into dest (which must not
        exist), with this holder's ticket; removed on any failure. Git verifies its content."""
        request = ("checkout.get", {"repo_key": repo_key, "commit": commit, "expires": self.holder["expires"],
                                    "ticket": self.holder["ticket"]})
        await _into_new_file(dest, lambda write: self._get("checkout", f"{repo_key}@{commit}", None, write,
                                                           request=request, max_size=max_bytes))

    def failed(self, exc: BaseException) -> None:
        """Called by the image cache when this source's attempt failed."""
        result = "bad_digest" if isinstance(exc, DigestMismatch) or getattr(exc, "bad_content", False) else "failed"
        self.directory.metrics.fetches.labels(result).inc()

    def succeeded(self) -> None:
        self.directory.metrics.fetches.labels("ok").inc()

    async def close(self) -> None:
        self._drop()


class PeerServer:
    """Serves this box's verified cache contents to the boxes of its hive, at most
    `rate_bytes_s` in all (the native token bucket), so it never starves the box's own builds."""

    def __init__(self, directory: PeerDirectory, rate_bytes_s: int) -> None:
        self.directory = directory
        self.rate_bytes_s = rate_bytes_s
        self.bucket: TokenBucket | None = None
        self.port = 0
        self.connections = 0
        self._server = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        if self.rate_bytes_s > 0:
            self.bucket = TokenBucket(self.rate_bytes_s, 1.0, loop.time())
        if self.directory.tls is None:
            raise PeerFailed("the peer link is TLS only, and this box has no hive certificate")
        self._server = await loop.create_server(self._factory, host, port, reuse_address=True,
                                                ssl=self.directory.tls.server,
                                                ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _factory(self) -> Channel:
        channel = Channel(Session("holder", self.directory.box_id, {"fetcher"}, schema=PEER),
                          hello_timeout=HANDSHAKE_TIMEOUT_S)
        task = asyncio.get_running_loop().create_task(self._serve(channel))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return channel

    async def _serve(self, ch: Channel) -> None:
        d = self.directory
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                await ch.handshake()
                who = peer_identity(ch.transport)  # verified against the hive's CA by the TLS handshake
                if who is None or who[1] != d.tls.hive_org:
                    d.metrics.refused.inc()
                    log.warning("peer link: refused %s: %s", peer_address(ch),
                                "no certificate" if who is None else f"certificate of {who[1]!r}")
                    raise ProtocolError("not_allowed", f"the peer link of hive {d.hive} needs the certificate of a box "
                                        f"of {d.tls.hive_org!r} (hived control init --box NAME): "
                                        f"{'none was shown' if who is None else f'{who[1]!r} was shown'}")
                if not d.token:
                    raise ProtocolError("busy", "this box has no peer token yet (not registered with its hive)")
                nonce = secrets.token_bytes(32)
                await ch.send("peer.challenge", nonce=nonce, hive=d.hive)
                auth = await ch.recv()
            if auth.name != "peer.auth":
                raise ProtocolError("bad_message", f"expected peer.auth, got {auth.name}")
            if auth["box_id"] != who[0]:
                d.metrics.refused.inc()
                log.warning("peer link: refused %s (%s): its certificate is of %s", auth["box_id"], peer_address(ch),
                            who[0])
                raise ProtocolError("not_allowed", f"box {auth['box_id']!r} shows the certificate of {who[0]!r}")
            if not hmac.compare_digest(proof(d.token, "fetcher", nonce, auth["nonce"], auth["box_id"]), auth["proof"]):
                d.metrics.refused.inc()
                log.warning("peer link: refused %s (%s): no proof of hive %s's peer token", auth["box_id"],
                            peer_address(ch), d.hive)
                raise ProtocolError("not_allowed", f"not a box of hive {d.hive} (no proof of its peer token)")
            await ch.send("peer.welcome", box_id=d.box_id,
                          proof=proof(d.token, "holder", nonce, auth["nonce"], d.box_id))
            self.connections += 1
            while True:
                async with asyncio.timeout(IDLE_S):
                    msg = await ch.recv()
                if msg.name == "blob.get":
                    await self._send_item(ch, msg["kind"], msg["key"])
                elif msg.name == "checkout.get":
                    await self._send_checkout(ch, who[0], msg)
                else:
                    await ch.send("error", code="not_allowed", fatal=False, ref="",
                                  message=f"a holder does not take {msg.name}")
        except ProtocolError as exc:
            with contextlib.suppress(Exception):
                ch.transport.write(ch.session.error_frame(exc))
        except (ChannelClosed, TimeoutError, ConnectionError):
            pass
        finally:
            ch.close("peer link ended")

    def _path(self, kind: str, key: str) -> Path | None:
        if kind in ("manifest", "config", "layer") and key.startswith("sha256:") and len(key) == 71:
            return self.directory.box.images.peer_file(kind, key)
        return None

    async def _send_checkout(self, ch: Channel, fetcher: str, msg) -> None:
        """A bundle of a commit from this box's mirror, for a fetcher the control plane vouched
        for (its ticket, for the fetcher its certificate names)."""
        d = self.directory
        repo_key, commit = msg["repo_key"], msg["commit"]
        key = f"{repo_key}@{commit}"
        why = tickets.check(d.ticket_key, msg["ticket"], fetcher, d.box_id, repo_key, commit, msg["expires"])
        if why:
            d.metrics.refused.inc()
            log.warning("peer link: refused checkout %s to %s: %s", key, fetcher, why)
            await ch.send("error", code="not_allowed", fatal=False, ref=key, message=why)
            return
        try:
            path = await d.box.repos.peer_bundle(repo_key, commit)
        except Exception as exc:  # this box's git or disk: the fetcher tries the next source
            log.warning("peer link: no bundle of %s for %s: %s", key, fetcher, exc)
            path = None
        if path is None:
            await ch.send("error", code="not_found", fatal=False, ref=key, message=f"this box does not hold {key}")
            return
        try:
            await self._send_file(ch, key, path, None)
        finally:
            d.box.repos.release(path)

    async def _send_item(self, ch: Channel, kind: str, key: str) -> None:
        await self._send_file(ch, key, self._path(kind, key), key)

    async def _send_file(self, ch: Channel, key: str, path: Path | None, sha256: str | None) -> None:
        """Stream a file as blob.start, chunks, blob.end (paced); sha256 None: hashed here first."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC) if path is not None else -1
        except FileNotFoundError:  # evicted just now
            fd = -1
        if fd < 0:
            await ch.send("error", code="not_found", fatal=False, ref=key, message=f"this box does not hold {key}")
            return
        loop = asyncio.get_running_loop()
        try:  # the open fd keeps the bytes even if the cache removes the file meanwhile
            size = os.fstat(fd).st_size
            if sha256 is None:
                sha256 = await asyncio.to_thread(_sha256_fd, fd, size)
            await ch.send("blob.start", key=key, size=size, sha256=sha256)
            offset = 0
            # never more per chunk than the bucket holds, so a low rate is not overshot
            chunk = CHUNK if self.bucket is None else max(1, min(CHUNK, int(self.bucket.size)))
            while offset < size:
                n = min(chunk, size - offset)
                # consume() takes all or nothing: a timer that wakes a little early must not send free
                while self.bucket is not None and not self.bucket.consume(n, loop.time()):
                    await asyncio.sleep(max(self.bucket.wait_time(n, loop.time()), 0.001))
                # A page-cache read of 256 KiB; the cache's files are what the box just used.
                data = os.pread(fd, n, offset)
                if not data:
                    raise ChannelClosed(f"{key} shrank while being served")
                async with asyncio.timeout(STALL_S):  # a fetcher that stops reading is dropped
                    await ch.send("blob.chunk", offset=offset, data=data)
                offset += len(data)
                self.directory.metrics.served_bytes.inc(len(data))
            await ch.send("blob.end", key=key)
        finally:
            os.close(fd)


def _sha256_fd(fd: int, size: int) -> str:
    h = hashlib.sha256()
    offset = 0
    while offset < size:
        data = os.pread(fd, min(1 << 20, size - offset), offset)
        if not data:
            break
        h.update(data)
        offset += len(data)
    return f"sha256:{h.hexdigest()}"
