"""The interface every VMM driver implements, and what it is given.

Phases, each with its own call (Firecracker's preboot/runtime split):
  prepare(spec)  -> host files for the cell (scratch disk, sockets); no process yet
  launch()       -> the VMM process runs; guest code may start
  accept()       -> the host<->cell channel, once the guest has said hello
  destroy()      -> everything above is gone; safe to call in any phase, twice
"""

import abc
import dataclasses
from pathlib import Path


class VmmError(Exception):
    """A VMM could not be prepared, launched or reached; the message says what and why."""


@dataclasses.dataclass(frozen=True)
class CellSpec:
    cell_id: str
    cell_dir: Path           # every host file of the cell lives here, named after it
    vcpus: int
    memory_mib: int
    scratch_mib: int
    kernel: Path
    initrd: Path
    rootfs: Path
    accelerator: str         # "kvm" or "tcg", from the KVM probe
    mode: str = "agent"      # "agent", or "bare" for the boot baseline
    cgroup_procs: tuple[Path, ...] = ()  # the VMM joins these before any guest code runs
    disk_bytes_s: int = 0    # 0: unlimited
    disk_iops: int = 0
    extra_cmdline: str = ""
    cores: tuple[int, ...] = ()  # host cores the vCPUs are pinned to (one each, round robin)
    vmm_uid: int = 0             # run the VMM confined as this uid (0: as root, unconfined)
    tap_fd: int = -1             # the cell's tap (in its own netns), handed to the VMM; -1: no NIC
    netns: str = ""              # the VMM runs in this network namespace (/run/netns/NAME, the cell's);
    #                              "": in a fresh, empty one of its own. Never in the host's.
    mac: str = ""
    net_cmdline: str = ""        # hived.ip=... hived.gw=... for the guest's init
    image_file: Path | None = None  # build image filesystem, attached read-only (serial hived-image)
    source_slot_mib: int = 0     # a sparse source slot (serial hived-source) filled at assignment; 0: none
    memory_fd: int = -1          # guest RAM is this file (a template's memfd), not anonymous memory
    memory_shared: bool = False  # True: the guest writes through to memory_fd (making a template);
    #                              False: private copy-on-write (a clone; the memfd is sealed anyway)
    restore: bool = False        # start paused, waiting for a template's device state (restore())
    scratch_image_fd: int = -1   # a clone's scratch disk starts as a copy of this file (its template's,
    #                              saved frozen: save_scratch()); -1: a freshly made filesystem


class VmmDriver(abc.ABC):
    name = "abstract"

    @abc.abstractmethod
    async def prepare(self, spec: CellSpec) -> None: ...

    @abc.abstractmethod
    async def launch(self) -> int:
        """Start the VMM; returns its pid."""

    @abc.abstractmethod
    async def accept(self, timeout: float):
        """Wait for the guest to connect and say hello; returns a hived.protocol Channel."""

    async def snapshot(self, state_fd: int, timeout: float) -> int:
        """Save the running guest's device state into `state_fd` (its RAM is memory_fd); returns bytes."""
        raise NotImplementedError(f"{self.name} cannot make templates")

    async def save_scratch(self, fd: int) -> int:
        """Copy the (stopped) template VM's scratch disk into `fd`; returns the bytes of data copied."""
        raise NotImplementedError(f"{self.name} cannot make templates")

    async def restore(self, state_fd: int, cores: tuple[int, ...], timeout: float) -> dict[int, int]:
        """Load a template's device state and run; pins vCPUs like pin_vcpus() and returns the same."""
        raise NotImplementedError(f"{self.name} cannot restore templates")

    async def pin_vcpus(self, cores: tuple[int, ...]) -> dict[int, int]:
        """Pin each vCPU thread to one of `cores`; returns vCPU index -> host thread id."""
        return {}

    @abc.abstractmethod
    async def wait_exit(self) -> int:
        """Wait for the VMM process to end; returns its exit status."""

    @abc.abstractmethod
    async def destroy(self) -> None: ...

    @abc.abstractmethod
    def console_tail(self, lines: int = 20) -> str:
        """The guest's last console lines, for error messages."""
