"""The box's Prometheus metrics, on a registry of its own (so tests can run several boxes)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

from hived.box.cell import CellState


class BoxMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.cells = Gauge("hived_cells", "Cells on this box by state", ["state"], registry=r)
        self.boot_seconds = Histogram(
            "hived_cell_boot_seconds", "Spawn to cell.hello", ["shape"], registry=r,
            buckets=(0.25, 0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 20, 40, 80),
        )
        self.builds = Counter("hived_builds_total", "Builds by result", ["result"], registry=r)
        self.pool_size = Gauge("hived_pool_warm_cells", "Warm cells per shape", ["shape"], registry=r)
        self.pool_target = Gauge("hived_pool_target_cells", "Warm pool target per shape", ["shape"],
                                 registry=r)
        self.cell_failures = Counter("hived_cell_failures_total", "Cells that failed, by phase",
                                     ["phase"], registry=r)
        # Build request taken by a warm cell -> build process started in the guest (its
        # _count is the builds started); TCG: ~0.1 s bare, ~0.4 s in a build container.
        self.warm_start_seconds = Histogram(
            "hived_build_warm_start_seconds", "Warm cell assigned to build process started, by shape", ["shape"],
            registry=r, buckets=(0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.5, 3, 6, 12, 30),
        )
        self.output_bytes = Counter("hived_build_output_bytes_total", "Build output passed on by the box",
                                    registry=r)
        # Cells that became warm, by how: "boot" or "restore" (a template's clone). Alert rules
        # and dashboards use these names.
        self.starts = Counter("hived_cell_starts_total", "Cells started, by shape and origin",
                              ["shape", "origin"], registry=r)
        self.start_failures = Counter("hived_cell_start_failures_total",
                                      "Cells that failed to start, by shape and origin (boot, restore, template)",
                                      ["shape", "origin"], registry=r)
        self.restore_seconds = Histogram(
            "hived_cell_restore_seconds", "VMM start to cell.hello of a cell restored from a template",
            ["shape"], registry=r,
            buckets=(0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5),
        )
        self.output_gaps = Counter("hived_box_output_gaps_total", "Markers put into build logs on this box "
                                   "(output cut on purpose, or missing), by reason", ["reason"], registry=r)
        self.adoptions = Counter("hived_cell_adoptions_total", "Cells a previous box daemon left running, at "
                                 "this daemon's start: adopted (warm or running a build) or not (removed, with why)",
                                 ["result"], registry=r)
        # [box] secure_prestart (hived/box/prestart.py): interfaces started with warm cells, and how
        # each Secure Compute tunnel got its interface.
        self.wg_prestarts = Counter("hived_wireguard_prestarts_total", "WireGuard interfaces pre-started with "
                                    "warm cells, by result (ok, failed)", ["result"], registry=r)
        self.secure_interfaces = Counter("hived_secure_tunnel_interfaces_total", "Secure Compute tunnels by how "
                                         "their interface came (prestarted, started at assignment)",
                                         ["interface"], registry=r)
        for result in ("ok", "failed"):
            self.wg_prestarts.labels(result)
        for how in ("prestarted", "started"):
            self.secure_interfaces.labels(how)
        for state in CellState:
            self.cells.labels(state.value)
        for result in ("warm", "running", "not_adopted"):
            self.adoptions.labels(result)
        self._server = None

    def watch_partition(self, partition) -> None:
        """Export how the box divides itself (read at scrape time from the partition)."""
        self.registry.register(_PartitionCollector(partition))

    def on_cell_change(self, cell, old: CellState, new: CellState) -> None:
        self.cells.labels(old.value).dec()
        self.cells.labels(new.value).inc()

    def serve(self, addr: str, port: int) -> int:
        """Start the /metrics HTTP server; returns the port it listens on."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        self._server = server
        return server.server_address[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class _PartitionCollector:
    """hived_partition_cores{use} and hived_partition_memory_bytes{use}: the box's own
    cores, the cell cores in use and free; memory the cells may use and use."""

    def __init__(self, partition) -> None:
        self.partition = partition

    def collect(self):
        d = self.partition.describe()
        cores = GaugeMetricFamily("hived_partition_cores", "Host cores: the box daemon's, cells' in use, cells' free",
                                  labels=["use"])
        cores.add_metric(["box"], len(d["box_cores"]))
        cores.add_metric(["cells_used"], len(d["cell_cores"]) - len(d["free_cores"]))
        cores.add_metric(["cells_free"], len(d["free_cores"]))
        yield cores
        memory = GaugeMetricFamily("hived_partition_memory_bytes", "Memory the cells may use and use",
                                   labels=["use"])
        memory.add_metric(["allocatable"], d["memory_mib"]["allocatable"] << 20)
        memory.add_metric(["used"], d["memory_mib"]["used"] << 20)
        yield memory
