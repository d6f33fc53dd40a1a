"""How a box divides itself among cells: pure bookkeeping, no I/O (the daemon applies it).

Cores: the first `reserved` host cores belong to the box daemon; the rest are handed out
whole to cells (cpuset), never shared unless the config allows overcommit. Memory: each
cell's guest memory plus the VMM's overhead, out of the box's allocatable memory. Disk and
network bandwidth: each shape's rates, out of the box's totals (0 = not partitioned).
Every cell also gets a slot number, which names its VMM's unprivileged uid.
"""

from dataclasses import dataclass, field


class NoCapacity(Exception):
    """The box cannot take this cell now (or ever, for a shape larger than the box)."""


class PartitionError(Exception):
    """The config divides the box impossibly; the message says which key to change."""


@dataclass(frozen=True)
class Allocation:
    cell_id: str
    slot: int
    cores: tuple[int, ...]
    memory_mib: int
    shared: bool            # True when a core is shared with another cell (overcommit)
    disk_bytes_s: int = 0
    net_bits_s: int = 0

    @property
    def cpuset(self) -> str:
        return ",".join(str(c) for c in self.cores)


@dataclass
class Partition:
    host_cores: list[int]
    reserved_cores: int
    memory_mib: int
    vmm_overhead_mib: int
    overcommit: bool = False
    disk_bytes_s: int = 0
    net_bits_s: int = 0
    max_slots: int = 1024
    cells: dict[str, Allocation] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.reserved_cores >= len(self.host_cores):
            raise PartitionError(
                f"box.reserved_cores = {self.reserved_cores} leaves none of the {len(self.host_cores)} "
                f"host cores for cells: lower it")

    @property
    def box_cores(self) -> list[int]:
        return self.host_cores[: self.reserved_cores]

    @property
    def cell_cores(self) -> list[int]:
        return self.host_cores[self.reserved_cores:]

    def _need_mib(self, shape) -> int:
        return shape.memory_mib + self.vmm_overhead_mib

    def check_shapes(self, shapes) -> None:
        """At start: refuse shapes larger than the box, and pools that overcommit it."""
        n = len(self.cell_cores)
        totals = {"cores": 0, "memory": 0, "disk": 0, "net": 0}
        for s in shapes:
            if s.vcpus > n and not self.overcommit:
                raise PartitionError(f"shape {s.name} wants {s.vcpus} vCPUs but the box has {n} cores for "
                                     f"cells ({self.reserved_cores} reserved): shrink the shape or set "
                                     "box.overcommit = true")
            if self._need_mib(s) > self.memory_mib:
                raise PartitionError(f"shape {s.name} needs {self._need_mib(s)} MiB (guest + VMM overhead) "
                                     f"but the box allocates {self.memory_mib} MiB: raise box.memory_mib or "
                                     "shrink the shape")
            totals["cores"] += s.pool_target * s.vcpus
            totals["memory"] += s.pool_target * self._need_mib(s)
            totals["disk"] += s.pool_target * s.disk_bytes_s
            totals["net"] += s.pool_target * (s.net_in_bits_s + s.net_out_bits_s)
        if self.overcommit:
            return
        problems = []
        if totals["cores"] > n:
            problems.append(f"{totals['cores']} cores of {n}")
        if totals["memory"] > self.memory_mib:
            problems.append(f"{totals['memory']} MiB of {self.memory_mib}")
        if self.disk_bytes_s and totals["disk"] > self.disk_bytes_s:
            problems.append(f"{totals['disk']} disk bytes/s of {self.disk_bytes_s}")
        if self.net_bits_s and totals["net"] > self.net_bits_s:
            problems.append(f"{totals['net']} network bits/s of {self.net_bits_s}")
        if problems:
            raise PartitionError("the warm pools overcommit the box (" + "; ".join(problems) +
                                 "): lower pool_target, shrink shapes, or set box.overcommit = true")

    def admit(self, cell_id: str, shape) -> Allocation:
        if cell_id in self.cells:
            raise PartitionError(f"cell {cell_id} is already admitted")
        use = {c: 0 for c in self.cell_cores}
        for a in self.cells.values():
            for c in a.cores:
                use[c] = use.get(c, 0) + 1
        free = [c for c in self.cell_cores if use[c] == 0]
        if len(free) >= shape.vcpus:
            cores, shared = tuple(free[: shape.vcpus]), False
        elif self.overcommit:
            by_load = sorted(self.cell_cores, key=lambda c: (use[c], c))
            cores = tuple(sorted(by_load[: min(shape.vcpus, len(by_load))]))
            shared = True
        else:
            raise NoCapacity(f"shape {shape.name} needs {shape.vcpus} dedicated cores; {len(free)} of "
                             f"{len(self.cell_cores)} are free")
        need = self._need_mib(shape)
        used = sum(a.memory_mib for a in self.cells.values())
        if used + need > self.memory_mib and not self.overcommit:
            raise NoCapacity(f"shape {shape.name} needs {need} MiB; {self.memory_mib - used} MiB of "
                             f"{self.memory_mib} are free")
        taken = {a.slot for a in self.cells.values()}
        slot = next((i for i in range(self.max_slots) if i not in taken), None)
        if slot is None:
            raise NoCapacity(f"all {self.max_slots} cell slots are in use")
        alloc = Allocation(cell_id, slot, cores, need, shared or any(use[c] for c in cores),
                           shape.disk_bytes_s, shape.net_in_bits_s + shape.net_out_bits_s)
        self.cells[cell_id] = alloc
        return alloc

    def readmit(self, alloc: Allocation) -> Allocation:
        """An adopted cell keeps the cores, memory and slot it had (hived/box/adopt.py)."""
        if alloc.cell_id in self.cells:
            raise PartitionError(f"cell {alloc.cell_id} is already admitted")
        if not set(alloc.cores) <= set(self.cell_cores):
            raise PartitionError(f"cell {alloc.cell_id} runs on cores {alloc.cpuset}, not all of which are cell "
                                 f"cores of this box now ({','.join(map(str, self.cell_cores))})")
        if any(a.slot == alloc.slot for a in self.cells.values()):
            raise PartitionError(f"cell {alloc.cell_id}'s slot {alloc.slot} is taken")
        self.cells[alloc.cell_id] = alloc
        return alloc

    def release(self, cell_id: str) -> None:
        self.cells.pop(cell_id, None)

    def describe(self) -> dict:
        cores = {str(c): [] for c in self.cell_cores}
        for a in self.cells.values():
            for c in a.cores:
                cores[str(c)].append(a.cell_id)
        used_mib = sum(a.memory_mib for a in self.cells.values())
        return {
            "box_cores": self.box_cores,
            "cell_cores": cores,
            "free_cores": [int(c) for c, owners in cores.items() if not owners],
            "memory_mib": {"allocatable": self.memory_mib, "used": used_mib,
                           "free": self.memory_mib - used_mib},
            "overcommit_allowed": self.overcommit,
            "overcommitted": any(len(o) > 1 for o in cores.values()) or used_mib > self.memory_mib,
        }
