"""Per-cell cgroups, v1 and v2 behind one interface, filesystem root passed in.

Each cell gets `<root>/[<controller>/]<parent>/<cell id>`; `parent` is per box, so a
restarted daemon finds its leftovers by listing it. The VMM joins through the paths
in `procs_files()` between fork and exec (see hived.vmm.qemu).
"""

import abc
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path


class CgroupError(Exception):
    pass


@dataclass(frozen=True)
class CellLimits:
    memory_bytes: int = 0         # 0: no limit
    cpus: str = ""                # cpuset list, "" = inherit
    pids_max: int = 0
    disk_bytes_s: int = 0         # io/blkio throttle on `disk_dev`, each direction; 0: none
    disk_iops: int = 0
    disk_dev: str = ""            # "major:minor" of the device holding the cells' disks


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise CgroupError(f"cannot write {value!r} to {path}: {exc.strerror}") from None


def _enable(d: Path, controllers: list[str]) -> None:
    """Enable `controllers` for the children of cgroup `d` (v2), writing only those not yet on."""
    try:
        on = set((d / "cgroup.subtree_control").read_text().split())
    except FileNotFoundError:  # a directory just made under a stand-in root (tests)
        on = set()
    todo = [c for c in controllers if c not in on]
    if todo:
        _write(d / "cgroup.subtree_control", " ".join(f"+{c}" for c in todo))


def _weigh(d: Path, knob: str, value: int) -> None:
    """Write a CPU weight knob of cgroup `d` unless it holds `value` already (no controller there: skip)."""
    path = d / knob
    try:
        if int(path.read_text()) == value:
            return
    except (FileNotFoundError, ValueError):
        return
    _write(path, str(value))


class Cgroups(abc.ABC):
    version = 0

    def __init__(self, root: Path, parent: str, anchor: str = "", cpu_weight: int = 0) -> None:
        self.root = Path(root)
        self.parent = parent
        # The highest cgroup (relative to root) whose attributes the box may write: "" is the
        # root itself; under systemd, the unit's delegated cgroup (hived/box/placement.py).
        self.anchor = anchor
        # [box] cells_cpu_weight, in cgroup v2 units (1-10000, 100 = the default): written on
        # every cgroup from below the anchor down to the cells' parent, so that where cells
        # share cores with the box daemon they yield to it (0: left alone). Weights only
        # matter between siblings: the top one is what competes with the daemon's cgroup.
        self.cpu_weight = cpu_weight
        if anchor and not Path(parent).is_relative_to(anchor):
            raise CgroupError(f"cells' parent cgroup {parent} is not below {anchor}, the subtree the box may manage")

    @abc.abstractmethod
    def dirs(self, name: str) -> list[Path]: ...

    @abc.abstractmethod
    def create(self, name: str, limits: CellLimits) -> list[Path]:
        """Make the cell's cgroup(s); returns the cgroup.procs files to join."""

    @abc.abstractmethod
    def cells(self) -> list[str]:
        """Names of every cell cgroup under this box's parent (for crash cleanup)."""

    def procs(self, name: str) -> set[int]:
        pids: set[int] = set()
        for d in self.dirs(name):
            try:
                pids |= {int(x) for x in (d / "cgroup.procs").read_text().split()}
            except FileNotFoundError:
                pass
        return pids

    def remove(self, name: str, timeout: float = 5.0) -> None:
        """Kill whatever is left in the cell's cgroup, then remove it. Idempotent."""
        deadline = time.monotonic() + timeout
        while True:
            pids = self.procs(name)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            busy = []
            for d in self.dirs(name):
                try:
                    d.rmdir()
                except FileNotFoundError:
                    pass
                except OSError:
                    busy.append(d)
            if not busy:
                return
            if time.monotonic() > deadline:
                raise CgroupError(f"cgroup {busy[0]} still busy after {timeout:g} s (pids {sorted(pids)})")
            time.sleep(0.01)

    def memory_limit(self, name: str) -> int | None:
        raise NotImplementedError

    @abc.abstractmethod
    def parent_dirs(self) -> list[Path]: ...

    def _below_anchor(self, top: Path) -> list[Path]:
        """The parent's cgroups under hierarchy `top`, from the one below the anchor down to it."""
        parts = Path(self.parent).relative_to(self.anchor).parts if self.anchor else Path(self.parent).parts
        base = top / self.anchor
        return [base.joinpath(*parts[:depth]) for depth in range(1, len(parts) + 1)]

    def remove_parent(self) -> None:
        """Remove the box's own parent groups once its cells are gone (best effort:
        a parent shared with another box, or still holding cells, stays)."""
        top = self.root / self.anchor
        for d in self.parent_dirs():
            for p in [d, *d.parents]:
                if p in (self.root, *self.root.parents) or p.parent == self.root or p == top:
                    break
                try:
                    p.rmdir()
                except OSError:
                    break


class CgroupV1(Cgroups):
    version = 1
    CONTROLLERS = ("cpuset", "cpu", "memory", "pids", "blkio")

    def dirs(self, name: str) -> list[Path]:
        return [self.root / c / self.parent / name for c in self.CONTROLLERS]

    def parent_dirs(self) -> list[Path]:
        return [self.root / c / self.parent for c in self.CONTROLLERS]

    def _ensure_parent(self) -> None:
        for c in self.CONTROLLERS:
            path = self.root / c
            if not path.is_dir():
                raise CgroupError(f"cgroup v1 controller {c} is not mounted at {path}")
            parts = Path(self.parent).parts
            for depth in range(1, len(parts) + 1):
                d = path.joinpath(*parts[:depth])
                if not d.is_dir():
                    d.mkdir()
                if c == "cpuset":  # a v1 cpuset is unusable until cpus and mems are set
                    for knob in ("cpuset.cpus", "cpuset.mems"):
                        if not (d / knob).read_text().strip():
                            _write(d / knob, (d.parent / knob).read_text().strip())
        if self.cpu_weight:  # v1 shares: 1024 is the default, as 100 is v2's weight
            for d in self._below_anchor(self.root / "cpu"):
                _weigh(d, "cpu.shares", max(2, self.cpu_weight * 1024 // 100))

    def create(self, name: str, limits: CellLimits) -> list[Path]:
        self._ensure_parent()
        made = []
        try:
            for d in self.dirs(name):
                d.mkdir()
                made.append(d)
            cpuset = self.root / "cpuset" / self.parent / name
            parent_cpuset = cpuset.parent
            _write(cpuset / "cpuset.cpus", limits.cpus or (parent_cpuset / "cpuset.cpus").read_text().strip())
            _write(cpuset / "cpuset.mems", (parent_cpuset / "cpuset.mems").read_text().strip())
            memory = self.root / "memory" / self.parent / name
            if limits.memory_bytes:
                _write(memory / "memory.limit_in_bytes", str(limits.memory_bytes))
            if limits.pids_max:
                _write(self.root / "pids" / self.parent / name / "pids.max", str(limits.pids_max))
            blkio = self.root / "blkio" / self.parent / name
            if limits.disk_dev and limits.disk_bytes_s:
                for knob in ("read_bps_device", "write_bps_device"):
                    _write(blkio / f"blkio.throttle.{knob}", f"{limits.disk_dev} {limits.disk_bytes_s}")
            if limits.disk_dev and limits.disk_iops:
                for knob in ("read_iops_device", "write_iops_device"):
                    _write(blkio / f"blkio.throttle.{knob}", f"{limits.disk_dev} {limits.disk_iops}")
        except (OSError, CgroupError):
            for d in made:
                try:
                    d.rmdir()
                except OSError:
                    pass
            raise
        return [d / "cgroup.procs" for d in self.dirs(name)]

    def cells(self) -> list[str]:
        names: set[str] = set()
        for c in self.CONTROLLERS:
            d = self.root / c / self.parent
            if d.is_dir():
                names |= {p.name for p in d.iterdir() if p.is_dir()}
        return sorted(names)

    def memory_limit(self, name: str) -> int | None:
        path = self.root / "memory" / self.parent / name / "memory.limit_in_bytes"
        return int(path.read_text()) if path.exists() else None


class CgroupV2(Cgroups):
    version = 2
    CONTROLLERS = ("cpuset", "cpu", "memory", "pids", "io")

    def dirs(self, name: str) -> list[Path]:
        return [self.root / self.parent / name]

    def parent_dirs(self) -> list[Path]:
        return [self.root / self.parent]

    def _ensure_parent(self) -> None:
        """Make the parent and hand the controllers down to it, from the anchor on: nothing
        above the anchor is written (under systemd that is systemd's), and a controller already
        enabled is not written again."""
        top = self.root / self.anchor
        available = set((top / "cgroup.controllers").read_text().split())
        missing = [c for c in ("memory", "pids") if c not in available]
        if missing:
            raise CgroupError(f"cgroup v2 at {top} lacks controllers {missing}: "
                              "enable them (systemd: Delegate=yes in the unit)")
        wanted = [c for c in self.CONTROLLERS if c in available]
        d = top
        for part in Path(self.parent).relative_to(self.anchor).parts:
            _enable(d, wanted)
            d = d / part
            d.mkdir(exist_ok=True)
        _enable(d, wanted)
        if self.cpu_weight:
            for d in self._below_anchor(self.root):
                _weigh(d, "cpu.weight", self.cpu_weight)

    def create(self, name: str, limits: CellLimits) -> list[Path]:
        self._ensure_parent()
        (d,) = self.dirs(name)
        d.mkdir()
        try:
            if limits.memory_bytes:
                _write(d / "memory.max", str(limits.memory_bytes))
            if limits.cpus and (d / "cpuset.cpus").exists():
                _write(d / "cpuset.cpus", limits.cpus)
            if limits.pids_max:
                _write(d / "pids.max", str(limits.pids_max))
            if limits.disk_dev and (limits.disk_bytes_s or limits.disk_iops) and (d / "io.max").exists():
                parts = []
                if limits.disk_bytes_s:
                    parts += [f"rbps={limits.disk_bytes_s}", f"wbps={limits.disk_bytes_s}"]
                if limits.disk_iops:
                    parts += [f"riops={limits.disk_iops}", f"wiops={limits.disk_iops}"]
                _write(d / "io.max", f"{limits.disk_dev} {' '.join(parts)}")
        except CgroupError:
            d.rmdir()
            raise
        return [d / "cgroup.procs"]

    def remove(self, name: str, timeout: float = 5.0) -> None:
        (d,) = self.dirs(name)
        if (d / "cgroup.kill").exists():
            try:
                (d / "cgroup.kill").write_text("1")
            except OSError:
                pass
        super().remove(name, timeout)

    def cells(self) -> list[str]:
        d = self.root / self.parent
        return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []

    def memory_limit(self, name: str) -> int | None:
        path = self.root / self.parent / name / "memory.max"
        if not path.exists():
            return None
        text = path.read_text().strip()
        return None if text == "max" else int(text)


def detect(root: Path = Path("/sys/fs/cgroup")) -> int:
    """1 or 2: which hierarchy is usable at `root` (v2 only if it has controllers)."""
    root = Path(root)
    controllers = root / "cgroup.controllers"
    if controllers.exists() and controllers.read_text().split():
        return 2
    if (root / "memory").is_dir() and (root / "cpuset").is_dir():
        return 1
    return 0


def open_cgroups(parent: str, root: Path = Path("/sys/fs/cgroup"), anchor: str = "",
                 cpu_weight: int = 0) -> Cgroups:
    version = detect(root)
    if version == 2:
        return CgroupV2(root, parent, anchor, cpu_weight)
    if version == 1:
        return CgroupV1(root, parent, cpu_weight=cpu_weight)
    raise CgroupError(f"no usable cgroup hierarchy at {root}: need v2 with controllers, "
                      "or v1 with cpuset and memory mounted")
