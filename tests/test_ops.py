"""ops/: the Prometheus rules (checked and unit-tested by promtool) and the Grafana dashboard
(valid, current, and querying only metrics hived exports)."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RULES = sorted((ROOT / "ops" / "prometheus").glob("*.rules.yml"))
RULE_TESTS = sorted((ROOT / "ops" / "prometheus").glob("*.test.yml"))
DASHBOARD = ROOT / "ops" / "grafana" / "hived.json"

# Metrics a rule or the dashboard uses before the code defines them (none now: templates and
# output accounting landed). Drop a name once the code defines it.
PENDING: set[str] = set()


def _promtool() -> str:
    """promtool from PATH or beside this interpreter (make deps puts it in .venv/bin)."""
    beside = Path(sys.executable).parent / "promtool"
    found = shutil.which("promtool") or (str(beside) if beside.exists() else None)
    if found is None:
        pytest.skip("promtool not installed: `make deps` takes it from Debian's prometheus package")
    return found


def exported_metrics() -> dict[str, str]:
    """Metric name -> kind, for every metric the code defines."""
    pattern = re.compile(r"\b(Counter|Gauge|Histogram|Summary|GaugeMetricFamily|CounterMetricFamily)\(\s*"
                         r"\"(hived_\w+)\"")
    found = {}
    for path in (ROOT / "hived").rglob("*.py"):
        for kind, name in pattern.findall(path.read_text()):
            if kind.startswith("Counter") and not name.endswith("_total"):
                name += "_total"   # what prometheus_client exposes a counter as
            found[name] = kind
    return found


def queried_metrics(text: str) -> set[str]:
    """hived_* metric names in PromQL text, histogram series folded to their metric."""
    names = set(re.findall(r"(?<![\w:])hived_[a-z0-9_]+", text))
    return {re.sub(r"_(bucket|sum|count)$", "", n) if re.search(r"_(bucket|sum|count)$", n) else n for n in names}


def _known(name: str, exported: dict) -> bool:
    return name in exported or name in PENDING


def test_exported_metrics_are_found():
    """The scan above finds the metrics the box and the control plane define."""
    exported = exported_metrics()
    for name in ("hived_cell_boot_seconds", "hived_pool_warm_cells", "hived_builds_total",
                 "hived_control_schedule_seconds", "hived_control_queue_length", "hived_partition_cores",
                 "hived_build_warm_start_seconds"):
        assert name in exported, name
    assert exported["hived_cell_boot_seconds"] == "Histogram"
    assert exported["hived_control_leader_changes_total"] == "Counter"   # defined without _total


def test_pending_metrics_are_not_in_the_code_yet():
    """PENDING stays true: a name the code now defines is checked against the code instead."""
    assert not PENDING & set(exported_metrics())


def test_queried_metrics_fold_histograms():
    q = queried_metrics('histogram_quantile(0.9, rate(hived_cell_boot_seconds_bucket[5m])) / hived:x:rate5m')
    assert q == {"hived_cell_boot_seconds"}


def test_rules_use_only_exported_metrics():
    exported = exported_metrics()
    used = set().union(*(queried_metrics(p.read_text()) for p in RULES))
    assert used, "no hived metric in the rules?"
    unknown = sorted(n for n in used if not _known(n, exported))
    assert not unknown, f"rules query metrics nobody exports: {unknown}"


def test_promtool_check_rules():
    proc = subprocess.run([_promtool(), "check", "rules", *map(str, RULES)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_test_rules():
    assert RULE_TESTS
    proc = subprocess.run([_promtool(), "test", "rules", *map(str, RULE_TESTS)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT / "ops" / "prometheus")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_every_alert_has_a_unit_test():
    alerts = set(re.findall(r"^\s*- alert: (\w+)", "".join(p.read_text() for p in RULES), re.MULTILINE))
    tested = set(re.findall(r"alertname: (\w+)", "".join(p.read_text() for p in RULE_TESTS)))
    assert alerts and alerts <= tested, sorted(alerts - tested)


# ---- the Grafana dashboard ------------------------------------------------------------


def _targets(dash: dict) -> list[dict]:
    return [t for p in dash["panels"] for t in p.get("targets", [])]


def test_dashboard_is_current():
    proc = subprocess.run([sys.executable, "ops/grafana/make_dashboard.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_dashboard_is_valid():
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dash["uid"] and dash["title"]
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["type"] in ("timeseries", "heatmap"), panel["title"]
        assert panel["targets"], panel["title"]
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
    refs = [(p["id"], t["refId"]) for p in dash["panels"] for t in p.get("targets", [])]
    assert len(refs) == len(set(refs))
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for what in ("builds started", "outcomes", "queue", "warm cells", "cold boot", "restore", "warm start",
                 "cores", "memory", "output"):
        assert what in titles, what


def test_dashboard_queries_only_exported_metrics():
    exported = exported_metrics()
    used = set().union(*(queried_metrics(t["expr"]) for t in _targets(json.loads(DASHBOARD.read_text()))))
    unknown = sorted(n for n in used if not _known(n, exported))
    assert not unknown, f"the dashboard queries metrics nobody exports: {unknown}"


def test_dashboard_queries_parse(tmp_path):
    """Every panel query is PromQL Prometheus accepts (as recording rules for promtool, with
    Grafana's variables filled in)."""
    promtool = _promtool()
    rules = []
    for i, t in enumerate(_targets(json.loads(DASHBOARD.read_text()))):
        expr = t["expr"].replace("$__rate_interval", "5m").replace("$hive", ".*")
        rules.append({"record": f"dashboard:query:{i}", "expr": expr})
    path = tmp_path / "dashboard.rules.yml"
    # JSON is YAML: no YAML library needed.
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(rules)} rules found" in proc.stdout
