"""Per-cell networking (hived/box/network.py) in real namespaces; one test boots a real VM.

The guest stand-in: a namespace `hvg-<x>` with its own tap (`eth0`, vnet header, TSO
offloads on) whose frames a relay thread copies to and from the cell's tap0 fd, the fd
setup() returns and QEMU would hold. So every test exercises the real tap0, its tbf,
the ingress -> ifb0 redirect and the cell's routing, exactly as a VM would; only the
virtio-net device is replaced by a second kernel tap (frames cross with their virtio
net headers, GSO included, as with QEMU's vhost=off). A veth in place of tap0 would
have skipped the tap and its tc, the part most worth testing; driving raw frames by
hand would have meant a TCP stack in the test.

Everything lives in namespaces these tests create (names carry a per-test tag); a
"host" namespace stands in for the root namespace, so nothing touches this machine's
own interfaces or addresses. Every fixture removes what it made even when a test fails,
and checks that the code under test left nothing behind.
"""

import asyncio
import bisect
import contextlib
import errno
import os
import re
import secrets
import select
import socket
import subprocess
import threading
import time

import pytest

from conftest import need_root

pytestmark = [pytest.mark.root]

network = pytest.importorskip("hived.box.network")

RATE = 20_000_000  # bit/s for the accuracy tests
TOLERANCE = 0.15


def run(coro):
    return asyncio.run(coro)


def netns_all() -> list[str]:
    return network.list_netns()


def links_everywhere() -> str:
    """`ip -all netns exec ip -o link` plus the root namespace's links (names only)."""
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    out += subprocess.run(["ip", "-all", "netns", "exec", "ip", "-o", "link"],
                          capture_output=True, text=True).stdout
    return out


def mine(names, tag: str) -> list[str]:
    return sorted(n for n in names if tag in n)


def ipr_in(ns: str):
    from pyroute2 import IPRoute

    with network.entered(ns):
        return IPRoute()


def ns_socket(ns: str, kind=socket.SOCK_STREAM) -> socket.socket:
    with network.entered(ns):
        return socket.socket(socket.AF_INET, kind)


# --------------------------------------------------------------------------------------
# fixtures


@pytest.fixture
def tag():
    need_root()
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("no /dev/net/tun")
    try:
        from hived import _sys  # noqa: F401
    except ImportError:
        pytest.skip("hived._sys not compiled: python _native/sys_build.py")
    t = "tn" + secrets.token_hex(2)
    before = mine(netns_all(), t)
    yield t
    # Whatever a failing test left: remove it, so the machine stays clean.
    for ns in mine(netns_all(), t):
        network.delete_netns(ns)
    assert before == [] and mine(netns_all(), t) == []


class Managers:
    """CellNetworks made by a test; all closed (and checked) at the end."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.made: list = []

    def __call__(self, suffix: str = "", **kw):
        net = network.CellNetwork(self.tag + suffix, **kw)
        self.made.append(net)
        return net

    def cleanup(self) -> list[str]:
        problems = []
        for net in self.made:
            try:
                for cid in sorted(set(net.cells()) | set(net.known())):
                    run(net.teardown(cid))
                if not net._closed:
                    run(net.close())
            except Exception as exc:  # noqa: BLE001 - report, keep cleaning
                problems.append(f"{net.box_name}: {exc!r}")
        return problems


@pytest.fixture
def managers(tag):
    m = Managers(tag)
    before = links_everywhere()
    try:
        yield m
    finally:
        problems = m.cleanup()
    assert not problems, problems
    assert mine(netns_all(), tag) == []
    after = links_everywhere()
    leaked = [ln for ln in after.splitlines() if ln not in before.splitlines()
              and re.search(r"\b(v[0-9a-f]{8}[ab]|hvu" + tag + r")\b", ln)]
    assert leaked == []


class Guest:
    """Stands in for the VM behind tap0 (see the module docstring)."""

    OFFLOADS = ("TUN_F_CSUM", "TUN_F_TSO4", "TUN_F_TSO6")

    def __init__(self, info, name: str) -> None:
        from hived._sys import lib

        self.info, self.ns = info, name
        self.fd = -1
        # Our own fd on tap0, as QEMU has: the manager closing its copy on teardown
        # cannot pull the number from under the relay (and let it be reused meanwhile).
        self.cell_fd = os.dup(info.tap_fd)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        network.create_netns(name)
        try:
            offload = 0
            for flag in self.OFFLOADS:
                offload |= getattr(lib, flag)
            with network.entered(name):
                network.write_sysctls({"net.ipv6.conf.all.disable_ipv6": 1,
                                       "net.ipv6.conf.default.disable_ipv6": 1})
                self.fd = network.tap_open("eth0", create=True)
            # The reader of each tap (this relay) takes GSO frames, as QEMU does for a
            # virtio-net guest with TSO.
            assert lib.hived_tap_set_offload(self.fd, offload) == 0
            assert lib.hived_tap_set_offload(self.cell_fd, offload) == 0
            ipr = ipr_in(name)
            try:
                idx = ipr.link_lookup(ifname="eth0")[0]
                ipr.link("set", index=idx, address=info.mac, mtu=info.mtu)
                ipr.addr("add", index=idx, address=info.guest_ip, prefixlen=info.guest_prefix)
                ipr.link("set", index=idx, state="up")
                ipr.link("set", index=1, state="up")
                ipr.route("add", dst="0.0.0.0/0", gateway=info.gateway)
            finally:
                ipr.close()
            for src, dst in ((self.fd, self.cell_fd), (self.cell_fd, self.fd)):
                t = threading.Thread(target=self._pump, args=(src, dst), daemon=True)
                t.start()
                self._threads.append(t)
        except BaseException:
            self.close()
            raise

    def _pump(self, src: int, dst: int) -> None:
        poll = select.poll()
        poll.register(src, select.POLLIN)
        while not self._stop.is_set():
            if not poll.poll(50):
                continue
            try:
                frame = os.read(src, 70000)
                os.write(dst, frame)
            except OSError as exc:
                if exc.errno in (errno.EBADF,):
                    return
                # EIO: tap down; ENOBUFS etc.: a dropped frame, as on a wire

    def socket(self, kind=socket.SOCK_STREAM) -> socket.socket:
        return ns_socket(self.ns, kind)

    def add_address(self, addr: str) -> None:
        ipr = ipr_in(self.ns)
        try:
            ipr.addr("add", index=ipr.link_lookup(ifname="eth0")[0], address=addr, prefixlen=32)
        finally:
            ipr.close()

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(2)
        for fd in (self.fd, self.cell_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.cell_fd = -1
        network.delete_netns(self.ns)


@pytest.fixture
def guests(tag):
    made: list[Guest] = []

    def make(info) -> Guest:
        g = Guest(info, f"hvg-{tag}-{len(made)}")
        made.append(g)
        return g

    try:
        yield make
    finally:
        for g in made:
            g.close()


class Listener:
    """A TCP server in a namespace that accepts connections and counts bytes."""

    def __init__(self, ns: str, addr: str, port: int = 0) -> None:
        self.sock = ns_socket(ns)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((addr, port))
        self.sock.listen(8)
        self.addr = self.sock.getsockname()
        self.peers: list = []
        self.samples: list[tuple[float, int]] = []
        self.total = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.peers.append(peer)
            with conn:
                conn.sendall(b"hello\n")
                while True:
                    try:
                        data = conn.recv(1 << 16)
                    except OSError:
                        break
                    if not data:
                        break
                    self.total += len(data)
                    self.samples.append((time.monotonic(), self.total))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(2)


@pytest.fixture
def listeners():
    made: list[Listener] = []

    def make(ns, addr, port=0) -> Listener:
        lst = Listener(ns, addr, port)
        made.append(lst)
        return lst

    try:
        yield make
    finally:
        for lst in made:
            lst.close()


def reaches(sock: socket.socket, addr, timeout: float = 1.5) -> bool:
    """Does a TCP connection to addr get through (and the server's hello come back)?"""
    sock.settimeout(timeout)
    try:
        sock.connect(addr)
        return sock.recv(6) == b"hello\n"
    except OSError:
        return False
    finally:
        sock.close()


def send_for(sock: socket.socket, addr, seconds: float) -> None:
    sock.settimeout(5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.connect(addr)
    assert sock.recv(6) == b"hello\n"
    chunk = b"\0" * (1 << 16)
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            sock.send(chunk)
    finally:
        sock.close()


def measured_rate(lst: Listener, warmup: float, window: float) -> float:
    """bit/s the listener received between warmup and warmup + window after the first byte."""
    times = [t for t, _ in lst.samples]
    t0 = times[0] + warmup
    a = bisect.bisect_left(times, t0)
    b = bisect.bisect_left(times, t0 + window)
    assert b < len(times), "the sender stopped before the measuring window ended"
    got = lst.samples[b][1] - lst.samples[a][1]
    return got * 8 / (lst.samples[b][0] - lst.samples[a][0])


# --------------------------------------------------------------------------------------
# names, addresses, lifecycle


def test_names_fit_ifnamsiz_and_derive_from_the_cell():
    for cid in ("c00000000", "cffffffff", "c1a2b3c4d"):
        a, b = network.veth_names(cid)
        assert a != b and len(a) <= 15 and len(b) <= 15 and cid[1:] in a
        assert network.cell_mac(cid).startswith("02:68:")
    for box in ("box1", "a-very-long-box-name.example.com", "B"):
        t = network.box_tag(box)
        assert len(t) <= 8 and re.fullmatch(r"[a-z0-9-]+", t)
        assert len(f"hvu{t}") <= 15
    assert network.box_tag("box1") == "box1" and network.box_tag("B") != network.box_tag("b")
    for bad in ("c123", "x1a2b3c4d", "c1A2B3C4D", "../etc"):
        with pytest.raises(network.NetworkError, match="c<8 hex"):
            network.check_cell_id(bad)


def test_tbf_sizing_holds_a_frame_and_scales():
    small, big = network.tbf_params(1_000_000), network.tbf_params(1_000_000_000)
    assert small["burst"] >= 2 * 1514 and small["limit"] >= 64 << 10
    assert big["burst"] == 500_000 and big["limit"] == 500_000 + 6_250_000
    with pytest.raises(network.NetworkError, match="out of range"):
        network.tbf_params(100)


def test_setup_teardown_leaves_nothing_and_is_fast(tag, managers):
    net = managers()
    before_ns, before_links = netns_all(), links_everywhere().splitlines()
    info = run(net.setup("c0000a001", 50_000_000, 20_000_000))
    assert info.netns == f"hv-{tag}-c0000a001" and info.tap == "tap0"
    assert network.netns_exists(info.netns) and network.netns_exists(net.router_netns)
    # everything named after the cell, nothing longer than IFNAMSIZ
    cell_links = subprocess.run(["ip", "-n", info.netns, "-o", "link"], capture_output=True,
                                text=True).stdout
    names = re.findall(r"^\d+: ([^:@]+)", cell_links, re.M)
    assert sorted(names) == ["ifb0", "lo", "tap0", "v0000a001b"]
    router_links = subprocess.run(["ip", "-n", net.router_netns, "-o", "link"],
                                  capture_output=True, text=True).stdout
    assert "v0000a001a" in router_links
    assert all(len(n) <= 15 for n in names)
    qdiscs = subprocess.run(["tc", "-n", info.netns, "qdisc"], capture_output=True, text=True).stdout
    assert re.search(r"qdisc tbf 1: dev tap0 root .*rate 50Mbit", qdiscs), qdiscs
    assert re.search(r"qdisc tbf 1: dev ifb0 root .*rate 20Mbit", qdiscs), qdiscs
    assert "qdisc ingress ffff: dev tap0" in qdiscs
    filters = subprocess.run(["tc", "-n", info.netns, "filter", "show", "dev", "tap0", "ingress"],
                             capture_output=True, text=True).stdout
    assert "mirred (Egress Redirect to device ifb0)" in filters, filters
    with open(f"/proc/self/fdinfo/{info.tap_fd}") as f:
        fd_flags = int(f.read().split("flags:")[1].split()[0], 8)
    assert fd_flags & os.O_CLOEXEC

    assert run(net.teardown("c0000a001")) is True
    assert run(net.teardown("c0000a001")) is False  # idempotent
    with pytest.raises(OSError):
        os.fstat(info.tap_fd)  # the box's copy of the tap fd is closed
    assert run(net.close()) is True
    assert mine(netns_all(), tag) == mine(before_ns, tag) == []
    new_links = [ln for ln in links_everywhere().splitlines() if ln not in before_links]
    assert [ln for ln in new_links if "v0000a001" in ln or tag in ln] == []

    # timing: the router exists once per box; then each cell costs setup + teardown
    net2 = managers("t")
    run(net2.setup("c0000a0ff", 0, 0))
    times = []
    for i in range(8):
        cid = f"c0000a1{i:02x}"
        t0 = time.perf_counter()
        run(net2.setup(cid, 100_000_000, 100_000_000))
        t1 = time.perf_counter()
        run(net2.teardown(cid))
        times.append(((t1 - t0) * 1000, (time.perf_counter() - t1) * 1000))
    setup_ms = sorted(t[0] for t in times)[len(times) // 2]
    teardown_ms = sorted(t[1] for t in times)[len(times) // 2]
    print(f"\nmedian setup {setup_ms:.1f} ms, teardown {teardown_ms:.1f} ms "
          f"(all: {[(round(a, 1), round(b, 1)) for a, b in times]})")
    assert setup_ms + teardown_ms < 100


def test_two_cells_get_different_addresses(managers):
    net = managers()
    a = run(net.setup("c0000b001"))
    b = run(net.setup("c0000b002"))
    assert len({a.guest_ip, a.gateway, a.router_ip, b.guest_ip, b.gateway, b.router_ip}) == 6
    assert a.mac != b.mac
    for info in (a, b):
        assert info.cmdline == f"hived.ip={info.guest_ip}/30 hived.gw={info.gateway}"
        assert info.qemu_args(7) == ["-netdev", "tap,id=n0,fd=7,vhost=off",
                                     "-device", f"virtio-net-device,netdev=n0,mac={info.mac}"]
    # the tap takes one fd at a time: a second attach waits until the box let its own go
    with pytest.raises(network.NetworkError, match="busy"):
        run(net.open_tap("c0000b002"))
    net.release_fd("c0000b002")
    fd = run(net.open_tap("c0000b002"))
    os.close(fd)
    # a freed block is reused
    run(net.teardown("c0000b001"))
    c = run(net.setup("c0000b003"))
    assert c.guest_ip == a.guest_ip


def test_isolation_between_cells_and_from_the_host(tag, managers, guests, listeners):
    # The "host": a namespace of the test's own, holding an address cells must not reach.
    host = f"hvt-{tag}-h"
    network.create_netns(host)
    try:
        hipr = ipr_in(host)
        try:
            hipr.link("set", index=1, state="up")
            hipr.addr("add", index=1, address="192.0.2.1", prefixlen=32)
        finally:
            hipr.close()
        host_lst = listeners(host, "192.0.2.1")

        net = managers(host_netns=host)
        a = run(net.setup("c0000c001"))
        b = run(net.setup("c0000c002"))
        ga, gb = guests(a), guests(b)
        sink = listeners(net.router_netns, a.router_ip)
        b_srv = listeners(gb.ns, b.guest_ip)

        assert reaches(ga.socket(), sink.addr), "cell A cannot reach the router sink"
        assert reaches(ns_socket(net.router_netns), b_srv.addr), "router cannot reach cell B"
        assert not reaches(ga.socket(), b_srv.addr), "cell A reached cell B's guest"
        gw_b = listeners(b.netns, b.gateway)
        assert not reaches(ga.socket(), gw_b.addr), "cell A reached cell B's namespace"
        assert not reaches(ga.socket(), host_lst.addr), "cell A reached the host"
        # spoofing cell B's address from cell A: dropped by rp_filter in A's namespace
        ga.add_address(b.guest_ip)
        spoof = ga.socket()
        spoof.bind((b.guest_ip, 0))
        assert not reaches(spoof, sink.addr), "a spoofed source got through"
        assert reaches(gb.socket(), (a.router_ip, sink.addr[1])), "cell B cannot reach the router"
    finally:
        network.delete_netns(host)


def test_uplink_nat_and_deny_rules(tag, managers, guests, listeners):
    """Egress through an uplink: NAT works; the host and denied networks stay unreachable."""
    host, inet = f"hvt-{tag}-h", f"hvt-{tag}-i"
    network.create_netns(host)
    network.create_netns(inet)
    try:
        hipr, iipr = ipr_in(host), ipr_in(inet)
        try:
            fd = os.open(network.netns_path(inet), os.O_RDONLY)
            try:
                hipr.link("add", ifname="wan0", kind="veth", peer={"ifname": "eth0", "net_ns_fd": fd})
            finally:
                os.close(fd)
            w = hipr.link_lookup(ifname="wan0")[0]
            hipr.addr("add", index=w, address="198.51.100.1", prefixlen=24)
            hipr.link("set", index=w, state="up")
            hipr.link("set", index=1, state="up")
            hipr.route("add", dst="10.99.0.0/24", gateway="198.51.100.2")
            e = iipr.link_lookup(ifname="eth0")[0]
            iipr.addr("add", index=e, address="198.51.100.2", prefixlen=24)
            iipr.addr("add", index=e, address="10.99.0.2", prefixlen=24)
            iipr.link("set", index=e, state="up")
        finally:
            hipr.close()
            iipr.close()
        internet = listeners(inet, "198.51.100.2")
        private = listeners(inet, "10.99.0.2")
        host_own = listeners(host, "198.51.100.1")

        net = managers(uplink="wan0", host_netns=host)
        a = run(net.setup("c0000d001"))
        b = run(net.setup("c0000d002"))
        ga, gb = guests(a), guests(b)
        b_srv = listeners(gb.ns, b.guest_ip)

        assert reaches(ga.socket(), internet.addr), "no egress through the uplink"
        assert internet.peers[-1][0] == "198.51.100.1", "egress is not NATed to the uplink address"
        assert not reaches(ga.socket(), host_own.addr), "cell reached the host's own address"
        transit = listeners(host, net.transit_host_ip)
        assert not reaches(ga.socket(), transit.addr), "cell reached the host's transit address"
        assert not reaches(ga.socket(), private.addr), "cell reached a denied (private) network"
        assert not reaches(ga.socket(), b_srv.addr), "cell A reached cell B with an uplink"
        ga.close()
        gb.close()
        run(net.teardown("c0000d001"))
        run(net.teardown("c0000d002"))
        assert run(net.close())
        links = subprocess.run(["ip", "-n", host, "-o", "link"], capture_output=True, text=True).stdout
        assert f"hvu{net.tag}" not in links
    finally:
        network.delete_netns(inet)
        network.delete_netns(host)


def tbf_sent_bytes(ns: str, dev: str) -> int:
    out = subprocess.run(["tc", "-s", "-n", ns, "qdisc", "show", "dev", dev], capture_output=True,
                         text=True).stdout
    m = re.search(r"qdisc tbf .*?Sent (\d+) bytes", out, re.S)
    assert m, out
    return int(m.group(1))


@pytest.mark.parametrize("direction", ["guest_to_host", "host_to_guest"])
def test_rate_limits_hold(direction, managers, guests, listeners):
    """A TCP stream each way for ~4 s at a 20 Mbit/s limit: goodput (what the sink gets,
    TCP/IP headers excluded) within 15 %, bytes on the wire (tbf's counter) at most 5 % over, at most 10 % under."""
    net = managers()
    limit_in = RATE if direction == "host_to_guest" else 0
    limit_out = RATE if direction == "guest_to_host" else 0
    info = run(net.setup("c0000e001", limit_in, limit_out))
    g = guests(info)
    warmup, window = 1.0, 2.0
    if direction == "guest_to_host":
        lst = listeners(net.router_netns, info.router_ip)
        sender, dev = g.socket(), network.IFB
    else:
        lst = listeners(g.ns, info.guest_ip)
        sender, dev = ns_socket(net.router_netns), network.TAP
    errors = []

    def send():
        try:
            send_for(sender, lst.addr, warmup + window + 0.5)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    th = threading.Thread(target=send)
    th.start()
    try:
        time.sleep(warmup)
        t0, w0, g0 = time.monotonic(), tbf_sent_bytes(info.netns, dev), lst.total
        time.sleep(window)
        t1, w1, g1 = time.monotonic(), tbf_sent_bytes(info.netns, dev), lst.total
    finally:
        th.join()
    assert not errors, errors
    goodput, wire = (g1 - g0) * 8 / (t1 - t0), (w1 - w0) * 8 / (t1 - t0)
    print(f"\n{direction}: limit {RATE / 1e6:.0f} Mbit/s, wire {wire / 1e6:.2f} Mbit/s "
          f"({(wire / RATE - 1) * 100:+.1f} %), goodput {goodput / 1e6:.2f} Mbit/s "
          f"({(goodput / RATE - 1) * 100:+.1f} %)")
    # The limit holds: never 5 % over. Under it, the test's own sender may be starved for a
    # moment on 2 busy cores (once -5.3 % in a full run, +-0.1 % alone), so 10 % there.
    assert -0.10 <= wire / RATE - 1 <= 0.05
    assert abs(goodput / RATE - 1) <= TOLERANCE


def test_unlimited_cell_is_not_throttled(managers, guests, listeners):
    net = managers()
    info = run(net.setup("c0000e002", 0, 0))
    g = guests(info)
    lst = listeners(net.router_netns, info.router_ip)
    send_for(g.socket(), lst.addr, 1.5)
    rate = measured_rate(lst, 0.3, 1.0)
    print(f"\nunlimited guest->host through the relay: {rate / 1e6:.0f} Mbit/s")
    assert rate > 3 * RATE


def test_leftovers_found_and_removed_after_a_crash(tag, managers):
    net = managers()
    infos = [run(net.setup(c, 10_000_000, 10_000_000)) for c in ("c0000f001", "c0000f002")]
    # "kill -9": the process's fds close, nothing else happens
    for info in infos:
        os.close(info.tap_fd)
    net._cells.clear()
    net._executor.shutdown()
    net._executor = None
    net._closed = True

    fresh = managers()
    assert fresh.cells() == ["c0000f001", "c0000f002"]
    for cid in fresh.cells():
        assert run(fresh.teardown(cid)) is True
    assert fresh.cells() == []
    assert run(fresh.close()) is True
    assert mine(netns_all(), tag) == []


def test_close_keeps_the_router_while_cells_remain(managers):
    net = managers()
    run(net.setup("c0000f101"))
    assert run(net.close()) is False
    assert network.netns_exists(net.router_netns)
    run(net.teardown("c0000f101"))
    assert run(net.close()) is True
    assert not network.netns_exists(net.router_netns)


def test_collision_with_a_leftover_is_cleaned_first(tag, managers, caplog):
    net = managers()
    run(net.setup("c0000f201"))  # router exists
    stale = net.netns_name("c0000f202")
    network.create_netns(stale)  # a leftover namespace with the next cell's name
    info = run(net.setup("c0000f202"))
    assert info.netns == stale
    assert any("leftover" in r.getMessage() for r in caplog.records)
    with pytest.raises(network.NetworkError, match="already has a network"):
        run(net.setup("c0000f202"))


def test_missing_tun_is_a_precise_error_and_leaves_nothing(tag, managers, monkeypatch):
    monkeypatch.setattr(network, "TUN_PATH", "/dev/net/no-such-tun")
    net = managers()
    with pytest.raises(network.MissingCapability, match="/dev/net/no-such-tun.*CONFIG_TUN"):
        run(net.setup("c0000f301"))
    assert mine(netns_all(), tag) == [] and net.known() == []


def test_missing_ifb_is_a_precise_error_and_rolls_back(tag, managers, monkeypatch):
    net = managers()
    run(net.setup("c0000f401"))
    monkeypatch.setattr(network, "IFB_KIND", "no-such-kind")
    with pytest.raises(network.MissingCapability, match="ifb.*CONFIG_IFB"):
        run(net.setup("c0000f402", 0, 10_000_000))
    assert net.cells() == ["c0000f401"] and net.known() == ["c0000f401"]
    # without a guest->host limit no ifb is needed
    run(net.setup("c0000f403", 10_000_000, 0))


def test_failure_half_way_rolls_back(tag, managers, monkeypatch):
    net = managers()
    run(net.setup("c0000f501"))
    real, calls = network.tbf_params, []

    def failing(bits):
        calls.append(bits)
        if len(calls) == 4:  # 2 validation calls, then tap0's tbf, then ifb0's: fail there
            raise network.NetworkError("injected failure")
        return real(bits)

    monkeypatch.setattr(network, "tbf_params", failing)
    with pytest.raises(network.NetworkError, match="injected"):
        run(net.setup("c0000f502", 10_000_000, 10_000_000))
    assert net.cells() == ["c0000f501"]
    router_links = subprocess.run(["ip", "-n", net.router_netns, "-o", "link"],
                                  capture_output=True, text=True).stdout
    assert "v0000f502a" not in router_links and "v0000f501a" in router_links
    monkeypatch.setattr(network, "tbf_params", real)
    info = run(net.setup("c0000f502", 10_000_000, 10_000_000))  # and the block is free again
    assert info.guest_ip == "10.213.0.10"


def test_cancelled_setup_leaves_nothing(tag, managers):
    net = managers()
    run(net.setup("c0000f601"))

    async def cancel_soon():
        task = asyncio.get_running_loop().create_task(net.setup("c0000f602", 10_000_000, 10_000_000))
        await asyncio.sleep(0.002)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(cancel_soon())
    assert net.cells() == ["c0000f601"] and net.known() == ["c0000f601"]


# --------------------------------------------------------------------------------------
# a real VM


@pytest.mark.vm
def test_real_vm_gets_its_address_and_answers_ping(tag, managers, tmp_path):
    from pathlib import Path

    from hived import image
    from hived.vmm import qemu
    from hived.vmm.base import CellSpec

    img = image.find_image(Path(os.environ.get("HIVED_IMAGE_DIR", "/var/lib/hived/images")))
    if img is None:
        pytest.skip("no cell image: run `hived image build`")
    manifest = image.read_manifest(img)
    if "virtio_net" not in manifest["modules"] + manifest["modules_builtin"]:
        pytest.skip("the cell image has no virtio_net: rebuild it")

    net = managers()
    cell_id = "c" + secrets.token_hex(4)
    info = run(net.setup(cell_id, 50_000_000, 50_000_000))
    sink = Listener(net.router_netns, info.router_ip)

    class NetQemu(qemu.QemuMicrovm):
        """QemuMicrovm plus the cell's NIC: what QemuMicrovm.launch needs to add."""

        async def launch(self) -> int:
            spec = self.spec
            argv = qemu.build_cmdline(spec, self._p("chan.sock"), self._p("qmp.sock"),
                                      self._p("console.log"), self._p("scratch.ext4"),
                                      self._p("qemu.pid"))
            argv += info.qemu_args()
            with open(self._p("qemu.stderr"), "wb") as stderr:
                self.proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                    stderr=stderr, pass_fds=(info.tap_fd,), start_new_session=True)
            return self.proc.pid

    spec = CellSpec(cell_id=cell_id, cell_dir=tmp_path / cell_id, vcpus=1, memory_mib=384,
                    scratch_mib=64, kernel=img / "vmlinuz", initrd=img / "initrd.img",
                    rootfs=img / "root.ext4", accelerator="tcg", extra_cmdline=info.cmdline)
    driver = NetQemu()

    async def boot_and_ping():
        await driver.prepare(spec)
        try:
            await driver.launch()
            net.release_fd(cell_id)  # QEMU has its own copy now
            channel = await driver.accept(90)
            msg = await asyncio.wait_for(channel.recv(), 30)
            assert msg.name == "cell.hello"
            proc = await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", net.router_netns, "busybox", "ping", "-c", "3", "-W", "5",
                info.guest_ip, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            out, _ = await proc.communicate()
            # a build in the guest opens a TCP connection to the sink and sends 1 MB
            script = ("import socket,sys\n"
                      f"s=socket.create_connection(({sink.addr[0]!r},{sink.addr[1]}),timeout=20)\n"
                      "assert s.recv(6)==b'hello\\n'\n"
                      "s.sendall(bytes(1<<20)); print(s.getsockname()[0]); s.close()\n")
            await channel.send("run", build_id="bnet", argv=["python3", "-c", script], env={},
                               cwd="/work", timeout_s=60, limits={"output_bytes": 1 << 16})
            stdout, exit_msg = b"", None
            while exit_msg is None:
                msg = await asyncio.wait_for(channel.recv(), 90)
                if msg.name == "output":
                    stdout += msg["data"]
                elif msg.name == "exit":
                    exit_msg = msg
                elif msg.name == "ping":
                    await channel.send("pong", seq=msg["seq"])
            return proc.returncode, out.decode(), driver.console_tail(40), exit_msg, stdout
        finally:
            await driver.destroy()
            sink.close()

    rc, out, console, exit_msg, stdout = run(boot_and_ping())
    print(f"\nping from {net.router_netns}:\n{out}\nconsole: {console}")
    assert rc == 0 and " 0% packet loss" in out, out
    assert exit_msg["code"] == 0, (exit_msg.fields, stdout, console)
    assert stdout.decode().strip() == info.guest_ip
    deadline = time.monotonic() + 10
    while sink.total < 1 << 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sink.total == 1 << 20 and sink.peers[-1][0] == info.guest_ip
    m = re.search(r"hived-init: init ([\d.]+) modules ([\d.]+) net ([\d.]+) root", console)
    assert m, console
    print(f"guest network up at {m.group(3)} s uptime, "
          f"{(float(m.group(3)) - float(m.group(2))) * 1000:.0f} ms after the modules")


def test_set_ups_and_teardowns_wait_for_a_secure_provisioning_at_most_the_hold(monkeypatch):
    """While a Secure Compute tunnel is provisioned, other cells' network set-ups and teardowns
    wait (they would hold the kernel's rtnl lock under the provisioning's netlink steps), and
    never longer than PROVISION_HOLD_S. The real effect is measured by `hived bench secure`."""
    from hived.box import network

    monkeypatch.setattr(network, "PROVISION_HOLD_S", 0.3)
    net = network.CellNetwork("gate-test")

    async def main() -> None:
        await asyncio.wait_for(net._after_provisioning(), 0.05)  # nothing in flight: no wait
        order = []
        with net.provisioning():
            waiting = asyncio.ensure_future(net._after_provisioning())
            waiting.add_done_callback(lambda _: order.append("set-up goes"))
            await asyncio.sleep(0.1)
            assert not waiting.done()
            order.append("provisioned")
        await asyncio.wait_for(waiting, 1)
        assert order == ["provisioned", "set-up goes"]
        with net.provisioning():  # one that outlasts the hold does not hold anyone longer
            t0 = time.monotonic()
            await net._after_provisioning()
            assert 0.25 <= time.monotonic() - t0 < 1.0

    asyncio.run(main())
