"""Secure Compute end to end, nothing simulated: a customer network in namespaces of its own
(a connector, `hived connector`, in front of a private HTTP service reachable only through
it), a real control plane with its key exchange service, a real box with real cells, and
per-cell WireGuard tunnels (wireguard-go here).

    root ns (the box's host)  10.231.N.1 ──veth── 10.231.N.2  connector ns  10.50.N.1 ──veth── 10.50.N.2
      control plane (box link) on 10.231.N.1       hived connector (WireGuard :51820)     private ns: HTTP
      cells' WireGuard UDP sockets                                                         (the secret)
"""

import asyncio
import base64
import os
import secrets
import signal
import time
from pathlib import Path

import pytest
from ports import free_port
from test_control_api import TOKENS, sha
from test_control_e2e import api_call, wait_build

from hived.box.controllink import ControlLink, LinkConfig
from hived.connector.testbed import CustomerNetwork
from hived.control.config import parse
from hived.control.server import ControlPlane

from boxharness import BoxHarness

pytestmark = [pytest.mark.vm, pytest.mark.root]

SHAPES = {"small": {"vcpus": 1, "memory_mib": 320, "scratch_mib": 128, "pool_target": 2}}
BOX_TOKEN = secrets.token_urlsafe(24)
CONN_TOKEN = secrets.token_urlsafe(24)
FETCH = ("import sys, urllib.request\n"
         "try:\n"
         "    print(urllib.request.urlopen('%s', timeout=float(sys.argv[1])).read().decode())\n"
         "except Exception as e:\n"
         "    print('unreachable:', e); sys.exit(3)\n")


class Hive:
    def __init__(self, tmp: Path, box: dict | None = None) -> None:
        self.box_options = box or {}  # extra [box] keys (test_secure_prestart.py)
        self.net = CustomerNetwork(tmp)
        self.control = ""
        self.tmp = tmp
        self.api_port = free_port()
        self.box = None
        self.cp = None
        self.link = None
        self.private_keys: list[bytes] = []

    def start(self) -> "Hive":
        self.net.up()
        self.box_port = free_port()
        self.control = f"{self.net.host_ip}:{self.box_port}"
        self.config = parse({
            "hive": {"name": "sc", "state_dir": str(self.tmp / "hive"),
                     "api_listen": f"127.0.0.1:{self.api_port}", "box_listen": f"{self.net.host_ip}:{self.box_port}",
                     "heartbeat_s": 0.5, "box_lost_s": 8.0},
            "shapes": {"small": {}},
            "customers": {"acme": {"api_tokens_sha256": [sha(TOKENS["acme"])]}},
            "boxes": {"sc-box": {"token_sha256": sha(BOX_TOKEN)}},
            "networks": {"acme-private": {"customer": "acme", "connector_tokens_sha256": [sha(CONN_TOKEN)],
                                          "tunnel_subnet": "100.96.0.0/24",
                                          "routes": [self.net.private_net]}},
        }, "sc")
        self.box = BoxHarness(SHAPES, box=self.box_options)
        self.box.start()
        self.cp = ControlPlane(self.config)
        self.box.call(self.cp.start())
        link_cfg = LinkConfig(self.net.host_ip, self.box_port, BOX_TOKEN, "sc-box", capacity=2)

        async def attach():
            self.link = ControlLink(self.box.daemon, link_cfg)
            self.link.start()
            await asyncio.wait_for(self.link.registered.wait(), 30)
        self.box.call(attach())
        self.net.start_connector(self.control, CONN_TOKEN)
        self.wait_connector()
        return self

    def wait_connector(self, timeout=30) -> None:
        deadline = time.monotonic() + timeout
        while "acme-private" not in self.cp.kex.connectors:
            if time.monotonic() > deadline:
                raise AssertionError(f"connector did not register: {self.net.connector_output()}")
            time.sleep(0.1)

    def stop(self) -> None:
        try:
            if self.link is not None:
                self.box.call(self.link.stop())
            if self.cp is not None:
                self.box.call(self.cp.stop())
        finally:
            try:
                if self.box is not None:
                    self.box.stop()
            finally:
                self.net.down()

    def http(self, method, path, body=None):
        return api_call(self.api_port, method, path, body)

    def submit(self, argv, secure=True, timeout_s=60):
        body = {"argv": argv, "timeout_s": timeout_s}
        if secure:
            body["options"] = {"secure_compute": "acme-private"}
        status, b = self.http("POST", "/v1/builds", body)
        assert status == 201, b
        return b["id"]

    def wait(self, build_id, states=("succeeded", "failed", "cancelled"), timeout=240):
        return wait_build(self.api_port, build_id, states, timeout)

    def log(self, build_id) -> str:
        _, data = self.http("GET", f"/v1/builds/{build_id}/logs")
        return data.decode(errors="replace")

    def fetch_argv(self, timeout=5):
        return ["python3", "-c", FETCH % self.net.url, str(timeout)]


@pytest.fixture(scope="module")
def hive(tmp_path_factory):
    yield from running_hive(tmp_path_factory)


def running_hive(tmp_path_factory, box: dict | None = None):
    """A started Hive (box with `box` as extra [box] keys); stopped and checked for leftovers after."""
    if os.geteuid() != 0:
        pytest.skip("needs root: namespaces, cgroups")
    import shutil
    if not shutil.which("wireguard-go") and not Path("/sys/module/wireguard").exists():
        pytest.skip("neither kernel WireGuard nor wireguard-go: `apt-get install wireguard-go`")
    from hived.secure import keys

    h = Hive(tmp_path_factory.mktemp("sc"), box)
    real_generate = keys.KeyPair.generate.__func__

    def spy(cls):  # the real generator; the test keeps the private keys to look for them later
        pair = real_generate(cls)
        h.private_keys.append(bytes(pair.private))
        return pair
    keys.KeyPair.generate = classmethod(spy)
    try:
        h.start()
        h.box.wait_pool_full()
        yield h
    finally:
        keys.KeyPair.generate = classmethod(real_generate)
        h.stop()
    leftovers = [n for n in os.listdir("/run/netns") if n.startswith(("hvtc", "hvtp"))
                 or h.box.daemon.network.tag in n] if os.path.isdir("/run/netns") else []
    assert not leftovers


def test_secure_build_reaches_the_private_service_and_an_ordinary_build_cannot(hive):
    plain = hive.submit(hive.fetch_argv(4), secure=False)
    secure = hive.submit(hive.fetch_argv())
    b = hive.wait(secure)
    assert (b["state"], b["exit_code"]) == ("succeeded", 0), (b, hive.log(secure))
    assert hive.net.secret in hive.log(secure)
    p = hive.wait(plain)
    assert p["exit_code"] == 3 and "unreachable" in hive.log(plain) and hive.net.secret not in hive.log(plain), p
    hive.box.wait_pool_full()


PROBE = ("import socket, sys\n"
         "for host, port in zip(sys.argv[1::2], sys.argv[2::2]):\n"
         "    try:\n"
         "        socket.create_connection((host, int(port)), timeout=3).close(); print('reached', host, port)\n"
         "    except OSError as e:\n"
         "        print('refused', host, port, e)\n")


def test_secure_cell_reaches_nothing_outside_its_tunnel(hive):
    """The box itself, the control plane, the connector's outer address, the router: all out of reach
    (the veth to the box router is gone; only the network's routes lead into the tunnel)."""
    router_ip = hive.box.daemon.network.transit_router_ip
    targets = [hive.net.host_ip, hive.box_port, hive.net.conn_ip, 51820, "127.0.0.1", hive.api_port,
               router_ip, 22, "1.1.1.1", 53, hive.net.private_ip, 8080]
    i = hive.submit(["python3", "-c", PROBE, *map(str, targets)])
    b = hive.wait(i)
    out = hive.log(i)
    assert b["state"] == "succeeded", (b, out)
    lines = dict(((w[1], w[2]), w[0]) for w in (line.split() for line in out.splitlines()) if len(w) >= 3)
    assert lines.pop((hive.net.private_ip, "8080")) == "reached", out  # the one thing in the tunnel's routes
    assert len(lines) == 5 and set(lines.values()) == {"refused"}, out
    hive.box.wait_pool_full()


def test_two_cells_get_different_keys_and_nothing_is_left(hive):
    before = len(hive.private_keys)
    ids = [hive.submit(hive.fetch_argv()) for _ in range(2)]
    for i in ids:
        b = hive.wait(i)
        assert b["state"] == "succeeded", (b, hive.log(i))
    new = hive.private_keys[before:]
    assert len(new) == 2 and new[0] != new[1]
    records = [hive.box.daemon.builds[i] for i in ids]
    pubs = {r["tunnel"]["public_key"] for r in records}
    assert len(pubs) == 2
    # Nothing of the tunnels is left: no WireGuard process, socket or peer.
    names = [r["tunnel"]["interface"] for r in records]
    def sockets():
        return [n for n in names if Path(f"/var/run/wireguard/{n}.sock").exists()]
    deadline = time.monotonic() + 10  # the box destroys cells after reporting their exit
    while time.monotonic() < deadline and (hive.cp.kex.tunnels or _wg_processes(names) or sockets()):
        time.sleep(0.1)
    assert not hive.cp.kex.tunnels
    assert not _wg_processes(names)
    assert not sockets()
    hive.box.wait_pool_full()


def test_no_private_key_in_state_run_logs_or_guest(hive):
    i = hive.submit(["sh", "-c", "cat /proc/cmdline; env; ls -la / /run 2>&1; cat /proc/net/dev"])
    b = hive.wait(i)
    assert b["state"] == "succeeded", (b, hive.log(i))
    assert hive.private_keys
    needles = set()
    for k in hive.private_keys:
        needles |= {k, k.hex().encode(), base64.b64encode(k)}
    guest_view = hive.log(i).encode()
    assert not [n for n in needles if n in guest_view]
    roots = [hive.tmp, Path("/run"), hive.box.tmp]
    found = []
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            if dirpath.startswith("/run/netns"):
                continue
            for f in files:
                p = Path(dirpath) / f
                try:
                    if not p.is_file() or p.stat().st_size > 64 << 20:
                        continue
                    data = p.read_bytes()
                except OSError:
                    continue
                found += [str(p) for n in needles if n in data]
    assert not found
    hive.box.wait_pool_full()


def test_connector_restart_mid_build_fails_the_build_clearly(hive):
    i = hive.submit(["sh", "-c", "python3 -c \"$0\" 5 && sleep 60", FETCH % hive.net.url], timeout_s=120)
    hive.wait(i, ("running",), timeout=120)
    deadline = time.monotonic() + 60
    while hive.net.secret not in hive.log(i):  # the tunnel carried the fetch before we pull the plug
        assert time.monotonic() < deadline, hive.log(i)
        time.sleep(0.2)
    hive.net.stop_connector(signal.SIGKILL)
    hive.net.start_connector(hive.control, CONN_TOKEN)
    b = hive.wait(i, timeout=60)
    assert b["state"] == "failed" and b["reason"] == "secure_compute", b
    assert "connector of Secure Compute network acme-private went away" in b["message"], b
    hive.wait_connector()
    hive.box.wait_pool_full()


def test_connector_down_fails_fast_and_leaves_nothing(hive):
    hive.net.stop_connector()
    deadline = time.monotonic() + 10
    while "acme-private" in hive.cp.kex.connectors and time.monotonic() < deadline:
        time.sleep(0.1)
    t0 = time.monotonic()
    i = hive.submit(hive.fetch_argv())
    b = hive.wait(i, timeout=60)
    took = time.monotonic() - t0
    assert b["state"] == "failed" and b["reason"] == "secure_compute", b
    assert "is not connected to the key exchange service" in b["message"], b
    assert took < 20, "fails at once, not after a handshake timeout"  # generous: the box's cell takes none
    names = [n for n in os.listdir("/var/run/wireguard")] if os.path.isdir("/var/run/wireguard") else []
    from hived.secure.wireguard import box_prefix
    assert not [n for n in names if n.startswith(box_prefix(hive.box.daemon.network.tag))]
    hive.net.start_connector(hive.control, CONN_TOKEN)
    hive.wait_connector()
    hive.box.wait_pool_full()


def _wg_processes(names) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"wireguard-go") and any(n.encode() in cmd for n in names):
            out.append(int(pid))
    return out


def test_control_plane_restart_mid_build_fails_the_secure_build_clearly(hive):
    """The key exchange service keeps tunnels in memory: after a restart the connector registers
    again with new keys, so the running build's tunnel is dead and the box must say so."""
    i = hive.submit(["sh", "-c", "python3 -c \"$0\" 5 && sleep 60", FETCH % hive.net.url], timeout_s=120)
    hive.wait(i, ("running",), timeout=120)
    deadline = time.monotonic() + 60
    while hive.net.secret not in hive.log(i):
        assert time.monotonic() < deadline, hive.log(i)
        time.sleep(0.2)
    hive.box.call(hive.cp.stop())
    hive.cp = ControlPlane(hive.config)
    hive.box.call(hive.cp.start())
    b = hive.wait(i, timeout=90)
    assert b["state"] == "failed" and b["reason"] == "secure_compute", b
    assert "control plane restarted" in b["message"], b
    hive.wait_connector()
    # A new build gets a new tunnel through the re-registered connector.
    j = hive.submit(hive.fetch_argv())
    assert hive.wait(j)["state"] == "succeeded", hive.log(j)
    hive.box.wait_pool_full()
