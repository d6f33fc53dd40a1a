"""Scheduling throughput and latency of the real control plane (store, scheduler, box link)
against simulated boxes that speak the real protocol over real sockets and finish every
build at once (hived.control.simbox). Builds are submitted in-process (no HTTP), so this
measures the control plane, not aiohttp.

    python -m hived.control.bench --boxes 100 --builds 5000 [--synchronous full|normal]
"""

import argparse
import asyncio
import hashlib
import json
import statistics
import tempfile
import time
from pathlib import Path

from hived.control.config import parse
from hived.control.server import ControlPlane
from hived.control.simbox import SimBox
from hived.control.store import Build


async def measure(boxes: int, builds: int, synchronous: str = "full", warm: int = 4) -> dict:
    with tempfile.TemporaryDirectory(prefix="hived-bench-") as tmp:
        config = parse({
            "hive": {"name": "bench", "state_dir": str(Path(tmp)), "api_listen": "127.0.0.1:0",
                     "box_listen": "127.0.0.1:0", "synchronous": synchronous, "heartbeat_s": 1.0,
                     "box_lost_s": 30.0},
            "shapes": {"small": {}},
            "customers": {"bench": {}},
            "boxes": {f"b{i}": {"token_sha256": hashlib.sha256(f"t{i}".encode()).hexdigest()}
                      for i in range(boxes)},
        }, "bench")
        cp = ControlPlane(config)
        await cp.start()
        sims = [SimBox("127.0.0.1", cp.box_port, f"b{i}", f"t{i}", warm={"small": warm}, capacity=warm * 2,
                       auto=True) for i in range(boxes)]
        await asyncio.gather(*(s.connect() for s in sims))
        t0 = time.perf_counter()
        for i in range(builds):
            cp.submit(Build(id=f"bench_{i:08d}", customer="bench", shape="small", argv=["true"],
                            submitted_at=cp.clock()))
            if i % 50 == 49:
                await asyncio.sleep(0)  # let boxes answer while we submit
        while True:
            counts = cp.store.count_by_state()
            finished = counts["succeeded"] + counts["failed"]
            if finished >= builds:
                break
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - t0
        latencies = sorted(s * 1000 for s in cp.schedule_samples)
        for s in sims:
            await s.close()
        await cp.stop()
        return {
            "boxes": boxes, "builds": builds, "builds_per_s": round(builds / elapsed, 1),
            "schedule_ms": {"p50": round(statistics.median(latencies), 3),
                            "p99": round(latencies[max(0, int(len(latencies) * 0.99) - 1)], 3)},
            "synchronous": synchronous,
            "note": "real control plane (SQLite store, scheduler, msgpack box link on TCP); simulated boxes "
                    "that finish every build at once; builds submitted in-process, not over HTTP",
        }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="hived bench control")
    p.add_argument("--boxes", type=int, default=100)
    p.add_argument("--builds", type=int, default=5000)
    p.add_argument("--synchronous", choices=["full", "normal"], default="full")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    import logging

    import uvloop

    logging.getLogger("hived").setLevel(logging.ERROR)  # 100 boxes saying goodbye is not news

    print(json.dumps(uvloop.run(measure(args.boxes, args.builds, args.synchronous)), indent=None if args.json
                     else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
