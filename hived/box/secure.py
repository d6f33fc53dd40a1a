"""Secure Compute on the box: one WireGuard tunnel per build, from the cell's namespace to
the customer's connector, made at assignment and gone with the cell.

    build.assign {options.secure_compute = NETWORK}
      1. a key pair, in this process's memory only            } at the same time
      2. a WireGuard interface `w<box tag><cell>`: its UDP    }
         socket in the box's namespace, the interface moved   }
         into the cell's namespace; on boxes with [box]       }
         secure_prestart made while the cell was warm         }
         (hived/box/prestart.py)                              }
      3. secure.open {cell public key} -> key exchange -> the connector adds the peer
         <- secure.opened {connector key, endpoint, cell address, routes}
      4. private key + peer into the interface over its UAPI socket     } at the same time
         (memory to memory)                                             }
      5. the address and routes lead into the tunnel                    }
         (CellNetwork.secure_route)                                     }
         meanwhile, during 2-3, nothing passes the cell's veth to the router any more and
         the guest's packets leaving by the tunnel get the cell's tunnel address
         (CellNetwork.secure_cut: nftables rules, ~1 ms)
      6. wait for the WireGuard handshake: the tunnel has carried its first bytes
      then `run` goes to the cell, while the veth itself is deleted (secure_unlink: a link
      deletion waits for RCU grace periods, 12-27 ms here, and the rules cut it already).

The private key never touches disk, never enters the guest and is not logged; it lives
in this process (dropped after step 4) and in the WireGuard process, which dies with the
cell. Anything failing on the way undoes what was made, and the build fails with
reason `secure_compute` and the cause (connector down, refused, no handshake).
"""

from __future__ import annotations

import asyncio
import logging
import time

log = logging.getLogger(__name__)

KEX_TIMEOUT_S = 5.0         # the key exchange service (and the connector behind it) must answer by then
HANDSHAKE_TIMEOUT_S = 5.0   # WireGuard retries an unanswered handshake after 5 s: one try is enough
KEEPALIVE_S = 25            # also makes the interface send at once, which starts the handshake


class SecureComputeFailed(Exception):
    """The tunnel could not be made; the message says why (for the build's failure)."""


class CellTunnel:
    """The tunnel of one build's cell."""

    def __init__(self, cell_id: str, network: str) -> None:
        self.cell_id = cell_id
        self.network = network
        self.iface = None
        self.address = ""
        self.public_key = b""
        self.timings: dict[str, float] = {}
        self.prestarted = False   # the interface was started while the cell was warm
        self.netlink_ms: dict[str, float] = {}  # the network worker's own time in the cut and the route
        self._kex = None
        self._unlinking: asyncio.Future | None = None  # the veth's deletion, after the handshake
        self._closed = False

    @classmethod
    async def open(cls, box, cell_id: str, network: str, kex, prestarted=None) -> CellTunnel:
        """Make the tunnel (steps 1-6 above). `kex` is the build's link to the key exchange
        service (controllink.Relay): open_tunnel(), close_tunnel(), tunnel_lost().
        `prestarted`: the cell's interface started while it was warm (hived/box/prestart.py),
        now the tunnel's: step 2 is done already (if its process still runs; else it is
        removed and step 2 made here). Other cells' network set-ups and teardowns wait
        meanwhile (CellNetwork.provisioning)."""
        net = box.network
        if net is None:
            raise SecureComputeFailed("Secure Compute needs cell networking ([box] network = true)")
        with net.provisioning():
            return await cls._open(net, cell_id, network, kex, prestarted)

    @classmethod
    async def _open(cls, net, cell_id: str, network: str, kex, prestarted) -> CellTunnel:
        from hived.secure import wireguard
        from hived.secure.keys import KeyPair

        self = cls(cell_id, network)
        t0 = time.perf_counter()
        keys = KeyPair.generate()
        self.public_key = keys.public
        name = wireguard.tunnel_name(net.tag, cell_id)
        if prestarted is not None and not prestarted.usable():
            log.warning("cell %s: pre-started WireGuard interface %s no longer works: starting another",
                        cell_id, prestarted.name)
            await prestarted.close()
            prestarted = None
        self.prestarted = prestarted is not None
        if prestarted is not None:
            opening = asyncio.get_running_loop().create_future()
            opening.set_result(prestarted)
        else:
            opening = asyncio.ensure_future(wireguard.open_interface(
                name, birth_netns=net.host_netns, target_netns=net.netns_name(cell_id)))
        asking = asyncio.ensure_future(kex.open_tunnel(cell_id, network, keys.public, KEX_TIMEOUT_S))
        cutting = asyncio.ensure_future(net.secure_cut(cell_id, name))
        self._kex = kex
        try:
            try:
                await asyncio.wait({opening, asking, cutting}, return_when=asyncio.FIRST_EXCEPTION)
                if asking.done() and asking.exception() is not None:
                    raise SecureComputeFailed(f"key exchange: {asking.exception()}")
                if opening.done() and opening.exception() is not None:
                    raise SecureComputeFailed(f"tunnel interface {name}: {opening.exception()}")
                if cutting.done() and cutting.exception() is not None:
                    raise SecureComputeFailed(str(cutting.exception()))
            finally:
                for fut in (opening, asking, cutting):
                    if not fut.done():
                        fut.cancel()
                    await asyncio.gather(fut, return_exceptions=True)
                if opening.done() and not opening.cancelled() and opening.exception() is None:
                    self.iface = opening.result()
            answer = asking.result()
            self.netlink_ms["cut"] = cutting.result()
            self.timings["interface_kex_cut_ms"] = (time.perf_counter() - t0) * 1000
            self.address = answer["address"]
            connector_key = answer["connector_key"]
            # Steps 4 and 5 at the same time: the key goes over the UAPI socket (this loop), the
            # address and routes over netlink (the network's worker thread); neither needs the other.
            configuring = asyncio.ensure_future(self.iface.configure(private_key=keys.private, peers=[wireguard.Peer(
                public_key=connector_key, endpoint=answer["endpoint"], allowed_ips=["0.0.0.0/0"],
                keepalive_s=KEEPALIVE_S)]))
            configuring.add_done_callback(
                lambda _: self.timings.setdefault("configure_ms", (time.perf_counter() - t0) * 1000))
            routing = asyncio.ensure_future(net.secure_route(cell_id, self.iface.name, self.address,
                                                             answer["routes"]))
            try:
                await asyncio.gather(configuring, routing)
            finally:
                for fut in (configuring, routing):
                    if not fut.done():
                        fut.cancel()
                await asyncio.gather(configuring, routing, return_exceptions=True)
                keys.wipe()
            self.timings["route_ms"] = (time.perf_counter() - t0) * 1000
            self.netlink_ms["route"] = routing.result()
            try:
                await self.iface.wait_handshake(connector_key, HANDSHAKE_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - any failure here is "no tunnel", said with its cause
                raise SecureComputeFailed(f"no WireGuard handshake with the connector of network {network} at "
                                          f"{answer['endpoint']} within {HANDSHAKE_TIMEOUT_S:g} s ({exc}): is it "
                                          "reachable from this box over UDP?") from None
            self.timings["provision_ms"] = (time.perf_counter() - t0) * 1000
            # The veth is cut already (drop rules); deleting it waits for RCU grace periods, so it
            # goes while the build starts. close() waits for it, and so would the network's teardown.
            self._unlinking = asyncio.ensure_future(net.secure_unlink(cell_id))
            self._unlinking.add_done_callback(self._unlinked)
            return self
        except BaseException as exc:
            keys.wipe()
            await self.close()
            if isinstance(exc, SecureComputeFailed) or not isinstance(exc, Exception):
                raise
            raise SecureComputeFailed(f"tunnel for network {network}: {exc}") from None

    def _unlinked(self, fut: asyncio.Future) -> None:
        if fut.cancelled():
            return
        if fut.exception() is not None:  # the drop rules still cut it; the teardown removes it
            log.error("cell %s: removing its veth to the router: %s", self.cell_id, fut.exception())
        else:
            self.netlink_ms["unlink"] = fut.result()

    async def close(self) -> None:
        """Remove the interface (its process and socket) and tell the key exchange service."""
        if self._closed:
            return
        self._closed = True
        if self._unlinking is not None:
            await asyncio.gather(self._unlinking, return_exceptions=True)
        if self.iface is not None:
            try:
                await self.iface.close()
            except Exception as exc:  # noqa: BLE001 - the namespace removal takes the interface anyway
                log.error("cell %s: closing tunnel interface: %s", self.cell_id, exc)
        if self._kex is not None:
            self._kex.close_tunnel()
