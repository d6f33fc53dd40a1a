"""Pre-started WireGuard interfaces of warm cells, on boxes serving Secure Compute
(`[box] secure_prestart = true`).

Starting wireguard-go was most of a tunnel's provisioning (~35 of ~52 ms, hived/box/secure.py).
None of it depends on the build, so on a box that serves Secure Compute each cell gets its
interface as it goes warm, exactly as a tunnel's is made at assignment: wireguard-go born in
the box's namespace (its UDP socket stays there), its tun moved into the cell's namespace and
up, named after the cell (`wireguard.tunnel_name`: w<box tag><cell>). It has no private key
and no peer, so it can send and accept nothing, and no route leads into it. With it come the
cut's nftables chains in the cell's namespace (`CellNetwork.secure_prepare`): empty base
chains that accept everything and a masquerade onto that interface's name, inert until
assignment adds the two drop rules; they stay in a plain build's cell, matching nothing
(its interface is gone), and go with the namespace. Then:

    secure build   CellTunnel.open takes it (if its process still runs; otherwise it starts
                   one as before): only the key pair, the key exchange, the veth cut, keys
                   and peer over UAPI, the routes and the handshake remain
    plain build    it is removed before `run` goes to the cell: a plain build never has a
                   tunnel, a WireGuard process or its interface (the removal starts at
                   assignment, beside build.accepted and the checkout's copy, and costs a
                   plain build ~20 ms of its start when nothing else overlaps it)
    cell destroyed it goes with the cell (destroy()); a detaching daemon removes it too

Keys are still made at assignment, in memory only, never stored, never reused.

After a kill -9 of the box daemon its wireguard-go processes live on (their own session); the
next daemon kills every one of its box's prefix before adopting anything
(`BoxDaemon._clean_tunnels`, `wireguard.clean_leftovers`), and gives each adopted warm cell a
new interface (`prestart()` from hived/box/adopt.py). The old one is remade, not adopted: its
process was the old daemon's child (no handle to wait for or kill it by, no log), and whether
its tun is still sound is unknowable, while a new one costs ~35 ms once per adopted cell.
Running Secure Compute builds are not adopted at all (their keys lived in the old daemon).

How the box knows it serves Secure Compute: its config says so. The control plane knows which
networks a hive has, not which boxes will get their builds, and a box without the key still
runs Secure Compute builds, starting the interface at assignment as before. A pre-started
interface costs one wireguard-go process per warm cell (Pss ~3.7 MiB idle).
"""

from __future__ import annotations

import logging
import time

from hived.box.network import NetworkError
from hived.secure import wireguard

log = logging.getLogger(__name__)


def host_problem() -> str:
    """Why this host cannot pre-start interfaces ("" if it can): checked once at the box's start."""
    import shutil

    if shutil.which(wireguard.WIREGUARD_GO) is None and not wireguard.kernel_available()[0]:
        return ("[box] secure_prestart = true but this host has neither wireguard-go nor kernel WireGuard: "
                "apt-get install --no-install-recommends wireguard-go wireguard-tools, or set secure_prestart = false")
    return ""


async def prestart(box, rt) -> None:
    """Give a cell about to be warm its interface. A failure is logged and counted, never fails
    the cell: its Secure Compute build then starts the interface at assignment."""
    if not box.config.secure_prestart or box.network is None or rt.net is None or rt.wg_prestarted is not None:
        return
    name = wireguard.tunnel_name(box.network.tag, rt.cell.id)
    try:
        rt.wg_prestarted = await wireguard.open_interface(
            name, birth_netns=box.network.host_netns, target_netns=box.network.netns_name(rt.cell.id))
    except wireguard.WireGuardError as exc:
        log.warning("cell %s: WireGuard interface not pre-started (a Secure Compute build starts it at "
                    "assignment): %s", rt.cell.id, exc)
        box.metrics.wg_prestarts.labels("failed").inc()
        return
    try:  # and the cut's nftables chains, empty (hived/box/network.py secure_prepare)
        await box.network.secure_prepare(rt.cell.id, name)
    except NetworkError as exc:  # the cut makes them itself
        log.warning("cell %s: Secure Compute egress not prepared ahead: %s", rt.cell.id, exc)
    box.metrics.wg_prestarts.labels("ok").inc()


def take(rt) -> wireguard.Interface | None:
    """The cell's pre-started interface, now its Secure Compute build's (None: there is none)."""
    iface, rt.wg_prestarted = rt.wg_prestarted, None
    return iface


async def remove(rt) -> float:
    """Remove the cell's pre-started interface (a plain build, or the cell goes); the ms it took
    (SIGKILL, the process's exit, which unregisters the tun: an RCU wait, ~20 ms here)."""
    iface, rt.wg_prestarted = rt.wg_prestarted, None
    if iface is None:
        return 0.0
    t0 = time.perf_counter()
    try:
        await iface.close()
    except Exception as exc:  # noqa: BLE001 - the namespace removal takes the interface anyway
        log.error("cell %s: removing its pre-started WireGuard interface: %s", rt.cell.id, exc)
    return (time.perf_counter() - t0) * 1000
