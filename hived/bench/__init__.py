"""`hived bench NAME`: benchmarks that run side by side with their baseline, one module each.

    hived bench codec    frame encode/decode, compiled vs pure-Python framing (codec.py)
    hived bench boot     cold boot vs bare QEMU, warm start through a box daemon (boot.py)
    hived bench control  control plane throughput and latency, simulated boxes (control.py)
    hived bench failover control plane replicas on PostgreSQL, the leader SIGKILLed (failover.py)
    hived bench repos    repository cache, cold vs warm (repos.py)
    hived bench cache    time to build start with an image and a repository, cold vs cached (cache.py)
    hived bench secure   Secure Compute provisioning beside plain builds (secure.py)
    hived bench peers    a build image from a neighbour box vs a shaped registry (peers.py)
    hived bench restart  hived up SIGKILLed during a build: cells adopted, nothing lost (restart.py)
    hived bench imageauth  a cached build image authorised per build: public, private (imageauth.py)
    hived bench plot REPORT.json FILE.png   the figure of a saved report (hived/benchplot.py)

`hived bench boot --plot FILE.png` and `hived bench control [--sweep] --plot FILE.png` draw
their report as well (latency CDFs; p50/p99 against builds/s).

Each module has `parser(p)`, `run(args) -> report` and `render(report) -> text`; what they
share (BenchError, statistics, machine facts, the JSON writer) is in common.py. Every result
is a distribution and a ratio to a baseline measured in the same run; `--json` prints exactly
one JSON object on stdout, progress goes to stderr. See benchmarks/README.md.
"""

import argparse
import importlib
import json
import sys
from pathlib import Path

from hived import benchplot
from hived.bench.common import BenchError, emit, progress
from hived.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK

BENCHMARKS = {
    "codec": "frame encode/decode: compiled vs pure-Python framing",
    "boot": "cold boot vs bare QEMU, and warm start through a box daemon",
    "control": "control plane scheduling throughput and latency, simulated boxes",
    "failover": "control plane replicas on PostgreSQL: the leader SIGKILLed while builds flow",
    "repos": "repository cache: clone cold vs warm (checkout image), and bundles",
    "secure": "Secure Compute: tunnel provisioning per cell, beside the same build without it",
    "cache": "time to build start with a build image and a repository, cold vs cached (real box)",
    "peers": "time to build start with a build image from a neighbour box vs a shaped registry (two real boxes)",
    "restart": "hived up SIGKILLed and started again during a build: time to adopt the cells, output lost",
    "imageauth": "what authorising a cached build image per build costs: public, private (memo, registry asked)",
}


def _module(name: str):
    return importlib.import_module(f"hived.bench.{name}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hived bench", description="benchmarks, each against its baseline in "
                                "the same run; --json prints one JSON object")
    sub = p.add_subparsers(dest="which", required=True)
    for name, help_text in BENCHMARKS.items():
        _module(name).parser(sub.add_parser(name, help=help_text))
    pl = sub.add_parser("plot", help="draw a report saved with --json (boot, control)")
    pl.add_argument("report", help="the JSON a benchmark printed with --json")
    pl.add_argument("figure", help="where the figure goes (.png, .svg, .pdf)")
    return p


def _plot_saved(args) -> int:
    """`hived bench plot REPORT.json FIGURE`."""
    try:
        report = json.loads(Path(args.report).read_text())
    except OSError as exc:
        print(f"hived bench plot: cannot read {args.report}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILED
    except ValueError as exc:
        print(f"hived bench plot: {args.report} is not JSON: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if not isinstance(report, dict):
        print(f"hived bench plot: {args.report} is not a benchmark report (a JSON object)", file=sys.stderr)
        return EXIT_FAILED
    try:
        progress(f"wrote {benchplot.plot(report, args.figure)}")
    except benchplot.PlotError as exc:
        print(f"hived bench plot: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.which == "plot":
        return _plot_saved(args)
    figure = getattr(args, "plot", "")
    if figure:
        try:
            benchplot.require()   # before a run of minutes, not after it
        except benchplot.PlotError as exc:
            print(f"hived bench {args.which}: {exc}", file=sys.stderr)
            return EXIT_FAILED
    bench = _module(args.which)
    try:
        report = bench.run(args)
    except BenchError as exc:
        print(f"hived bench {args.which}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"hived bench {args.which}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    emit(report, args.json, bench.render)
    if figure:
        try:
            progress(f"wrote {benchplot.plot(report, figure)}")
        except benchplot.PlotError as exc:
            print(f"hived bench {args.which}: {exc}", file=sys.stderr)
            return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
