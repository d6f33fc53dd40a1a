"""The connector (`hived connector --config FILE`): the customer's end of the cells' tunnels.

It runs inside the customer's network and serves one Secure Compute network:

    start: key pair (memory) -> WireGuard interface <interface>, UDP <listen_port>
    link:  connect to the control plane (TLS when ca_file is set), role "connector"
           connector.register {network, token, public key, endpoint} ->
                                      <- connector.registered {address, routes, heartbeat_s, lost_s}
           address on the interface; ip_forward=1; nftables (table hived_conn_<iface>):
             forward: into the tunnel only replies; out of it only to `routes`
             postrouting: masquerade the tunnel subnet onto the private side (masquerade = true)
           ping every heartbeat_s                              <- pong
                                      <- peer.add {peer_id, public key, address /32}
           peer.added {ok, message} ->   (the peer may use exactly that address)
                                      <- peer.remove {peer_id}
    link lost (error, silence past lost_s, closed): every peer goes, a NEW key pair goes into
           the interface, reconnect with backoff, register again. Keys are never reused.
    SIGTERM: stop; the interface, its process and the nftables table go.

Nothing secret is written anywhere: the private key lives in this process until it is
written into the interface (then wiped) and in the interface. Logs show public keys only.

`Connector(config)` is the whole thing with `start()` / `stop()`; its netlink parts
(`_apply_address`, `_apply_firewall`, `_remove_firewall`) run in a worker thread inside
the configured namespace (`netns`, for tests; default: this process's).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import os
import socket
import time

from hived.connector.config import ConnectorConfig
from hived.link import REGISTER_TIMEOUT_S, ReconnectLoop, dial
from hived.net import netns
from hived.net import nft as nft_x
from hived.net.errors import NetworkError
from hived.protocol.channel import Channel, ChannelClosed
from hived.protocol.errors import ProtocolError
from hived.secure import wireguard as wg
from hived.secure.keys import KeyPair, b64

log = logging.getLogger(__name__)



class ConnectorError(Exception):
    """The connector cannot run; the message says why and what to do."""


class RegistrationRefused(Exception):
    """The key exchange service said no (wrong token, unknown network)."""


@dataclasses.dataclass(frozen=True)
class PeerInfo:
    peer_id: str
    public_key: bytes
    address: str       # a /32

    def __repr__(self) -> str:
        return f"PeerInfo({self.peer_id}, {b64(self.public_key)}, {self.address})"


class Connector(ReconnectLoop):
    def __init__(self, config: ConnectorConfig) -> None:
        self.config = config
        self.iface: wg.Interface | None = None
        self._public_key = b""
        self.address = ""                  # the tunnel address with prefix (CIDR), once registered
        self.routes: list[str] = []
        self.hive = ""
        self.heartbeat_s = 1.0
        self.lost_s = 10.0
        self._peers: dict[str, PeerInfo] = {}
        self.channel: Channel | None = None
        self.registered = asyncio.Event()
        self.connects = 0
        self.key_generations = 0
        self.last_error = ""
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._wake = asyncio.Event()
        self._firewall_subnet: str | None = None
        self._turn = 0                     # which of config.controls is dialled

    # -- what tests and status look at ---------------------------------------------------
    @property
    def interface_name(self) -> str:
        return self.config.interface

    @property
    def public_key(self) -> bytes:
        return self._public_key

    @property
    def tunnel_address(self) -> str:
        return self.address

    @property
    def peers(self) -> dict[str, PeerInfo]:
        return dict(self._peers)

    @property
    def table(self) -> str:
        return f"hived_conn_{self.config.interface}"[:32]

    def describe(self) -> dict:
        host, port = self._control()
        return {"network": self.config.network, "control": f"{host}:{port}",
                "interface": self.interface_name, "public_key": b64(self._public_key) if self._public_key else "",
                "address": self.address, "routes": self.routes, "connected": self.registered.is_set(),
                "connects": self.connects, "peers": {p.peer_id: p.address for p in self._peers.values()},
                "last_error": self.last_error}

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Bring up the interface with a fresh key pair, then keep the link to the control plane."""
        cfg = self.config
        # wireguard-go names are global on a machine: a live connector's interface is never taken
        for pid, _ in wg.wireguard_go_processes(cfg.interface, exact=True).items():
            owner = wg.parent_pid(pid)
            if owner not in (0, 1, os.getpid()):
                raise ConnectorError(f"interface {cfg.interface} is served by wireguard-go (pid {pid}) of a running "
                                     f"process (pid {owner}): another connector on this machine? Give this one "
                                     "another [connector].interface")
        cleaned = await wg.run_blocking(lambda: wg.clean_leftovers(cfg.interface, netns=[cfg.netns], exact=True))
        for what in cleaned:
            log.warning("connector: removed a leftover of a previous run: %s", what)
        try:
            self.iface = await wg.open_interface(cfg.interface, birth_netns=cfg.netns, driver=cfg.driver)
        except wg.WireGuardError as exc:
            raise ConnectorError(f"connector interface {cfg.interface}: {exc}") from None
        try:
            await self.new_keys(listen_port=cfg.listen_port)
        except BaseException:
            await self.iface.close()
            self.iface = None
            raise
        log.info("connector for network %s: interface %s, UDP port %d, public key %s", cfg.network, cfg.interface,
                 cfg.listen_port, b64(self._public_key))
        self._task = asyncio.get_running_loop().create_task(self._run(), name="connector-link")

    async def stop(self) -> None:
        """Close the link, remove the interface (its process, socket) and the firewall table."""
        self._stopping = True
        self._wake.set()
        if self.channel is not None:
            self.channel.close("connector stopping")
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        try:
            await wg.run_blocking(self._remove_firewall)
        except Exception as exc:  # noqa: BLE001 - still remove the interface
            log.error("connector: removing nftables table %s: %s", self.table, exc)
        if self.iface is not None:
            await self.iface.close()
            self.iface = None
        self._peers.clear()
        self.registered.clear()

    async def new_keys(self, listen_port: int | None = None) -> None:
        """A new key pair into the interface; every peer goes (they knew the old key)."""
        keys = KeyPair.generate()
        try:
            await self.iface.configure(private_key=keys, listen_port=listen_port, peers=[])
            self._public_key = keys.public
            self.key_generations += 1
        except wg.WireGuardError as exc:
            raise ConnectorError(f"connector interface {self.config.interface}: {exc}") from None
        finally:
            keys.wipe()
        self._peers.clear()

    # -- the link ---------------------------------------------------------------------------
    link_kind = "connector link"
    refused_errors = (RegistrationRefused,)
    retry_errors = (*ReconnectLoop.retry_errors, ConnectorError)

    def peer_name(self) -> str:
        host, port = self._control()
        return f"control plane {host}:{port} (connector of network {self.config.network})"

    def _rotate(self) -> bool:
        """Dial the next replica; True while some of the list were not tried since the last link."""
        self._turn += 1
        return self._turn % len(self.config.controls) != 0

    def _control(self) -> tuple[str, int]:
        controls = self.config.controls
        return controls[self._turn % len(controls)]

    async def _connect(self) -> Channel:
        cfg = self.config
        host, port = self._control()
        return await dial("connector", cfg.network, host, port, cfg.ssl_context(), cfg.server_name)

    async def _register(self, channel: Channel) -> None:
        cfg = self.config
        await channel.handshake()
        await channel.send("connector.register", network=cfg.network, token=cfg.token, public_key=self._public_key,
                           endpoint=cfg.endpoint, agent=_version())
        msg = await asyncio.wait_for(channel.recv(), REGISTER_TIMEOUT_S)
        if msg.name == "error":
            raise RegistrationRefused(f"{msg['code']}: {msg['message']}")
        if msg.name != "connector.registered":
            raise ProtocolError("bad_message", f"expected connector.registered, got {msg.name}")
        f = msg.fields
        try:
            ipaddress.IPv4Interface(f["address"])
            routes = [str(ipaddress.IPv4Network(r)) for r in f["routes"]]
        except ValueError as exc:
            raise ProtocolError("bad_message", f"connector.registered: {exc}") from None
        self.hive, self.heartbeat_s, self.lost_s = f["hive"], f["heartbeat_s"], f["lost_s"]
        self.address, self.routes = f["address"], routes
        await wg.run_blocking(self._apply_address, self.address)
        await wg.run_blocking(self._apply_firewall, self.address, routes)
        self.channel = channel
        self.connects += 1
        self.registered.set()
        log.info("connector of network %s registered with hive %s at %s: tunnel address %s, routes %s",
                 cfg.network, self.hive, self.peer_name(), self.address, ", ".join(routes))

    async def _disconnected(self, channel: Channel) -> None:
        channel.close("link ended")
        was = self.registered.is_set()
        self.channel = None
        self.registered.clear()
        if self._stopping or self.iface is None:
            return
        if was or self._peers:
            # The key exchange service dropped every tunnel of this connector: so do we, and
            # the next registration brings a key pair never seen before.
            log.warning("connector of network %s: link to the control plane lost; removing %d peer(s), new keys",
                        self.config.network, len(self._peers))
        await self.new_keys()

    async def _heartbeat(self, channel: Channel) -> None:
        seq = 0
        with contextlib.suppress(ChannelClosed):
            while True:
                seq += 1
                await channel.send("ping", seq=seq)
                await asyncio.sleep(self.heartbeat_s)

    async def _on_message(self, channel: Channel, msg) -> None:
        f = msg.fields
        if msg.name == "peer.add":
            ok, message = await self.add_peer(f["peer_id"], f["public_key"], f["address"])
            await channel.send("peer.added", peer_id=f["peer_id"], ok=ok, message=message[:4096])
        elif msg.name == "peer.remove":
            await self.remove_peer(f["peer_id"])
        elif msg.name == "ping":
            await channel.send("pong", seq=f["seq"])
        elif msg.name == "error":
            log.warning("control plane says %s: %s", f["code"], f["message"])
            if f.get("fatal"):
                raise ChannelClosed(f"control plane: {f['code']}: {f['message']}")
        elif msg.name != "pong":
            log.info("connector: ignoring %s from the control plane", msg.name)

    # -- peers --------------------------------------------------------------------------------
    async def add_peer(self, peer_id: str, public_key: bytes, address: str) -> tuple[bool, str]:
        """Accept a cell: its key may send from exactly `address` (a /32 in the tunnel subnet)."""
        try:
            addr = ipaddress.IPv4Network(address)
        except ValueError:
            return False, f"peer address {address!r} is not an IPv4 address"
        if addr.prefixlen != 32:
            return False, f"peer address {address} is not a /32"
        if self.address and addr.network_address not in ipaddress.IPv4Interface(self.address).network:
            return False, f"peer address {address} is outside this connector's tunnel subnet {self.address}"
        if self.address and addr.network_address == ipaddress.IPv4Interface(self.address).ip:
            return False, f"peer address {address} is the connector's own"
        if len(public_key) != 32 or public_key == self._public_key:
            return False, "bad public key"
        for other in self._peers.values():
            if other.peer_id != peer_id and (other.public_key == public_key or other.address == str(addr)):
                return False, f"key or address already used by tunnel {other.peer_id}"
        old = self._peers.get(peer_id)
        try:
            if old is not None and old.public_key != public_key:
                await self.iface.remove_peer(old.public_key)
                self._peers.pop(peer_id, None)
            await self.iface.add_peer(wg.Peer(public_key=public_key, allowed_ips=[str(addr)]))
        except wg.WireGuardError as exc:
            log.error("connector: peer %s (%s): %s", peer_id, b64(public_key), exc)
            return False, str(exc)
        self._peers[peer_id] = PeerInfo(peer_id, public_key, str(addr))
        log.info("connector: peer %s added (%s, %s)", peer_id, b64(public_key), addr)
        return True, ""

    async def remove_peer(self, peer_id: str) -> bool:
        info = self._peers.pop(peer_id, None)
        if info is None:
            return False
        try:
            await self.iface.remove_peer(info.public_key)
        except wg.WireGuardError as exc:
            log.error("connector: removing peer %s: %s", peer_id, exc)
        log.info("connector: peer %s removed", peer_id)
        return True

    # -- netlink (worker thread, inside config.netns) ----------------------------------------
    def _apply_address(self, address: str) -> None:
        """`address` (CIDR) becomes the interface's only address; its subnet routes into the tunnel."""
        ip = ipaddress.IPv4Interface(address)
        ipr = wg._iproute(self.config.netns)
        try:
            idx = ipr.link_lookup(ifname=self.config.interface)
            if not idx:
                raise ConnectorError(f"interface {self.config.interface} is gone")
            for a in ipr.get_addr(index=idx[0], family=socket.AF_INET):
                if (a.get_attr("IFA_ADDRESS"), a["prefixlen"]) != (str(ip.ip), ip.network.prefixlen):
                    ipr.addr("del", index=idx[0], address=a.get_attr("IFA_ADDRESS"), prefixlen=a["prefixlen"])
            with contextlib.suppress(Exception):   # already there: fine
                ipr.addr("add", index=idx[0], address=str(ip.ip), prefixlen=ip.network.prefixlen)
            ipr.link("set", index=idx[0], state="up")
        except ConnectorError:
            raise
        except Exception as exc:  # noqa: BLE001 - netlink error, said with its cause
            raise ConnectorError(f"address {address} on {self.config.interface}: {wg._netlink_why(exc)}") from None
        finally:
            ipr.close()

    def _apply_firewall(self, address: str, routes: list[str]) -> None:
        """ip_forward=1 and the table: into the tunnel only replies; out of it only to `routes`;
        masquerade the tunnel subnet onto anything but the tunnel (if configured)."""
        subnet = str(ipaddress.IPv4Interface(address).network)
        iface, t = self.config.interface, self.table
        with wg.in_netns(self.config.netns):
            try:
                netns.write_sysctls({"net.ipv4.ip_forward": 1})
            except NetworkError as exc:
                raise ConnectorError(f"{exc} (the connector forwards the cells' traffic)") from None
            nft = _nftables()
        try:
            self._remove_firewall_with(nft)
            try:
                nft.table("add", name=t)
                nft.chain("add", table=t, name="forward", hook="forward", type="filter", priority=0)
            except Exception as exc:  # noqa: BLE001 - any failure here is the same missing feature
                raise ConnectorError(f"nftables table {t}: {wg._netlink_why(exc)}: the kernel needs "
                                     "CONFIG_NF_TABLES (IPv4 filter and NAT)") from None
            rules = [
                # into the tunnel: only replies (the private network cannot open connections to cells)
                nft_x.match_ifname(nft_x.NFT_META_OIFNAME, iface)
                + nft_x.match_ct_state(nft_x.CT_ESTABLISHED | nft_x.CT_RELATED) + nft_x.verdict(nft_x.NF_ACCEPT),
                nft_x.match_ifname(nft_x.NFT_META_OIFNAME, iface) + nft_x.verdict(nft_x.NF_DROP),
            ]
            # out of the tunnel: only to the network's routes
            for r in routes:
                rules.append(nft_x.match_ifname(nft_x.NFT_META_IIFNAME, iface) + nft_x.match_ip_in(r, dst=True)
                             + nft_x.verdict(nft_x.NF_ACCEPT))
            rules.append(nft_x.match_ifname(nft_x.NFT_META_IIFNAME, iface) + nft_x.verdict(nft_x.NF_DROP))
            for expr in rules:
                nft.rule("add", table=t, chain="forward", expressions=[expr])
            if self.config.masquerade:
                nft.chain("add", table=t, name="postrouting", hook="postrouting", type="nat", priority=100)
                nft.rule("add", table=t, chain="postrouting", expressions=[
                    nft_x.match_ip_in(subnet, dst=False)
                    + nft_x.match_ifname(nft_x.NFT_META_OIFNAME, iface, nft_x.NFT_CMP_NEQ) + nft_x.masquerade()])
            self._firewall_subnet = subnet
        except ConnectorError:
            raise
        except Exception as exc:  # noqa: BLE001 - netlink error, said with its cause
            raise ConnectorError(f"nftables rules in table {t}: {wg._netlink_why(exc)}") from None
        finally:
            nft.close()

    def _remove_firewall(self) -> None:
        if self.config.netns is not None and not netns.netns_exists(self.config.netns):
            return
        with wg.in_netns(self.config.netns):
            nft = _nftables()
        try:
            self._remove_firewall_with(nft)
        finally:
            nft.close()
        self._firewall_subnet = None

    def _remove_firewall_with(self, nft) -> None:
        try:
            tables = [m.get_attr("NFTA_TABLE_NAME") for m in nft.get_tables()]
        except Exception:  # noqa: BLE001 - no nftables: no table
            return
        if self.table in tables:
            nft.table("del", name=self.table)


def _nftables():
    from pyroute2.nftables.main import NFTables

    return NFTables(nfgen_family=socket.AF_INET)


def _version() -> str:
    try:
        from hived import __version__

        return str(__version__)[:64]
    except ImportError:
        return "hived"


async def serve(config: ConnectorConfig) -> int:
    """Run until SIGTERM/SIGINT; 0 after a clean stop."""
    import signal

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    connector = Connector(config)
    await connector.start()
    try:
        await stop.wait()
    finally:
        t0 = time.monotonic()
        await connector.stop()
        log.info("connector stopped in %.0f ms", (time.monotonic() - t0) * 1000)
    return 0


def main(config_path: str, verbose: bool = False) -> int:
    """`hived connector --config FILE`; raises ConnectorError / ConnectorConfigError for the CLI."""
    config = ConnectorConfig.load(config_path)
    try:
        import uvloop

        return uvloop.run(serve(config))
    except ImportError:
        return asyncio.run(serve(config))
