"""`hived bench control`: scheduling throughput and latency of the real control plane (SQLite
store, scheduler, msgpack box links on TCP) with many boxes connected.

    hived bench control [--json] [--boxes 100] [--builds 20000] [--rate R] [--latency-builds N]
                        [--store sqlite|postgresql] [--database URL]

`--store postgresql` starts a throwaway PostgreSQL server (hived.control.pgserver: fsync on,
Unix socket) unless `--database URL` names an empty database of one's own (its password from
$HIVED_DATABASE_PASSWORD or $PGPASSWORD, never on the command line).

The boxes are simulated (hived.control.simbox, `simulated_boxes: true` in the output): they
speak the real protocol over real sockets and finish every build at once. They run in a
process of their own, pinned to another CPU than the control plane's when there are two, so
they do not take the control plane's core. Builds are submitted inside the control plane's
process through the same call the HTTP API makes (`ControlPlane.submit`, acknowledged only
once the build is durable): this measures the control plane, not aiohttp.

Two runs, after a short warm-up:

* saturation: submit as fast as the control plane takes builds, keeping a bounded number
  outstanding; `builds_per_s` = builds / (first submit -> last build stored as finished).
* latency: an open-loop submitter at a fixed rate (default: half of the saturation
  throughput just measured, so it is sustainable); `schedule_ms` = from the moment a build
  was due to be submitted (before it is stored) to `build.assign` written to its box's
  socket, after the assignment is durable. Measuring from the due time, not from when the
  submitter got to it, keeps a stalled loop from hiding its own delay.
"""

import argparse
import asyncio
import contextlib
import gc
import hashlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hived.bench.common import BenchError, _loadavg, machine_info, summary
from hived.control.config import parse
from hived.control.server import ControlPlane
from hived.control.simbox import bench_token
from hived.control.store import Build


def _dist(ms: list[float]) -> dict:
    return summary(ms, (50, 90, 99), digits=3)


class _Fleet:
    """The simulated boxes' process."""

    def __init__(self, port: int, boxes: int, warm: int, capacity: int, seed: str, cpu: int, log: Path) -> None:
        self.log_path = log
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hived.control.simbox", "--port", str(port), "--boxes", str(boxes),
                 "--warm", str(warm), "--capacity", str(capacity), "--seed", seed, "--cpu", str(cpu)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)

    def stderr(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    async def ready(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        line = await asyncio.wait_for(loop.run_in_executor(None, self.proc.stdout.readline), timeout)
        if line.strip() != b"ready":
            self.proc.kill()
            raise BenchError(f"the simulated boxes did not start: {line!r} {self.stderr()}")

    async def finish(self) -> dict:
        loop = asyncio.get_running_loop()
        self.proc.stdin.close()  # the fleet ends when its stdin closes
        try:
            out = await asyncio.wait_for(loop.run_in_executor(None, self.proc.stdout.read), 30)
        except TimeoutError:
            self.proc.kill()
            return {}
        try:
            return json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            return {"error": self.stderr()[-500:]}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _config(tmp: str, boxes: int, seed: str, synchronous: str, database: dict | None = None):
    return parse({
        "hive": {"name": "bench", "state_dir": tmp, "api_listen": "127.0.0.1:0", "box_listen": "127.0.0.1:0",
                 "synchronous": synchronous, "heartbeat_s": 1.0, "box_lost_s": 30.0, **(database or {})},
        "shapes": {"small": {}},
        "customers": {"bench": {"api_tokens_sha256": [hashlib.sha256(f"api-{seed}".encode()).hexdigest()]}},
        "boxes": {f"b{i}": {"token_sha256": hashlib.sha256(bench_token(seed, i).encode()).hexdigest()}
                  for i in range(boxes)},
    }, "bench")


class _Submitter:
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self.n = 0
        self.failed = 0

    def build(self, submitted_at: float) -> Build:
        self.n += 1
        return Build(id=f"bench_{self.n:09d}", customer="bench", shape="small", argv=["true"],
                     submitted_at=submitted_at)

    def acked(self, fut: asyncio.Future) -> None:
        if fut.exception() is not None:  # counted, and the run says so
            self.failed += 1


class _Finished:
    """Counts builds stored as finished; wakes whoever waits for a count."""

    def __init__(self, cp: ControlPlane) -> None:
        self.n = 0
        self.target = 0
        self.event = asyncio.Event()
        cp.finish_listeners.append(self._one)

    def _one(self, state: str) -> None:
        self.n += 1
        if self.n >= self.target:
            self.event.set()

    async def wait(self, target: int, timeout: float) -> None:
        self.target = target
        while self.n < target:
            self.event.clear()
            try:
                await asyncio.wait_for(self.event.wait(), timeout)
            except TimeoutError:
                raise BenchError(f"only {self.n} of {target} builds finished within {timeout:g} s") from None


async def _saturate(cp: ControlPlane, sub: _Submitter, done: _Finished, builds: int, window: int) -> dict:
    """Keep between window/2 and `window` builds outstanding until `builds` were submitted."""
    base = done.n
    cp.schedule_samples.clear()
    cp.commit_seconds.clear()
    commits0 = cp.commits
    t0 = time.perf_counter()
    cpu0 = os.times()
    submitted = 0
    while submitted < builds:
        outstanding = submitted - (done.n - base)
        n = min(window - outstanding, builds - submitted)
        for _ in range(n):
            cp.submit_nowait(sub.build(cp.clock())).add_done_callback(sub.acked)
        submitted += n
        await done.wait(base + submitted - window // 2, 120)
    await done.wait(base + builds, 120)
    elapsed = time.perf_counter() - t0
    cpu1 = os.times()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    commits = cp.commits - commits0
    return {"builds": builds, "seconds": round(elapsed, 3), "builds_per_s": round(builds / elapsed, 1),
            "window": window, "control_cpu_util": round(cpu / elapsed, 2),
            "control_cpu_us_per_build": round(cpu / builds * 1e6, 1),
            "commits": commits, "builds_per_commit": round(builds / max(1, commits), 1),
            "commit_ms": _dist([c * 1000 for c in cp.commit_seconds]),
            "schedule_ms_incl_queueing": _dist([s * 1000 for s in cp.schedule_samples])}


async def _paced(cp: ControlPlane, sub: _Submitter, done: _Finished, rate: float, builds: int) -> dict:
    """Open loop: build i is due at t0 + i/rate; latency counts from the due time."""
    base = done.n
    cp.schedule_samples.clear()
    cp.commit_seconds.clear()
    commits0 = cp.commits
    t0 = cp.clock() + 0.01
    submitted = 0
    lag = []
    while submitted < builds:
        now = cp.clock()
        due = min(builds, int((now - t0) * rate) + 1) if now >= t0 else 0
        if due > submitted:
            lag.append(now - (t0 + (due - 1) / rate))
        while submitted < due:
            cp.submit_nowait(sub.build(t0 + submitted / rate)).add_done_callback(sub.acked)
            submitted += 1
        await asyncio.sleep(max(0.0, min(0.001, t0 + submitted / rate - cp.clock())))
    await done.wait(base + builds, 120)
    ms = [s * 1000 for s in cp.schedule_samples]
    return {"rate_per_s": round(rate, 1), "builds": builds, "schedule_ms": _dist(ms),
            "commit_ms": _dist([c * 1000 for c in cp.commit_seconds]), "commits": cp.commits - commits0,
            "submitter_lag_ms_max": round(max(lag, default=0.0) * 1000, 3)}


async def _http(cp: ControlPlane, seed: str, builds: int, concurrency: int, cpu: int) -> dict:
    """Closed loop over HTTP: a client process POSTs builds, `concurrency` at a time."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hived.bench.control", "_http_client", f"http://127.0.0.1:{cp.api_port}/v1/builds",
        f"api-{seed}", str(builds), str(concurrency), str(cpu), stdout=subprocess.PIPE)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise BenchError(f"the HTTP client failed ({proc.returncode}): {out.decode()[-500:]}")
    return json.loads(out)


async def _http_client(url: str, token: str, n: int, concurrency: int) -> dict:
    import aiohttp

    body = json.dumps({"customer": "bench", "argv": ["true"]}).encode()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    todo = iter(range(n))
    ms: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:
        async def worker():
            for _ in todo:
                t = time.perf_counter()
                async with http.post(url, data=body, headers=headers) as r:
                    if r.status != 201:
                        raise BenchError(f"POST /v1/builds: {r.status} {await r.text()}")
                    await r.read()
                ms.append((time.perf_counter() - t) * 1000)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return {"builds": n, "concurrency": concurrency, "submits_per_s": round(n / elapsed, 1),
            "submit_ms": _dist(ms)}


# --sweep: open-loop rates as fractions of the saturation throughput just measured.
SWEEP = (0.1, 0.25, 0.5, 0.75, 0.9)


async def measure(boxes: int = 100, builds: int = 20000, *, rate: float = 0.0, latency_builds: int = 0,
                  warm: int = 4, synchronous: str = "full", window: int = 0, pin: bool = True,
                  http: int = 0, store: str = "sqlite", database: str = "", sweep: bool = False) -> dict:
    import logging

    logging.getLogger("hived").setLevel(logging.ERROR)  # 100 boxes saying goodbye is not news
    machine = machine_info()  # its load average is the one before this run
    cpus = sorted(os.sched_getaffinity(0))
    pinned = pin and len(cpus) >= 2
    old_affinity = set(cpus)
    seed = secrets.token_hex(8)
    fleet = None
    with tempfile.TemporaryDirectory(prefix="hived-bench-") as tmp, contextlib.ExitStack() as servers:
        db = {}
        if store == "postgresql":
            from hived.control.pgserver import ThrowawayPostgres

            pg = None if database else servers.enter_context(ThrowawayPostgres())
            db = {"database": database} if database else {"database": pg.url,
                                                          "database_password_file": str(pg.password_file)}
        cp = ControlPlane(_config(tmp, boxes, seed, synchronous, db))
        try:
            if pinned:
                os.sched_setaffinity(0, {cpus[0]})
            await cp.start()
            fleet = _Fleet(cp.box_port, boxes, warm, warm * 2, seed, cpus[1] if pinned else -1,
                           Path(tmp) / "boxes.log")
            await fleet.ready(60)
            deadline = time.monotonic() + 30
            while cp.scheduler.boxes_connected() < boxes:
                if time.monotonic() > deadline:
                    raise BenchError(f"{cp.scheduler.boxes_connected()} of {boxes} simulated boxes registered")
                await asyncio.sleep(0.01)
            gc.freeze()  # as `hived control` does once started
            sub = _Submitter(cp)
            done = _Finished(cp)
            window = window or boxes * warm * 2
            await _saturate(cp, sub, done, min(2000, max(builds // 10, 50)), window)  # warm-up, not counted
            sat = await _saturate(cp, sub, done, builds, window)
            rate = rate or max(1.0, sat["builds_per_s"] / 2)
            lat = await _paced(cp, sub, done, rate, latency_builds or max(200, min(int(rate * 5), builds)))
            swept = []
            for fraction in SWEEP if sweep else ():
                r = max(1.0, sat["builds_per_s"] * fraction)
                swept.append(await _paced(cp, sub, done, r, max(200, min(int(r * 3), builds))))
            over_http = None
            if http:
                base = done.n
                over_http = await _http(cp, seed, http, 64, cpus[1] if pinned else -1)
                await done.wait(base + http, 120)
            counts = cp.store.count_by_state()
            writers = getattr(cp.store, "commits_in_flight", 1)
            fleet_stats = await fleet.finish()
        finally:
            if fleet is not None:
                fleet.kill()
            await cp.stop()
            if pinned:
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(0, old_affinity)
    if sub.failed or counts["failed"] or counts["queued"] or counts["assigned"] or counts["running"]:
        raise BenchError(f"builds went wrong: {sub.failed} submits failed; store says {counts}")
    machine["loadavg_at_end"] = _loadavg()
    # (at the end the load counts this run's own two processes: only the start says if others ran)
    busy = (machine["loadavg_at_start"] or [0.0])[0] > 0.5 * machine["nproc"]
    return {
        "benchmark": "control",
        "store": store,
        **({"database": "throwaway server (fsync on, Unix socket)" if not database else "given",
            "writers": writers} if store == "postgresql" else {}),
        "simulated_boxes": True,
        "boxes": boxes,
        "warm_per_box": warm,
        "builds_per_s": sat["builds_per_s"],
        "schedule_ms": lat["schedule_ms"],
        "latency_rate_per_s": lat["rate_per_s"],
        "saturation": sat,
        "latency": lat,
        **({"latency_sweep": swept} if swept else {}),
        **({"http": {**over_http, "note": "POST /v1/builds (auth, validation, durable before the answer) "
                                          "closed loop from a client process on the boxes' CPU; builds run "
                                          "as above"}} if over_http else {}),
        "builds_total": counts["succeeded"],
        "synchronous": synchronous,
        "submit": "in-process ControlPlane.submit (what the HTTP API calls), acknowledged after commit",
        "processes": {"control_plane": {"pid": os.getpid(), "cpu": cpus[0] if pinned else None},
                      "simulated_boxes": {"pid": fleet.proc.pid, "cpu": cpus[1] if pinned else None,
                                          **fleet_stats}},
        "machine": machine,
        **({"warning": "the machine was busy with other work during the run (load average above half the "
                       "CPUs): numbers are lower and tails longer than on an idle machine"} if busy else {}),
        "note": f"real control plane ({store} store, scheduler, msgpack box links on TCP); simulated boxes in "
                "another process that finish every build at once and report refilled warm cells at once; "
                "schedule_ms: due-to-submit -> build.assign written to the box, at latency_rate_per_s",
    }


def render(r: dict) -> str:
    s, lat = r["saturation"], r["latency"]["schedule_ms"]
    return "\n".join([
        f"control plane on {r['store']}, {r['boxes']} simulated boxes ({r['warm_per_box']} warm cells each)"
        + (f", synchronous={r['synchronous']}" if r["store"] == "sqlite" else ""),
        f"  saturation: {s['builds']} builds in {s['seconds']} s = {s['builds_per_s']} builds/s "
        f"(control plane CPU {s['control_cpu_util'] * 100:.0f}%)",
        f"  latency at {r['latency_rate_per_s']} builds/s: schedule p50 {lat['p50']} ms, p90 {lat['p90']} ms, "
        f"p99 {lat['p99']} ms, max {lat['max']} ms (n={lat['n']})",
        *([f"  over HTTP: {r['http']['submits_per_s']} builds/s, {r['http']['concurrency']} at a time, "
           f"submit p50 {r['http']['submit_ms']['p50']} ms p99 {r['http']['submit_ms']['p99']} ms"]
          if "http" in r else []),
        *([f"  warning: {r['warning']}"] if "warning" in r else []),
    ])


def parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="hived bench control")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--boxes", type=int, default=100, help="simulated boxes (default %(default)d)")
    p.add_argument("--builds", type=int, default=20000, help="builds in the saturation run (default %(default)d)")
    p.add_argument("--warm", type=int, default=4, help="warm cells per box (default %(default)d)")
    p.add_argument("--rate", type=float, default=0.0,
                   help="builds/s of the latency run (default: half the saturation throughput)")
    p.add_argument("--latency-builds", type=int, default=0, help="builds in the latency run (default: 5 s worth)")
    p.add_argument("--synchronous", choices=["full", "normal"], default="full", help="SQLite durability")
    p.add_argument("--store", choices=["sqlite", "postgresql"], default="sqlite", help="the hive's store")
    p.add_argument("--database", default="", metavar="URL",
                   help="with --store postgresql: an empty database to use (no password in the URL) instead "
                        "of a throwaway server")
    p.add_argument("--no-pin", action="store_true", help="do not pin the two processes to CPUs")
    p.add_argument("--http", type=int, default=0, metavar="N",
                   help="also submit N builds over the HTTP API (64 at a time) from a client process")
    p.add_argument("--sweep", action="store_true",
                   help=f"also latency runs at {', '.join(f'{f * 100:.0f}%%' for f in SWEEP)} of saturation "
                        "(latency_sweep: what --plot draws)")
    p.add_argument("--plot", metavar="FILE.png", default="",
                   help="also draw p50/p99 schedule latency against builds/s (needs matplotlib)")
    return p


def run(args) -> dict:
    import uvloop

    from hived.control.config import ConfigError, check_database_url
    from hived.control.pgserver import PostgresUnavailable
    from hived.control.store import StoreError

    if args.boxes < 1 or args.builds < 1:
        raise BenchError("--boxes and --builds must be at least 1")
    if args.database and args.store != "postgresql":
        raise BenchError("--database is for --store postgresql")
    try:
        check_database_url("--database", args.database)
        return uvloop.run(measure(args.boxes, args.builds, rate=args.rate, latency_builds=args.latency_builds,
                                  warm=args.warm, synchronous=args.synchronous, pin=not args.no_pin,
                                  http=args.http, store=args.store, database=args.database,
                                  sweep=args.sweep))
    except (ConfigError, StoreError, PostgresUnavailable) as exc:
        raise BenchError(str(exc)) from None


def main(argv=None) -> int:
    """Only the --http client process starts here (`hived bench control` is the benchmark)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_http_client"]:  # the client process of --http
        import uvloop

        url, token, n, concurrency, cpu = argv[1], argv[2], int(argv[3]), int(argv[4]), int(argv[5])
        if cpu >= 0:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, {cpu})
        print(json.dumps(uvloop.run(_http_client(url, token, n, concurrency))))
        return 0
    raise SystemExit("usage: python -m hived.bench.control _http_client URL TOKEN N CONCURRENCY CPU "
                     "(the benchmark itself is `hived bench control`)")


if __name__ == "__main__":
    raise SystemExit(main())

