"""The box daemon: one process (uvloop) that owns every cell on this box.

    client --build.submit--> BoxDaemon --take warm cell--> WarmPool
                                 |  run / cancel / shutdown        ^ boots cells
                                 v                                 |
                              cell (VMM driver + channel) --------'
    output and exit flow back: cell -> box (paced, bounded) -> client
"""

import asyncio
import collections
import contextlib
import dataclasses
import functools
import logging
import os
import secrets
import time
from pathlib import Path

from hived import sdnotify
from hived.box import adopt, cellrecord, leftovers, prestart
from hived.box.builds import run_build
from hived.box.cell import Cell, CellState, new_cell_id
from hived.box.cgroups import CellLimits, CgroupError
from hived.box.config import BoxConfig
from hived.box.metrics import BoxMetrics
from hived.box.network import NetworkError
from hived.box.partition import NoCapacity, Partition
from hived.box.placement import place as place_cgroups
from hived.box.pool import BootFailed, NoRoom, WarmPool
from hived.box.templates import (
    HugePages,
    Template,
    TemplateFailed,
    TemplateStore,
    inputs_digest,
    memfd_prefix,
    new_memfd,
    template_inputs,
)
from hived.protocol.channel import Channel, ChannelClosed, unlink_socket
from hived.protocol.errors import ProtocolError
from hived.protocol.session import Session
from hived.vmm.base import CellSpec, VmmError
from hived.vmm.qemu import QemuMicrovm

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CellImage:
    kernel: Path
    initrd: Path
    rootfs: Path

    @classmethod
    def at(cls, d: Path) -> "CellImage":
        return cls(d / "vmlinuz", d / "initrd.img", d / "root.ext4")


@dataclasses.dataclass
class CellRuntime:
    """A cell and the host things it owns."""
    cell: Cell
    driver: object
    channel: Channel | None = None
    cgroup: bool = False
    watcher: asyncio.Task | None = None
    vmm_status: int | None = None
    destroyed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    isolation_ms: float = 0.0
    teardown_ms: float = 0.0
    alloc: object = None
    net: object = None  # hived.box.network.CellNetInfo
    tunnel: object = None  # hived.box.secure.CellTunnel (Secure Compute builds)
    wg_prestarted: object = None  # its WireGuard interface, started while warm (hived/box/prestart.py)
    image_lease: object = None  # path of the build image leased from the image cache while the cell lives
    vcpu_threads: dict = dataclasses.field(default_factory=dict)
    origin: str = "boot"  # "boot", "restore" (a template's clone) or "template" (a VM being saved)
    template: str = ""    # the template a restored cell came from
    start_ms: float = 0.0  # VMM start -> cell.hello
    start_stages_ms: dict = dataclasses.field(default_factory=dict)  # host side: VMM start -> each step
    facts: object = None   # hived.box.cellrecord.BuildFacts of the build it runs
    record_state: str = "warm"  # warm / assigned / running, in its cell record
    vmm_start_ticks: int = 0
    saved: bool = False    # it has a cell record: a new daemon may adopt it
    adopted: bool = False  # taken over from a previous box daemon (hived/box/adopt.py)
    # cell.ready (protocol v5): its build container is pre-made, or why not; None until it came.
    # first_recv: the channel read waiting for it while the cell is warm; a build takes it over.
    premade: dict | None = None
    first_recv: asyncio.Future | None = None


_VERB = {"boot": "boot", "restore": "restore", "template": "boot as a template"}


class BoxDaemon:
    def __init__(self, config: BoxConfig, *, image: CellImage, accelerator: str,
                 driver_factory=QemuMicrovm) -> None:
        self.config = config
        self.image = image
        self.accelerator = accelerator
        self.driver_factory = driver_factory
        self.metrics = BoxMetrics()
        self.cells: dict[str, CellRuntime] = {}
        self.pools: dict[str, WarmPool] = {}
        self.builds: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self.cancels: dict[str, asyncio.Event] = {}
        self.boot_sem = asyncio.Semaphore(config.boot_concurrency)
        self.cgroups = None
        self.network = None
        self.partition = make_partition(config)
        self.metrics.watch_partition(self.partition)
        self.metrics_port = 0
        self.leftovers_cleaned: list[str] = []
        self.adoption: dict = {}  # what start() adopted (hived/box/adopt.py)
        self.detaching = False    # stopping without ending the cells (detach())
        self.stopping = False
        self._server = None
        self._watchdog: asyncio.Task | None = None
        self._clients: set[Channel] = set()
        self._tasks: set[asyncio.Task] = set()
        self.control_link = None  # hived.box.controllink.ControlLink when [control] is configured
        self.peers = None         # hived.box.peers.PeerDirectory: box peers, with a control link
        self.peer_server = None   # hived.box.peers.PeerServer when peer_listen is set
        self._images = None  # hived.oci.cache.ImageCache, opened on first use
        self._repos = None   # hived.repos.cache.RepoCache, opened on first use
        self.started_at = time.time()
        self.templates = TemplateStore(self._make_template, max_age_s=config.template_max_age_s,
                                       max_clones=config.template_max_clones) if config.templates else None

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        self.partition.check_shapes(cfg.shapes.values())  # PartitionError: refuse to start
        cfg.cells_dir.mkdir(parents=True, exist_ok=True)
        if cfg.templates and cfg.template_hugepages:
            self._check_hugepages()
        try:
            self.cgroups = place_cgroups(cfg.cgroup_placement, cfg.name,  # hived/box/placement.py
                                         cpu_weight=cfg.cells_cpu_weight)
        except CgroupError as exc:
            if os.geteuid() == 0:
                raise
            log.warning("running without per-cell cgroups: %s", exc)
        # Cells a previous daemon left running are adopted; what is left of the others goes.
        alive, dead = adopt.find(cfg.cells_dir) if cfg.adopt_cells else ([], [])
        keep = {rec.cell_id for rec in alive}
        self.leftovers_cleaned = leftovers.clean(cfg.cells_dir, self.cgroups, keep=keep)
        if cfg.network:
            from hived.box.network import DEFAULT_DENY, CellNetwork

            try:
                self.network = CellNetwork(cfg.name, cfg.net_subnet, cfg.net_uplink or None,
                                           deny=(*DEFAULT_DENY, *cfg.net_deny))
                for rec in alive:
                    if rec.net is not None:
                        self.network.adopt(rec.cell_id, rec.net)
                for cell_id in self.network.cells():  # after the VMMs above are gone
                    if cell_id in keep:
                        continue
                    await self.network.teardown(cell_id)
                    if cell_id not in self.leftovers_cleaned:
                        self.leftovers_cleaned.append(cell_id)
                await self._clean_tunnels(keep)
                if cfg.secure_prestart:
                    why = await asyncio.get_running_loop().run_in_executor(None, prestart.host_problem)
                    if why:
                        raise NetworkError(why)
            except NetworkError as exc:
                raise CgroupError(f"cell networking cannot start: {exc}") from None
        self.metrics_port = self.metrics.serve(cfg.metrics_addr, cfg.metrics_port)
        unlink_socket(str(cfg.client_socket))
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(self._client_factory, str(cfg.client_socket))
        os.chmod(cfg.client_socket, 0o660)
        link = cfg.extra.get("control")
        if link is not None:
            from hived.box.controllink import ControlLink

            self.control_link = ControlLink(self, link)
        t0 = time.monotonic()
        adopt.report_dead(self, dead)
        warm = await adopt.adopt_all(self, alive)
        self.adoption = {"cells": len(alive), "adopted": sum(1 for rt in self.cells.values() if rt.adopted),
                         "warm": len(warm), "lost": [why for _, rec, why in dead if rec is not None],
                         "ms": round((time.monotonic() - t0) * 1000, 1), "since_process_start_ms": _process_age_ms()}
        if alive or dead:
            log.warning("box %s: adopted %d of %d cell(s) a previous daemon left running in %.0f ms "
                        "(%.0f ms after the process started)", cfg.name, self.adoption["adopted"], len(alive),
                        self.adoption["ms"], self.adoption["since_process_start_ms"])
        for shape in cfg.shapes.values():
            pool = WarmPool(shape, self.boot_cell, self.metrics)
            self.pools[shape.name] = pool
            pool.warm.extend(rt for rt in warm if rt.cell.shape == shape.name)
            pool.start()
        interval = sdnotify.watchdog_interval()
        if interval:
            self._watchdog = loop.create_task(self._watchdog_loop(interval))
        if self.control_link is not None:
            await self._start_peers(link)
            self.control_link.start()

    def _check_hugepages(self) -> None:
        """[box] template_hugepages: the host must have huge pages reserved (vm.nr_hugepages) and every
        shape's memory must be whole huge pages; else the box does not start, saying what to set."""
        hp = HugePages.read()
        need = sum(hp.pages(s.memory_mib << 20) for s in self.config.shapes.values()) * 2
        if not hp.size or hp.total == 0:
            raise CgroupError("[box] template_hugepages = true but this host has no huge pages reserved "
                              f"(vm.nr_hugepages = {hp.total}): reserve them, e.g. `sysctl -w vm.nr_hugepages="
                              f"{need}` (a template and one clone per shape), or set template_hugepages = false")
        for s in self.config.shapes.values():
            if (s.memory_mib << 20) % hp.size:
                raise CgroupError(f"[box] template_hugepages = true: shapes.{s.name}.memory_mib = {s.memory_mib} "
                                  f"is not a whole number of {hp.size >> 10} kB huge pages: make it a multiple "
                                  f"of {hp.size >> 20 or 1} MiB")

    async def _start_peers(self, link) -> None:
        """Box peers (hived/box/peers.py): serve the image cache on peer_listen, fetch from the hive;
        TLS with the box's hive certificate (hived/box/peertls.py), or no part in the peer link."""
        from hived.box import peertls
        from hived.box.peers import PeerDirectory, PeerMetrics, PeerServer, split_addr

        cfg = self.config
        box_id = link.box_id
        try:
            tls = peertls.load(link.ca_file, link.cert_file, link.key_file, box_id)
        except peertls.PeerTlsError as exc:
            tls = None
            log.log(logging.WARNING if cfg.peer_listen else logging.INFO,
                    "box %s takes no part in the peer link (images come from the registry): %s", box_id, exc)
        self.peers = PeerDirectory(self, box_id, "", PeerMetrics(self.metrics.registry), tls)
        if cfg.peer_listen and tls is not None:
            host, port = split_addr(cfg.peer_listen)
            self.peer_server = PeerServer(self.peers, cfg.peer_serve_bytes_s)
            port = await self.peer_server.start(host, port)
            self.peers.peer_addr = cfg.peer_advertise or f"{host}:{port}"
            log.info("box %s serves its peers on %s (at most %d bytes/s)", box_id, self.peers.peer_addr,
                     cfg.peer_serve_bytes_s)

    async def _clean_tunnels(self, keep: set[str]) -> None:
        """WireGuard processes and sockets of a previous run (kill -9): Secure Compute tunnels and
        interfaces pre-started with warm cells, also those of cells being adopted (`keep`: the
        adopted warm ones get new ones, hived/box/prestart.py), and any such interface left in
        the namespaces of those cells."""
        from hived.secure import wireguard

        netns = (self.network.host_netns, *(self.network.netns_name(c) for c in sorted(keep)))
        removed = await wireguard.run_blocking(
            functools.partial(wireguard.clean_leftovers, wireguard.box_prefix(self.network.tag), netns=netns))
        for what in removed:
            log.warning("box %s: removed leftover tunnel %s", self.config.name, what)

    async def wait_ready(self) -> None:
        """Until every pool with a target has had a warm cell; then READY=1."""
        await asyncio.gather(*(p.ready.wait() for p in self.pools.values() if p.target > 0))
        sdnotify.notify(f"READY=1\nSTATUS=serving; {self.status_line()}")

    async def _watchdog_loop(self, interval: float) -> None:
        while True:
            sdnotify.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def detach(self) -> None:
        """Go away and leave the cells running, each with its record: the next daemon adopts
        them (a restart that loses no build). Cells still booting have no record: they go."""
        self.detaching = True
        log.info("box %s: detaching; %d cell(s) keep running for the next daemon", self.config.name,
                 sum(1 for rt in self.cells.values() if rt.saved))
        await self.stop()

    async def stop(self) -> None:
        self.stopping = True
        sdnotify.notify("STOPPING=1")
        if self.control_link is not None:
            await self.control_link.stop()
        if self.peer_server is not None:
            await self.peer_server.stop()
        if self._server:
            self._server.close()
        for ch in list(self._clients):
            ch.close("box stopping")
        for pool in self.pools.values():
            await pool.stop()
        if self.templates is not None:
            await self.templates.close()  # clones keep running on their own private copies
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(self.destroy(rt, "box stopping") for rt in list(self.cells.values())),
                             return_exceptions=True)
        if self._watchdog:
            self._watchdog.cancel()
        unlink_socket(str(self.config.client_socket))
        kept = [rt for rt in self.cells.values() if rt.saved]
        if self.cgroups is not None and not kept:
            self.cgroups.remove_parent()
        if self.network is not None:
            if kept:
                self.network.leave()
            else:
                await self.network.close()
        for cache in (self._images, self._repos):
            if cache is not None:
                cache.close()
        self.metrics.close()

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- caches and pools per build image ---------------------------------------------------
    @property
    def images(self):
        """The box's build image cache (hived/oci), opened on first use."""
        if self._images is None:
            from hived.oci.cache import ImageCache

            self._images = ImageCache(self.config.oci_dir, max_bytes=self.config.oci_max_mib << 20,
                                      insecure=self.config.oci_insecure)
        return self._images

    @property
    def repos(self):
        """The box's repository cache (hived/repos), opened on first use."""
        if self._repos is None:
            from hived.repos.cache import RepoCache

            self._repos = RepoCache(self.config.repos_dir, self.config.repos_max_mib << 20,
                                    protocols=self.config.repo_protocols)
        return self._repos

    def pool_for(self, shape, image=None) -> WarmPool:
        """The warm pool of `shape` whose cells have `image` attached; made on first use and kept
        (image_pool_target warm cells) so the next build of that image starts warm."""
        if image is None:
            return self.pools[shape.name]
        key = f"{shape.name}@{image.digest}"
        pool = self.pools.get(key)
        if pool is None:
            async def boot(shape, key=key, image=image):
                return await self.boot_cell(shape, pool_key=key, image=image)

            pool = WarmPool(shape, boot, self.metrics, key=key, image=image, target=self.config.image_pool_target)
            self.pools[key] = pool
            pool.start()
        return pool

    # -- cells -----------------------------------------------------------------------------
    def cell_spec(self, cell: Cell, shape, cgroup_procs, mode: str = "agent", alloc=None, net=None,
                  image_file=None, memory_fd: int = -1, memory_shared: bool = False,
                  restore: bool = False, scratch_image_fd: int = -1) -> CellSpec:
        uid = self.config.vmm_uid_base + alloc.slot if (alloc and self.config.vmm_uid_base) else 0
        return CellSpec(
            cores=alloc.cores if alloc else (), vmm_uid=uid,
            tap_fd=net.tap_fd if net else -1, mac=net.mac if net else "", net_cmdline=_net_cmdline(net, mode),
            netns=net.netns_path if net else "",
            cell_id=cell.id, cell_dir=self.config.cells_dir / cell.id, vcpus=shape.vcpus,
            memory_mib=shape.memory_mib, scratch_mib=shape.scratch_mib,
            kernel=self.image.kernel, initrd=self.image.initrd, rootfs=self.image.rootfs,
            accelerator=self.accelerator, mode=mode, cgroup_procs=tuple(cgroup_procs),
            disk_bytes_s=shape.disk_bytes_s, disk_iops=shape.disk_iops,
            image_file=image_file, source_slot_mib=self.config.source_slot_mib if mode != "bare" else 0,
            memory_fd=memory_fd, memory_shared=memory_shared, restore=restore,
            scratch_image_fd=scratch_image_fd,
        )

    async def boot_cell(self, shape, pool_key: str = "", image=None) -> CellRuntime:
        """A new warm cell for the pool `pool_key`: restored from the pool's template when there is
        one (made first if need be), booted otherwise, and booted when the restore fails."""
        key = pool_key or shape.name
        if self.templates is not None:
            try:
                digest = self.template_digest(shape, image)
            except OSError as exc:  # an input vanished (image being rebuilt): boot
                log.warning("pool %s: no template: %s", key, exc)
            else:
                tpl = await self.templates.get(key, digest, shape, image)
                short = HugePages.read().shortage(shape.memory_mib << 20, f"a clone of template {tpl.id}") \
                    if tpl is not None and tpl.hugetlb else ""
                if short:  # the template stays: the next clone may find room
                    log.warning("pool %s: booting, not restoring: %s", key, short)
                elif tpl is not None:
                    try:
                        return await self._start_cell(shape, key, image, origin="restore", template=tpl)
                    except BootFailed as exc:
                        self.templates.discard(key, f"a clone failed to restore: {exc}", tpl)
        return await self._start_cell(shape, key, image, origin="boot")

    def template_digest(self, shape, image) -> str:
        from hived.vmm.qemu import host_tsc_khz

        return inputs_digest(template_inputs(
            shape, image, self.image, accelerator=self.accelerator, source_slot_mib=self.config.source_slot_mib,
            nic=self.network is not None, tsc_khz=host_tsc_khz() if self.accelerator != "kvm" else 0))

    async def _make_template(self, key: str, digest: str, shape, image) -> Template:
        """Boot a cell in template mode, save it at its snapshot point, keep its memory and state."""
        t0 = time.monotonic()
        hugetlb = self.config.template_hugepages
        if hugetlb:
            short = HugePages.read().shortage(shape.memory_mib << 20, f"the template of pool {key}")
            if short:
                raise TemplateFailed(short)
        try:
            memory_fd = new_memfd(f"{memfd_prefix(self.config.name)}{key}-memory", shape.memory_mib << 20,
                                  hugetlb=hugetlb)
        except OSError as exc:
            raise TemplateFailed(f"template memory of pool {key}{' on huge pages' if hugetlb else ''}: "
                                 f"{exc.strerror}" + (" (vm.nr_hugepages)" if hugetlb else "")) from None
        tpl = Template(id="t" + secrets.token_hex(4), key=key, digest=digest, made_at=t0, memory_fd=memory_fd,
                       state_fd=new_memfd(f"{memfd_prefix(self.config.name)}{key}-state"), hugetlb=hugetlb)
        try:
            rt = await self._start_cell(shape, key, image, origin="template", template=tpl)
            try:
                tpl.state_bytes = await rt.driver.snapshot(tpl.state_fd, self.config.boot_timeout_s)
                tpl.scratch_fd = new_memfd(f"{memfd_prefix(self.config.name)}{key}-scratch")
                tpl.scratch_bytes = await rt.driver.save_scratch(tpl.scratch_fd)
            finally:
                await self.destroy(rt, f"template {tpl.id} saved" if tpl.state_bytes else "template not saved")
            tpl.seal()  # the template VM is gone: no writable mapping is left
        except BootFailed as exc:
            tpl.close()
            raise TemplateFailed(str(exc)) from None
        except (VmmError, OSError) as exc:
            tpl.close()
            raise TemplateFailed(f"template {tpl.id}: {exc}") from None
        except BaseException:
            tpl.close()
            raise
        tpl.made_at = time.monotonic()
        tpl.make_ms = (tpl.made_at - t0) * 1000
        tpl.boot = rt.cell.boot
        return tpl

    async def _start_cell(self, shape, key: str, image, origin: str, template: Template | None = None) -> CellRuntime:
        """Boot (origin "boot"), restore from `template` ("restore"), or boot one to make `template`
        ("template": returns once the guest reached its snapshot point, never WARM)."""
        # A cell is named after its pool ("shape" or "shape@digest"): that is where it returns.
        cell = Cell(new_cell_id(), key, on_change=self.metrics.on_cell_change)
        self.metrics.cells.labels(cell.state.value).inc()
        rt = CellRuntime(cell, self.driver_factory(), origin=origin)
        self.cells[cell.id] = rt
        memory_fd = state_fd = scratch_fd = -1
        async with self.boot_sem:
            try:
                rt.alloc = alloc = self.partition.admit(cell.id, shape)
            except NoCapacity as exc:
                await self.destroy(rt, f"no room: {exc}")
                raise NoRoom(str(exc)) from None
            try:
                t0 = time.monotonic()
                procs = []
                if self.cgroups is not None:
                    limits = CellLimits(memory_bytes=alloc.memory_mib << 20, cpus=alloc.cpuset, pids_max=4096,
                                        disk_bytes_s=shape.disk_bytes_s, disk_iops=shape.disk_iops,
                                        disk_dev=_block_device(self.config.cells_dir))
                    procs = self.cgroups.create(cell.id, limits)
                    rt.cgroup = True
                if self.network is not None:
                    # Set up in a worker thread, which a cancel cannot stop: on cancel, wait for it
                    # to finish so destroy() below tears down what it made.
                    setup = asyncio.ensure_future(
                        self.network.setup(cell.id, shape.net_in_bits_s, shape.net_out_bits_s))
                    try:
                        rt.net = await asyncio.shield(setup)
                    except asyncio.CancelledError:
                        with contextlib.suppress(Exception):
                            rt.net = await setup
                        raise
                if image is not None:
                    # The cell holds a lease on its image: never evicted while attached.
                    from hived.oci.errors import OciError

                    try:
                        rt.image_lease = self.images.acquire(image.digest)
                    except OciError as exc:
                        raise VmmError(f"build image {image.digest} is not usable: {exc}") from None
                if origin == "restore":
                    memory_fd, state_fd, scratch_fd = template.clone_fds()
                    rt.template = template.id
                elif origin == "template":
                    memory_fd = template.memory_fd
                await rt.driver.prepare(self.cell_spec(
                    cell, shape, procs, alloc=alloc, net=rt.net, image_file=rt.image_lease,
                    mode="template" if origin == "template" else "agent", memory_fd=memory_fd,
                    memory_shared=origin == "template", restore=origin == "restore", scratch_image_fd=scratch_fd))
                rt.isolation_ms = (time.monotonic() - t0) * 1000
                cell.transition(CellState.BOOTING)
                t_vmm = time.monotonic()
                cell.pid = await rt.driver.launch()
                if rt.net is not None:
                    self.network.release_fd(cell.id)  # the VMM has its own copy now
                stage = functools.partial(_stage, rt.start_stages_ms, t_vmm)
                stage("launched")
                # Connected before a clone is restored: its guest never sees the port close.
                await rt.driver.connect(self.config.boot_timeout_s)
                if origin == "restore":
                    os.close(memory_fd)  # QEMU has its own
                    memory_fd = -1
                    rt.vcpu_threads = await rt.driver.restore(state_fd, alloc.cores, self.config.boot_timeout_s)
                    os.close(state_fd)
                    state_fd = -1
                    stage("restored")
                else:
                    rt.vcpu_threads = await rt.driver.pin_vcpus(alloc.cores)
                rt.watcher = asyncio.get_running_loop().create_task(self._watch_vmm(rt))
                rt.channel = await rt.driver.accept(self.config.boot_timeout_s)
                stage("channel")
                if origin == "restore":
                    # The clone becomes its own before it says cell.hello (hived/cell/identity.py).
                    await rt.channel.send("cell.restore", cell_id=cell.id, entropy=os.urandom(64),
                                          time_ns=time.time_ns(), net=rt.net.cmdline if rt.net else "",
                                          mac=rt.net.mac if rt.net else "")
                msg = await asyncio.wait_for(rt.channel.recv(), self.config.boot_timeout_s)
                if origin == "template":
                    if msg.name != "cell.template":
                        raise ProtocolError("bad_message", f"expected cell.template from template VM {cell.id}, "
                                            f"got {msg.name}")
                    cell.boot = dict(msg["boot"], kernel=msg["kernel"])
                    return rt
                if msg.name != "cell.hello" or msg["cell_id"] != cell.id:
                    raise ProtocolError("bad_message", f"expected cell.hello from {cell.id}, got {msg.name} "
                                        f"{msg.fields.get('cell_id', '')!r}")
                cell.boot = dict(msg["boot"], kernel=msg["kernel"])
                rt.start_ms = stage("hello")
                await prestart.prestart(self, rt)  # [box] secure_prestart: its WireGuard interface, no keys
                cell.transition(CellState.WARM)
                self.save_cell(rt, "warm")
                self._await_ready(rt)
                if template is not None:
                    log.info("cell %s restored from template %s in %.0f ms", cell.id, template.id, rt.start_ms)
            except (VmmError, CgroupError, ProtocolError, ChannelClosed, TimeoutError, OSError,
                    NetworkError) as exc:
                why = f"cell {cell.id} failed to {_VERB[origin]}: {exc}"
                if isinstance(exc, (ChannelClosed, TimeoutError, ProtocolError)):
                    why += f"; console: {rt.driver.console_tail(6) or '(empty)'}"
                log.warning("%s", why)
                self.metrics.cell_failures.labels("boot").inc()
                self.metrics.start_failures.labels(shape.name, origin).inc()
                await self.destroy(rt, why)
                raise BootFailed(why) from None
            except asyncio.CancelledError:
                await self.destroy(rt, "box stopping")
                raise
            except Exception as exc:  # a bug must not leak the cell: clean up, report, go on
                log.exception("cell %s: internal error while starting", cell.id)
                self.metrics.cell_failures.labels("boot").inc()
                self.metrics.start_failures.labels(shape.name, origin).inc()
                await self.destroy(rt, f"internal error: {exc!r}")
                raise BootFailed(f"cell {cell.id} failed to {_VERB[origin]}: internal error: {exc!r}") from None
            finally:
                for fd in (memory_fd if origin == "restore" else -1, state_fd, scratch_fd):
                    if fd >= 0:
                        os.close(fd)
        self.metrics.starts.labels(shape.name, origin).inc()
        if origin == "restore":
            self.metrics.restore_seconds.labels(shape.name).observe(rt.start_ms / 1000)
        else:
            self.metrics.boot_seconds.labels(shape.name).observe(cell.boot_seconds())
        return rt

    def _await_ready(self, rt: CellRuntime) -> None:
        """A warm cell says cell.ready once its build container is pre-made (hived/cell/premade.py);
        the read waits here until then, or until a build takes it over (run_build)."""
        if rt.channel.session.version < 5:
            rt.premade = {"premade": False, "message": f"the cell speaks protocol v{rt.channel.session.version}"}
            return
        t_hello = time.monotonic()
        read = rt.first_recv = asyncio.ensure_future(rt.channel.recv())

        def done(fut: asyncio.Future) -> None:
            if fut.cancelled() or fut.exception() is not None or rt.first_recv is not fut:
                return  # closed (the cell's end is seen elsewhere), or a build has the read now
            msg = fut.result()
            if msg.name == "cell.ready":
                rt.first_recv = None
                self.cell_ready(rt, msg, (time.monotonic() - t_hello) * 1000)

        read.add_done_callback(done)

    def cell_ready(self, rt: CellRuntime, msg, after_hello_ms: float | None = None) -> None:
        rt.premade = {"premade": msg["premade"], "made_ms": round(msg["made_ms"], 1), "message": msg["message"]}
        if after_hello_ms is not None:
            rt.premade["after_hello_ms"] = round(after_hello_ms, 1)
        if not msg["premade"]:  # info: hived.premade=off says so too; status and build records show it
            log.info("cell %s has no pre-made build container (its build starts the ordinary way): %s",
                     rt.cell.id, msg["message"])

    def new_runtime(self, cell: Cell, **fields) -> CellRuntime:
        return CellRuntime(cell, self.driver_factory(), **fields)

    def save_cell(self, rt: CellRuntime, state: str | None = None) -> None:
        """The cell's durable facts, for a daemon that starts again (hived/box/cellrecord.py)."""
        from hived.vmm.qemu import process_start_ticks

        cell = rt.cell
        if not cell.alive or not cell.pid or not self.config.adopt_cells:
            return
        if state is not None:
            rt.record_state = state
        alloc = dataclasses.asdict(rt.alloc) if rt.alloc else {}
        net = None
        if rt.net is not None:
            net = {k: v for k, v in dataclasses.asdict(rt.net).items() if k != "tap_fd"}
        shape = cell.shape.split("@", 1)[0]
        record = cellrecord.CellRecord(
            cell_id=cell.id, pool=cell.shape, shape=shape, origin=rt.origin, vmm_pid=cell.pid,
            vmm_start_ticks=rt.vmm_start_ticks or process_start_ticks(cell.pid), alloc=alloc, net=net,
            cgroup=rt.cgroup, image=cell.shape.split("@", 1)[1] if "@" in cell.shape else "",
            template=rt.template, boot=cell.boot, state=rt.record_state,
            build=rt.facts if rt.record_state != "warm" else None)
        rt.vmm_start_ticks = record.vmm_start_ticks
        try:
            cellrecord.write(self.config.cells_dir / cell.id, record)
            rt.saved = True
        except OSError as exc:  # the cell runs on; only a restart of the daemon would lose it
            log.error("cell %s: cannot write its record: %s", cell.id, exc)

    async def _watch_vmm(self, rt: CellRuntime) -> None:
        status = await rt.driver.wait_exit()
        rt.vmm_status = status
        if rt.cell.alive and rt.cell.state is not CellState.RUNNING:
            # A warm cell whose VMM died: remove it from the pool and refill.
            why = f"VMM exited with status {status} while {rt.cell.state.value}; " \
                  f"console: {rt.driver.console_tail(6) or '(empty)'}"
            pool = self.pools.get(rt.cell.shape)
            if pool and rt in pool.warm:
                pool.warm.remove(rt)
                pool.kick()
            if rt.cell.state is CellState.WARM:
                self.metrics.cell_failures.labels("warm").inc()
                await self.destroy(rt, why)

    async def destroy(self, rt: CellRuntime, reason: str = "") -> None:
        """Remove everything the cell owns; safe in any state, and twice."""
        cell = rt.cell
        if cell.state is CellState.DESTROYED:
            return
        if self.detaching and rt.saved and cell.alive:
            await prestart.remove(rt)  # remade by the next daemon (hived/box/prestart.py)
            rt.driver.detach()  # the cell and all it owns stay for the next daemon
            return
        t0 = time.monotonic()
        if cell.alive:
            cell.transition(CellState.FAILED, reason)
        try:
            await rt.driver.destroy()
        finally:
            if rt.tunnel is not None:
                await rt.tunnel.close()
            await prestart.remove(rt)
            if self.network is not None and (rt.net is not None or cell.id in self.network.known()):
                try:
                    await self.network.teardown(cell.id)
                except Exception as exc:  # never stop the rest of the cleanup
                    log.error("cell %s: network teardown: %s", cell.id, exc)
            if rt.image_lease is not None:
                lease, rt.image_lease = rt.image_lease, None
                try:
                    self.images.release(lease)
                except Exception as exc:  # never stop the rest of the cleanup
                    log.error("cell %s: image lease: %s", cell.id, exc)
            if rt.cgroup:
                try:
                    self.cgroups.remove(cell.id)
                except CgroupError as exc:
                    log.error("cell %s: %s", cell.id, exc)
            if rt.watcher and asyncio.current_task() is not rt.watcher:
                rt.watcher.cancel()
            self.partition.release(cell.id)
            rt.teardown_ms = (time.monotonic() - t0) * 1000
            cell.transition(CellState.DESTROYED)
            self.cells.pop(cell.id, None)
            rt.destroyed.set()
            if rt.alloc is not None:  # its cores and memory are free: any shape may fit now
                for pool in self.pools.values():
                    pool.room_freed()
            pool = self.pools.get(cell.shape)
            if pool:
                pool.kick()

    # -- clients ---------------------------------------------------------------------------
    def _client_factory(self) -> Channel:
        session = Session("box", self.config.name, {"client", "control"})
        channel = Channel(session, hello_timeout=10.0)
        self.spawn(self._serve_client(channel))
        return channel

    async def _serve_client(self, channel: Channel) -> None:
        self._clients.add(channel)
        mine: set[str] = set()
        try:
            await channel.handshake()
            while True:
                msg = await channel.recv()
                if msg.name == "build.submit":
                    build_id = "b" + secrets.token_hex(6)
                    mine.add(build_id)
                    self.cancels[build_id] = asyncio.Event()
                    self.spawn(run_build(self, channel, build_id, msg))
                elif msg.name == "cancel":
                    event = self.cancels.get(msg["build_id"])
                    if event is None:
                        await channel.send("error", code="not_found", fatal=False, ref=msg["build_id"],
                                           message=f"no running build {msg['build_id']} on this box")
                    else:
                        event.set()
                elif msg.name == "status.get":
                    await channel.send("status", report=self.status())
                elif msg.name == "ping":
                    await channel.send("pong", seq=msg["seq"])
        except ChannelClosed:
            pass
        finally:
            self._clients.discard(channel)
            for build_id in mine:  # a client that leaves takes its builds with it
                event = self.cancels.get(build_id)
                if event:
                    event.set()

    # -- reporting -------------------------------------------------------------------------
    def record_build(self, build_id: str, **fields) -> dict:
        rec = self.builds.setdefault(build_id, {"id": build_id})
        rec.update(fields)
        while len(self.builds) > 200:
            self.builds.popitem(last=False)
        return rec

    def status(self) -> dict:
        by_state = collections.Counter(rt.cell.state.value for rt in self.cells.values())
        return {
            "box": self.config.name,
            "accelerator": self.accelerator,
            "cells_by_state": {s.value: by_state.get(s.value, 0) for s in CellState},
            "cells": [
                {"id": rt.cell.id, "shape": rt.cell.shape, "state": rt.cell.state.value,
                 "pid": rt.cell.pid, "build": rt.cell.build_id,
                 "cores": list(rt.alloc.cores) if rt.alloc else [],
                 "net": {"netns": rt.net.netns, "ip": rt.net.guest_ip} if rt.net else None,
                 "vcpu_threads": {str(k): v for k, v in rt.vcpu_threads.items()},
                 "origin": rt.origin, "template": rt.template, "adopted": rt.adopted, "start_ms": round(rt.start_ms, 1),
                 "wireguard_prestarted": rt.wg_prestarted.name if rt.wg_prestarted is not None else "",
                 "premade": rt.premade,
                 "start_stages_ms": rt.start_stages_ms,
                 "boot_s": round(rt.cell.boot_seconds() or 0, 3), "boot": rt.cell.boot}
                for rt in self.cells.values()
            ],
            "pools": {name: pool.describe() for name, pool in self.pools.items()},
            "templates": self.templates.describe() if self.templates is not None else None,
            "partition": {**self.partition.describe(), "cells_cpu_weight": self.config.cells_cpu_weight},
            "builds": list(self.builds.values())[-50:],
            "leftovers_cleaned_at_start": self.leftovers_cleaned,
            "adopted_at_start": self.adoption,
            "metrics_port": self.metrics_port,
            "control": self.control_link.describe() if self.control_link is not None else None,
            "peers": {"addr": self.peers.peer_addr, "hive": self.peers.hive,
                      "serving": self.peer_server is not None,
                      "tls": self.peers.tls is not None} if self.peers is not None else None,
        }

    def status_line(self) -> str:
        warm = sum(len(p.warm) for p in self.pools.values())
        return f"{len(self.cells)} cells, {warm} warm"


def _process_age_ms() -> float:
    """How long this process has run (its start time in /proc: clock ticks since boot)."""
    from hived.vmm.qemu import process_start_ticks

    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return round((uptime - process_start_ticks(os.getpid()) / os.sysconf("SC_CLK_TCK")) * 1000, 1)


def _stage(stages: dict, t0: float, name: str) -> float:
    stages[name] = round((time.monotonic() - t0) * 1000, 1)
    return stages[name]


def _net_cmdline(net, mode: str) -> str:
    if net is None:
        return ""
    # A template's network is configured by each clone (cell.restore): only its modules load.
    return "hived.nic=1" if mode == "template" else net.cmdline


def make_partition(config: BoxConfig) -> Partition:
    memory = config.memory_mib
    if not memory:
        with open("/proc/meminfo") as f:
            total_kib = int(f.readline().split()[1])
        memory = max(0, (total_kib >> 10) - 1024)
    return Partition(
        host_cores=sorted(os.sched_getaffinity(0)), reserved_cores=config.reserved_cores,
        memory_mib=memory, vmm_overhead_mib=config.vmm_overhead_mib, overcommit=config.overcommit,
        disk_bytes_s=config.disk_bytes_s, net_bits_s=config.net_bits_s,
    )


def _block_device(path: Path) -> str:
    """major:minor of the block device holding `path` (where the cells' disks live)."""
    st = os.stat(path)
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    # A partition's throttle must name the whole disk: follow sysfs to the parent.
    sys_dev = Path(f"/sys/dev/block/{major}:{minor}")
    if (sys_dev / "partition").exists():
        return (sys_dev.resolve().parent / "dev").read_text().strip()
    return f"{major}:{minor}" if sys_dev.exists() else ""
