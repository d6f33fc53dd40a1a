"""Writes ops/grafana/hived.json, the Grafana dashboard of a hive (Grafana 9+, a Prometheus
data source; import it, or provision it from this directory).

    python ops/grafana/make_dashboard.py          # rewrite hived.json
    python ops/grafana/make_dashboard.py --check  # exit 1 if hived.json is not what this writes

The panels are data here so the dashboard stays one reviewable list; tests/test_ops.py
checks that every metric a panel queries exists in the code (or is on the list of
metrics being added, ops/README.md).
"""

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "hived.json"
HIVE = 'hive=~"$hive"'
DS = {"type": "prometheus", "uid": "${datasource}"}

# (title, unit, [(expr, legend)], kind); kind: "timeseries", "stacked" or "heatmap".
ROWS = [
    ("Builds", [
        ("Builds started /s (warm cell taken, by shape)", "reqps",
         [(f"sum by (shape) (rate(hived_build_warm_start_seconds_count{{{HIVE}}}[$__rate_interval]))",
           "{{shape}}")], "timeseries"),
        ("Build outcomes on the boxes /s (by result)", "reqps",
         [(f"sum by (result) (rate(hived_builds_total{{{HIVE}}}[$__rate_interval]))", "{{result}}")], "stacked"),
        ("Builds ended in the hive /s (by state)", "reqps",
         [(f"sum by (state) (rate(hived_control_builds_finished_total{{{HIVE}}}[$__rate_interval]))", "{{state}}")],
         "stacked"),
        ("Infrastructure failures (share of builds)", "percentunit",
         [(f'sum(rate(hived_builds_total{{{HIVE},result=~"spawn_failed|cell_failed|no_capacity|secure_compute"}}'
           f"[$__rate_interval])) / sum(rate(hived_builds_total{{{HIVE}}}[$__rate_interval]))", "infrastructure")],
         "timeseries"),
    ]),
    ("Queue", [
        ("Queued builds (by shape)", "short",
         [(f"sum by (shape) (hived_control_queue_length{{{HIVE}}})", "{{shape}}")], "stacked"),
        ("Live builds (by state)", "short",
         [(f'sum by (state) (hived_control_builds{{{HIVE},state=~"queued|assigned|running"}})', "{{state}}")],
         "stacked"),
        ("Queue wait: submit to assignment", "s",
         [(f"histogram_quantile({q}, sum by (le) (rate(hived_control_schedule_seconds_bucket{{{HIVE}}}"
           f"[$__rate_interval])))", f"p{int(q * 100)}") for q in (0.5, 0.95, 0.99)], "timeseries"),
    ]),
    ("Cells", [
        ("Warm cells (by shape) against the pool target", "short",
         [(f"sum by (shape) (hived_pool_warm_cells{{{HIVE}}})", "{{shape}} warm"),
          (f"sum by (shape) (hived_pool_target_cells{{{HIVE}}})", "{{shape}} target")], "timeseries"),
        ("Cells by state", "short",
         [(f'sum by (state) (hived_cells{{{HIVE},state!="destroyed"}})', "{{state}}")], "stacked"),
        ("Cell start failures /s (by shape, boot or restore)", "reqps",
         [(f"sum by (shape, origin) (rate(hived_cell_start_failures_total{{{HIVE}}}[$__rate_interval]))",
           "{{shape}} {{origin}}"),
          (f"sum by (phase) (rate(hived_cell_failures_total{{{HIVE}}}[$__rate_interval]))", "failed in {{phase}}")],
         "timeseries"),
        ("Cell starts /s (boot from scratch or restore from a template)", "reqps",
         [(f"sum by (origin) (rate(hived_cell_starts_total{{{HIVE}}}[$__rate_interval]))", "{{origin}}")],
         "stacked"),
    ]),
    ("Latency", [
        ("Cold boot (spawn to cell.hello)", "s",
         [(f"sum by (le) (increase(hived_cell_boot_seconds_bucket{{{HIVE}}}[$__rate_interval]))", "{{le}}")],
         "heatmap"),
        ("Restore from a template", "s",
         [(f"sum by (le) (increase(hived_cell_restore_seconds_bucket{{{HIVE}}}[$__rate_interval]))", "{{le}}")],
         "heatmap"),
        ("Warm start (cell assigned to build process started)", "s",
         [(f"sum by (le) (increase(hived_build_warm_start_seconds_bucket{{{HIVE}}}[$__rate_interval]))",
           "{{le}}")], "heatmap"),
    ]),
    ("Boxes", [
        ("Cell cores per box: in use and free", "short",
         [(f'sum by (instance, use) (hived_partition_cores{{{HIVE},use=~"cells_used|cells_free"}})',
           "{{instance}} {{use}}")], "stacked"),
        ("Cell memory per box: used of allocatable", "bytes",
         [(f"sum by (instance, use) (hived_partition_memory_bytes{{{HIVE}}})", "{{instance}} {{use}}")],
         "timeseries"),
        ("Boxes connected to the control plane", "short",
         [(f"sum by (instance) (hived_control_boxes_connected{{{HIVE}}})", "{{instance}}")], "timeseries"),
        ("Control plane leader", "short",
         [(f"hived_control_is_leader{{{HIVE}}}", "{{instance}} leader"),
          (f"increase(hived_control_leader_changes_total{{{HIVE}}}[1h])", "{{instance}} changes / 1 h")],
         "timeseries"),
    ]),
    ("Output", [
        ("Build output through the boxes", "Bps",
         [(f"sum by (instance) (rate(hived_build_output_bytes_total{{{HIVE}}}[$__rate_interval]))", "{{instance}}")],
         "stacked"),
        ("Output gaps /s and bytes cut /s (by reason)", "short",
         [(f"sum by (reason) (rate(hived_output_gaps_total{{{HIVE}}}[$__rate_interval]))", "gaps: {{reason}}"),
          (f"sum by (reason) (rate(hived_output_cut_bytes_total{{{HIVE}}}[$__rate_interval]))",
           "bytes cut: {{reason}}")],
         "timeseries"),
    ]),
]


def _panel(pid: int, title: str, unit: str, queries: list, kind: str, x: int, y: int) -> dict:
    targets = [{"datasource": DS, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i),
                **({"format": "heatmap"} if kind == "heatmap" else {})}
               for i, (expr, legend) in enumerate(queries)]
    panel = {"id": pid, "title": title, "datasource": DS, "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
             "targets": targets}
    if kind == "heatmap":
        panel.update(type="heatmap", options={"calculate": False, "yAxis": {"unit": unit},
                                              "color": {"scheme": "Oranges", "mode": "scheme"},
                                              "cellGap": 1, "tooltip": {"show": True}})
    else:
        custom = {"fillOpacity": 30 if kind == "stacked" else 0,
                  "stacking": {"mode": "normal" if kind == "stacked" else "none"}}
        panel.update(type="timeseries", fieldConfig={"defaults": {"unit": unit, "custom": custom}, "overrides": []},
                     options={"legend": {"displayMode": "list", "placement": "bottom"},
                              "tooltip": {"mode": "multi"}})
    return panel


def dashboard() -> dict:
    panels, pid, y = [], 1, 0
    for row_title, row in ROWS:
        panels.append({"id": pid, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid, y = pid + 1, y + 1
        for i, (title, unit, queries, kind) in enumerate(row):
            panels.append(_panel(pid, title, unit, queries, kind, x=12 * (i % 2), y=y + 8 * (i // 2)))
            pid += 1
        y += 8 * ((len(row) + 1) // 2)
    return {
        "title": "hived: hive",
        "uid": "hived-hive",
        "description": "Generated by ops/grafana/make_dashboard.py: edit that, not this file.",
        "tags": ["hived"],
        "schemaVersion": 37,
        "version": 1,
        "editable": True,
        "timezone": "utc",
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
            {"name": "hive", "type": "query", "datasource": DS, "label": "hive", "includeAll": True, "multi": True,
             "query": {"query": "label_values(hived_control_builds, hive)", "refId": "hive"},
             "definition": "label_values(hived_control_builds, hive)", "refresh": 2, "allValue": ".*",
             "current": {"text": "All", "value": "$__all"}},
        ]},
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, sort_keys=False) + "\n"


if __name__ == "__main__":
    text = render()
    if sys.argv[1:] == ["--check"]:
        if OUT.read_text() != text:
            sys.exit(f"{OUT} is stale: run python ops/grafana/make_dashboard.py")
        sys.exit(0)
    OUT.write_text(text)
    print(f"wrote {OUT}")
