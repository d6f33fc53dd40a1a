"""A cell's durable facts, one small file per cell (`cells/<id>/cell.json`), so that a box
daemon that starts again (after a crash, a kill -9, an upgrade) can find each cell, check
that it is still what the file says, and adopt it (hived/box/adopt.py).

Written atomically (a temporary file, then rename) at each step that changes what a new
daemon must know: warm, assigned, started, and every time the control plane confirms more
output (the offsets the cell resends from). No fsync: the file must outlive the daemon, not
the host; after a reboot there is no cell to adopt anyway.

Pure data and file I/O; nothing here touches a cell.
"""

import dataclasses
import json
import os
from pathlib import Path

VERSION = 1
NAME = "cell.json"


class RecordError(Exception):
    """A state file that cannot be used; the message names the file and what is wrong."""


@dataclasses.dataclass
class BuildFacts:
    """The build a cell runs, and how far its output is safe (stored where it goes)."""
    id: str
    via: str                      # "control" (a control plane's assignment) or "client" (the box's socket)
    lease: int = 0
    shape: str = ""
    customer: str = ""
    timeout_s: float = 0.0
    assigned_at: float = 0.0      # wall clock
    started: bool = False         # the cell said `started`
    secure: bool = False          # a Secure Compute build (its tunnel's keys live only in the daemon)
    cell_next: int = 0            # the first cell output seq not yet safe: the cell resends from here
    control_next: int = 0         # the control plane's seq that chunk gets (build.output seq)
    received: int = 0             # output bytes safe so far
    stream_bytes: tuple = (0, 0)  # stdout, stderr bytes safe so far


@dataclasses.dataclass
class CellRecord:
    cell_id: str
    pool: str                     # the warm pool it belongs to ("shape" or "shape@digest")
    shape: str
    origin: str                   # boot / restore
    vmm_pid: int
    vmm_start_ticks: int          # with the pid, names the VMM process for good
    alloc: dict                   # hived.box.partition.Allocation fields
    net: dict | None = None       # hived.box.network.CellNetInfo fields but the tap fd
    cgroup: bool = False
    image: str = ""               # digest of the build image attached, if any
    template: str = ""
    boot: dict = dataclasses.field(default_factory=dict)
    state: str = "warm"           # warm / assigned / running
    build: BuildFacts | None = None
    version: int = VERSION

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict, where: str) -> "CellRecord":
        if not isinstance(data, dict) or data.get("version") != VERSION:
            raise RecordError(f"{where}: not a version {VERSION} cell record")
        fields = {f.name for f in dataclasses.fields(cls)}
        try:
            build = data.get("build")
            rec = cls(**{k: v for k, v in data.items() if k in fields and k != "build"},
                      build=BuildFacts(**{**build, "stream_bytes": tuple(build.get("stream_bytes", (0, 0)))})
                      if build else None)
        except TypeError as exc:
            raise RecordError(f"{where}: {exc}") from None
        if not isinstance(rec.vmm_pid, int) or rec.vmm_pid <= 0 or not isinstance(rec.vmm_start_ticks, int):
            raise RecordError(f"{where}: no VMM pid and start time")
        if rec.state not in ("warm", "assigned", "running") or (rec.state != "warm") != (rec.build is not None):
            raise RecordError(f"{where}: state {rec.state!r} does not fit build {rec.build!r}")
        return rec


def path(cell_dir: Path) -> Path:
    return cell_dir / NAME


def write(cell_dir: Path, record: CellRecord) -> None:
    """Atomically: a reader sees the old record or the new one, never half of one."""
    final = path(cell_dir)
    tmp = final.with_name(NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(record.to_json(), f, separators=(",", ":"))
    os.replace(tmp, final)


def read(cell_dir: Path) -> CellRecord:
    where = str(path(cell_dir))
    try:
        with open(where) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise RecordError(f"{where}: missing (the cell never got warm, or its daemon died while making it)") from None
    except (OSError, ValueError) as exc:
        raise RecordError(f"{where}: unreadable: {exc}") from None
    return CellRecord.from_json(data, where)
