"""The box's Prometheus metrics, on a registry of its own (so tests can run several boxes)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

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
        for state in CellState:
            self.cells.labels(state.value)
        self._server = None

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
