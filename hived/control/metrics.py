"""The control plane's Prometheus metrics, on a registry of its own (tests run several hives)."""

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from hived.control.store import GAP_REASONS, STATES


class _Live:
    """Gauges read at scrape time from the store and the scheduler (never stale)."""

    def __init__(self, control) -> None:
        self.control = control

    def collect(self):
        cp = self.control
        builds = GaugeMetricFamily("hived_control_builds", "Builds of this hive by state", labels=["state"])
        counts = cp.store.count_by_state() if cp.store else dict.fromkeys(STATES, 0)
        for state in STATES:
            builds.add_metric([state], counts.get(state, 0))
        yield builds
        queue = GaugeMetricFamily("hived_control_queue_length", "Builds waiting for a warm cell, by shape",
                                  labels=["shape"])
        lengths = cp.scheduler.queue_lengths()
        for shape in sorted(set(cp.config.shapes) | set(lengths)):
            queue.add_metric([shape], lengths.get(shape, 0))
        yield queue
        yield GaugeMetricFamily("hived_control_boxes_connected", "Boxes registered and heartbeating",
                                value=cp.scheduler.boxes_connected())
        yield GaugeMetricFamily("hived_control_is_leader", "1 if this control plane leads its hive (schedules), "
                                "0 if it stands by", value=1 if cp.leading else 0)
        gaps = CounterMetricFamily("hived_output_gaps", "Markers in build logs where output was cut on "
                                   "purpose or is missing (since start), by reason", labels=["reason"])
        cut = CounterMetricFamily("hived_output_cut_bytes", "Output bytes those markers stand for, where "
                                  "known (since start), by reason", labels=["reason"])
        store_gaps = getattr(cp.store, "gaps", {})
        store_cut = getattr(cp.store, "cut_bytes", {})
        for reason in GAP_REASONS:
            gaps.add_metric([reason], store_gaps.get(reason, 0))
            cut.add_metric([reason], store_cut.get(reason, 0))
        yield gaps
        yield cut


class ControlMetrics:
    def __init__(self, control) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.schedule_seconds = Histogram(
            "hived_control_schedule_seconds", "Submit to assignment to a box (includes queueing)",
            registry=r, buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                                 5, 10, 30, 60, 120, 300),
        )
        self.finished = Counter("hived_control_builds_finished_total", "Builds that ended, by state",
                                ["state"], registry=r)
        self.refused = Counter("hived_control_stale_messages_total",
                               "Messages from boxes refused for a stale lease", registry=r)
        self.leader_changes = Counter(
            "hived_control_leader_changes", "Times this control plane took the lead of its hive (summed over "
            "a hive's replicas: its leader changes)", registry=r)
        r.register(_Live(control))

    def render(self) -> bytes:
        return generate_latest(self.registry)
