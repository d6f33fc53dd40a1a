"""What every benchmark shares: its one error, progress lines, statistics, machine facts and
the one way a report is written (JSON on stdout, or text)."""

import json
import os
import platform
import sys
from collections.abc import Callable


class BenchError(Exception):
    """A benchmark that cannot produce a number: one line, naming the cause and the fix."""


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- statistics ------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _r(x: float, digits: int = 1) -> float:
    return round(x, digits)


def summary(values: list[float], quantiles: tuple[int, ...] = (50, 95), digits: int = 1,
            with_min: bool = False) -> dict:
    """{"p50": .., "p95": .., ["min": ..,] "max": .., "n": ..} of `values` (None for each
    figure when there are no values)."""
    out: dict = {}
    for q in quantiles:
        out[f"p{q}"] = round(percentile(values, q), digits) if values else None
    if with_min:
        out["min"] = round(min(values), digits) if values else None
    out["max"] = round(max(values), digits) if values else None
    out["n"] = len(values)
    return out


def dist_ms(values: list[float]) -> dict:
    """p50/p95/min/max and the samples, in milliseconds (values are milliseconds)."""
    return {
        "p50": _r(percentile(values, 50)),
        "p95": _r(percentile(values, 95)),
        "min": _r(min(values)),
        "max": _r(max(values)),
        "n": len(values),
        "samples": [_r(v) for v in values],
    }


# -- machine ---------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": usable,
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "loadavg_at_start": load,
    }


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def emit(report: dict, as_json: bool, render: Callable[[dict], str]) -> None:
    """The one writer: exactly one JSON object on stdout with --json, else the rendered text."""
    print(json.dumps(report, indent=2) if as_json else render(report))
