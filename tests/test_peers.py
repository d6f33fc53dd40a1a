"""Box peers for real: a control plane, box A (`hived box --config`, its own process, holding
an image) and box B (a BoxDaemon in this process), Debian's docker-registry on loopback.

B gets the image's layers from A over the peer link (TLS with the hive's certificates and
token proofs, rate-limited on A, verified on B); a wrong byte on A's disk fails that transfer,
is counted, and the registry serves the image; a fetcher without the hive's certificate, with
another hive's, or without the hive's token is refused with a clear error, and B refuses a
holder that is not the box it asked for; nothing crosses the peer link in clear text (a relay
records the bytes of a real transfer); A killed (SIGKILL) in the middle of a transfer: B
finishes from the registry and keeps nothing half-written.
No cells are booted here (pool targets 0): the whole build path with a cell is
`hived bench peers`.
"""

import asyncio
import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from ports import free_port
from test_control_api import sha
from test_oci_support import Layer, make_image, need_registry, push, running_registry

from hived.control import tls
from hived.control.config import parse as parse_hive
from hived.control.server import ControlPlane
from hived.oci.cache import ImageCache

from boxharness import BoxHarness, find_image

pytestmark = [pytest.mark.root]

TOKENS = {"box-a": secrets.token_urlsafe(24), "box-b": secrets.token_urlsafe(24)}
LAYER_MB = 12          # two incompressible layers of this size
SERVE_BYTES_S = 8 << 20  # box A serves at most this: a transfer takes seconds, long enough to kill A in


class LoopThread:
    """An event loop on its own thread (the control plane's)."""

    def __init__(self) -> None:
        import uvloop

        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def scrape(port: int) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


class TwoBoxes:
    """A control plane on its own loop thread (TLS), box A as its own `hived box --config`
    process and box B as a BoxHarness here; shared by the peer tests (images, checkouts)."""

    def __init__(self, tmp: Path, tokens: dict[str, str], box_lost_s: float = 6.0, **hive_tables) -> None:
        self.tmp, self.tokens = tmp, tokens
        self.box_port, self.api_port = free_port(), free_port()
        self.tls_dir = tmp / "tls"
        tls.init(self.tls_dir, "peers", boxes=list(tokens))
        self.cp_loop = LoopThread()
        self.cp = ControlPlane(parse_hive({
            "hive": {"name": "peers", "state_dir": str(tmp / "hive"), "api_listen": f"127.0.0.1:{self.api_port}",
                     "box_listen": f"127.0.0.1:{self.box_port}", "heartbeat_s": 0.3, "box_lost_s": box_lost_s,
                     "tls_dir": str(self.tls_dir)},
            "shapes": {"small": {}, "holder": {}},
            "customers": {},
            "boxes": {name: {"token_sha256": sha(tok)} for name, tok in tokens.items()},
            **hive_tables,
        }, "test"))
        self.cp_loop.call(self.cp.start())
        self.a_proc = None
        self.b = None

    def control(self, box: str) -> dict:
        return {"address": f"127.0.0.1:{self.box_port}", "token": self.tokens[box], "box_id": box,
                "ca_file": str(self.tls_dir / "ca.pem"), "cert_file": str(self.tls_dir / f"box-{box}.pem"),
                "key_file": str(self.tls_dir / f"box-{box}.key")}

    def spawn_a(self, serve_bytes_s: int, extra: str = "") -> None:
        """Box A from its own box.toml: no cells (a `holder` shape with no pool), a peer link
        serving at most `serve_bytes_s`; `extra` adds [box] lines."""
        a = self.tmp / "a"
        a.mkdir(exist_ok=True)
        self.a_peer_port, self.a_metrics_port = free_port(), free_port()
        control = "\n".join(f'{k} = "{v}"' for k, v in self.control("box-a").items())
        (a / "box.toml").write_text(f"""
[box]
name = "pa-{secrets.token_hex(3)}"
state_dir = "{a / 'state'}"
image_dir = "{find_image().parent}"
network = false
overcommit = true
reserved_cores = 0
metrics_port = {self.a_metrics_port}
oci_dir = "{a / 'oci'}"
peer_listen = "127.0.0.1:{self.a_peer_port}"
peer_serve_bytes_s = {serve_bytes_s}
{extra}
[shapes.holder]
pool_target = 0

[control]
{control}
""")
        self.a_log = open(a / "box.log", "ab")  # noqa: SIM115 - closed in stop()
        self.a_proc = subprocess.Popen([sys.executable, "-m", "hived", "box", "--config", str(a / "box.toml")],
                                       stdout=self.a_log, stderr=self.a_log, stdin=subprocess.DEVNULL,
                                       start_new_session=True)

    def start_b(self, pool_target: int, **box) -> None:
        b = self.tmp / "b"
        self.b = BoxHarness({"small": {"vcpus": 1, "memory_mib": 384, "scratch_mib": 256, "pool_target": pool_target}},
                            box={"network": False, "oci_dir": str(b / "oci"), "peer_listen": "127.0.0.1:0", **box},
                            tables={"control": self.control("box-b")})
        self.b.start(wait_ready=False)

    def kill_a(self) -> None:
        if self.a_proc is not None and self.a_proc.poll() is None:
            os.killpg(self.a_proc.pid, signal.SIGKILL)
            self.a_proc.wait(10)

    def wait_for(self, what, cond, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.1)

    def b_metric(self, name: str, labels: str = "") -> float:
        from prometheus_client import generate_latest

        return metric(generate_latest(self.b.daemon.metrics.registry).decode(), name, labels)

    def stop(self) -> None:
        try:
            self.kill_a()
            if self.b is not None:
                self.b.stop()
        finally:
            self.cp_loop.call(self.cp.stop())
            self.cp_loop.stop()
            if self.a_proc is not None:
                self.a_log.close()


class Hive(TwoBoxes):
    def __init__(self, tmp: Path, registry) -> None:
        super().__init__(tmp, TOKENS)
        self.registry = registry

    def start_a(self) -> None:
        self.spawn_a(SERVE_BYTES_S, f'oci_insecure = ["{self.registry.host}"]')

    def start_b(self) -> None:
        super().start_b(0, oci_insecure=[self.registry.host])

    def holders(self, key: str) -> set:
        return set(self.cp.holdings.by_key.get(key, ()))

    def b_pull(self, ref: str):
        d = self.b.daemon
        return self.b.call(d.images.pull(ref, peers=d.peers.image_sources), 120)


@pytest.fixture(scope="module")
def hive(tmp_path_factory):
    need_registry()
    find_image()
    tmp = tmp_path_factory.mktemp("peers")
    (tmp / "reg").mkdir()
    layers = [Layer().dir("opt").file(f"opt/payload{i}", os.urandom(LAYER_MB << 20)).bytes() for i in (1, 2)]
    image = make_image(layers)
    with running_registry(tmp / "reg") as registry:
        ref = f"{registry.host}/test/peers:1"
        asyncio.run(push(ref, image))

        async def prepull():  # box A's cache, filled the way the box daemon fills it
            cache = ImageCache(tmp / "a" / "oci", insecure=(registry.host,))
            try:
                await cache.pull(ref)
            finally:
                cache.close()

        asyncio.run(prepull())
        env = Hive(tmp, registry)
        try:
            env.start_a()
            env.start_b()
            env.wait_for("box A's image in the hive's index",
                         lambda: "box-a" in env.holders(f"image:{image.digest}"))
            env.wait_for("box B registered", lambda: "box-b" in env.cp.links and env.b.daemon.peers.token)
            yield env, ref, image
        finally:
            env.stop()


def _no_partial_files(oci: Path) -> None:
    """No work dir left but those being deleted (del-*, removed in the background), and the
    blobs/ and images/ hold only complete, verified things (the cache's own rule)."""
    leftovers = [p.name for p in (oci / "tmp").iterdir() if not p.name.startswith("del-")]
    assert leftovers == [], f"work left in the cache's tmp: {leftovers}"
    assert not list((oci / "blobs" / "sha256").glob("partial-*"))


def test_an_image_comes_from_a_peer_verified(hive):
    env, ref, image = hive
    served0 = metric(scrape(env.a_metrics_port), "hived_peer_served_bytes_total")
    t0 = time.monotonic()
    got = env.b_pull(ref)
    took = time.monotonic() - t0
    assert got.digest == image.digest and got.path.is_file()
    # A's serving is paced by its token bucket (full at start: one second's worth goes at once)
    layer_mib = sum(len(image.blobs[d]) for d in image.layer_digests) / SERVE_BYTES_S
    assert took >= layer_mib - 1.0 - 0.25, f"{took:.2f} s for {layer_mib:.1f} s worth at the serving limit"
    assert env.b_metric("hived_peer_fetches_total", '{result="ok"}') == 1
    layer_bytes = sum(len(image.blobs[d]) for d in image.layer_digests)
    assert env.b_metric("hived_peer_fetched_bytes_total") >= layer_bytes
    assert metric(scrape(env.a_metrics_port), "hived_peer_served_bytes_total") - served0 >= layer_bytes
    _no_partial_files(env.tmp / "b" / "oci")
    # B now serves it too: its next report puts it in the index
    env.wait_for("box B in the index", lambda: "box-b" in env.holders(f"image:{image.digest}"))


def test_a_wrong_byte_fails_that_transfer_is_counted_and_the_registry_serves(hive):
    env, ref, image = hive
    b = env.b.daemon
    env.b.call(_remove(b, image.digest))
    blob = env.tmp / "a" / "oci" / "blobs" / "sha256" / image.layer_digests[0].split(":")[1]
    original = blob.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x01
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(flipped))  # bit rot on the holder's disk, or a lying holder
    try:
        bad0 = env.b_metric("hived_peer_fetches_total", '{result="bad_digest"}')
        got = env.b_pull(ref)
        assert got.digest == image.digest
        assert env.b_metric("hived_peer_fetches_total", '{result="bad_digest"}') == bad0 + 1
        _no_partial_files(env.tmp / "b" / "oci")
    finally:
        blob.write_bytes(original)


def _fetch_as(env, image, peer_tls, *, token=None, holder="box-a", addr=None):
    """Fetch a layer of the image from A as a box with this TLS material and peer token."""
    from hived.box.peers import PeerDirectory, PeerSource
    from hived.oci.registry import Descriptor

    real = env.b.daemon.peers
    dest = env.tmp / f"stranger-{secrets.token_hex(3)}.blob"

    async def try_it():
        stranger = PeerDirectory(env.b.daemon, "box-b", "", real.metrics, peer_tls)
        stranger.hive, stranger.token = real.hive, token or real.token
        source = PeerSource(stranger, {"box_id": holder, "addr": addr or f"127.0.0.1:{env.a_peer_port}"})
        digest = image.layer_digests[0]
        try:
            await source.fetch_blob(None, Descriptor("application/octet-stream", digest, len(image.blobs[digest])),
                                    dest)
        finally:
            await source.close()

    try:
        return env.b.call(try_it())
    finally:
        assert not dest.exists() or dest.stat().st_size == len(image.blobs[image.layer_digests[0]])
        dest.unlink(missing_ok=True)


def _tls_of(tls_dir: Path, box: str, *, cert: bool = True):
    from hived.box import peertls

    t = peertls.load(tls_dir / "ca.pem", tls_dir / f"box-{box}.pem", tls_dir / f"box-{box}.key", box)
    if cert:
        return t
    import ssl

    bare = ssl.create_default_context(cafile=str(tls_dir / "ca.pem"))  # verifies A, shows no certificate
    bare.check_hostname = False
    return peertls.PeerTls(t.server, bare, box, t.hive_org)


def test_a_box_without_the_hive_token_is_refused(hive):
    from hived.box.peers import PeerFailed

    env, ref, image = hive
    refused0 = metric(scrape(env.a_metrics_port), "hived_peer_refused_total")
    with pytest.raises(PeerFailed, match="no proof of its peer token"):
        _fetch_as(env, image, env.b.daemon.peers.tls, token="not-the-hive-token")
    assert metric(scrape(env.a_metrics_port), "hived_peer_refused_total") == refused0 + 1


def test_a_fetcher_without_the_hive_certificate_is_refused_with_a_clear_error(hive):
    from hived.box.peers import PeerFailed

    env, ref, image = hive
    assert env.b.daemon.status()["peers"]["tls"] is True
    refused0 = metric(scrape(env.a_metrics_port), "hived_peer_refused_total")
    # no certificate at all (but the right token): told in words, over TLS, and counted
    with pytest.raises(PeerFailed, match=r"refused us: the peer link of hive peers needs the certificate of a box "
                                         r"of 'hived hive peers'.*none was shown"):
        _fetch_as(env, image, _tls_of(env.tls_dir, "box-b", cert=False))
    assert metric(scrape(env.a_metrics_port), "hived_peer_refused_total") == refused0 + 1
    # a certificate of another hive's CA (named box-b too): the TLS handshake fails
    other = env.tmp / "other-tls"
    tls.init(other, "other", boxes=["box-b"])
    with pytest.raises(PeerFailed, match=r"TLS refused"):
        _fetch_as(env, image, _tls_of(other, "box-b"))
    # the holder is checked too: A's certificate is not box-x's, whatever the index said
    with pytest.raises(PeerFailed, match=r"the certificate of \('box-a', 'hived hive peers'\), not of box 'box-x'"):
        _fetch_as(env, image, env.b.daemon.peers.tls, holder="box-x")
    # and the right material still works on the same holder
    _fetch_as(env, image, env.b.daemon.peers.tls)


def test_nothing_crosses_the_peer_link_in_clear_text(hive):
    env, ref, image = hive
    # a plain TCP hello gets no hello back: A speaks TLS only
    hello = bytes.fromhex("0000001e") + b"\x01" + b"\x00" * 29  # any frame; a plain peer would answer hello
    with socket.create_connection(("127.0.0.1", env.a_peer_port), timeout=5) as s:
        s.sendall(hello)
        s.settimeout(5)
        try:
            answer = s.recv(4096)
        except (ConnectionResetError, TimeoutError):
            answer = b""
    assert not answer or answer[0] == 0x15, f"A answered clear text to a plain connection: {answer[:16]!r}"
    # a real transfer through a relay that records every byte: none of the layer's is in it
    relay = Relay(("127.0.0.1", env.a_peer_port))
    try:
        _fetch_as(env, image, env.b.daemon.peers.tls, addr=f"127.0.0.1:{relay.port}")
    finally:
        relay.close()
    layer = image.blobs[image.layer_digests[0]]
    wire = bytes(relay.from_holder)
    assert len(wire) >= len(layer), "the transfer did not go through the relay"
    for at in range(0, len(layer) - 64, len(layer) // 16):
        assert layer[at:at + 64] not in wire, f"layer bytes at {at} crossed the peer link in clear text"


class Relay:
    """A TCP relay (one connection) that keeps what the holder sent."""

    def __init__(self, target) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target = target
        self.from_holder = bytearray()
        self.threads = [threading.Thread(target=self._run, daemon=True)]
        self.threads[0].start()

    def _run(self) -> None:
        client, _ = self.listener.accept()
        upstream = socket.create_connection(self.target)
        t = threading.Thread(target=self._pump, args=(client, upstream, None), daemon=True)
        t.start()
        self._pump(upstream, client, self.from_holder)
        t.join(10)
        client.close()
        upstream.close()

    @staticmethod
    def _pump(src, dst, keep) -> None:
        try:
            while data := src.recv(1 << 16):
                if keep is not None:
                    keep.extend(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()
        self.threads[0].join(30)


def test_a_peer_killed_mid_transfer_the_registry_finishes_and_nothing_half_written_is_used(hive):
    env, ref, image = hive
    b = env.b.daemon
    env.b.call(_remove(b, image.digest))
    # only A may serve it now (B dropped it): the index must not offer B to itself anyway
    failed0 = env.b_metric("hived_peer_fetches_total", '{result="failed"}')
    served0 = metric(scrape(env.a_metrics_port), "hived_peer_served_bytes_total")
    fut = asyncio.run_coroutine_threadsafe(b.images.pull(ref, peers=b.peers.image_sources), env.b.loop)
    env.wait_for("A serving", lambda: metric(scrape(env.a_metrics_port), "hived_peer_served_bytes_total")
                 - served0 >= 4 << 20, timeout=30)
    env.kill_a()
    got = fut.result(120)
    assert got.digest == image.digest and got.path.is_file()
    assert env.b_metric("hived_peer_fetches_total", '{result="failed"}') == failed0 + 1
    _no_partial_files(env.tmp / "b" / "oci")
    env.wait_for("A gone from the index", lambda: "box-a" not in env.holders(f"image:{image.digest}"), timeout=30)


async def _remove(daemon, digest: str) -> None:
    daemon.images.remove(digest)
