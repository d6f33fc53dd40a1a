"""Figures of benchmark reports: `hived bench boot|control --plot FILE.png`, and
`hived bench plot REPORT.json FILE.png` for a report saved with --json.

Takes the report dict a benchmark returns (the same JSON `--json` prints) and draws it
with matplotlib (the optional `plot` extra: `pip install 'hived[plot]'`; `make deps`
installs it), headless (Agg), so it works on a box without a display.
"""

from __future__ import annotations

from pathlib import Path

# Start kinds of `bench boot`, in the order they are drawn: key in the report, label.
BOOT_SERIES = (
    ("bare_qemu_ms", "bare QEMU (baseline)"),
    ("cold_boot_ms", "cold boot -> cell.hello"),
    ("restore_ms", "restored from a template"),
    ("warm_start_ms", "warm start -> build started"),
)


class PlotError(Exception):
    """A figure that cannot be drawn: one line, naming the cause and the fix."""


def require() -> None:
    """Fail before a benchmark runs, not after, when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotError("--plot needs matplotlib: pip install 'hived[plot]' (make deps installs it)") from None


def _pyplot():
    require()
    import matplotlib

    matplotlib.use("Agg")   # no display on a box; also what the tests use
    import matplotlib.pyplot as plt

    return plt


def _samples(entry) -> list[float]:
    if isinstance(entry, dict):
        return sorted(float(v) for v in entry.get("samples") or [])
    return []


def _machine(report: dict) -> str:
    """The machine in a few words, with its load (a busy machine draws slower curves)."""
    m = report.get("machine") or {}
    load = m.get("loadavg_at_start")
    parts = [f"{m['nproc']} CPUs" if m.get("nproc") else "", report.get("accelerator", ""),
             f"load {load[0]:.1f}" if load else ""]
    return ", ".join(p for p in parts if p)


def boot_series(report: dict) -> list[tuple[str, list[float]]]:
    """(label with the report's own p50, sorted samples) of every start kind the report has
    samples of."""
    series = []
    for key, label in BOOT_SERIES:
        s = _samples(report.get(key))
        if s:
            p50 = report[key].get("p50")
            p50 = s[(len(s) - 1) // 2] if p50 is None else float(p50)
            series.append((f"{label}: p50 {p50:,.0f} ms, n={len(s)}", s))
    return series


def plot_boot(report: dict, path: str | Path) -> Path:
    """Latency CDFs of every start kind the report has (a kind it lacks is left out:
    `restore_ms` comes with snapshot templates)."""
    series = boot_series(report)
    if not series:
        raise PlotError("the boot report has no samples (cold_boot_ms, bare_qemu_ms, restore_ms, warm_start_ms)")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    try:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        for label, s in series:
            n = len(s)
            # A step CDF: the fraction of starts done within x ms (from 0 at the fastest).
            ax.step([s[0], *s], [0.0, *((i + 1) / n for i in range(n))], where="post", label=label)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("milliseconds (log)")
        ax.set_ylabel("fraction of starts")
        ax.set_ylim(0, 1.02)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
        busy = " - machine busy during the run" if report.get("warning") else ""
        ax.set_title(f"hived bench boot: start latency ({_machine(report)}){busy}", fontsize=9)
        fig.tight_layout()
        return _save(fig, path)
    finally:
        plt.close(fig)


def _paced_runs(report: dict) -> tuple[list[tuple[float, dict]], tuple[float, dict] | None]:
    """(the sweep's (builds/s, schedule_ms) sorted by rate, the main latency run or None)."""
    sweep = sorted(((float(r["rate_per_s"]), r["schedule_ms"]) for r in report.get("latency_sweep") or []
                    if r["schedule_ms"].get("p99") is not None), key=lambda p: p[0])
    lat = report.get("latency")
    main = None
    if lat and lat.get("schedule_ms", {}).get("p99") is not None:
        main = (float(lat["rate_per_s"]), lat["schedule_ms"])
    return sweep, main


def plot_control(report: dict, path: str | Path) -> Path:
    """p50 and p99 schedule latency against the rate builds came in (the --sweep runs as
    lines, the main latency run as its own markers); the saturation throughput as the
    wall on the right."""
    sweep, main = _paced_runs(report)
    if not sweep and main is None:
        raise PlotError("the control report has no latency runs (latency, latency_sweep)")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    try:
        if sweep:
            rates = [r for r, _ in sweep]
            ax.plot(rates, [d["p99"] for _, d in sweep], "o-", color="C0", label="p99 (sweep)")
            ax.plot(rates, [d["p50"] for _, d in sweep], "s--", color="C1", label="p50 (sweep)")
        if main is not None:
            ax.plot([main[0]], [main[1]["p99"]], "D", color="C0", fillstyle="none", markersize=9,
                    label=f"p99 at {main[0]:,.0f} builds/s (latency run)")
            ax.plot([main[0]], [main[1]["p50"]], "D", color="C1", fillstyle="none", markersize=9,
                    label=f"p50 at {main[0]:,.0f} builds/s (latency run)")
        sat = report.get("builds_per_s")
        if sat:
            ax.axvline(float(sat), color="grey", linestyle=":", label=f"saturation {float(sat):,.0f} builds/s")
        ax.set_yscale("log")
        ax.set_xlabel("builds/s submitted (open loop)")
        ax.set_ylabel("submit -> assigned to a box, ms (log)")
        ax.set_xlim(left=0)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
        busy = " - machine busy during the run" if report.get("warning") else ""
        ax.set_title(f"hived bench control: {report.get('boxes', '?')} simulated boxes, "
                     f"synchronous={report.get('synchronous', '?')} ({_machine(report)}){busy}", fontsize=9)
        fig.tight_layout()
        return _save(fig, path)
    finally:
        plt.close(fig)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise PlotError(f"{path}: name the figure .png, .svg or .pdf")
    try:
        fig.savefig(path)
    except OSError as exc:
        raise PlotError(f"cannot write {path}: {exc.strerror}") from None
    return path


PLOTTERS = {"boot": plot_boot, "control": plot_control}


def plot(report: dict, path: str | Path) -> Path:
    """Draws a report of any benchmark that has a figure."""
    which = report.get("benchmark")
    if which not in PLOTTERS:
        raise PlotError(f"no figure for benchmark {which!r} (figures: {', '.join(PLOTTERS)})")
    return PLOTTERS[which](report, path)
