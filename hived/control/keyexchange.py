"""The key exchange service of Secure Compute (runs inside the control plane).

    connector ── connector.register {network, token, public key, endpoint} ──▶ ┐
              ◀─ connector.registered {tunnel address, routes} ─────────────── │ key exchange
    box ── secure.open {build, lease, cell, network, cell public key} ───────▶ │ (this module)
          kex ── peer.add {build, cell public key, cell address} ──▶ connector │
          kex ◀─ peer.added {ok} ─────────────────────────────────── connector │
    box ◀─ secure.opened {connector key, endpoint, cell address, routes} ──── ┘

Only public keys pass through here: each side makes its own key pair in memory for one
tunnel (a connector makes a new one at every registration), so nothing secret is ever
stored or sent. The service refuses:
  * a connector with an unknown network or a wrong token (the link is closed, logged);
  * `secure.open` for a build the box does not hold with that lease (stale), for a build
    that is not a Secure Compute build of that network, for a build that already had a
    tunnel (replayed), or with a public key seen before (keys are never reused);
  * any `secure.open` while the network's connector is not connected: the build fails at
    once with that reason instead of waiting on a tunnel that cannot come up.
It removes peers whose cell, box or connector is gone: `secure.close` from the box, the
build's end (exit, cancel, a lost box: the control plane calls `build_over`), and a
connector that disconnects or is replaced takes all its tunnels with it; the boxes
holding them get `secure.lost` and fail those builds with the reason.

State is memory only: after a control plane restart connectors register again (with new
keys), which ends every tunnel of the previous run. Boxes see a new `epoch` in
box.registered and fail the Secure Compute builds they were running, with that reason.

The class is plain logic with `send` callbacks, driven by hived/control/server.py.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Callable

from hived.control.config import SecureNetwork

log = logging.getLogger(__name__)

PEER_ADD_TIMEOUT_S = 5.0      # a connector that does not answer peer.add in time fails the open
SEEN_KEYS_MAX = 1_000_000     # public keys remembered to refuse reuse (32 B digests: ~100 MB worst case)

Send = Callable[..., None]    # send(message name, **fields)


@dataclasses.dataclass
class ConnectorLink:
    network: str
    send: Send
    close: Callable[[str], None]
    public_key: bytes
    endpoint: str
    peer: str                  # where it connected from, for logs
    since: float


@dataclasses.dataclass
class Tunnel:
    build_id: str
    lease: int
    box_id: str
    cell_id: str
    network: str
    address: ipaddress.IPv4Address
    connector: ConnectorLink
    state: str = "adding"      # adding -> open
    deadline: float = 0.0


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


class KeyExchange:
    def __init__(self, networks: dict[str, SecureNetwork], *, hive: str, send_box: Callable[..., bool],
                 holds: Callable[[str, str, int], bool], build_network: Callable[[str], str | None],
                 peer_add_timeout_s: float = PEER_ADD_TIMEOUT_S) -> None:
        """send_box(box_id, name, **fields) -> False when the box has no link.
        holds(box_id, build_id, lease): does that box hold that build with that lease?
        build_network(build_id): the Secure Compute network the build asked for (None: none)."""
        self.networks = networks
        self.hive = hive
        self.send_box = send_box
        self.holds = holds
        self.build_network = build_network
        self.peer_add_timeout_s = peer_add_timeout_s
        self.connectors: dict[str, ConnectorLink] = {}
        self.tunnels: dict[str, Tunnel] = {}
        self._seen_keys: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._seen_builds: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.refused = collections.Counter()   # reason -> count, for metrics and tests

    # -- connectors ------------------------------------------------------------------------------
    def authenticate_connector(self, network: str, token: str, public_key: bytes) -> str | None:
        """None if this connector may register, else why not."""
        net = self.networks.get(network)
        if net is None:
            return (f"unknown Secure Compute network {network!r} in hive {self.hive} "
                    f"(known: {', '.join(sorted(self.networks)) or 'none'}); add [networks.{network}] "
                    "to the hive's config")
        digest = hashlib.sha256(token.encode()).hexdigest()
        if not any(hmac.compare_digest(digest, h) for h in net.connector_tokens_sha256):
            return f"wrong connector token for network {network!r}"
        if self._seen(public_key):
            return "this public key was used before: a connector makes a new key pair at every registration"
        return None

    def connector_up(self, link: ConnectorLink) -> dict:
        """Register an authenticated connector; returns the fields of connector.registered.
        A connector already registered for the network is replaced (and its tunnels end)."""
        old = self.connectors.get(link.network)
        if old is not None:
            self.connector_down(old, "replaced by a new connection of the network's connector")
            old.close("replaced by a new connection")
        self._remember_key(link.public_key)
        self.connectors[link.network] = link
        net = self.networks[link.network]
        first = next(net.tunnel_subnet.hosts())
        log.info("connector of network %s registered from %s (endpoint %s)", link.network, link.peer,
                 link.endpoint)
        return {"network": link.network, "hive": self.hive, "address": f"{first}/{net.tunnel_subnet.prefixlen}",
                "routes": list(net.routes)}

    def connector_down(self, link: ConnectorLink, reason: str) -> None:
        """The connector's link ended: its tunnels are gone; tell the boxes that hold them."""
        if self.connectors.get(link.network) is not link:
            return
        del self.connectors[link.network]
        log.warning("connector of network %s gone: %s", link.network, reason)
        for t in [t for t in self.tunnels.values() if t.connector is link]:
            del self.tunnels[t.build_id]
            why = f"the connector of Secure Compute network {t.network} went away ({reason})"
            if t.state == "adding":
                self._answer(t, ok=False, message=why)
            else:
                self.send_box(t.box_id, "secure.lost", build_id=t.build_id, lease=t.lease, reason=why)

    def peer_added(self, link: ConnectorLink, peer_id: str, ok: bool, message: str) -> None:
        t = self.tunnels.get(peer_id)
        if t is None or t.connector is not link or t.state != "adding":
            log.info("connector %s: peer.added for %s, which is not waiting: ignored", link.network, peer_id)
            if t is None and ok:  # a peer for a tunnel that ended meanwhile: take it out again
                link.send("peer.remove", peer_id=peer_id)
            return
        if not ok:
            del self.tunnels[peer_id]
            self._answer(t, ok=False, message=f"the connector of network {t.network} refused the tunnel: "
                                              f"{message}")
            return
        t.state = "open"
        net = self.networks[t.network]
        self._answer(t, ok=True, message="", connector_key=link.public_key, endpoint=link.endpoint,
                     address=f"{t.address}/32", routes=list(net.routes))

    # -- boxes ---------------------------------------------------------------------------------------
    def open(self, box_id: str, build_id: str, lease: int, cell_id: str, network: str, public_key: bytes,
             now: float) -> None:
        """A box's secure.open. Answered (secure.opened) now when refused, else once the
        connector has added the peer."""
        def refuse(kind: str, why: str) -> None:
            self.refused[kind] += 1
            log.warning("box %s: secure.open for build %s refused (%s): %s", box_id, build_id, kind, why)
            self.send_box(box_id, "secure.opened", build_id=build_id, lease=lease, ok=False, message=why,
                          connector_key=b"", endpoint="", address="", routes=[])

        if not self.holds(box_id, build_id, lease):
            return refuse("stale", f"box {box_id} does not hold build {build_id} with lease {lease}")
        wanted = self.build_network(build_id)
        if wanted != network:
            return refuse("network", f"build {build_id} asked for Secure Compute network {wanted!r}, "
                                     f"not {network!r}")
        if build_id in self._seen_builds:
            return refuse("replay", f"build {build_id} already had a tunnel: a replayed or repeated request")
        if self._seen(public_key):
            return refuse("key_reuse", "this public key was used before: every tunnel needs a new key pair")
        link = self.connectors.get(network)
        if link is None:
            return refuse("connector_down", f"the connector of Secure Compute network {network} is not "
                                            "connected to the key exchange service")
        address = self._allocate(network)
        if address is None:
            return refuse("full", f"no free tunnel address in network {network} "
                                  f"({self.networks[network].tunnel_subnet})")
        self._remember_key(public_key)
        self._seen_builds[build_id] = None
        while len(self._seen_builds) > SEEN_KEYS_MAX:
            self._seen_builds.popitem(last=False)
        t = Tunnel(build_id, lease, box_id, cell_id, network, address, link,
                   deadline=now + self.peer_add_timeout_s)
        self.tunnels[build_id] = t
        link.send("peer.add", peer_id=build_id, public_key=public_key, address=f"{address}/32")

    def close(self, box_id: str, build_id: str, lease: int) -> None:
        t = self.tunnels.get(build_id)
        if t is not None and t.box_id == box_id and t.lease == lease:
            self._remove(t)

    def build_over(self, build_id: str) -> None:
        """The build ended (finished, cancelled, failed with its box): its peer goes."""
        t = self.tunnels.get(build_id)
        if t is not None:
            self._remove(t)

    def tick(self, now: float) -> None:
        """Fail opens whose connector did not answer in time."""
        for t in [t for t in self.tunnels.values() if t.state == "adding" and now >= t.deadline]:
            del self.tunnels[t.build_id]
            t.connector.send("peer.remove", peer_id=t.build_id)
            self._answer(t, ok=False, message=f"the connector of network {t.network} did not add the tunnel "
                                              f"within {self.peer_add_timeout_s:g} s")

    def describe(self) -> dict:
        return {"connectors": {n: {"endpoint": c.endpoint, "from": c.peer, "since": c.since}
                               for n, c in self.connectors.items()},
                "tunnels": {t.build_id: {"box": t.box_id, "cell": t.cell_id, "network": t.network,
                                         "address": str(t.address), "state": t.state}
                            for t in self.tunnels.values()},
                "refused": dict(self.refused)}

    # -- internals ------------------------------------------------------------------------------------
    def _answer(self, t: Tunnel, *, ok: bool, message: str, connector_key: bytes = b"", endpoint: str = "",
                address: str = "", routes: list | None = None) -> None:
        if not ok:
            log.warning("build %s: no tunnel: %s", t.build_id, message)
        self.send_box(t.box_id, "secure.opened", build_id=t.build_id, lease=t.lease, ok=ok, message=message,
                      connector_key=connector_key, endpoint=endpoint, address=address, routes=routes or [])

    def _remove(self, t: Tunnel) -> None:
        del self.tunnels[t.build_id]
        if self.connectors.get(t.network) is t.connector:
            t.connector.send("peer.remove", peer_id=t.build_id)

    def _allocate(self, network: str) -> ipaddress.IPv4Address | None:
        net = self.networks[network]
        used = {t.address for t in self.tunnels.values() if t.network == network}
        hosts = net.tunnel_subnet.hosts()
        next(hosts)  # the connector's
        for addr in hosts:
            if addr not in used:
                return addr
        return None

    def _seen(self, key: bytes) -> bool:
        return _digest(key) in self._seen_keys

    def _remember_key(self, key: bytes) -> None:
        self._seen_keys[_digest(key)] = None
        while len(self._seen_keys) > SEEN_KEYS_MAX:
            self._seen_keys.popitem(last=False)
