"""Box peers, the pure parts: the peer link's own schema and sessions, the membership proof,
the control plane's who-has index, and bounded holdings reports. The real thing (box daemons,
a registry, a peer killed mid-transfer) is tests/test_peers.py."""

import dataclasses
from pathlib import Path

import pytest

from hived.box.peers import PEER, REPORT_MAX, PeerDirectory, proof
from hived.control.holdings import HoldingsIndex
from hived.protocol import codec
from hived.protocol.errors import ProtocolError
from hived.protocol.framing import FrameDecoder
from hived.protocol.session import LinkState, Session


def _pair():
    fetcher = Session("fetcher", "box-b", {"holder"}, schema=PEER)
    holder = Session("holder", "box-a", {"fetcher"}, schema=PEER)
    for a, b in ((fetcher, holder), (holder, fetcher)):
        (body,) = FrameDecoder(4096).feed(a.hello_frame())
        b.receive(body)
    return fetcher, holder


def _body(frame: bytes) -> bytes:
    (body,) = FrameDecoder(1 << 20).feed(frame)
    return body


def test_the_peer_link_is_its_own_table_with_its_own_version():
    assert PEER.version == 2 and codec.MAIN.version >= 5
    assert "blob.chunk" in PEER.by_name and "blob.chunk" not in codec.BY_NAME
    assert "build.assign" not in PEER.by_name
    fetcher, holder = _pair()
    assert fetcher.state is holder.state is LinkState.OPEN and fetcher.version == 2
    assert "checkout.get" in PEER.by_name and "checkout.find" in codec.BY_NAME  # v2 / main v5
    msg = fetcher.receive(_body(holder.frame("blob.chunk", offset=0, data=b"x" * 10)))
    assert msg.name == "blob.chunk" and msg["data"] == b"x" * 10
    with pytest.raises(ProtocolError) as exc:  # a fetcher may not send what only holders send
        holder.receive(_body(_raw_frame(fetcher, "blob.chunk", offset=0, data=b"")))
    assert exc.value.code == "not_allowed"


def _raw_frame(session: Session, name: str, **fields) -> bytes:
    from hived.protocol.framing import pack_frame

    return pack_frame(session.schema.encode(name, session.version, **fields), 1 << 20)


def test_a_box_or_cell_cannot_open_a_peer_link():
    holder = Session("holder", "box-a", {"fetcher"}, schema=PEER)
    main_box = Session("box", "box-b", {"control"})  # the main protocol's hello: role "box"
    with pytest.raises(ProtocolError) as exc:
        holder.receive(_body(main_box.hello_frame()))
    assert exc.value.code in ("bad_message", "not_allowed")
    assert holder.state is LinkState.CLOSED


def test_chunks_are_bounded():
    fetcher, holder = _pair()
    with pytest.raises(ProtocolError):
        holder.frame("blob.chunk", offset=0, data=b"\0" * (512 * 1024 + 1))


def test_proof_binds_token_side_nonces_and_name():
    hn, fn = b"h" * 32, b"f" * 32
    p = proof("tok", "fetcher", hn, fn, "box-b")
    assert p == proof("tok", "fetcher", hn, fn, "box-b") and len(p) == 32
    assert p != proof("other", "fetcher", hn, fn, "box-b")
    assert p != proof("tok", "holder", hn, fn, "box-b")
    assert p != proof("tok", "fetcher", b"x" * 32, fn, "box-b")
    assert p != proof("tok", "fetcher", hn, fn, "box-c")


def test_index_answers_least_loaded_first_and_never_the_asker():
    idx = HoldingsIndex()
    idx.report("a", full=True, added={"image:sha256:1": ""}, removed=[], peer_addr="10.0.0.1:1")
    idx.report("b", full=True, added={"image:sha256:1": "", "image:sha256:2": ""}, removed=[],
               peer_addr="10.0.0.2:1")
    idx.report("c", full=True, added={"image:sha256:1": ""}, removed=[], peer_addr="")  # serves nothing
    load = {"a": 3, "b": 1, "c": 0}.__getitem__
    found = idx.find("image:sha256:1", asking="z", load=load)
    assert [h["box_id"] for h in found] == ["b", "a"]
    assert found[0]["addr"] == "10.0.0.2:1" and found[0]["running"] == 1
    assert [h["box_id"] for h in idx.find("image:sha256:1", asking="b", load=load)] == ["a"]
    idx.report("b", full=False, added={}, removed=["image:sha256:1"], peer_addr="")
    assert [h["box_id"] for h in idx.find("image:sha256:1", asking="z", load=load)] == ["a"]
    idx.report("a", full=True, added={"image:sha256:3": ""}, removed=[], peer_addr="10.0.0.1:1")  # replaces
    assert idx.find("image:sha256:1", asking="z", load=load) == []
    assert idx.find("image:sha256:3", asking="z", load=load)[0]["addr"] == "10.0.0.1:1"
    idx.forget("a")
    assert idx.find("image:sha256:3", asking="z", load=load) == [] and "image:sha256:3" not in idx.by_key


@dataclasses.dataclass
class _Images:
    digests: list

    def servable(self):
        return list(self.digests)


@dataclasses.dataclass
class _Config:
    oci_dir: Path

    @property
    def repos_dir(self) -> Path:  # no repository cache: images only (checkouts: test_peers_checkouts.py)
        return self.oci_dir / "no-repos"


@dataclasses.dataclass
class _Box:  # a stand-in for the daemon's image cache listing (the real one: tests/test_peers.py)
    images: _Images
    config: _Config


def test_reports_are_bounded_full_first_then_changes(tmp_path):
    digests = [f"sha256:{i:064x}" for i in range(600)]
    box = _Box(_Images(digests), _Config(tmp_path))
    d = PeerDirectory(box, "box-a", "127.0.0.1:7000", metrics=None)
    first = d.reports(full=True)
    assert len(first) == 3 and first[0]["full"] and not any(r["full"] for r in first[1:])
    assert all(len(r["added"]) <= REPORT_MAX for r in first)
    assert sum(len(r["added"]) for r in first) == 600
    for fields in first:  # each one fits the message's bounds
        codec.encode("holds.report", codec.VERSION, **fields)
    assert d.reports(full=False) == []  # nothing changed
    box.images.digests = digests[1:] + ["sha256:" + "f" * 64]
    (change,) = d.reports(full=False)
    assert change["removed"] == ["image:" + digests[0]] and list(change["added"]) == ["image:sha256:" + "f" * 64]
    assert not change["full"]
    d.peer_addr = ""  # not serving: reports nothing
    assert d.holdings() == {}


def test_peer_config_errors_name_the_key():
    from hived.box.config import ConfigError, parse

    shapes = {"s": {}}
    cfg = parse({"box": {"peer_listen": "127.0.0.1:0", "peer_serve_bytes_s": 1 << 20}, "shapes": shapes}, "t")
    assert (cfg.peer_listen, cfg.peer_serve_bytes_s, cfg.peer_fetch) == ("127.0.0.1:0", 1 << 20, True)
    with pytest.raises(ConfigError, match=r"box\.peer_listen: expected \"HOST:PORT\""):
        parse({"box": {"peer_listen": "no port"}, "shapes": shapes}, "t")
    with pytest.raises(ConfigError, match=r"box\.peer_serve_bytes_s"):
        parse({"box": {"peer_serve_bytes_s": -1}, "shapes": shapes}, "t")
    with pytest.raises(ConfigError, match=r"registry_credentials\[0\]\.username"):
        parse({"box": {}, "shapes": shapes, "registry_credentials": [{"registry": "r", "password": "p"}]}, "t")


def test_peer_tls_material_is_checked_and_errors_name_the_fix(tmp_path):
    """The peer link's TLS material (the box's control link files): the real files of
    `hived control init`; each wrong one named with its fix. (The link itself: test_peers.py.)"""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from hived.box import peertls
    from hived.control import tls

    d = tmp_path / "tls"
    tls.init(d, "h1", boxes=["box-a"])
    ok = peertls.load(d / "ca.pem", d / "box-box-a.pem", d / "box-box-a.key", "box-a")
    assert ok.box_id == "box-a" and ok.hive_org == "hived hive h1"
    with pytest.raises(peertls.PeerTlsError, match=r"no cert_file: make one with `hived control init"):
        peertls.load(d / "ca.pem", None, None, "box-a")
    with pytest.raises(peertls.PeerTlsError, match=r"is of 'box-a', this box is 'box-z'"):
        peertls.load(d / "ca.pem", d / "box-box-a.pem", d / "box-box-a.key", "box-z")
    # a box certificate made before the peer link: a client's only
    ca_key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), None)
    ca = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    old = (x509.CertificateBuilder().subject_name(tls._name("box-a", "h1")).issuer_name(ca.subject)
           .public_key(key.public_key()).serial_number(x509.random_serial_number())
           .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
           .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
           .sign(ca_key, hashes.SHA256()))
    (d / "old.pem").write_bytes(old.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(peertls.PeerTlsError, match=r"a client's only \(made before the peer link\)"):
        peertls.load(d / "ca.pem", d / "old.pem", d / "box-box-a.key", "box-a")
    # a key that is not the certificate's
    tls.init(d, "h1", boxes=["box-b"])
    with pytest.raises(peertls.PeerTlsError, match=r"unusable"):
        peertls.load(d / "ca.pem", d / "box-box-a.pem", d / "box-box-b.key", "box-a")


def test_checkout_tickets_bind_fetcher_holder_repository_commit_and_time():
    """Pure: every field is in the MAC, and expiry is checked (the real exchange: test_peers_checkouts.py)."""
    from hived import tickets

    key = b"k" * 32
    args = ("box-b", "box-a", "0" * 32, "c" * 40, 1_000)
    t = tickets.checkout_ticket(key, *args)
    assert tickets.check(key, t, *args, now=999) == ""
    assert "expired" in tickets.check(key, t, *args, now=1_001)
    for i in range(4):  # another fetcher, holder, repository or commit
        other = list(args)
        other[i] = other[i] + "x"
        assert "not the control plane's" in tickets.check(key, t, *other, now=0)
    assert "not the control plane's" in tickets.check(key, t, *args[:4], 1_001, now=0)  # a later expiry
    assert "not the control plane's" in tickets.check(b"j" * 32, t, *args, now=0)       # another holder's key
    assert "no ticket key" in tickets.check(None, t, *args, now=0)


def test_checkouts_are_reported_beside_images_and_bounded(tmp_path):
    from hived.box.peers import CHECKOUTS_MAX

    class _Repos:
        def servable_checkouts(self, limit):
            return [("k" * 32, f"{i:040x}") for i in range(limit + 10)][:limit]

    box = _Box(_Images(["sha256:" + "a" * 64]), _Config(tmp_path))
    box.repos = _Repos()
    box.config.repos_dir.mkdir()
    d = PeerDirectory(box, "box-a", "127.0.0.1:7000", metrics=None)
    held = d.holdings()
    assert "image:sha256:" + "a" * 64 in held
    assert sum(k.startswith("checkout:" + "k" * 32 + "@") for k in held) == CHECKOUTS_MAX
    for fields in d.reports(full=True):
        codec.encode("holds.report", codec.VERSION, **fields)
