"""`hived bench secure [--builds N] [--json]`: Secure Compute provisioning, measured on real
parts: a customer network on this machine (hived/connector/testbed.py: a connector in its own
namespace in front of a private service), a control plane with its key exchange service,
a box with warm cells (real microVMs) and a WireGuard tunnel per cell.

Builds alternate, Secure Compute and not, with the same command, in one run:

  provision_ms   the box takes a warm cell for the build -> the cell's WireGuard handshake
                 with the connector has completed (the first bytes have come back through
                 the tunnel); covers key pair, interface, key exchange round trip through the
                 control plane and the connector, egress switch and handshake.
  stages_ms      cumulative per step (interface_kex_cut: interface, key exchange and cutting the
                 veth at the same time; configure: the key and peer in; route: that and the
                 address and routes, done at the same time; provision).
  start_ms       the box takes the cell -> the guest reports the build started, for both
                 kinds; overhead_ratio = secure start p50 / plain start p50.
  netlink_ms     the network worker thread's own time in the veth cut (drop rules), the route
                 step, and the veth's deletion after the handshake (unlink: not in provision_ms,
                 overlapping the build's start)
  prestart       whether the box pre-started each warm cell's WireGuard interface ([box]
                 secure_prestart, hived/box/prestart.py; default on, `--prestart off` for the
                 old way as a baseline), how many tunnels used one, and what removing it
                 cost the plain builds before their `run` (plain_removal_ms).

Every secure build also fetches the private service through its tunnel, so a number is
only reported for a tunnel that worked.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path

from hived.bench.common import BenchError, dist_ms, machine_info, progress

NETWORK = "bench-private"


def parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--builds", type=int, default=20, help="builds of each kind (default %(default)s, min 20 "
                   "for the published figures)")
    p.add_argument("--prestart", choices=["on", "off"], default="on",
                   help="pre-start each warm cell's WireGuard interface ([box] secure_prestart; default on)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


async def _run(n: int, work: Path, prestart: bool = True) -> dict:
    from hived import image as cell_image
    from hived import kvm
    from hived.box.config import parse as box_parse
    from hived.box.controllink import LinkConfig
    from hived.box.daemon import BoxDaemon, CellImage
    from hived.connector.testbed import CustomerNetwork
    from hived.control.config import parse as control_parse
    from hived.control.server import ControlPlane, token_hash
    from hived.control.store import Build

    img = cell_image.find_image(required=True)
    net = CustomerNetwork(work, network=NETWORK).up()
    box_token, conn_token, api_token = (secrets.token_urlsafe(24) for _ in range(3))
    cp = box = None
    try:
        import socket

        with socket.socket() as s:
            s.bind((net.host_ip, 0))
            port = s.getsockname()[1]
        cp = ControlPlane(control_parse({
            "hive": {"name": "bench", "state_dir": str(work / "hive"), "api_listen": "127.0.0.1:0",
                     "box_listen": f"{net.host_ip}:{port}", "heartbeat_s": 0.5, "box_lost_s": 8.0,
                     "synchronous": "normal"},
            "shapes": {"small": {}},
            "customers": {"acme": {"api_tokens_sha256": [token_hash(api_token)]}},
            "boxes": {"bench-box": {"token_sha256": token_hash(box_token)}},
            "networks": {NETWORK: {"customer": "acme", "connector_tokens_sha256": [token_hash(conn_token)],
                                   "tunnel_subnet": "100.97.0.0/24", "routes": [net.private_net]}},
        }, "bench"))
        await cp.start()
        cfg = box_parse({"box": {"name": "bsec-" + secrets.token_hex(2), "state_dir": str(work / "box"),
                                 "reserved_cores": 0, "overcommit": True, "boot_timeout_s": 180,
                                 "queue_timeout_s": 180, "secure_prestart": prestart},
                         "shapes": {"small": {"vcpus": 1, "memory_mib": 320, "scratch_mib": 128,
                                              "pool_target": 2}}}, "bench")
        import dataclasses

        cfg = dataclasses.replace(cfg, extra={**cfg.extra, "control": LinkConfig(
            net.host_ip, port, box_token, "bench-box", capacity=2)})
        box = BoxDaemon(cfg, image=CellImage.at(img), accelerator=kvm.accelerator())
        await box.start()
        net.start_connector(f"{net.host_ip}:{port}", conn_token)
        deadline = time.monotonic() + 30
        while NETWORK not in cp.kex.connectors:
            if time.monotonic() > deadline:
                raise BenchError(f"the connector did not register: {net.connector_output()}")
            await asyncio.sleep(0.05)
        await asyncio.wait_for(box.wait_ready(), 240)
        fetch = ("import urllib.request,sys; d=urllib.request.urlopen(sys.argv[1], timeout=10).read().decode();"
                 "sys.exit(0 if d.strip()==sys.argv[2] else 4)")
        results: dict[str, list[dict]] = {"secure": [], "plain": []}
        for i in range(n):
            for kind in ("secure", "plain"):
                while not any(len(p.warm) for p in box.pools.values()):  # every build takes a warm cell
                    await asyncio.sleep(0.05)
                argv = ["python3", "-c", fetch, net.url, net.secret] if kind == "secure" else ["true"]
                build = Build(id=cp.new_build_id(), customer="acme", shape="small", argv=argv, env={},
                              cwd="/work", timeout_s=60,
                              options={"secure_compute": NETWORK} if kind == "secure" else {},
                              submitted_at=cp.clock())
                b, _ = await cp.submit(build)
                while True:
                    got = cp.store.get_build(b.id)
                    if got.terminal:
                        break
                    await asyncio.sleep(0.02)
                rec = box.builds.get(b.id, {})
                if got.state != "succeeded":
                    raise BenchError(f"{kind} build {b.id} {got.state}: {got.reason}: {got.message}")
                results[kind].append(rec)
                progress(f"secure bench: {i + 1}/{n} {kind}: start {rec.get('warm_start_ms', 0):.0f} ms"
                         + (f", provision {rec['secure_ms']['provision_ms']:.1f} ms" if kind == "secure" else ""))
        return _report(results, n, prestart)
    finally:
        progress("secure bench: stopping")
        if box is not None:
            await box.stop()
        progress("secure bench: box stopped")
        if cp is not None:
            await cp.stop()
        progress("secure bench: control plane stopped")
        net.down()


def _report(results: dict, n: int, prestart: bool = True) -> dict:
    secure, plain = results["secure"], results["plain"]
    provision = [r["secure_ms"]["provision_ms"] for r in secure]
    stages = {k: dist_ms([r["secure_ms"][k] for r in secure]) for k in secure[0]["secure_ms"]} if secure else {}
    s_start = [r["warm_start_ms"] for r in secure if "warm_start_ms" in r]
    p_start = [r["warm_start_ms"] for r in plain if "warm_start_ms" in r]
    sd, pd = dist_ms(s_start), dist_ms(p_start)
    removed = [r["prestart_removed_ms"] for r in plain if "prestart_removed_ms" in r]
    return {"bench": "secure", "builds_each": n, "machine": machine_info(),
            "provision_ms": dist_ms(provision), "stages_ms": stages,
            "start_ms": {"secure": sd, "plain": pd},
            "overhead_ratio": round(sd["p50"] / pd["p50"], 2) if pd.get("p50") else None,
            "netlink_ms": {k: dist_ms([r["tunnel"]["netlink_ms"][k] for r in secure if k in r["tunnel"]["netlink_ms"]])
                           for k in ("cut", "route", "unlink")} if secure else {},
            "prestart": {"configured": prestart,
                         "tunnels_prestarted": sum(1 for r in secure if r["tunnel"].get("prestarted")),
                         "plain_removal_ms": dist_ms(removed) if removed else None},
            "target": {"provision_ms.p95": "<= 25", "met": dist_ms(provision)["p95"] <= 25}}


def render(r: dict) -> str:
    p = r["provision_ms"]
    return (f"Secure Compute, {r['builds_each']} builds each: provision p50 {p['p50']} ms, p95 {p['p95']} ms; "
            f"start p50 secure {r['start_ms']['secure']['p50']} ms vs plain {r['start_ms']['plain']['p50']} ms "
            f"(ratio {r['overhead_ratio']}); interfaces pre-started: {r['prestart']['tunnels_prestarted']} of "
            f"{r['builds_each']}")


def run(args) -> dict:
    import uvloop

    if os.geteuid() != 0:
        raise BenchError("hived bench secure needs root (namespaces, cgroups, WireGuard)")
    if args.builds < 1:
        raise BenchError("--builds must be at least 1")
    work = Path(tempfile.mkdtemp(prefix="hived-bench-secure-"))
    try:
        return uvloop.run(_run(args.builds, work, args.prestart == "on"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
