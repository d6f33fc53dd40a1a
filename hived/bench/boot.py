"""`hived bench boot`: cold boot (spawn -> cell.hello) against bare QEMU (same kernel and image,
the initramfs reports and powers off), cell by cell in one run; then warm start (build request ->
process started in the guest) through a real box daemon."""

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from hived.bench.common import BenchError, _loadavg, _r, dist_ms, machine_info, percentile, progress

TMP_PREFIX = "hvb-"
CGROUP_PARENT = "hived/bench"
BOOT_PHASE_TIMEOUT_S = 120.0
WARM_SETTLE_S = 1.0   # idle time given to a freshly warm cell before a warm-start build


def _matches_code(d: Path) -> bool:
    from hived import image as images

    try:
        return images.read_manifest(d).get("local_key") == images.local_key(images.local_inputs())
    except (OSError, ValueError):
        return False


def resolve_image(image: str | None) -> tuple[Path, bool]:
    """(image directory with vmlinuz, initrd.img, root.ext4, built from this code?)."""
    from hived import image as images

    need = ("vmlinuz", "initrd.img", "root.ext4")
    if image:
        d = Path(image)
        missing = [n for n in need if not (d / n).is_file()]
        if missing:
            raise BenchError(f"{d} is not a cell image (no {', '.join(missing)}): "
                             "run `hived image build` or pass --image DIR")
        return d.resolve(), _matches_code(d)
    root = images.default_dest()
    found = images.find_image(root)
    if found is not None:
        return Path(found).resolve(), True
    current = root / "current"
    if all((current / n).is_file() for n in need):
        progress(f"[boot] warning: {current} was built from other hived code (guest agent may differ); "
                 "`hived image build` makes a matching one")
        return current.resolve(), False
    raise BenchError(f"no cell image in {root}: run `hived image build`")


def _pin_image(src: Path, dest: Path) -> str:
    """Hard-link the image files into our temp dir, so a rebuild or clean-up of the image
    directory during the run cannot pull them away; copying is not worth it (fallback: use src)."""
    dest.mkdir()
    try:
        for name in ("vmlinuz", "initrd.img", "root.ext4"):
            os.link(src / name, dest / name)
        return "hardlink"
    except OSError:
        shutil.rmtree(dest, ignore_errors=True)
        return "none"


def _qemu_version() -> str:
    try:
        from hived.vmm.qemu import qemu_binary

        out = subprocess.run([qemu_binary(), "--version"], capture_output=True, text=True, timeout=10)
        return out.stdout.splitlines()[0].strip() if out.stdout else "unknown"
    except Exception as exc:  # reported, not fatal: the boots will say what is wrong
        return f"unknown ({exc})"


@dataclasses.dataclass
class _BootRun:
    """Everything the boot benchmark puts on the host, for clean-up in any case."""
    tmp: Path
    cgroups: object = None                  # hived.box.cgroups.Cgroups for cold/bare cells
    cgroup_cells: set = dataclasses.field(default_factory=set)
    drivers: set = dataclasses.field(default_factory=set)
    box_cgroup_parent: str = ""
    extra_cgroup_parents: list = dataclasses.field(default_factory=list)  # the template figures' boxes
    cell_ids: list = dataclasses.field(default_factory=list)

    @property
    def cells_dir(self) -> Path:
        return self.tmp / "cells"


def _driver_factory(extra_cmdline: str):
    """The real QEMU driver; with --cmdline, one that adds it to every cell's kernel command line."""
    from hived.vmm.qemu import QemuMicrovm

    if not extra_cmdline:
        return QemuMicrovm

    class QemuMicrovmExtraCmdline(QemuMicrovm):
        async def prepare(self, spec):
            extra = (spec.extra_cmdline + " " + extra_cmdline).strip()
            await super().prepare(dataclasses.replace(spec, extra_cmdline=extra))

    return QemuMicrovmExtraCmdline


async def _one_cell(run: _BootRun, mode: str, shape, image, accel: str, driver_factory, timeout: float,
                    vmm_overhead_mib: int) -> dict:
    """Boot one cell with the real driver: mode "agent" until cell.hello, "bare" until QEMU exits."""
    from hived.box.cell import new_cell_id
    from hived.box.cgroups import CellLimits, CgroupError
    from hived.protocol.channel import ChannelClosed
    from hived.protocol.errors import ProtocolError
    from hived.vmm.base import CellSpec, VmmError

    cell_id = new_cell_id()
    run.cell_ids.append(cell_id)
    driver = driver_factory()
    run.drivers.add(driver)
    what = "cold boot" if mode == "agent" else "bare QEMU boot"
    out: dict = {"cell_id": cell_id}
    try:
        t0 = time.monotonic()
        procs: list = []
        if run.cgroups is not None:
            limit = (shape.memory_mib + vmm_overhead_mib) << 20
            run.cgroup_cells.add(cell_id)
            procs = run.cgroups.create(cell_id, CellLimits(memory_bytes=limit, pids_max=4096))
        spec = CellSpec(
            cell_id=cell_id, cell_dir=run.cells_dir / cell_id, vcpus=shape.vcpus, memory_mib=shape.memory_mib,
            scratch_mib=shape.scratch_mib, kernel=image.kernel, initrd=image.initrd, rootfs=image.rootfs,
            accelerator=accel, mode=mode, cgroup_procs=tuple(procs),
            disk_bytes_s=shape.disk_bytes_s, disk_iops=shape.disk_iops,
        )
        await driver.prepare(spec)
        t1 = time.monotonic()
        out["isolation_setup_ms"] = (t1 - t0) * 1000
        await driver.launch()
        if mode == "agent":
            deadline = t1 + timeout
            channel = await driver.accept(timeout)
            msg = await asyncio.wait_for(channel.recv(), max(0.1, deadline - time.monotonic()))
            t2 = time.monotonic()
            if msg.name != "cell.hello" or msg["cell_id"] != cell_id:
                raise ProtocolError("bad_message", f"expected cell.hello from {cell_id}, got {msg.name}")
            out["boot_ms"] = (t2 - t1) * 1000
            out["guest_stages_s"] = dict(msg["boot"])
            out["kernel"] = msg["kernel"]
        else:
            status = await asyncio.wait_for(driver.wait_exit(), timeout)
            t2 = time.monotonic()
            console = (spec.cell_dir / "console.log").read_text(errors="replace")
            if "hived-bare-ready" not in console:
                tail = " | ".join(console.strip().splitlines()[-6:]) or "(empty)"
                raise BenchError(f"{what}: QEMU exited (status {status}) without the guest printing "
                                 f"hived-bare-ready; console: {tail}")
            if status != 0:
                raise BenchError(f"{what}: QEMU exited with status {status} after hived-bare-ready")
            out["boot_ms"] = (t2 - t1) * 1000
    except TimeoutError:
        raise BenchError(f"{what} of {cell_id}: no {'cell.hello' if mode == 'agent' else 'QEMU exit'} within "
                         f"{timeout:g} s; console: {driver.console_tail(6) or '(empty)'}") from None
    except (VmmError, CgroupError, ProtocolError, ChannelClosed, OSError) as exc:
        raise BenchError(f"{what} of {cell_id}: {exc}") from None
    finally:
        t3 = time.monotonic()
        try:
            await driver.destroy()
            if cell_id in run.cgroup_cells:
                run.cgroups.remove(cell_id)
                run.cgroup_cells.discard(cell_id)
        finally:
            run.drivers.discard(driver)
        out["teardown_ms"] = (time.monotonic() - t3) * 1000
    return out


async def _warm_starts(run: _BootRun, n: int, image, accel: str, driver_factory, timeout: float) -> dict:
    """N builds of `true` through a real BoxDaemon, each on a warm cell of an idle box."""
    from hived.box.cell import CellState
    from hived.box.cgroups import CgroupError
    from hived.box.config import embedded
    from hived.box.daemon import BoxDaemon
    from hived.protocol.channel import ChannelClosed, connect_unix
    from hived.protocol.session import Session

    home = run.tmp / "box"
    home.mkdir()
    config = dataclasses.replace(embedded(home, pool_target=1), boot_timeout_s=timeout,
                                 queue_timeout_s=timeout)
    run.box_cgroup_parent = config.cgroup_parent
    box = BoxDaemon(config, image=image, accelerator=accel, driver_factory=driver_factory)
    notify = os.environ.pop("NOTIFY_SOCKET", None)  # the daemon must not tell *our* service READY

    async def idle(what: str) -> None:
        """Until the pool is full, its cells ready (cell.ready: the build container pre-made) and no
        other cell is left (the last build's cell is destroyed)."""
        deadline = time.monotonic() + timeout
        while True:
            pools = list(box.pools.values())
            if all(len(p.warm) >= p.target for p in pools) and \
                    all(rt.cell.state is CellState.WARM and rt.premade is not None for rt in box.cells.values()):
                return
            failed = [p for p in pools if p.failures]
            if failed:
                raise BenchError(f"warm pool could not boot a cell {what}: {failed[0].last_error}")
            if time.monotonic() > deadline:
                raise BenchError(f"warm pool not full {what} after {timeout:g} s: {box.status_line()}")
            await asyncio.sleep(0.05)

    warm, accepted, done, stages = [], [], [], []
    try:
        try:
            await box.start()
        except (CgroupError, OSError) as exc:
            raise BenchError(f"box daemon cannot start: {exc}") from None
        ready = asyncio.ensure_future(box.wait_ready())
        try:
            await idle("at start")
            await asyncio.wait_for(ready, timeout)
        finally:
            ready.cancel()
        progress("[boot] box daemon ready (warm pool of 1)")
        for i in range(n):
            await idle(f"before build {i + 1}")
            await asyncio.sleep(WARM_SETTLE_S)  # a pool cell has usually been idle a while
            client = await connect_unix(str(config.client_socket), Session("client", "bench", {"box"}))
            build_id = ""
            try:
                t0 = time.monotonic()
                await client.send("build.submit", request_id=f"bench-{i}", shape="", customer="bench",
                                  argv=["true"], env={}, cwd="/work", timeout_s=timeout)
                while True:
                    msg = await asyncio.wait_for(client.recv(), timeout)
                    if msg.name == "build.accepted":
                        build_id = msg["build_id"]
                        accepted.append((time.monotonic() - t0) * 1000)
                    elif msg.name == "exit":
                        done.append((time.monotonic() - t0) * 1000)
                        if msg["reason"] != "exited" or msg["code"] != 0:
                            raise BenchError(f"warm build {i + 1} ({build_id or 'not accepted'}) ended with "
                                             f"{msg['reason']} code {msg['code']}: {msg['message']}")
                        break
                    elif msg.name == "error":
                        raise BenchError(f"warm build {i + 1}: box said {msg['code']}: {msg['message']}")
            except TimeoutError:
                raise BenchError(f"warm build {i + 1}: no answer from the box within {timeout:g} s") from None
            except ChannelClosed as exc:
                raise BenchError(f"warm build {i + 1}: box closed the connection: {exc}") from None
            finally:
                client.close()
            rec = box.builds.get(build_id, {})
            if "warm_start_ms" not in rec:
                raise BenchError(f"warm build {i + 1}: the box recorded no warm_start_ms ({rec})")
            warm.append(float(rec["warm_start_ms"]))
            ready = rec.get("cell_premade") or {}
            stages.append(dict(rec.get("guest_start") or {}, run_sent_ms=rec.get("run_sent_ms", 0.0),
                               warm_start_ms=warm[-1], **{f"ready_{k}": v for k, v in ready.items()
                                                          if k in ("made_ms", "after_hello_ms")}))
            run.cell_ids.append(rec.get("cell", ""))
            progress(f"[boot] warm start {i + 1}/{n}: {warm[-1]:.1f} ms "
                     f"(client submit->accepted {accepted[-1]:.1f} ms, ->exit {done[-1]:.0f} ms)")
    finally:
        if notify is not None:
            os.environ["NOTIFY_SOCKET"] = notify
        await box.stop()
    return {"warm_start_ms": warm, "submit_to_accepted_ms": accepted, "submit_to_exit_ms": done,
            "stages": stages}


def warm_start_stages(stages: list[dict]) -> dict:
    """Where warm starts went, p50 of each stage (ms): the box until `run` is sent, the guest from
    `run` to `started` (of it: waiting for the pre-made container, crun), the rest (the channel
    both ways, message handling); how many builds got a pre-made container, and what making it
    cost while the cell was warm (in the guest; cell.hello -> cell.ready at the box)."""
    def p50(key) -> float:
        vals = [s[key] for s in stages if key in s]
        return round(percentile(vals, 50), 2) if vals else 0.0

    rest = [s["warm_start_ms"] - s["run_sent_ms"] - s["spawn_ms"] for s in stages if "spawn_ms" in s]
    return {
        "box_until_run_sent_ms": p50("run_sent_ms"),
        "guest_run_to_started_ms": p50("spawn_ms"),
        "guest_wait_premade_ms": p50("wait_premade_ms"),
        "guest_crun_ms": p50("crun_ms"),
        "channel_and_rest_ms": round(percentile(rest, 50), 2) if rest else 0.0,
        "premade": f"{sum(1 for s in stages if s.get('premade'))}/{len(stages)}",
        "premade_made_ms": p50("ready_made_ms"),
        "hello_to_ready_ms": p50("ready_after_hello_ms"),
    }


async def _boot_main(run: _BootRun, args, image_dir: Path, image_current: bool) -> dict:
    from hived import kvm
    from hived.box.cgroups import CgroupError, open_cgroups
    from hived.box.config import embedded
    from hived.box.daemon import CellImage

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    started = time.monotonic()
    machine = machine_info()
    try:
        accel = kvm.accelerator()
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    pinned = _pin_image(image_dir, run.tmp / "image")
    image = CellImage.at(run.tmp / "image" if pinned == "hardlink" else image_dir)
    defaults = embedded(run.tmp / "unused")  # the shape `hived up` boots: same for cold and warm
    shape = next(iter(defaults.shapes.values()))
    cgroup_note = "none: not root" if os.geteuid() != 0 else ""
    if os.geteuid() == 0:
        try:
            run.cgroups = open_cgroups(CGROUP_PARENT)
            cgroup_note = f"v{run.cgroups.version} {CGROUP_PARENT}/<cell>"
        except CgroupError as exc:
            cgroup_note = f"none: {exc}"
    run.cells_dir.mkdir()
    factory = _driver_factory(args.cmdline)
    timeout = args.boot_timeout
    one = dict(shape=shape, image=image, accel=accel, driver_factory=factory, timeout=timeout,
               vmm_overhead_mib=defaults.vmm_overhead_mib)

    for i in range(args.warmup):
        a = await _one_cell(run, "agent", **one)
        b = await _one_cell(run, "bare", **one)
        progress(f"[boot] warm-up {i + 1}/{args.warmup} (not counted): cold {a['boot_ms']:.0f} ms, "
                 f"bare {b['boot_ms']:.0f} ms")
    cold, bare = [], []
    for i in range(args.cells):
        cold.append(await _one_cell(run, "agent", **one))
        bare.append(await _one_cell(run, "bare", **one))
        progress(f"[boot] cell {i + 1}/{args.cells}: cold boot {cold[-1]['boot_ms']:.0f} ms, "
                 f"bare QEMU {bare[-1]['boot_ms']:.0f} ms")
    warm = await _warm_starts(run, args.cells, image, accel, factory, timeout)
    tpl = await _template_figures(run, args, image, accel, factory, timeout)

    cold_ms = [c["boot_ms"] for c in cold]
    bare_ms = [b["boot_ms"] for b in bare]
    stages = {}
    for name in sorted({k for c in cold for k in c["guest_stages_s"]}):
        vals = [c["guest_stages_s"][name] for c in cold if name in c["guest_stages_s"]]
        stages[name] = round(percentile(vals, 50), 3)
    return {
        "benchmark": "boot",
        "machine": dict(machine, loadavg_at_end=_loadavg(), qemu=_qemu_version()),
        "accelerator": accel,
        "cells": args.cells,
        "cold_boot_ms": dist_ms(cold_ms),
        "bare_qemu_ms": dist_ms(bare_ms),
        "ratio": round(percentile(cold_ms, 50) / percentile(bare_ms, 50), 3),
        "warm_start_ms": dist_ms(warm["warm_start_ms"]),
        "warm_start_stages_p50": warm_start_stages(warm["stages"]),
        "submit_to_accepted_ms": dist_ms(warm["submit_to_accepted_ms"]),
        "submit_to_exit_ms": dist_ms(warm["submit_to_exit_ms"]),
        **_template_report(tpl),
        "isolation_setup_ms": dist_ms([c["isolation_setup_ms"] for c in cold]),
        "teardown_ms": dist_ms([c["teardown_ms"] for c in cold]),
        "guest_stages_s_p50": stages,
        "config": {
            "shape": {"vcpus": shape.vcpus, "memory_mib": shape.memory_mib, "scratch_mib": shape.scratch_mib},
            "image": str(image_dir), "image_matches_code": image_current, "image_pinned": pinned,
            "guest_kernel": cold[0].get("kernel", "") if cold else "",
            "cgroups": cgroup_note, "warmup_pairs": args.warmup, "boot_timeout_s": timeout,
            "warm_settle_s": WARM_SETTLE_S,
            "warm_start": "each build on a warm cell of an idle box: pool full, its cell ready (cell.ready), "
                          "then warm_settle_s",
            "extra_cmdline": args.cmdline,
            "order": "cold, bare, cold, bare, ... (one at a time), then warm starts through a box daemon",
            "baseline": "bare_qemu_ms: same QEMU command, kernel and image, hived.mode=bare: the initramfs "
                        "mounts the disks, prints hived-bare-ready and reboots; launch -> QEMU exit",
            "ratio": "cold_boot_ms.p50 / bare_qemu_ms.p50",
        },
        "resources": {"tmp_dir": str(run.tmp), "cgroup_parents": [CGROUP_PARENT, run.box_cgroup_parent,
                                                                *run.extra_cgroup_parents],
                      "cell_ids": [c for c in run.cell_ids if c]},
        "elapsed_s": round(time.monotonic() - started, 1),
    }


async def _template_figures(run: _BootRun, args, image, accel: str, factory, timeout: float) -> dict:
    """restore_ms, template_ms, idle_pss_mib, burst_ms (hived/bench/templates.py)."""
    from hived.bench import templates as templatebench

    def on_box(box) -> None:
        run.extra_cgroup_parents.append(box.config.cgroup_parent)

    try:
        return await templatebench.measure(run.tmp / "templates", image, accel, factory, timeout, args.cells,
                                           progress, idle_cells=args.idle_cells, pool=args.burst_pool,
                                           on_box=on_box, hugepages=args.template_hugepages)
    except templatebench.TemplateBenchError as exc:
        raise BenchError(str(exc)) from None


def _template_report(t: dict) -> dict:
    pss = t["idle_pss_mib_all"]
    restored, cold = percentile(pss["restored"], 50), percentile(pss["cold"], 50)
    ram = t["idle_guest_ram_pss_mib_all"]
    ram_restored, ram_cold = percentile(ram["restored"], 50), percentile(ram["cold"], 50)
    return {
        "restore_ms": dist_ms(t["restore_ms_all"]),
        "restore_host_stages_ms_p50": t["restore_host_stages_ms_p50"],
        "restore_guest_steps_s_p50": t["restore_guest_steps_s_p50"],
        "template_ms": _r(t["template_ms"]),
        "template_state_bytes": t["template_state_bytes"],
        "idle_pss_mib": {"restored": _r(restored), "cold": _r(cold), "ratio": round(restored / cold, 3),
                         "cells_up": t["idle_cells"], "all": {k: [_r(v) for v in vs] for k, vs in pss.items()},
                         # the guest's RAM mapping alone: what is left of the VMM under KVM (no TCG buffer)
                         "guest_ram": {"restored": _r(ram_restored), "cold": _r(ram_cold),
                                       "ratio": round(ram_restored / ram_cold, 3)}},
        "burst_ms": {k: _r(v) for k, v in t["burst_ms"].items()},
        "burst_config": t["burst_config"],
        "template_hugepages": t.get("hugepages"),  # --template-hugepages: what the clones held
    }


def _cleanup(run: _BootRun) -> list[str]:
    """Synchronous last resort, after the event loop is gone (also after Ctrl-C, SIGTERM or an
    error): kill any QEMU whose command line names our temp dir, remove our cgroups and files.
    Returns what had to be removed here (normally nothing: the async paths clean up)."""
    from hived.box import leftovers
    from hived.box.cgroups import CgroupError, open_cgroups

    left = []
    pids = leftovers.vmm_pids(run.tmp)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            left.append(f"qemu pid {pid}")
    deadline = time.monotonic() + 5
    while any(os.path.exists(f"/proc/{pid}") for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    groups = [run.cgroups] if run.cgroups is not None else []
    for parent in [run.box_cgroup_parent, *run.extra_cgroup_parents]:
        if parent and os.geteuid() == 0:
            with contextlib.suppress(CgroupError):
                groups.append(open_cgroups(parent))
    for cg in groups:
        if cg is run.cgroups:  # shared parent: only our cells
            names = run.cgroup_cells | (set(cg.cells()) & set(run.cell_ids))
        else:                  # the daemon's parent is named after our temp dir: all of it
            names = set(cg.cells())
        for name in sorted(names):
            if any(d.exists() for d in cg.dirs(name)):
                left.append(f"cgroup {cg.parent}/{name}")
            try:
                cg.remove(name)
            except CgroupError as exc:
                progress(f"[boot] cannot remove cgroup {cg.parent}/{name}: {exc}")
        cg.remove_parent()
    if run.tmp.exists():
        shutil.rmtree(run.tmp, ignore_errors=True)
    return left


def run_boot(args) -> dict:
    import uvloop

    if args.cells < 1:
        raise BenchError(f"--cells must be >= 1, got {args.cells}")
    image_dir, current = resolve_image(args.image)
    run = _BootRun(Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir="/tmp")))
    try:
        return uvloop.run(_boot_main(run, args, image_dir, current))
    except asyncio.CancelledError:
        raise BenchError("interrupted (SIGTERM); everything it started was removed") from None
    finally:
        left = _cleanup(run)
        if left:
            progress(f"[boot] removed after the run: {', '.join(left)}")


def render_boot(r: dict) -> str:
    def row(name, d):
        return f"{name:<26} {d['p50']:>10.1f} {d['p95']:>10.1f} {d['min']:>10.1f} {d['max']:>10.1f}"

    head = f"{'boot (' + r['accelerator'] + ', ms)':<26} {'p50':>10} {'p95':>10} {'min':>10} {'max':>10}"
    lines = [head, "-" * len(head),
             row("cold boot -> cell.hello", r["cold_boot_ms"]),
             row("bare QEMU (baseline)", r["bare_qemu_ms"]),
             row("warm start -> started", r["warm_start_ms"]),
             row("restore -> cell.hello", r["restore_ms"]),
             row("client submit->accepted", r["submit_to_accepted_ms"]),
             row("isolation setup", r["isolation_setup_ms"]),
             row("teardown", r["teardown_ms"]),
             f"ratio cold/bare (p50): {r['ratio']:.2f}   cells: {r['cells']}   "
             f"cgroups: {r['config']['cgroups']}",
             "warm start stages (p50 ms): " + ", ".join(
                 f"{k} {v}" for k, v in r.get("warm_start_stages_p50", {}).items()),
             f"template made in {r['template_ms']:.0f} ms; idle PSS restored {r['idle_pss_mib']['restored']:.1f} "
             f"MiB vs cold {r['idle_pss_mib']['cold']:.1f} MiB (x{r['idle_pss_mib']['ratio']:.2f}); burst "
             + ", ".join(f"{k} {v:.0f} ms" for k, v in r["burst_ms"].items())]
    m = r["machine"]
    lines.append(f"machine: {m['nproc']} cpus ({m['cpu_model']}), {m['qemu']}, "
                 f"load {m['loadavg_at_start']} -> {m['loadavg_at_end']}")
    return "\n".join(lines)


def parser(p):
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--cells", type=int, default=10, help="cells of each kind, and warm builds (default 10)")
    p.add_argument("--image", default=None, help="cell image directory (default: the built image)")
    p.add_argument("--warmup", type=int, default=1,
                   help="uncounted cold+bare pairs first, to warm the page cache (default 1)")
    p.add_argument("--boot-timeout", type=float, default=BOOT_PHASE_TIMEOUT_S,
                   help="seconds a boot or build may take before the run is an error (default %(default)g)")
    p.add_argument("--idle-cells", type=int, default=3,
                   help="cells held up at once for idle_pss_mib, restored and cold (default %(default)d)")
    p.add_argument("--burst-pool", type=int, default=2,
                   help="warm pool size for burst_ms; 3x as many builds are submitted (default %(default)d)")
    p.add_argument("--template-hugepages", action="store_true",
                   help="template memory on huge pages ([box] template_hugepages; vm.nr_hugepages must be "
                        "reserved beforehand)")
    p.add_argument("--cmdline", default="",
                   help="extra guest kernel arguments for every cell (diagnosis; recorded in the JSON)")
    p.add_argument("--plot", metavar="FILE.png", default="",
                   help="also draw the latency CDFs of every start kind (needs matplotlib)")
    return p


run = run_boot
render = render_boot
