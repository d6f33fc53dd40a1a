"""`hived bench failover`: several `hived control` replicas on one PostgreSQL database, builds
flowing, the leader SIGKILLed again and again.

    hived bench failover [--json] [--replicas 2] [--kills 3] [--boxes 10] [--rate 40] [--every 4]

A throwaway PostgreSQL server (hived.control.pgserver, fsync on) holds the hive; each
replica is a real `hived control` process. Simulated boxes (hived.control.simbox: the real
protocol over real sockets; each build starts, writes a line and exits at once) run in this
process and, when their link drops, dial the next replica (a standby forwards them to the
leader). Builds are submitted over HTTP to the replicas in turn, each with an
Idempotency-Key, and retried on another replica until one acknowledges it.

Every `--every` seconds the leader (the replica whose /healthz says so) is SIGKILLed, and
started again as a standby once another leads. Reported:

* `failover_s`: from the SIGKILL to the first `build.assign` a box receives on a link it
  registered after the kill (the new leader elected, boxes relinked, a build scheduled; not
  what the dead leader had written into sockets before it died), p50/p95/max over the kills;
* `builds` acknowledged; `builds_lost`: acknowledged but not stored or not succeeded at the
  end; `builds_duplicated`: started by boxes more than once.
"""

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hived.bench.common import BenchError, machine_info, percentile
from hived.control.simbox import SimBox, SimBuild


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values: list[float], q: float) -> float | None:
    return round(percentile(values, q), 3) if values else None


class _Replica:
    """One `hived control` process; started again on the same ports after a kill."""

    def __init__(self, name: str, tmp: Path, pg, seed: str, boxes: int) -> None:
        self.name = name
        self.api_port, self.box_port = _free_port(), _free_port()
        self.log_path = tmp / f"{name}.log"
        self.config = tmp / f"{name}.toml"
        box_tables = "\n".join(f'[boxes.b{i}]\ntoken_sha256 = "{_sha(f"{seed}-{i}")}"' for i in range(boxes))
        self.config.write_text(f"""
[hive]
name = "fo"
state_dir = "{tmp / name}"
api_listen = "127.0.0.1:{self.api_port}"
box_listen = "127.0.0.1:{self.box_port}"
heartbeat_s = 0.5
box_lost_s = 10.0
database = "{pg.url}"
database_password_file = "{pg.password_file}"

[shapes.small]

[customers.bench]
api_tokens_sha256 = ["{_sha(f"api-{seed}")}"]

{box_tables}
""")
        self.proc: subprocess.Popen | None = None

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    async def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "hived", "control", "--config", str(self.config)],
                                         stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(60):
                line = await loop.run_in_executor(None, self.proc.stdout.readline)
        except TimeoutError:
            line = b""
        if not line.startswith(b"ready "):
            self.kill()
            raise BenchError(f"replica {self.name} did not start: {line!r} "
                             f"{self.log_path.read_text(errors='replace')[-800:]}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.alive():
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _sha(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


class _Box(SimBox):
    """A simulated box that counts the builds it starts, notes when assignments arrive, and
    dials the next replica when its link drops."""

    def __init__(self, *args, ledger: dict, assigns: list, **kw) -> None:
        super().__init__(*args, **kw)
        self.ledger = ledger
        self.assigns = assigns      # (when, when its link registered): what a dead leader sent before it
        self.linked_at = 0.0        # died may still arrive, but on a link registered earlier

    def _auto(self, b: SimBuild) -> None:
        self.assigns.append((time.monotonic(), self.linked_at))
        self.ledger[b.build_id] = self.ledger.get(b.build_id, 0) + 1
        super()._auto(b)

    async def keep_linked(self, ports: list[int], stop: asyncio.Event) -> None:
        for port in itertools.cycle(ports):
            if stop.is_set():
                return
            self.host, self.port = "127.0.0.1", port
            try:
                await self.connect()
                self.linked_at = time.monotonic()
                await self.channel.wait_closed()
            except Exception:  # refused, forwarded to a dead leader, closed mid-register: next one
                pass
            await asyncio.sleep(0.05)


async def _submitter(replicas: list[_Replica], token: str, rate: float, acked: dict, stop: asyncio.Event) -> None:
    import aiohttp

    headers = {"Authorization": f"Bearer {token}"}
    body = {"customer": "bench", "argv": ["true"]}
    turn = itertools.count()
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=10)) as http:
        async def one(key: str) -> None:
            while not (stop.is_set() and time.monotonic() > stopped_at[0] + 30):  # then: never acknowledged
                r = replicas[next(turn) % len(replicas)]
                try:
                    async with http.post(f"{r.api}/v1/builds", json=body, headers={"Idempotency-Key": key}) as resp:
                        if resp.status in (200, 201):
                            acked[key] = (await resp.json())["id"]
                            return
                except (TimeoutError, aiohttp.ClientError):
                    pass
                await asyncio.sleep(0.05)
        tasks = set()
        t0 = time.monotonic()
        stopped_at = [float("inf")]
        for i in itertools.count():
            if stop.is_set():
                stopped_at[0] = time.monotonic()
                break
            await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
            task = asyncio.get_running_loop().create_task(one(f"fo-{i}"))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        async with asyncio.timeout(60):
            await asyncio.gather(*tasks)


async def _leader(replicas: list[_Replica]) -> _Replica | None:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        for r in replicas:
            if not r.alive():
                continue
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                async with http.get(f"{r.api}/healthz") as resp:
                    if (await resp.json()).get("leader"):
                        return r
    return None


async def _until_leader(replicas: list[_Replica], timeout: float) -> _Replica:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = await _leader(replicas)
        if r is not None:
            return r
        await asyncio.sleep(0.05)
    raise BenchError(f"no replica led within {timeout:g} s")


async def _final_states(pg) -> dict:
    import asyncpg

    conn = await asyncpg.connect(pg.url, password=pg.password)
    try:
        rows = await conn.fetch("SELECT id, state, attempts FROM builds")
        return {r["id"]: (r["state"], r["attempts"]) for r in rows}
    finally:
        await conn.close()


async def measure(replicas: int = 2, kills: int = 3, boxes: int = 10, rate: float = 40.0, every: float = 4.0) -> dict:
    from hived.control.pgserver import ThrowawayPostgres

    machine = machine_info()
    seed = secrets.token_hex(6)
    with tempfile.TemporaryDirectory(prefix="hived-failover-") as tmp, ThrowawayPostgres() as pg:
        tmp = Path(tmp)
        reps = [_Replica(f"r{i}", tmp, pg, seed, boxes) for i in range(replicas)]
        stop_boxes, stop_submits = asyncio.Event(), asyncio.Event()
        ledger: dict[str, int] = {}
        assigns: list[tuple[float, float]] = []
        acked: dict[str, str] = {}
        tasks = []
        fleet = []
        try:
            for r in reps:  # the first one leads
                await r.start()
            ports = [r.box_port for r in reps]
            fleet = [_Box("127.0.0.1", 0, f"b{i}", f"{seed}-{i}", warm={"small": 2}, capacity=4, auto=True,
                          report_warm=True, ledger=ledger, assigns=assigns) for i in range(boxes)]
            loop = asyncio.get_running_loop()
            for i, b in enumerate(fleet):  # boxes spread over the replicas
                k = i % len(ports)
                tasks.append(loop.create_task(b.keep_linked(ports[k:] + ports[:k], stop_boxes)))
            tasks.append(loop.create_task(_submitter(reps, f"api-{seed}", rate, acked, stop_submits)))
            failovers = []
            for _ in range(kills):
                await asyncio.sleep(every)
                leader = await _until_leader(reps, 30)
                leader.kill()
                t_kill = time.monotonic()
                deadline = t_kill + 60
                while not any(linked > t_kill for _, linked in assigns[-200:]):
                    if time.monotonic() > deadline:
                        raise BenchError("no build was scheduled within 60 s of killing the leader")
                    await asyncio.sleep(0.01)
                failovers.append(min(t for t, linked in assigns[-200:] if linked > t_kill) - t_kill)
                await leader.start()  # back, as a standby
            await asyncio.sleep(1.0)
            stop_submits.set()
            await tasks[-1]
            # every acknowledged build ends (the boxes run them at once)
            deadline = time.monotonic() + 60
            while True:
                states = await _final_states(pg)
                if all(states.get(i, ("queued",))[0] in ("succeeded", "failed", "cancelled") for i in acked.values()):
                    break
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
        finally:
            stop_boxes.set()
            stop_submits.set()
            for b in fleet:
                await b.close()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for r in reps:
                r.kill(signal.SIGTERM)
    ids = set(acked.values())
    lost = sorted(i for i in ids if states.get(i, ("missing",))[0] != "succeeded")
    duplicated = sorted(i for i, n in ledger.items() if n > 1)
    return {
        "benchmark": "failover",
        "replicas": replicas,
        "kills": kills,
        "simulated_boxes": boxes,
        "rate_per_s": rate,
        "builds": len(ids),
        "builds_lost": len(lost),
        "builds_duplicated": len(duplicated),
        "builds_not_succeeded": {i: states.get(i, ("missing",))[0] for i in lost[:20]},
        "failover_s": {"p50": _pct(failovers, 50), "p95": _pct(failovers, 95),
                       "max": round(max(failovers), 3) if failovers else None,
                       "each": [round(f, 3) for f in failovers]},
        "machine": {**machine, "loadavg_at_end": list(os.getloadavg())},
        "note": "real `hived control` replicas on a throwaway PostgreSQL (fsync on); the leader SIGKILLed every "
                f"{every:g} s and started again as a standby; simulated boxes in the bench process relink to the "
                "next replica; failover_s: SIGKILL -> next build.assign received by a box",
    }


def render(r: dict) -> str:
    f = r["failover_s"]
    return "\n".join([
        f"failover: {r['replicas']} replicas, leader SIGKILLed {r['kills']} times, {r['simulated_boxes']} simulated "
        f"boxes, {r['rate_per_s']:g} builds/s",
        f"  builds acknowledged {r['builds']}, lost {r['builds_lost']}, run twice {r['builds_duplicated']}",
        f"  failover (kill -> next build scheduled): p50 {f['p50']} s, p95 {f['p95']} s, max {f['max']} s",
    ])


def parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="hived bench failover")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--replicas", type=int, default=2, help="hived control processes (default %(default)d)")
    p.add_argument("--kills", type=int, default=3, help="times the leader is SIGKILLed (default %(default)d)")
    p.add_argument("--boxes", type=int, default=10, help="simulated boxes (default %(default)d)")
    p.add_argument("--rate", type=float, default=40.0, help="builds submitted per second (default %(default)g)")
    p.add_argument("--every", type=float, default=4.0, help="seconds between kills (default %(default)g)")
    return p


def run(args) -> dict:
    import uvloop

    from hived.control.pgserver import PostgresUnavailable

    if args.replicas < 2 or args.kills < 1 or args.boxes < 1 or args.rate <= 0 or args.every <= 0:
        raise BenchError("--replicas must be at least 2; --kills, --boxes at least 1; --rate, --every above 0")
    try:
        return uvloop.run(measure(args.replicas, args.kills, args.boxes, args.rate, args.every))
    except PostgresUnavailable as exc:
        raise BenchError(str(exc)) from None


