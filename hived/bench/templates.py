"""`hived bench boot`'s template figures (kept apart from the boot benchmark's own code).

    template_ms        making one template: boot to the snapshot point + saving the device state
    restore_ms         VMM start -> a restored cell's cell.hello (it has reseeded, set its clock,
                       network and disks), p50/p95 over `cells` restores
    idle_pss_mib       PSS (/proc/PID/smaps_rollup) of idle warm cells' VMMs with `cells` cells up:
                       restored (sharing their template's memory) vs cold (booted); with
                       --template-hugepages plus Private_Hugetlb (a clone's own copies of huge
                       pages), and `hugepages` says what the held clones had reserved and mapped;
                       guest_ram: the guest-RAM mapping's Pss alone (no QEMU, no TCG buffer)
    burst_ms           3x the pool's builds submitted at once -> the last one running in its
                       container, with templates and without (every refill a cold boot)

Each figure comes from a real BoxDaemon (the `hived up` defaults) on real microVMs.
"""

import asyncio
import dataclasses
import time
from pathlib import Path


class TemplateBenchError(Exception):
    pass


def rollup_mib(pid: int) -> dict[str, float]:
    """/proc/PID/smaps_rollup in MiB: {"Pss": ..., "Private_Hugetlb": ..., ...}."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                out[key] = int(rest.split()[0]) / 1024
    if "Pss" not in out:
        raise TemplateBenchError(f"no Pss in /proc/{pid}/smaps_rollup")
    return out


def pss_mib(pid: int) -> float:
    """Pss, plus the huge pages only this process maps (Private_Hugetlb: a clone's copies of its
    template's huge pages): Pss leaves hugetlb out. 0 without huge pages."""
    r = rollup_mib(pid)
    return r["Pss"] + r.get("Private_Hugetlb", 0.0)


def guest_ram_pss_mib(pid: int, memory_mib: int) -> float:
    """Pss of the guest's RAM alone: the VMM's one mapping of exactly the shape's memory (a
    template's memfd in a clone, anonymous memory in a booted cell). The rest of a VMM's Pss is
    QEMU itself, and under TCG mostly its translation buffer, which KVM does not have."""
    best = None
    size = pss = 0.0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key == "Size":
                size = int(rest.split()[0]) / 1024
            elif key in ("Pss", "Private_Hugetlb") and size == memory_mib:
                pss += int(rest.split()[0]) / 1024
            elif key == "VmFlags":  # the last field of a mapping
                if size == memory_mib:
                    best = pss if best is None else max(best, pss)
                size = pss = 0.0
    if best is None:
        raise TemplateBenchError(f"VMM {pid} has no mapping of {memory_mib} MiB (the guest's RAM)")
    return best


def _p50s(rows: list[dict]) -> dict:
    from hived.bench.common import percentile

    keys = sorted({k for r in rows for k in r if isinstance(r[k], (int, float))})
    return {k: round(percentile([r[k] for r in rows if k in r], 50), 4) for k in keys}


async def _box(home: Path, image, accel: str, driver_factory, timeout: float, *, templates: bool, pool: int,
               hugepages: bool = False):
    from hived.box.config import embedded
    from hived.box.daemon import BoxDaemon

    home.mkdir(parents=True)
    # A burst of 3x the pool waits for 2x the pool's cells to start: cold boots under TCG on a
    # busy host take far longer than one boot's timeout, and a burst must not fail for that.
    config = dataclasses.replace(embedded(home, pool_target=pool), boot_timeout_s=timeout,
                                 queue_timeout_s=timeout * 3 * pool, templates=templates,
                                 template_hugepages=templates and hugepages)
    return BoxDaemon(config, image=image, accelerator=accel, driver_factory=driver_factory)


async def _until_idle(box, timeout: float, what: str) -> None:
    from hived.box.cell import CellState

    deadline = time.monotonic() + timeout
    while True:
        pools = list(box.pools.values())
        if all(len(p.warm) >= p.target for p in pools) and \
                all(rt.cell.state is CellState.WARM for rt in box.cells.values()):
            return
        if time.monotonic() > deadline:
            raise TemplateBenchError(f"pool not full {what} after {timeout:g} s: {box.status_line()}")
        await asyncio.sleep(0.05)


async def _hold_cells(box, shape, n: int) -> list:
    """n more warm cells started the box's way (restore if it has templates), held out of the pool."""
    cells = []
    for _ in range(n):
        cells.append(await box.boot_cell(shape))
    return cells


async def _burst(box, n: int, timeout: float) -> float:
    """n builds of `true` at once; ms from the first submit to the last build running."""
    from hived.protocol.channel import connect_unix
    from hived.protocol.session import Session

    async def one(i: int) -> str:
        client = await connect_unix(str(box.config.client_socket), Session("client", "bench", {"box"}))
        try:
            await client.send("build.submit", request_id=f"burst-{i}", shape="", customer="bench",
                              argv=["true"], env={}, cwd="/work", timeout_s=timeout)
            build_id = ""
            while True:
                msg = await client.recv()
                if msg.name == "build.accepted":
                    build_id = msg["build_id"]
                elif msg.name == "exit":
                    if msg["code"] != 0:
                        raise TemplateBenchError(f"burst build {i}: {msg['reason']}: {msg['message']}")
                    return build_id
                elif msg.name == "error":
                    raise TemplateBenchError(f"burst build {i}: {msg['code']}: {msg['message']}")
        finally:
            client.close()

    async with asyncio.timeout(timeout * n):
        ids = await asyncio.gather(*(one(i) for i in range(n)))
    recs = [box.builds[b] for b in ids]
    return (max(r["started"] for r in recs) - min(r["submitted"] for r in recs)) * 1000


async def measure(tmp: Path, image, accel: str, driver_factory, timeout: float, restores: int,
                  progress, *, idle_cells: int = 3, pool: int = 2, on_box=lambda box: None,
                  hugepages: bool = False) -> dict:
    """The figures above; `on_box(box)` is told of each box daemon (for clean-up after a crash)."""
    out: dict = {}
    for templates in (True, False):
        label = "with templates" if templates else "without templates"
        box = await _box(tmp / ("tpl" if templates else "cold"), image, accel, driver_factory, timeout,
                         templates=templates, pool=pool, hugepages=hugepages)
        on_box(box)
        held = []
        try:
            await box.start()
            await _until_idle(box, timeout, f"at start ({label})")
            shape = next(iter(box.config.shapes.values()))
            if templates:
                [tpl] = box.templates.templates.values()
                out["template_ms"] = tpl.make_ms
                out["template_state_bytes"] = tpl.state_bytes
                progress(f"[boot] template made in {tpl.make_ms:.0f} ms ({tpl.state_bytes} bytes of state)")
            if templates:
                restored, host, guest = [], [], []
                for _ in range(restores):  # one at a time, each destroyed before the next
                    [rt] = await _hold_cells(box, shape, 1)
                    await box.destroy(rt, "bench")
                    if rt.origin != "restore":
                        raise TemplateBenchError(f"a cell came from {rt.origin}, not a restore: "
                                                 f"{box.templates.describe()}")
                    restored.append(rt.start_ms)
                    host.append(rt.start_stages_ms)
                    guest.append({k: v for k, v in rt.cell.boot.items() if k.startswith("restore_")})
                out["restore_ms_all"] = restored
                out["restore_host_stages_ms_p50"] = _p50s(host)  # VMM start -> each step, ms
                out["restore_guest_steps_s_p50"] = _p50s(guest)  # each identity step, guest seconds
                progress(f"[boot] {restores} restores: " + ", ".join(f"{ms:.0f}" for ms in restored) + " ms")
            held = await _hold_cells(box, shape, idle_cells)
            origins = {rt.origin for rt in held}
            if origins != {"restore" if templates else "boot"}:
                raise TemplateBenchError(f"{label}: cells came from {sorted(origins)}")
            await asyncio.sleep(2.0)  # idle: the clones' start-up is over
            if templates and hugepages:
                from hived.box.templates import HugePages

                hp = HugePages.read()
                rollups = [rollup_mib(rt.cell.pid) for rt in held]
                out["hugepages"] = {
                    "page_kib": hp.size >> 10, "host_total": hp.total, "host_free": hp.free,
                    "host_reserved": hp.reserved,
                    "in_use_mib": round((hp.total - hp.free) * hp.size / 2**20, 1),
                    "promised_mib": round(hp.reserved * hp.size / 2**20, 1),
                    "clone_private_hugetlb_mib": [round(r.get("Private_Hugetlb", 0.0), 1) for r in rollups],
                    "clone_shared_hugetlb_mib": [round(r.get("Shared_Hugetlb", 0.0), 1) for r in rollups],
                    "held_clones": len(held), "pool_cells": pool}
            out.setdefault("idle_pss_mib_all", {})["restored" if templates else "cold"] = \
                [pss_mib(rt.cell.pid) for rt in held]
            out.setdefault("idle_guest_ram_pss_mib_all", {})["restored" if templates else "cold"] = \
                [guest_ram_pss_mib(rt.cell.pid, shape.memory_mib) for rt in held]
            for rt in held:
                await box.destroy(rt, "bench")
            held = []
            await _until_idle(box, timeout, f"before the burst ({label})")
            burst = await _burst(box, 3 * pool, timeout)
            out.setdefault("burst_ms", {})["with_templates" if templates else "without_templates"] = burst
            progress(f"[boot] burst of {3 * pool} builds on a pool of {pool} {label}: last started after "
                     f"{burst:.0f} ms")
        finally:
            for rt in held:
                await box.destroy(rt, "bench")
            await box.stop()
    out["idle_cells"] = idle_cells + pool  # held + the pool's own warm cells
    out["burst_config"] = {"pool": pool, "builds": 3 * pool, "command": "true",
                           "measured": "first submit -> last build running in its container"}
    return out
