"""hived/benchplot.py and `--plot`: figures drawn for real (matplotlib, Agg) from report dicts,
and from a real `hived bench control` run."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="matplotlib not installed: pip install 'hived[plot]' (make deps does)")

from hived import benchplot  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _dist(values: list[float]) -> dict:
    s = sorted(values)
    return {"p50": s[len(s) // 2], "p95": s[int(len(s) * 0.95)], "min": s[0], "max": s[-1], "n": len(s),
            "samples": values}


def boot_report(restore: bool) -> dict:
    rng = random.Random(7)
    r = {"benchmark": "boot", "accelerator": "tcg", "machine": {"nproc": 2, "cpu_model": "test CPU"},
         "cold_boot_ms": _dist([rng.gauss(3850, 200) for _ in range(10)]),
         "bare_qemu_ms": _dist([rng.gauss(1920, 100) for _ in range(10)]),
         "warm_start_ms": _dist([rng.gauss(92, 8) for _ in range(10)])}
    if restore:
        r["restore_ms"] = _dist([rng.gauss(60, 5) for _ in range(10)])
    return r


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, "not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.mark.parametrize("restore", [False, True])
def test_boot_figure(tmp_path, restore):
    report = boot_report(restore)
    labels = [label for label, _ in benchplot.boot_series(report)]
    assert any(lb.startswith("restored from a template") for lb in labels) is restore   # only what the JSON has
    assert len(labels) == (4 if restore else 3)
    cold = next(lb for lb in labels if lb.startswith("cold boot"))
    assert f"p50 {report['cold_boot_ms']['p50']:,.0f} ms, n=10" in cold   # the report's own p50
    out = benchplot.plot(report, tmp_path / "boot.png")
    assert _png_size(out) == (800, 450)


def test_boot_figure_from_the_json_round_trip(tmp_path):
    """What `--json` printed, read back, draws the same."""
    report = json.loads(json.dumps(boot_report(False)))
    assert _png_size(benchplot.plot_boot(report, tmp_path / "b.png")) == (800, 450)


def control_report(sweep: bool) -> dict:
    r = {"benchmark": "control", "boxes": 100, "synchronous": "full", "builds_per_s": 6949.0,
         "machine": {"nproc": 2, "cpu_model": "test CPU"},
         "latency": {"rate_per_s": 2000.0, "schedule_ms": {"p50": 0.8, "p90": 1.5, "p99": 2.5, "max": 4.0, "n": 9}}}
    if sweep:
        r["latency_sweep"] = [{"rate_per_s": rate, "schedule_ms": {"p50": p50, "p90": p50 * 2, "p99": p50 * 3,
                                                                     "max": p50 * 5, "n": 100}}
                              for rate, p50 in ((700, 0.6), (1700, 0.7), (3500, 0.9), (5200, 3.0), (6200, 20.0))]
    return r


@pytest.mark.parametrize("sweep", [False, True])
def test_control_figure(tmp_path, sweep):
    report = control_report(sweep)
    points, main = benchplot._paced_runs(report)
    assert len(points) == (5 if sweep else 0) and main == (2000.0, report["latency"]["schedule_ms"])
    assert _png_size(benchplot.plot(report, tmp_path / "control.png")) == (800, 450)


def test_svg_too(tmp_path):
    out = benchplot.plot(control_report(True), tmp_path / "control.svg")
    assert out.read_text().lstrip().startswith("<?xml")


@pytest.mark.parametrize("report, why", [
    ({"benchmark": "boot"}, "no samples"),
    ({"benchmark": "control", "builds_per_s": 1.0}, "no latency runs"),
    ({"benchmark": "codec"}, "no figure for benchmark 'codec'"),
])
def test_reports_without_a_figure(tmp_path, report, why):
    with pytest.raises(benchplot.PlotError, match=why):
        benchplot.plot(report, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_bad_figure_names(tmp_path):
    with pytest.raises(benchplot.PlotError, match=r"name the figure \.png, \.svg or \.pdf"):
        benchplot.plot(control_report(False), tmp_path / "x.txt")
    with pytest.raises(benchplot.PlotError, match="cannot write"):
        benchplot.plot(control_report(False), tmp_path / "no-such-dir" / "x.png")


def _hived(*args, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "hived", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_bench_plot_command(tmp_path):
    saved = tmp_path / "boot.json"
    saved.write_text(json.dumps(boot_report(True)))
    proc = _hived("bench", "plot", str(saved), str(tmp_path / "boot.png"))
    assert proc.returncode == 0, proc.stderr
    assert _png_size(tmp_path / "boot.png") == (800, 450)


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not JSON"),
    ("[1, 2]", "is not a benchmark report"),
    ('{"benchmark": "codec"}', "no figure for benchmark"),
])
def test_bench_plot_command_bad_input(tmp_path, content, message):
    saved = tmp_path / "r.json"
    saved.write_text(content)
    proc = _hived("bench", "plot", str(saved), str(tmp_path / "r.png"))
    assert proc.returncode == 1
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_bench_control_plot_for_real(tmp_path):
    """The real control plane benchmark (small: 5 simulated boxes) with --sweep --plot:
    the JSON has the sweep and the figure is drawn from it."""
    figure = tmp_path / "control.png"
    proc = _hived("bench", "control", "--json", "--boxes", "5", "--builds", "300", "--warm", "2", "--sweep",
                  "--plot", str(figure))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert len(report["latency_sweep"]) == 5
    rates = [r["rate_per_s"] for r in report["latency_sweep"]]
    assert rates == sorted(rates) and rates[-1] < report["builds_per_s"]
    assert f"wrote {figure}" in proc.stderr
    assert _png_size(figure) == (800, 450)


def test_plot_without_matplotlib_fails_before_the_run(tmp_path):
    """No matplotlib: one line naming the fix, before a benchmark of minutes starts (the boot
    benchmark would otherwise boot cells first)."""
    code = ("import sys; sys.modules['matplotlib'] = None; from hived.bench import main; "
            f"sys.exit(main(['boot', '--plot', {str(tmp_path / 'b.png')!r}]))")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("hived bench boot: --plot needs matplotlib: pip install 'hived[plot]' "
                                   "(make deps installs it)")
