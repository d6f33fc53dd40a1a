r"""Per-cell networking on a box: network namespaces, a tap for the VMM, NAT egress, rate limits.

One box, one router namespace; per cell, a namespace of its own holding the VMM's tap:

    guest eth0 ==virtio-net== QEMU --fd--> tap0 ---- cell ns hv-<box>-<cell> ---- v<8hex>b
      .2/30                                 .1/30   (ip_forward=1, rp_filter=1)       .6/30
                                      tc: tbf root (host->guest)                        |
                                      ingress -u32/mirred-> ifb0 -> tbf (guest->host)   | veth
                                                                                        |
                     router ns hvr-<box> (ip_forward=1, rp_filter=1, nftables) ---- v<8hex>a .5/30
                       |  route guest /30 via .6; forward policy DROP:
                       |    established/related accept; cell -> up0 accept unless denied
                       |  postrouting: oifname up0 masquerade
                      up0 (only with an uplink)
                       | veth
                    hvu<box> in the host ns: input from it dropped; forward only to the uplink;
                             masquerade onto the uplink

Each cell gets a /29 of the box's subnet (index i: base = subnet + 8*i): a /30 for
tap0 <-> guest eth0 (gateway base+1, guest base+2) and a /30 for the veth (router side
base+5, cell side base+6). The last /30 of the subnet is the router <-> host transit link.

Isolation (all enforced outside the guest):
  * cell -> cell: the router ns forward chain has policy drop; the only accepted flows are
    replies (ct established,related) and cell -> up0. Nothing is ever forwarded from one
    v*a veth to another.
  * spoofing: rp_filter=1 in the cell ns (a source that does not route back via tap0 is
    dropped: only the guest's /30 does) and in the router ns (only that cell's /29 routes
    back via its veth), so a cell can use neither another cell's address nor a made-up one.
  * the box itself: without an uplink the router ns has no route to the host at all.
    With one, the host ns drops every packet arriving on hvu<box> for local delivery
    (nftables input: iifname hvu<box> drop), and forwards from it only to the uplink.
  * the control plane and private networks: the router ns drops cell -> up0 packets whose
    destination is in `deny` (default: RFC 1918, CGNAT, link-local incl. cloud metadata,
    loopback, multicast/reserved); add the control plane's public address if it has one.
  * IPv6 is disabled in the router and cell namespaces (no v6 path exists).

Rate limits (per shape): host->guest is a tbf on tap0's egress; guest->host is tap0's
ingress redirected (u32 match-all, mirred) to ifb0 in the cell ns, shaped by a tbf there.
See tbf_params() for burst and queue sizing. Limits count Ethernet frames: a TCP stream's
goodput is ~4.4 % below the limit (1448 payload bytes per 1514-byte frame).
Measured here (TCP, 4 s, tbf byte counters): wire rate within 0.6 % of the limit at 1,
10, 20, 100 and 1000 Mbit/s, both ways. Setup ~10 ms and teardown ~20-30 ms per cell
(the first setup of a box also makes the router ns: ~10 ms, plus ~120 ms to import pyroute2).

Names: everything a cell owns is in its namespace `hv-<box tag>-<cell id>` (tap0, ifb0,
v<8hex>b) plus the router end of its veth, v<8hex>a, removed explicitly on teardown
(deleting a namespace whose tap a VMM still holds would otherwise leave it alive).
The box tag is in the namespace name so that one box's crash cleanup never touches
another box's cells on the same machine (tests, `hived up` next to a daemon).

Netlink work (pyroute2) runs in one worker thread per box; the thread enters a
namespace with setns(2) (hived._sys, cffi) only to create sockets and the tap fd there,
and returns to its own namespace at once. Netlink sockets stay bound to the namespace
they were created in. The Secure Compute cut and route, which touch only their cell's own
namespace and are on a build's critical path, run on a second small pool instead
(`_run_in_cell`), so they never wait behind another cell's setup or teardown.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import errno
import hashlib
import ipaddress
import logging
import os
import re
import socket
import time

from hived.net.errors import MissingCapability, NetworkError
from hived.net.netns import (
    TUN_PATH,
    _errcheck,
    _Stranded,
    _sys,
    create_netns,
    delete_netns,
    entered,
    list_netns,
    netns_exists,
    netns_path,
    tap_open,
    write_sysctls,
)
from hived.net.nft import (
    CT_ESTABLISHED,
    CT_RELATED,
    NF_ACCEPT,
    NF_DROP,
    NFT_CMP_NEQ,
    NFT_META_IIFNAME,
    NFT_META_OIFNAME,
    masquerade,
    match_ct_state,
    match_ifname,
    match_ip_in,
    verdict,
)
from hived.net.tc import ETH_P_ALL, TC_INGRESS, TC_ROOT_TBF, tbf_params

log = logging.getLogger(__name__)

TAP = "tap0"
IFB = "ifb0"
IFB_KIND = "ifb"  # rtnetlink link kind of IFB
ROUTER_UPLINK = "up0"
DEFAULT_SUBNET = "10.213.0.0/16"
CELL_BLOCK = 8  # addresses per cell: two /30s
IFNAMSIZ = 15   # usable characters (16 with the NUL)
CELL_ID_RE = re.compile(r"^c[0-9a-f]{8}$")
ROUTER_TABLE = "hived"
# How long other cells' network set-ups and teardowns wait for a Secure Compute provisioning
# (CellNetwork.provisioning): a refill may wait this much, a build's tunnel never does.
PROVISION_HOLD_S = 1.0
CELL_TABLE = "hived_cell"  # nftables table in a Secure Compute cell's namespace

# The router and every cell namespace forward IPv4 only, drop spoofed sources, send no redirects.
FORWARDER_SYSCTLS = {"net.ipv6.conf.all.disable_ipv6": 1, "net.ipv6.conf.default.disable_ipv6": 1,
                     "net.ipv4.ip_forward": 1, "net.ipv4.conf.all.rp_filter": 1,
                     "net.ipv4.conf.default.rp_filter": 1, "net.ipv4.conf.all.send_redirects": 0,
                     "net.ipv4.conf.default.send_redirects": 0}

# Destinations a cell may never reach through the uplink.
DEFAULT_DENY = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.168.0.0/16", "224.0.0.0/3",
)


@dataclasses.dataclass(frozen=True)
class CellNetInfo:
    cell_id: str
    netns: str
    tap: str
    tap_fd: int          # O_CLOEXEC: hand it to the VMM with pass_fds (see qemu_args)
    guest_ip: str
    guest_prefix: int
    gateway: str
    mac: str
    router_ip: str
    mtu: int = 1500
    setup_ms: float = 0.0

    @property
    def netns_path(self) -> str:
        """The cell's namespace as a file: its VMM joins it (hived/vmm/qemu.py)."""
        return netns_path(self.netns)

    @property
    def cmdline(self) -> str:
        """Kernel command line arguments for hived/guest/init.sh."""
        args = f"hived.ip={self.guest_ip}/{self.guest_prefix} hived.gw={self.gateway}"
        if self.mtu != 1500:
            args += f" hived.mtu={self.mtu}"
        return args

    def qemu_args(self, fd: int | None = None) -> list[str]:
        """QEMU arguments for the cell's NIC; `fd` is the tap fd's number in QEMU."""
        n = self.tap_fd if fd is None else fd
        return ["-netdev", f"tap,id=n0,fd={n},vhost=off",
                "-device", f"virtio-net-device,netdev=n0,mac={self.mac}"]


# --------------------------------------------------------------------------------------
# names


def box_tag(box_name: str) -> str:
    """A short tag for names derived from the box: the name itself if short and plain."""
    if re.fullmatch(r"[a-z0-9][a-z0-9-]{0,7}", box_name):
        return box_name
    return "x" + hashlib.sha256(box_name.encode()).hexdigest()[:7]


def check_cell_id(cell_id: str) -> str:
    if not isinstance(cell_id, str) or not CELL_ID_RE.match(cell_id):
        raise NetworkError(f"cell id {cell_id!r} is not of the form c<8 hex digits>: "
                           "network names are derived from it")
    return cell_id


def veth_names(cell_id: str) -> tuple[str, str]:
    """(router side, cell side) of the cell's veth pair."""
    hex8 = check_cell_id(cell_id)[1:]
    return f"v{hex8}a", f"v{hex8}b"


def cell_mac(cell_id: str) -> str:
    """The guest NIC's MAC: locally administered, unicast, from the cell id."""
    hex8 = check_cell_id(cell_id)[1:]
    return "02:68:" + ":".join(hex8[i:i + 2] for i in range(0, 8, 2))


# --------------------------------------------------------------------------------------
# the manager


@dataclasses.dataclass
class _CellState:
    cell_id: str
    index: int
    tap_fd: int = -1
    info: CellNetInfo | None = None
    secure_prepared: str = ""  # secure_prepare() made the cut's chains for this tunnel name


def _netlink_code(exc: BaseException) -> int | None:
    return getattr(exc, "code", None) if type(exc).__name__ == "NetlinkError" else None


class CellNetwork:
    """The networking of one box's cells (see the module docstring)."""

    def __init__(self, box_name: str, subnet: str = DEFAULT_SUBNET, uplink: str | None = None, *,
                 deny: tuple[str, ...] | list[str] = DEFAULT_DENY, host_netns: str | None = None,
                 mtu: int = 1500) -> None:
        """`uplink`: the host interface egress leaves by (None: no egress at all).
        `deny`: destinations cells may not reach through the uplink (add the control plane).
        `host_netns`: the namespace playing the host (None: this process's, the root ns;
        tests pass one of their own so that nothing touches the real host).
        """
        self.box_name = box_name
        self.tag = box_tag(box_name)
        try:
            self.subnet = ipaddress.IPv4Network(subnet)
        except ValueError as exc:
            raise NetworkError(f"subnet {subnet!r} is not an IPv4 network: {exc}") from None
        if self.subnet.num_addresses < 2 * CELL_BLOCK:
            raise NetworkError(f"subnet {subnet} is too small: at least a /28 is needed")
        self.max_cells = self.subnet.num_addresses // CELL_BLOCK - 1  # last block: transit
        self.uplink = uplink
        if uplink is not None and not 0 < len(uplink) <= IFNAMSIZ:
            raise NetworkError(f"uplink interface name {uplink!r} is not a valid interface name")
        self.deny = tuple(str(ipaddress.IPv4Network(d)) for d in deny)
        if host_netns is not None and not netns_exists(host_netns):
            raise NetworkError(f"host network namespace {host_netns} does not exist")
        self.host_netns = host_netns
        self.mtu = mtu
        self.router_netns = f"hvr-{self.tag}"
        self.host_veth = f"hvu{self.tag}"
        self.host_table = f"hived_{self.tag}"
        last = self.subnet.network_address + self.subnet.num_addresses - 4
        self.transit_host_ip = str(last + 1)
        self.transit_router_ip = str(last + 2)
        self._cells: dict[str, _CellState] = {}
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._cell_executor: concurrent.futures.ThreadPoolExecutor | None = None  # see _run_in_cell
        self._router_ipr = None  # pyroute2 IPRoute bound to the router ns (worker thread only)
        self._router_ready = False
        self._home_ino = 0       # the worker thread's own namespace (inode), for _check_home
        self._closed = False
        self._keep_router = False  # cells were adopted: their router namespace stays
        self._provisioning = 0     # Secure Compute tunnels being provisioned now (provisioning())
        self._provisioned = asyncio.Event()  # set while none is (binds to the loop at its first wait)
        self._provisioned.set()

    # -- names ---------------------------------------------------------------------------
    def netns_name(self, cell_id: str) -> str:
        return f"hv-{self.tag}-{check_cell_id(cell_id)}"

    def names(self, cell_id: str) -> dict[str, str]:
        """Every name the cell owns on the host."""
        a, b = veth_names(cell_id)
        return {"netns": self.netns_name(cell_id), "tap": TAP, "ifb": IFB,
                "veth_router": a, "veth_cell": b}

    def addresses(self, index: int) -> dict[str, str]:
        if not 0 <= index < self.max_cells:
            raise NetworkError(f"cell index {index} is outside subnet {self.subnet} "
                               f"({self.max_cells} cells fit)")
        base = self.subnet.network_address + CELL_BLOCK * index
        return {"guest_net": f"{base}/30", "gateway": str(base + 1), "guest": str(base + 2),
                "veth_net": f"{base + 4}/30", "router": str(base + 5), "cell_veth": str(base + 6)}

    def cells(self) -> list[str]:
        """Cell ids of this box that have a namespace, known or leftover (after kill -9)."""
        prefix = f"hv-{self.tag}-"
        return sorted(n[len(prefix):] for n in list_netns()
                      if n.startswith(prefix) and CELL_ID_RE.match(n[len(prefix):]))

    def known(self) -> list[str]:
        """Cells set up by this manager and not torn down."""
        return sorted(self._cells)

    # -- worker thread -------------------------------------------------------------------
    def _thread_init(self) -> None:
        if self.host_netns is not None:
            s = _sys()
            fd = os.open(netns_path(self.host_netns), os.O_RDONLY | os.O_CLOEXEC)
            try:
                # safe: runs once, in the new worker thread, which lives there for good ("home")
                _errcheck(s.lib.setns(fd, s.lib.CLONE_NEWNET), f"setns into {self.host_netns}")
            finally:
                os.close(fd)
        self._home_ino = os.stat("/proc/thread-self/ns/net").st_ino

    def _check_home(self) -> None:
        """Before touching the host ns through a new socket: is this thread really there?"""
        if os.stat("/proc/thread-self/ns/net").st_ino != self._home_ino:
            raise _Stranded(f"network worker of box {self.box_name} is not in its own namespace")

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"hived-net-{self.tag}", initializer=self._thread_init)
        return self._executor

    def _retire_worker(self) -> None:
        """The worker thread is in an unknown namespace: never use it again."""
        log.error("network worker of box %s lost its namespace; replacing it", self.box_name)
        if self._executor is not None:
            self._executor.shutdown(wait=False)
        self._executor = None
        self._router_ipr = None
        self._router_ready = False

    async def _run(self, fn, *args):
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._pool(), fn, *args)
        try:
            return await asyncio.shield(fut)
        except _Stranded as exc:
            self._retire_worker()
            raise NetworkError(str(exc)) from None
        except asyncio.CancelledError:
            # The blocking job cannot be interrupted: let it finish so that its effects
            # are known, then let the caller roll back.
            with contextlib.suppress(Exception):
                await fut
            raise

    async def _run_in_cell(self, fn, *args):
        """Run `fn` on a thread of its own: for work inside one cell's namespace that shares no
        state with the worker (no router socket), on a build's critical path (the Secure Compute
        cut and route), so it never queues behind another cell's setup or teardown on the
        worker (a teardown waits for RCU grace periods: 20-30 ms)."""
        if self._cell_executor is None:
            self._cell_executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=2, thread_name_prefix=f"hived-netc-{self.tag}", initializer=self._thread_init)
        fut = asyncio.get_running_loop().run_in_executor(self._cell_executor, fn, *args)
        try:
            return await asyncio.shield(fut)
        except _Stranded as exc:
            log.error("a cell network thread of box %s lost its namespace; replacing its pool", self.box_name)
            self._cell_executor.shutdown(wait=False)
            self._cell_executor = None
            raise NetworkError(str(exc)) from None
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await fut  # let the blocking job finish, so that its effects are known
            raise

    # -- public API ----------------------------------------------------------------------
    @contextlib.contextmanager
    def provisioning(self):
        """Around one Secure Compute provisioning, which a build waits on. Meanwhile other
        cells' set-ups and teardowns wait (at most PROVISION_HOLD_S each, _after_provisioning):
        they take the kernel's rtnl lock dozens of times, and the provisioning's own netlink
        steps queue behind them (a 4 ms route step took 45 ms once, beside another cell's
        teardown; `hived bench secure`)."""
        self._provisioning += 1
        self._provisioned.clear()
        try:
            yield
        finally:
            self._provisioning -= 1
            if not self._provisioning:
                self._provisioned.set()

    async def _after_provisioning(self) -> None:
        if self._provisioning:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PROVISION_HOLD_S):
                    await self._provisioned.wait()

    async def setup(self, cell_id: str, net_in_bits_s: int = 0, net_out_bits_s: int = 0) -> CellNetInfo:
        """Create the cell's namespace, tap, veth, addresses, routes and limits.

        net_in_bits_s: host->guest, net_out_bits_s: guest->host; 0 = unlimited.
        The returned tap_fd is the box's (O_CLOEXEC); pass it to the VMM with pass_fds,
        then call release_fd(). Nothing is left behind if this raises or is cancelled.
        """
        await self._after_provisioning()
        if self._closed:
            raise NetworkError(f"network of box {self.box_name} is closed")
        check_cell_id(cell_id)
        for rate in (net_in_bits_s, net_out_bits_s):
            if rate:
                tbf_params(rate)
        if cell_id in self._cells:
            raise NetworkError(f"cell {cell_id} already has a network")
        used = {c.index for c in self._cells.values()}
        index = next((i for i in range(self.max_cells) if i not in used), None)
        if index is None:
            raise NetworkError(f"subnet {self.subnet} is full ({self.max_cells} cells)")
        state = _CellState(cell_id, index)
        self._cells[cell_id] = state
        try:
            info = await self._run(self._setup_blocking, state, net_in_bits_s, net_out_bits_s)
        except asyncio.CancelledError:
            # _run let the job finish: undo whatever it made (tap fd included).
            with contextlib.suppress(Exception):
                await asyncio.shield(self.teardown(cell_id))
            self._cells.pop(cell_id, None)
            raise
        except BaseException:
            self._cells.pop(cell_id, None)
            raise
        state.info = info
        return info

    async def teardown(self, cell_id: str) -> bool:
        """Remove everything the cell owns (known or leftover); True if anything was there."""
        check_cell_id(cell_id)
        await self._after_provisioning()
        state = self._cells.get(cell_id)
        if state is not None and state.tap_fd >= 0:
            os.close(state.tap_fd)
            state.tap_fd = -1
        try:
            return await self._run(self._teardown_blocking, cell_id)
        finally:
            self._cells.pop(cell_id, None)

    def adopt(self, cell_id: str, fields: dict) -> None:
        """A cell a previous daemon set up, still running (hived/box/adopt.py): known again, and
        the router namespace it hangs off is kept rather than made anew."""
        info = CellNetInfo(**{**fields, "tap_fd": -1})
        index = (int(ipaddress.IPv4Address(info.guest_ip)) - int(self.subnet.network_address)) // CELL_BLOCK
        self._cells[check_cell_id(cell_id)] = _CellState(cell_id, index, -1, info)
        self._keep_router = True

    def adopted(self, cell_id: str) -> CellNetInfo | None:
        """The adopted cell's network, if its namespace is still there."""
        state = self._cells.get(cell_id)
        if state is None or not netns_exists(self.netns_name(cell_id)):
            return None
        return state.info

    def release_fd(self, cell_id: str) -> None:
        """Close the box's copy of the tap fd (once the VMM has its own)."""
        state = self._cells.get(cell_id)
        if state is not None and state.tap_fd >= 0:
            os.close(state.tap_fd)
            state.tap_fd = -1

    async def open_tap(self, cell_id: str) -> int:
        """A new O_CLOEXEC fd on the cell's tap0 (e.g. for a restarted VMM); caller closes it."""
        name = self.netns_name(cell_id)

        def attach() -> int:
            with entered(name):
                return tap_open(TAP)
        try:
            return await self._run(attach)
        except OSError as exc:
            raise NetworkError(f"cannot open {TAP} of cell {cell_id}: {exc.strerror}") from None

    async def secure_prepare(self, cell_id: str, ifname: str) -> float:
        """While the cell is warm (hived/box/prestart.py): what secure_cut needs that changes
        nothing by itself: the table, two empty base chains accepting everything (prerouting
        and postrouting), and the masquerade onto `ifname`, which matches nothing while no
        interface of that name is in the namespace (a plain build's cell never has one).
        Several netlink transactions (each hook registered): milliseconds off the build's path."""
        check_cell_id(cell_id)
        ms = await self._run(self._secure_prepare_blocking, cell_id, ifname)
        state = self._cells.get(cell_id)
        if state is not None:
            state.secure_prepared = ifname
        return ms

    async def secure_cut(self, cell_id: str, ifname: str) -> float:
        """First half of Secure Compute egress (it needs nothing from the key exchange, so it
        runs meanwhile): nothing passes the veth to the router any more (nftables drop rules
        in the cell's namespace, in and out), so the cell has no way out at all, and the
        guest's packets leaving by `ifname` get its address (masquerade). Two rules when
        secure_prepare ran, the whole table otherwise: rules, not a link deletion, which
        waits for RCU grace periods (12-27 ms here); the veth itself goes afterwards, off the
        build's critical path (secure_unlink)."""
        check_cell_id(cell_id)
        state = self._cells.get(cell_id)
        prepared = state is not None and state.secure_prepared == ifname
        return await self._run_in_cell(self._secure_cut_blocking, cell_id, ifname, prepared)

    async def secure_unlink(self, cell_id: str) -> float:
        """After secure_cut: delete the cell's veth to the router (its router end takes the cell
        end and the router's route to the cell along). Milliseconds (RCU)."""
        check_cell_id(cell_id)
        return await self._run(self._secure_unlink_blocking, cell_id)

    async def secure_route(self, cell_id: str, ifname: str, address: str, routes: list[str]) -> float:
        """Second half: `address` (a /32) on the WireGuard interface `ifname` (already moved
        into the cell's namespace), which goes up, and `routes` lead into it. Milliseconds."""
        check_cell_id(cell_id)
        for r in routes:
            ipaddress.IPv4Network(r)
        return await self._run_in_cell(self._secure_route_blocking, cell_id, ifname, address, list(routes))

    def leave(self) -> None:
        """The daemon goes and its cells stay (detach): close our sockets and thread, remove nothing."""
        for state in self._cells.values():
            if state.tap_fd >= 0:
                os.close(state.tap_fd)
                state.tap_fd = -1
        for executor in (self._executor, self._cell_executor):
            if executor is not None:
                executor.shutdown(wait=True)
        self._executor = self._cell_executor = None
        self._closed = True

    async def close(self) -> bool:
        """Remove the router namespace (and the uplink's host side) if no cells remain.

        Returns False (and removes nothing) while cells of this box still have a namespace.
        """
        remaining = sorted(set(self._cells) | set(self.cells()))
        if remaining:
            log.warning("box %s network: not removing router namespace %s, cells remain: %s",
                        self.box_name, self.router_netns, ", ".join(remaining))
            return False
        try:
            await self._run(self._close_blocking)
        finally:
            for executor in (self._executor, self._cell_executor):
                if executor is not None:
                    executor.shutdown(wait=True)
            self._executor = self._cell_executor = None
            self._closed = True
        return True

    # -- blocking parts (worker thread) --------------------------------------------------
    def _iproute(self):
        from pyroute2 import IPRoute
        return IPRoute()

    def _nft(self):
        from pyroute2.nftables.main import NFTables
        return NFTables(nfgen_family=socket.AF_INET)

    @staticmethod
    def _fail(what: str, exc: BaseException) -> NetworkError:
        code = _netlink_code(exc)
        if code is None and isinstance(exc, OSError):
            code = exc.errno
        why = os.strerror(code) if code else str(exc)
        return NetworkError(f"{what}: {why}")

    def _router(self):
        """The router ns's netlink socket, creating and configuring the namespace first."""
        if self._router_ready:
            return self._router_ipr
        name = self.router_netns
        if not os.path.exists(TUN_PATH):
            raise MissingCapability(f"{TUN_PATH} does not exist: the kernel needs tun (CONFIG_TUN; "
                                    "`modprobe tun`) for cell taps")
        if netns_exists(name) and self._keep_router:
            with entered(name):  # adopted cells' veths live there: reuse it as it is
                self._router_ipr = self._iproute()
            self._router_ready = True
            return self._router_ipr
        if netns_exists(name):
            log.warning("box %s: removing leftover router namespace %s", self.box_name, name)
            self._remove_host_side()
            delete_netns(name)
        try:
            create_netns(name)
        except FileExistsError:
            raise NetworkError(f"network namespace {name} appeared while creating it: is another "
                               f"box named {self.box_name!r} running?") from None
        except OSError as exc:
            raise self._fail(f"create router namespace {name}", exc) from None
        try:
            with entered(name):
                write_sysctls(FORWARDER_SYSCTLS)
                ipr = self._iproute()
                nft = self._nft()
            try:
                ipr.link("set", index=1, state="up")
                self._router_rules(nft)
            finally:
                nft.close()
            if self.uplink is not None:
                self._connect_uplink(ipr)
        except BaseException:
            with contextlib.suppress(Exception):
                self._remove_host_side()
            delete_netns(name)
            raise
        self._router_ipr = ipr
        self._router_ready = True
        return ipr

    def _router_rules(self, nft) -> None:
        t = ROUTER_TABLE
        try:
            nft.table("add", name=t)
            nft.chain("add", table=t, name="forward", hook="forward", type="filter",
                      priority=0, policy=NF_DROP)
        except Exception as exc:  # noqa: BLE001 - any failure here is the same missing feature
            raise MissingCapability(f"nftables in router namespace {self.router_netns} failed "
                                    f"({self._fail('add table', exc)}): the kernel needs "
                                    "CONFIG_NF_TABLES with IPv4 filter and NAT") from None
        rules = [match_ct_state(CT_ESTABLISHED | CT_RELATED) + verdict(NF_ACCEPT)]
        if self.uplink is not None:
            for cidr in self.deny:
                rules.append(match_ip_in(cidr, dst=True) + verdict(NF_DROP))
            rules.append(match_ifname(NFT_META_IIFNAME, "v*") + match_ifname(NFT_META_OIFNAME, ROUTER_UPLINK)
                         + verdict(NF_ACCEPT))
        for expr in rules:
            nft.rule("add", table=t, chain="forward", expressions=[expr])
        if self.uplink is not None:
            nft.chain("add", table=t, name="postrouting", hook="postrouting", type="nat",
                      priority=100)
            nft.rule("add", table=t, chain="postrouting",
                     expressions=[match_ifname(NFT_META_OIFNAME, ROUTER_UPLINK) + masquerade()])

    def _connect_uplink(self, router_ipr) -> None:
        """Transit veth host<->router, host-side firewall and NAT onto the uplink."""
        up, hv, t = self.uplink, self.host_veth, self.host_table
        self._check_home()
        host = self._iproute()
        try:
            if not host.link_lookup(ifname=up):
                raise NetworkError(f"uplink interface {up} does not exist"
                                   + (f" in netns {self.host_netns}" if self.host_netns else ""))
            if host.link_lookup(ifname=hv):
                log.warning("box %s: removing leftover transit veth %s", self.box_name, hv)
                host.link("del", ifname=hv)
            rfd = os.open(netns_path(self.router_netns), os.O_RDONLY | os.O_CLOEXEC)
            try:
                host.link("add", ifname=hv, kind="veth", mtu=self.mtu,
                          peer={"ifname": ROUTER_UPLINK, "net_ns_fd": rfd, "mtu": self.mtu})
            finally:
                os.close(rfd)
            hidx = host.link_lookup(ifname=hv)[0]
            host.addr("add", index=hidx, address=self.transit_host_ip, prefixlen=30)
            host.link("set", index=hidx, state="up")
            ridx = router_ipr.link_lookup(ifname=ROUTER_UPLINK)[0]
            router_ipr.addr("add", index=ridx, address=self.transit_router_ip, prefixlen=30)
            router_ipr.link("set", index=ridx, state="up")
            router_ipr.route("add", dst="0.0.0.0/0", gateway=self.transit_host_ip)
            write_sysctls({"net.ipv4.ip_forward": 1, f"net.ipv4.conf.{hv}.rp_filter": 1})
            nft = self._nft()
            try:
                nft.table("add", name=t)
                nft.chain("add", table=t, name="input", hook="input", type="filter", priority=-10)
                nft.rule("add", table=t, chain="input",
                         expressions=[match_ifname(NFT_META_IIFNAME, hv) + verdict(NF_DROP)])
                nft.chain("add", table=t, name="forward", hook="forward", type="filter", priority=-10)
                nft.rule("add", table=t, chain="forward",
                         expressions=[match_ifname(NFT_META_IIFNAME, hv)
                                      + match_ifname(NFT_META_OIFNAME, up, NFT_CMP_NEQ) + verdict(NF_DROP)])
                nft.rule("add", table=t, chain="forward",
                         expressions=[match_ifname(NFT_META_OIFNAME, hv)
                                      + match_ct_state(CT_ESTABLISHED | CT_RELATED) + verdict(NF_ACCEPT)])
                nft.rule("add", table=t, chain="forward",
                         expressions=[match_ifname(NFT_META_OIFNAME, hv) + verdict(NF_DROP)])
                nft.chain("add", table=t, name="postrouting", hook="postrouting", type="nat",
                          priority=100)
                nft.rule("add", table=t, chain="postrouting",
                         expressions=[match_ip_in(f"{self.transit_router_ip}/32", dst=False)
                                      + match_ifname(NFT_META_OIFNAME, up) + masquerade()])
            finally:
                nft.close()
        except NetworkError:
            raise
        except Exception as exc:  # noqa: BLE001 - netlink errors, named by step below
            raise self._fail(f"connect router namespace {self.router_netns} to uplink {up}", exc) from None
        finally:
            host.close()

    def _remove_host_side(self) -> None:
        """The transit veth and nftables table in the host ns (if any); idempotent."""
        self._check_home()
        host = self._iproute()
        try:
            for idx in host.link_lookup(ifname=self.host_veth):
                host.link("del", index=idx)
        finally:
            host.close()
        nft = self._nft()
        try:
            tables = [m.get_attr("NFTA_TABLE_NAME") for m in nft.get_tables()]
            if self.host_table in tables:
                nft.table("del", name=self.host_table)
        except Exception as exc:  # noqa: BLE001 - no nftables: there is no table to remove
            log.debug("nftables table %s: %s", self.host_table, exc)
        finally:
            nft.close()

    def _setup_blocking(self, state: _CellState, rate_in: int, rate_out: int) -> CellNetInfo:
        t0 = time.perf_counter()
        cell_id = state.cell_id
        ns = self.netns_name(cell_id)
        veth_a, veth_b = veth_names(cell_id)
        addr = self.addresses(state.index)
        router = self._router()
        if netns_exists(ns) or router.link_lookup(ifname=veth_a):
            log.warning("cell %s: removing leftover network (%s) before setting it up", cell_id, ns)
            self._teardown_blocking(cell_id)
        undo: list = []
        cell_ipr = None
        fd = -1
        step = "create namespace"
        try:
            create_netns(ns)
            undo.append(lambda: delete_netns(ns))
            step = "configure namespace"
            with entered(ns):
                write_sysctls(FORWARDER_SYSCTLS)
                cell_ipr = self._iproute()
                step = f"create {TAP}"
                try:
                    fd = tap_open(TAP, create=True, persist=True)
                except FileNotFoundError:
                    raise MissingCapability(f"{TUN_PATH} is missing: the kernel needs tun "
                                            "(CONFIG_TUN) for cell taps") from None
            step = f"create {IFB}"
            need_ifb = bool(rate_out)
            if need_ifb:
                try:
                    cell_ipr.link("add", ifname=IFB, kind=IFB_KIND)
                except Exception as exc:  # noqa: BLE001
                    if _netlink_code(exc) in (errno.EOPNOTSUPP, errno.ENOENT, errno.EINVAL):
                        raise MissingCapability(
                            f"cannot create an ifb device ({self._fail('ifb', exc)}): the kernel "
                            "needs CONFIG_IFB (`modprobe ifb`) for guest->host rate limits") from None
                    raise
            step = f"create veth {veth_a}/{veth_b}"
            nsfd = os.open(netns_path(ns), os.O_RDONLY | os.O_CLOEXEC)
            try:
                router.link("add", ifname=veth_a, kind="veth", mtu=self.mtu,
                            peer={"ifname": veth_b, "net_ns_fd": nsfd, "mtu": self.mtu})
            finally:
                os.close(nsfd)
            undo.append(lambda: self._del_router_link(veth_a))
            step = "router side addresses and routes"
            aidx = router.link_lookup(ifname=veth_a)[0]
            router.addr("add", index=aidx, address=addr["router"], prefixlen=30)
            router.link("set", index=aidx, state="up")
            router.route("add", dst=addr["guest_net"], gateway=addr["cell_veth"], oif=aidx)
            step = "cell side addresses and routes"
            tidx = cell_ipr.link_lookup(ifname=TAP)[0]
            bidx = cell_ipr.link_lookup(ifname=veth_b)[0]
            cell_ipr.link("set", index=tidx, mtu=self.mtu)
            cell_ipr.addr("add", index=tidx, address=addr["gateway"], prefixlen=30)
            cell_ipr.addr("add", index=bidx, address=addr["cell_veth"], prefixlen=30)
            cell_ipr.link("set", index=tidx, state="up")
            cell_ipr.link("set", index=bidx, state="up")
            cell_ipr.route("add", dst="0.0.0.0/0", gateway=addr["router"], oif=bidx)
            if rate_in:
                step = f"tbf on {TAP} (host->guest {rate_in} bit/s)"
                cell_ipr.tc("add", "tbf", tidx, TC_ROOT_TBF, **tbf_params(rate_in))
            if rate_out:
                step = f"ingress redirect {TAP} -> {IFB} and tbf (guest->host {rate_out} bit/s)"
                iidx = cell_ipr.link_lookup(ifname=IFB)[0]
                cell_ipr.link("set", index=iidx, state="up")
                cell_ipr.tc("add", "tbf", iidx, TC_ROOT_TBF, **tbf_params(rate_out))
                cell_ipr.tc("add", "ingress", tidx, TC_INGRESS)
                cell_ipr.tc("add-filter", "u32", tidx, parent=TC_INGRESS, prio=1, protocol=ETH_P_ALL,
                            keys=["0x0/0x0+0"], target=TC_ROOT_TBF | 1,
                            action=dict(kind="mirred", direction="egress", action="redirect",
                                        ifindex=iidx))
        except BaseException as exc:
            if fd >= 0:
                os.close(fd)
            for fn in reversed(undo):
                try:
                    fn()
                except Exception as e2:  # noqa: BLE001 - keep undoing; report the first error
                    log.error("cell %s: rollback step failed: %s", cell_id, e2)
            if isinstance(exc, (NetworkError, _Stranded)) or not isinstance(exc, Exception):
                raise
            if step.startswith(("tbf", "ingress")) and _netlink_code(exc) in (errno.ENOENT,
                                                                             errno.EOPNOTSUPP):
                raise MissingCapability(f"cell {cell_id}: {step}: the kernel lacks a tc part "
                                        "(CONFIG_NET_SCH_TBF, CONFIG_NET_SCH_INGRESS, "
                                        "CONFIG_NET_CLS_U32, CONFIG_NET_ACT_MIRRED)") from None
            raise self._fail(f"cell {cell_id}: {step}", exc) from None
        finally:
            if cell_ipr is not None:
                cell_ipr.close()
        state.tap_fd = fd
        return CellNetInfo(
            cell_id=cell_id, netns=ns, tap=TAP, tap_fd=fd, guest_ip=addr["guest"], guest_prefix=30,
            gateway=addr["gateway"], mac=cell_mac(cell_id), router_ip=addr["router"], mtu=self.mtu,
            setup_ms=round((time.perf_counter() - t0) * 1000, 2))

    def _del_router_link(self, name: str) -> bool:
        if not (self._router_ready or netns_exists(self.router_netns)):
            return False
        if self._router_ready:
            ipr = self._router_ipr
            idx = ipr.link_lookup(ifname=name)
            if idx:
                ipr.link("del", index=idx[0])
            return bool(idx)
        with entered(self.router_netns):
            ipr = self._iproute()
        try:
            idx = ipr.link_lookup(ifname=name)
            if idx:
                ipr.link("del", index=idx[0])
            return bool(idx)
        finally:
            ipr.close()

    # The cut's two chains: every packet in from the veth passes prerouting, every packet out
    # to it postrouting (forwarded, the guest's, or the namespace's own). First of all hooks.
    _CUT_CHAINS = (("cut_in", "prerouting", NFT_META_IIFNAME), ("cut_out", "postrouting", NFT_META_OIFNAME))

    def _secure_tables(self, nft, ifname: str) -> None:
        nft.table("add", name=CELL_TABLE)
        for chain, hook, _ in self._CUT_CHAINS:
            nft.chain("add", table=CELL_TABLE, name=chain, hook=hook, type="filter", priority=-300)
        nft.chain("add", table=CELL_TABLE, name="postrouting", hook="postrouting", type="nat", priority=100)
        nft.rule("add", table=CELL_TABLE, chain="postrouting",
                 expressions=[match_ifname(NFT_META_OIFNAME, ifname) + masquerade()])

    def _secure_prepare_blocking(self, cell_id: str, ifname: str) -> float:
        t0 = time.perf_counter()
        with entered(self.netns_name(cell_id)):
            nft = self._nft()
        try:
            # an adopted cell may have its table from the previous daemon: make it anew
            with contextlib.suppress(Exception):
                nft.table("del", name=CELL_TABLE)
            self._secure_tables(nft, ifname)
        except Exception as exc:  # noqa: BLE001 - netlink errors, named
            raise self._fail(f"cell {cell_id}: Secure Compute egress prepared ahead", exc) from None
        finally:
            nft.close()
        return round((time.perf_counter() - t0) * 1000, 2)

    def _secure_cut_blocking(self, cell_id: str, ifname: str, prepared: bool = False) -> float:
        t0 = time.perf_counter()
        ns = self.netns_name(cell_id)
        _, veth_b = veth_names(cell_id)
        step = f"masquerade onto {ifname}"
        try:
            with entered(ns):
                nft = self._nft()
            try:
                if not prepared:
                    self._secure_tables(nft, ifname)
                step = f"drop everything through veth {veth_b} (the cell's path to the router)"
                for chain, _, key in self._CUT_CHAINS:
                    nft.rule("add", table=CELL_TABLE, chain=chain,
                             expressions=[match_ifname(key, veth_b) + verdict(NF_DROP)])
            finally:
                nft.close()
        except NetworkError:
            raise
        except Exception as exc:  # noqa: BLE001 - netlink errors, named by step
            raise self._fail(f"cell {cell_id}: Secure Compute egress: {step}", exc) from None
        return round((time.perf_counter() - t0) * 1000, 2)

    def _secure_unlink_blocking(self, cell_id: str) -> float:
        t0 = time.perf_counter()
        veth_a, _ = veth_names(cell_id)
        try:
            self._router()
            self._del_router_link(veth_a)  # the router end takes the cell end along
        except NetworkError:
            raise
        except Exception as exc:  # noqa: BLE001 - netlink errors, named by step
            raise self._fail(f"cell {cell_id}: Secure Compute egress: remove veth {veth_a}", exc) from None
        return round((time.perf_counter() - t0) * 1000, 2)

    def _secure_route_blocking(self, cell_id: str, ifname: str, address: str, routes: list[str]) -> float:
        t0 = time.perf_counter()
        ns = self.netns_name(cell_id)
        step = f"address {address} on {ifname}"
        try:
            with entered(ns):
                ipr = self._iproute()
            try:
                idx = ipr.link_lookup(ifname=ifname)
                if not idx:
                    raise NetworkError(f"cell {cell_id}: tunnel interface {ifname} is not in namespace {ns}")
                ip, _, prefix = address.partition("/")
                ipr.addr("add", index=idx[0], address=ip, prefixlen=int(prefix or 32))
                ipr.link("set", index=idx[0], state="up")
                for r in routes:
                    step = f"route {r} into {ifname}"
                    ipr.route("add", dst=r, oif=idx[0])
            finally:
                ipr.close()
        except NetworkError:
            raise
        except Exception as exc:  # noqa: BLE001 - netlink errors, named by step
            raise self._fail(f"cell {cell_id}: Secure Compute egress: {step}", exc) from None
        return round((time.perf_counter() - t0) * 1000, 2)

    def _teardown_blocking(self, cell_id: str) -> bool:
        veth_a, _ = veth_names(cell_id)
        ns = self.netns_name(cell_id)
        found = False
        try:
            # First the router end: its routes go with it, and the cell is cut off even if a
            # VMM still holds the tap (which keeps the namespace alive after unmounting).
            found = self._del_router_link(veth_a)
        except Exception as exc:  # noqa: BLE001 - still remove the namespace
            log.error("cell %s: cannot delete %s in %s: %s", cell_id, veth_a, self.router_netns, exc)
        try:
            found = delete_netns(ns) or found
        except OSError as exc:
            raise self._fail(f"cell {cell_id}: remove namespace {ns}", exc) from None
        return found

    def _close_blocking(self) -> None:
        if self._router_ipr is not None:
            self._router_ipr.close()
            self._router_ipr = None
        self._router_ready = False
        try:
            self._remove_host_side()
        finally:
            delete_netns(self.router_netns)
