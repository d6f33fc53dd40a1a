"""Adopting the cells a previous box daemon left running (after a crash, kill -9, OOM, or a
restart that keeps cells).

    cells/<id>/cell.json (hived/box/cellrecord.py)
        -> find(): the VMM still runs (same pid *and* start time)?      no -> leftover, removed
        -> adopt_one(): its cgroup holds that VMM, its netns is there, it is in the partition,
           the channel reconnects and the guest answers `cell.adopt` as the same cell with
           the same build?                                              no -> destroyed, reason logged
        -> warm: back into its pool, not rebooted
           running: its build goes on (builds.resume_build) under its lease; the cell sends
           again everything after the last output the control plane had stored

A build whose cell did not make it fails with the reason (through the control link, under
its lease). Builds from the box's local socket cannot go on: their client's connection was
the old daemon's. Secure Compute builds cannot either: their tunnel's keys lived only in the
old daemon, and are never stored.
"""

import asyncio
import contextlib
import logging
from pathlib import Path

from hived.box import cellrecord, leftovers, prestart
from hived.box.cell import Cell, CellState
from hived.box.cellrecord import CellRecord, RecordError
from hived.box.cgroups import CgroupError
from hived.box.partition import Allocation, PartitionError
from hived.protocol.channel import ChannelClosed
from hived.protocol.errors import ProtocolError
from hived.vmm.base import VmmError
from hived.vmm.qemu import process_start_ticks

log = logging.getLogger(__name__)

ADOPT_TIMEOUT_S = 10.0


class NotAdopted(Exception):
    """Why a cell that is still running cannot be adopted."""


def find(cells_dir: Path) -> tuple[list[CellRecord], list[tuple[str, CellRecord | None, str]]]:
    """(records whose VMM still runs, [(cell id, record or None, why it cannot be adopted)])."""
    alive, dead = [], []
    if not cells_dir.is_dir():
        return alive, dead
    vmms = leftovers.vmm_pids(cells_dir)  # pid -> the cell directory its command line names
    for d in sorted(cells_dir.iterdir()):
        try:
            rec = cellrecord.read(d)
        except RecordError as exc:
            dead.append((d.name, None, str(exc)))
            continue
        if rec.cell_id != d.name:
            dead.append((d.name, None, f"{cellrecord.path(d)} names cell {rec.cell_id!r}"))
            continue
        ticks = process_start_ticks(rec.vmm_pid)
        if ticks == 0:
            dead.append((rec.cell_id, rec, f"its VMM (pid {rec.vmm_pid}) exited while the box daemon was away"))
        elif ticks != rec.vmm_start_ticks:
            dead.append((rec.cell_id, rec, f"its VMM (pid {rec.vmm_pid}) exited while the box daemon was away, "
                                           "and the pid now belongs to another process (not touched)"))
        elif vmms.get(rec.vmm_pid) != rec.cell_id:
            dead.append((rec.cell_id, rec, f"its VMM's pid {rec.vmm_pid} now belongs to another process, which is "
                                           "not touched"))
        else:
            alive.append(rec)
    return alive, dead


def report_dead(box, dead) -> None:
    """Each cell that cannot be adopted is named with why; its build fails with that reason."""
    for cell_id, rec, why in dead:
        log.warning("cell %s not adopted: %s", cell_id, why)
        box.metrics.adoptions.labels("not_adopted").inc()
        if rec is None or rec.build is None:
            continue
        message = f"cell {cell_id} running build {rec.build.id} is gone: {why}"
        log.warning("%s", message)
        if rec.build.via == "control" and box.control_link is not None:
            box.control_link.fail_adopted(rec.build, "cell_failed", message)


async def adopt_all(box, records: list[CellRecord]) -> list:
    """Adopt each record's cell, all at once; returns the warm ones (for their pools)."""
    results = await asyncio.gather(*(adopt_one(box, rec) for rec in records), return_exceptions=True)
    warm = []
    for rec, result in zip(records, results, strict=True):
        if isinstance(result, BaseException):
            log.error("cell %s: adoption failed: %r", rec.cell_id, result)
        elif result is not None and result.cell.state is CellState.WARM:
            warm.append(result)
    return warm


async def adopt_one(box, rec: CellRecord):
    """The cell's runtime, adopted; None if it could not be (it is destroyed, its build failed)."""
    cell = Cell(rec.cell_id, rec.pool, on_change=box.metrics.on_cell_change)
    box.metrics.cells.labels(cell.state.value).inc()
    rt = box.new_runtime(cell, origin=rec.origin, template=rec.template)
    rt.adopted = True
    box.cells[cell.id] = rt
    cell.boot = dict(rec.boot)
    try:
        # First of all: whatever happens next, destroy() must be able to end this VMM.
        rt.driver.adopt(box.config.cells_dir / cell.id, rec.vmm_pid, rec.vmm_start_ticks)
        cell.pid = rec.vmm_pid
        shape = box.config.shapes.get(rec.shape)
        if shape is None:
            raise NotAdopted(f"shape {rec.shape!r} is no longer in the box's config")
        if rec.state == "warm" and rec.pool != rec.shape:
            raise NotAdopted("warm cells of a build image's pool are not adopted (their image is looked up again "
                             "on the next build)")
        rt.alloc = box.partition.readmit(Allocation(**{**rec.alloc, "cores": tuple(rec.alloc["cores"])}))
        if rec.cgroup:
            if box.cgroups is None:
                raise NotAdopted("it had a cgroup and this daemon runs without cgroups")
            if rec.vmm_pid not in box.cgroups.procs(cell.id):
                raise NotAdopted(f"its VMM (pid {rec.vmm_pid}) is not in its cgroup")
            rt.cgroup = True
        if rec.net is not None:
            if box.network is None:
                raise NotAdopted("it has a network and this daemon runs without cell networking")
            rt.net = box.network.adopted(cell.id)
            if rt.net is None:
                raise NotAdopted(f"its network namespace {box.network.netns_name(cell.id)} is gone")
        if rec.image:
            rt.image_lease = box.images.acquire(rec.image)
        cell.transition(CellState.BOOTING)
        rt.watcher = asyncio.get_running_loop().create_task(box._watch_vmm(rt))
        rt.channel = await rt.driver.accept(ADOPT_TIMEOUT_S)
        try:  # QMP again: the vCPU threads, pinned to the cell's cores as at its start
            rt.vcpu_threads = await rt.driver.pin_vcpus(rt.alloc.cores)
        except (VmmError, OSError) as exc:  # the cell runs on unpinned; say so, do not fail it
            log.warning("cell %s: vCPU threads not pinned again: %s", cell.id, exc)
        build = rec.build
        await rt.channel.send("cell.adopt", cell_id=cell.id, build_id=build.id if build else "",
                              output_from=build.cell_next if build else 0)
        async with asyncio.timeout(ADOPT_TIMEOUT_S):
            msg = await rt.channel.recv()
        if msg.name != "cell.adopted":
            raise NotAdopted(f"the guest answered cell.adopt with {msg.name}"
                             + (f": {msg['message']}" if msg.name == "error" else ""))
        if msg["cell_id"] != cell.id or msg["build_id"] != (build.id if build else ""):
            raise NotAdopted(f"the guest says it is cell {msg['cell_id']} with build {msg['build_id']!r}")
        cell.transition(CellState.WARM)
        if build is None:
            if msg["state"] != "warm":
                raise NotAdopted(f"the cell says it is {msg['state']} with no build")
            box.save_cell(rt, "warm")
            await prestart.prestart(box, rt)  # a new one: the old daemon's was removed (hived/box/prestart.py)
            box.metrics.adoptions.labels("warm").inc()
            log.info("cell %s adopted: warm", cell.id)
            return rt
        cell.transition(CellState.ASSIGNED)
        cell.build_id = build.id
        rt.record_state, rt.facts, rt.saved = rec.state, build, True
        if build.via != "control" or box.control_link is None:
            raise NotAdopted(f"build {build.id} came through the box's local socket, whose client left with the "
                             "old daemon")
        if build.secure:
            raise NotAdopted(f"build {build.id} is a Secure Compute build: its tunnel's keys lived only in the old "
                             "daemon and are never stored")
        from hived.box.builds import resume_build

        relay = box.control_link.adopt_build(build)
        log.info("cell %s adopted: build %s %s, output again from chunk %d", cell.id, build.id, msg["state"],
                 build.cell_next)
        box.spawn(resume_build(box, rt, relay, build, dict(msg.fields)))
        box.metrics.adoptions.labels("running").inc()
        return rt
    except (NotAdopted, VmmError, CgroupError, PartitionError, ProtocolError, ChannelClosed, TimeoutError,
            OSError) as exc:
        why = f"cell {cell.id} not adopted: {exc}"
    except Exception as exc:  # a bug must not leak the cell: destroy it, say why
        log.exception("cell %s: adoption", cell.id)
        why = f"cell {cell.id} not adopted: internal error: {exc!r}"
    log.warning("%s", why)
    box.metrics.cell_failures.labels("adopt").inc()
    box.metrics.adoptions.labels("not_adopted").inc()
    if rec.build is not None and rec.build.via == "control" and box.control_link is not None:
        box.control_link.fail_adopted(rec.build, "cell_failed", why)
    with contextlib.suppress(Exception):
        await box.destroy(rt, why)
    return None
