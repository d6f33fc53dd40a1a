"""`hived bench restart`: `hived up` SIGKILLed and started again on the same home, again and
again, while a build prints numbered lines; its cells are adopted by each new daemon.

    hived bench restart [--json] [--restarts 5] [--pool 2] [--every 1.0]

A real `hived up` (control plane, box, router in one process; real microVMs) in a temporary
home keeps `--pool` warm cells; one build (followed by `hived run`, as a user would) prints a
numbered line every 0.1 s. `--restarts` times: SIGKILL, start again, wait until the new
daemon says it adopted the cells, wait `--every` s. Reported:

* `adopt_ms`: the new process's start -> every cell adopted (the daemon's own figure, from
  its start time in /proc), p50/p95/max over the restarts, with the cells adopted each time;
* `baseline_ready_ms`: the same home started fresh (the cells stopped first): process start ->
  its warm pool ready, what a restart cost before cells outlived the daemon; and the ratio;
* `output_lost_bytes`, `output_duplicated_lines`, `builds_lost` (all must be 0).
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hived.bench.common import BenchError, machine_info, percentile, progress

ADOPTED = re.compile(r"adopted (\d+) of (\d+) cell\(s\) .* in ([0-9.]+) ms \(([0-9.]+) ms after the process started\)")
HIVED = [sys.executable, "-m", "hived"]


def parser(p) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--restarts", type=int, default=5, help="SIGKILL + start cycles (default %(default)s)")
    p.add_argument("--pool", type=int, default=2, help="warm cells besides the build's (default %(default)s)")
    p.add_argument("--every", type=float, default=1.0, help="seconds between an adoption and the next kill")


class _Up:
    def __init__(self, home: Path, pool: int) -> None:
        self.home, self.pool = home, pool
        self.log_path = home / "up.log"
        self.proc = None

    def start(self, env=None) -> "_Up":
        self.out_path = self.home / "up.out"
        with open(self.log_path, "ab") as log, open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen([*HIVED, "up", "--home", str(self.home), "--pool", str(self.pool)],
                                         stdout=out, stderr=log, stdin=subprocess.DEVNULL, env=env)
        return self

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def wait_log(self, pattern: re.Pattern, after: int, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")[after:]
            m = pattern.search(text)
            if m:
                return m
            if self.proc.poll() is not None:
                raise BenchError(f"hived up exited ({self.proc.returncode}) before {what}: {text[-1500:]}")
            time.sleep(0.02)
        raise BenchError(f"timed out after {timeout:g} s waiting for {what}")

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0


def run(args) -> dict:
    if os.geteuid() != 0:
        raise BenchError("needs root: cells get cgroups and network namespaces")
    if args.restarts < 1:
        raise BenchError("--restarts must be at least 1")
    from hived.image.store import find_image

    if find_image() is None:
        raise BenchError("no cell image for this code: run `hived image build` (or `make image`)")
    home = Path(tempfile.mkdtemp(prefix="hvbr", dir="/tmp"))
    up = _Up(home, args.pool)
    follower = None
    env = dict(os.environ, HIVED_LOG="WARNING")
    lines = max(200, int((args.restarts * (args.every + 6) + 10) / 0.1))
    try:
        progress(f"hived up in {home}: {args.pool} warm cell(s), waiting for ready")
        up.start(env)
        _wait_ready(home, up, 300)
        follower = subprocess.Popen([*HIVED, "run", "--home", str(home), "--", "sh", "-c",
                                     f"for i in $(seq 1 {lines}); do echo \"line $i\"; sleep 0.1; done"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        first = follower.stdout.readline()
        if first != b"line 1\n":
            raise BenchError(f"the build did not start: {first!r} {follower.stderr.read()[-1000:]!r}")
        adopt_ms, adopted, phase_ms = [], [], []
        for i in range(args.restarts):
            time.sleep(args.every)
            up.kill()
            mark = up.log_size()
            up.start(env)
            m = up.wait_log(ADOPTED, mark, 120, f"restart {i + 1}'s adoption")
            adopted.append(int(m.group(1)))
            phase_ms.append(float(m.group(3)))
            adopt_ms.append(float(m.group(4)))
            progress(f"restart {i + 1}: adopted {m.group(1)} of {m.group(2)} cell(s), {m.group(4)} ms after start")
        out, err = follower.communicate(timeout=lines * 0.1 + 300)
        got = (first + out).decode(errors="replace").splitlines()
        want = [f"line {i}" for i in range(1, lines + 1)]
        missing = set(want) - set(got)
        lost_bytes = sum(len(x) + 1 for x in missing)
        duplicated = len(got) - len(set(got))
        builds_lost = 0 if follower.returncode == 0 else 1
        # baseline: the same home started fresh, nothing to adopt: start -> warm pool ready
        up.kill(signal.SIGINT)
        t0 = time.monotonic()
        up.start(env)
        _wait_ready(home, up, 300)
        baseline_ms = (time.monotonic() - t0) * 1000
        up.kill(signal.SIGINT)
    finally:
        if follower is not None and follower.poll() is None:
            follower.kill()
        up.kill(signal.SIGINT)
        shutil.rmtree(home, ignore_errors=True)
    p50 = percentile(adopt_ms, 50)
    return {
        "bench": "restart",
        "machine": machine_info(),
        "restarts": args.restarts,
        "cells_adopted": adopted,
        "adopt_ms": {"p50": round(p50, 1), "p95": round(percentile(adopt_ms, 95), 1),
                     "max": round(max(adopt_ms), 1), "all": adopt_ms},
        "adopt_phase_ms": {"p50": round(percentile(phase_ms, 50), 1), "max": round(max(phase_ms), 1)},
        "baseline_ready_ms": round(baseline_ms, 1),
        "baseline_over_adopt": round(baseline_ms / p50, 2) if p50 else None,
        "build_lines": lines,
        "output_lost_bytes": lost_bytes,
        "output_duplicated_lines": duplicated,
        "builds_lost": builds_lost,
        "build_stderr_tail": err.decode(errors="replace")[-500:] if builds_lost else "",
    }


def _wait_ready(home: Path, up: _Up, timeout: float) -> None:
    """Until hived up says "ready" (a warm cell per pool, the API answering)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if b"ready\n" in up.out_path.read_bytes():
            return
        if up.proc.poll() is not None:
            raise BenchError(f"hived up exited ({up.proc.returncode}): {up.log_path.read_text()[-1500:]}")
        time.sleep(0.05)
    raise BenchError(f"hived up not ready within {timeout:g} s")


def render(r: dict) -> str:
    a = r["adopt_ms"]
    return (f"restart: {r['restarts']} SIGKILL + start of hived up during a build, cells adopted {r['cells_adopted']}\n"
            f"  adopt (process start -> all cells adopted): p50 {a['p50']} ms, p95 {a['p95']} ms, max {a['max']} ms\n"
            f"  baseline (fresh start -> warm pool ready): {r['baseline_ready_ms']} ms "
            f"(x{r['baseline_over_adopt']} the adoption)\n"
            f"  output lost {r['output_lost_bytes']} bytes, duplicated lines {r['output_duplicated_lines']}, "
            f"builds lost {r['builds_lost']}")
