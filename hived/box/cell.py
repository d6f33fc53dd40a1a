r"""A cell's life on the box: one enum, one gatekeeper, every other transition an error.

    PENDING -> BOOTING -> WARM -> ASSIGNED -> RUNNING -> FINISHED -> DESTROYED
       \__________\_________\________\__________\-> FAILED -> DESTROYED

A cell never goes back to WARM: one build per cell, then it is destroyed.
"""

import enum
import secrets
import time
from dataclasses import dataclass, field


class CellState(enum.Enum):
    PENDING = "pending"      # host resources being prepared
    BOOTING = "booting"      # VMM started, waiting for cell.hello
    WARM = "warm"            # guest up, waiting in the pool
    ASSIGNED = "assigned"    # taken for a build, `run` sent
    RUNNING = "running"      # the build's process exists in the guest
    FINISHED = "finished"    # the build ended (any exit status)
    FAILED = "failed"        # the cell broke, or was stopped before finishing a build
    DESTROYED = "destroyed"  # nothing of it is left on the host


_NEXT = {
    CellState.PENDING: {CellState.BOOTING, CellState.FAILED},
    CellState.BOOTING: {CellState.WARM, CellState.FAILED},
    CellState.WARM: {CellState.ASSIGNED, CellState.FAILED},
    CellState.ASSIGNED: {CellState.RUNNING, CellState.FAILED},
    CellState.RUNNING: {CellState.FINISHED, CellState.FAILED},
    CellState.FINISHED: {CellState.DESTROYED},
    CellState.FAILED: {CellState.DESTROYED},
    CellState.DESTROYED: set(),
}


class IllegalTransition(RuntimeError):
    pass


def new_cell_id() -> str:
    # Short enough for interface names (IFNAMSIZ 15) with a prefix: "c" + 8 hex.
    return "c" + secrets.token_hex(4)


@dataclass
class Cell:
    id: str
    shape: str
    state: CellState = CellState.PENDING
    reason: str = ""
    build_id: str = ""
    pid: int = 0
    created: float = field(default_factory=time.monotonic)
    times: dict = field(default_factory=dict)  # state value -> monotonic time entered
    boot: dict = field(default_factory=dict)   # guest boot stages from cell.hello
    on_change: object = None                   # callable(cell, old, new), for metrics

    def __post_init__(self) -> None:
        self.times[self.state.value] = self.created

    def transition(self, new: CellState, reason: str = "") -> None:
        """The gatekeeper: the only place a cell's state changes."""
        if new not in _NEXT[self.state]:
            raise IllegalTransition(f"cell {self.id}: {self.state.value} -> {new.value} is not allowed")
        old, self.state = self.state, new
        self.times[new.value] = time.monotonic()
        if reason:
            self.reason = reason
        if self.on_change:
            self.on_change(self, old, new)

    @property
    def alive(self) -> bool:
        return self.state not in (CellState.FINISHED, CellState.FAILED, CellState.DESTROYED)

    def boot_seconds(self) -> float | None:
        if "warm" in self.times:
            return self.times["warm"] - self.times["pending"]
        return None
