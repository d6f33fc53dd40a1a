"""The key exchange service's rules (pure logic; the real thing with real tunnels, a real
connector and real cells is tests/test_secure_compute.py)."""

import hashlib
import ipaddress
import os

from hived.control.config import SecureNetwork
from hived.control.keyexchange import ConnectorLink, KeyExchange


def sha(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


NET = SecureNetwork("acme-private", "acme", (sha("conn-token"),), ipaddress.IPv4Network("100.96.0.0/29"),
                    ("10.50.0.0/24",))


class World:
    def __init__(self) -> None:
        self.to_box: list[tuple[str, str, dict]] = []
        self.to_conn: list[tuple[str, dict]] = []
        self.closed: list[str] = []
        self.held = {("box-a", "b1", 1), ("box-a", "b2", 1), ("box-b", "b3", 7)}
        self.networks = {"b1": "acme-private", "b2": "acme-private", "b3": "acme-private"}
        self.kex = KeyExchange({"acme-private": NET}, hive="t1", send_box=self.send_box,
                               holds=lambda box, b, lease: (box, b, lease) in self.held,
                               build_network=self.networks.get, peer_add_timeout_s=2.0)

    def send_box(self, box_id, name, **fields) -> bool:
        self.to_box.append((box_id, name, fields))
        return True

    def connector(self, key: bytes | None = None) -> ConnectorLink:
        link = ConnectorLink("acme-private", lambda name, **f: self.to_conn.append((name, f)),
                             self.closed.append, key or os.urandom(32), "192.0.2.1:51820", "test", 0.0)
        assert self.kex.authenticate_connector("acme-private", "conn-token", link.public_key) is None
        return link

    def last_box(self) -> dict:
        return self.to_box[-1][2]


def test_connectors_are_authenticated_by_network_and_token():
    w = World()
    assert "unknown Secure Compute network 'nope'" in w.kex.authenticate_connector("nope", "conn-token", b"k" * 32)
    assert "wrong connector token" in w.kex.authenticate_connector("acme-private", "guess", b"k" * 32)
    link = w.connector()
    reg = w.kex.connector_up(link)
    assert reg["address"] == "100.96.0.1/29" and reg["routes"] == ["10.50.0.0/24"]
    # A connector registering again must bring a new key pair.
    assert "used before" in w.kex.authenticate_connector("acme-private", "conn-token", link.public_key)


def test_open_goes_through_the_connector_and_hands_out_distinct_addresses():
    w = World()
    link = w.connector()
    w.kex.connector_up(link)
    k1, k2 = os.urandom(32), os.urandom(32)
    w.kex.open("box-a", "b1", 1, "c00000001", "acme-private", k1, now=0)
    w.kex.open("box-a", "b2", 1, "c00000002", "acme-private", k2, now=0)
    assert not w.to_box, "nothing is said to the box before the connector has the peer"
    adds = [f for name, f in w.to_conn if name == "peer.add"]
    assert [a["public_key"] for a in adds] == [k1, k2]
    assert adds[0]["address"] != adds[1]["address"]
    assert {a["address"] for a in adds} <= {f"100.96.0.{i}/32" for i in range(2, 7)}
    w.kex.peer_added(link, "b1", True, "")
    box, name, f = w.to_box[-1]
    assert (box, name, f["ok"], f["connector_key"], f["endpoint"], f["address"], f["routes"]) == \
        ("box-a", "secure.opened", True, link.public_key, "192.0.2.1:51820", adds[0]["address"], ["10.50.0.0/24"])
    w.kex.peer_added(link, "b2", False, "interface gone")
    assert w.last_box()["ok"] is False and "interface gone" in w.last_box()["message"]


def test_stale_replayed_reused_and_mismatched_requests_are_refused():
    w = World()
    link = w.connector()
    w.kex.connector_up(link)
    key = os.urandom(32)
    w.kex.open("box-a", "b1", 2, "c00000001", "acme-private", key, now=0)   # wrong lease
    assert "does not hold build b1 with lease 2" in w.last_box()["message"]
    w.kex.open("box-b", "b1", 1, "c00000001", "acme-private", key, now=0)   # another box
    assert "box box-b does not hold build b1" in w.last_box()["message"]
    w.kex.open("box-a", "b1", 1, "c00000001", "other-net", key, now=0)
    assert "asked for Secure Compute network 'acme-private', not 'other-net'" in w.last_box()["message"]
    w.kex.open("box-a", "b1", 1, "c00000001", "acme-private", key, now=0)   # good
    w.kex.open("box-a", "b1", 1, "c00000001", "acme-private", os.urandom(32), now=0)
    assert "already had a tunnel" in w.last_box()["message"]
    w.kex.open("box-a", "b2", 1, "c00000002", "acme-private", key, now=0)   # b1's key again
    assert "public key was used before" in w.last_box()["message"]
    w.kex.open("box-a", "b2", 1, "c00000002", "acme-private", link.public_key, now=0)  # the connector's
    assert "public key was used before" in w.last_box()["message"]
    assert dict(w.kex.refused) == {"stale": 2, "network": 1, "replay": 1, "key_reuse": 2}
    assert [n for n, _ in w.to_conn].count("peer.add") == 1


def test_connector_down_fails_fast_and_ends_its_tunnels():
    w = World()
    w.kex.open("box-a", "b1", 1, "c00000001", "acme-private", os.urandom(32), now=0)
    f = w.last_box()
    assert f["ok"] is False and "connector of Secure Compute network acme-private is not connected" in f["message"]
    link = w.connector()
    w.kex.connector_up(link)
    w.kex.open("box-a", "b2", 1, "c00000002", "acme-private", os.urandom(32), now=0)
    w.kex.peer_added(link, "b2", True, "")
    w.kex.open("box-b", "b3", 7, "c00000003", "acme-private", os.urandom(32), now=0)  # still adding
    w.kex.connector_down(link, "restarted")
    said = {(box, name): f for box, name, f in w.to_box[-2:]}
    assert "went away (restarted)" in said[("box-a", "secure.lost")]["reason"]
    assert said[("box-b", "secure.opened")]["ok"] is False
    assert not w.kex.tunnels


def test_peers_go_when_builds_end_or_the_connector_is_silent():
    w = World()
    link = w.connector()
    w.kex.connector_up(link)
    w.kex.open("box-a", "b1", 1, "c00000001", "acme-private", os.urandom(32), now=0)
    w.kex.peer_added(link, "b1", True, "")
    w.kex.close("box-b", "b1", 1)  # not its tunnel: nothing happens
    assert "b1" in w.kex.tunnels
    w.kex.build_over("b1")
    assert w.to_conn[-1] == ("peer.remove", {"peer_id": "b1"}) and not w.kex.tunnels
    w.kex.open("box-a", "b2", 1, "c00000002", "acme-private", os.urandom(32), now=10)
    w.kex.tick(11.9)
    assert "b2" in w.kex.tunnels
    w.kex.tick(12.0)
    assert w.to_conn[-1] == ("peer.remove", {"peer_id": "b2"})
    assert "did not add the tunnel within 2 s" in w.last_box()["message"]
    # A late answer for a tunnel that ended is taken out again.
    w.kex.peer_added(link, "b2", True, "")
    assert w.to_conn[-1] == ("peer.remove", {"peer_id": "b2"})


def test_addresses_run_out_with_a_clear_refusal():
    w = World()
    link = w.connector()
    w.kex.connector_up(link)
    w.held |= {("box-a", f"x{i}", 1) for i in range(6)}
    w.networks.update({f"x{i}": "acme-private" for i in range(6)})
    for i in range(6):  # a /29: 6 hosts, one is the connector's
        w.kex.open("box-a", f"x{i}", 1, "c00000001", "acme-private", os.urandom(32), now=0)
    assert "no free tunnel address in network acme-private (100.96.0.0/29)" in w.last_box()["message"]
    assert len(w.kex.tunnels) == 5
