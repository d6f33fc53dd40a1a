"""Pre-started WireGuard interfaces ([box] secure_prestart, hived/box/prestart.py), on real parts:
real cells, a real control plane with its key exchange service, a real connector in front of
a private service (test_secure_compute.Hive), wireguard-go; and a real `hived box` process
killed with SIGKILL and started again.
"""

import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_secure_compute import running_hive
from test_up_cli import clean_box_config, wait_for

from hived.box.config import load
from hived.box.network import CellNetwork
from hived.secure import wireguard

from boxharness import find_image

pytestmark = [pytest.mark.vm, pytest.mark.root]


@pytest.fixture(scope="module")
def hive(tmp_path_factory):
    yield from running_hive(tmp_path_factory, {"secure_prestart": True})


def interfaces_in(netns: str) -> list[str]:
    """Names of the links in a network namespace."""
    out = subprocess.run(["ip", "-n", netns, "-o", "link", "show"], capture_output=True, text=True)
    if out.returncode != 0:
        return []
    return [line.split(":")[1].strip().split("@")[0] for line in out.stdout.splitlines()]


def box_wireguard(tag: str) -> dict[int, str]:
    """{pid: interface} of the wireguard-go processes of one box."""
    return wireguard.wireguard_go_processes(wireguard.box_prefix(tag))


def test_warm_cells_have_their_interface_and_a_secure_build_uses_it(hive):
    daemon = hive.box.daemon
    net = daemon.network
    hive.box.wait_pool_full()
    warm = [rt for pool in daemon.pools.values() for rt in pool.warm]
    assert warm
    for rt in warm:  # each warm cell: its wireguard-go, its interface in its own namespace, no key
        name = wireguard.tunnel_name(net.tag, rt.cell.id)
        assert rt.wg_prestarted is not None and rt.wg_prestarted.name == name
        assert name in interfaces_in(net.netns_name(rt.cell.id))
        assert name in box_wireguard(net.tag).values()
        state = hive.box.call(rt.wg_prestarted.state())
        assert not state.has_private_key and not state.peers
    shown = {c["id"]: c["wireguard_prestarted"] for c in hive.box.status()["cells"] if c["state"] == "warm"}
    assert shown == {rt.cell.id: wireguard.tunnel_name(net.tag, rt.cell.id) for rt in warm}
    i = hive.submit(hive.fetch_argv())
    b = hive.wait(i)
    assert (b["state"], b["exit_code"]) == ("succeeded", 0), (b, hive.log(i))
    assert hive.net.secret in hive.log(i)
    rec = daemon.builds[i]
    assert rec["tunnel"]["prestarted"] is True, rec
    assert rec["tunnel"]["interface"] == wireguard.tunnel_name(net.tag, rec["cell"])
    assert daemon.metrics.registry.get_sample_value(
        "hived_secure_tunnel_interfaces_total", {"interface": "prestarted"}) >= 1
    # the build's cell is gone and its interface with it
    wait_for(lambda: rec["tunnel"]["interface"] not in box_wireguard(net.tag).values(), 30,
             "the build's wireguard-go to go with its cell")
    hive.box.wait_pool_full()


def test_a_secure_cells_veth_to_the_router_goes_while_its_build_runs(hive):
    """The cut is drop rules at once; the veth itself is deleted after the handshake."""
    from hived.box.network import veth_names

    daemon = hive.box.daemon
    net = daemon.network
    hive.box.wait_pool_full()
    i = hive.submit(["sh", "-c", "python3 -c \"$0\" 5 && sleep 8", hive.fetch_argv()[2]])
    hive.wait(i, ("running",), timeout=120)
    cell_id = daemon.builds[i]["cell"]
    veth_a, veth_b = veth_names(cell_id)
    wait_for(lambda: veth_a not in interfaces_in(net.router_netns) and veth_b not in interfaces_in(
        net.netns_name(cell_id)), 20, "the secure cell's veth to go")
    assert wireguard.tunnel_name(net.tag, cell_id) in interfaces_in(net.netns_name(cell_id))
    b = hive.wait(i)
    assert (b["state"], b["exit_code"]) == ("succeeded", 0), (b, hive.log(i))
    assert hive.net.secret in hive.log(i)
    assert daemon.builds[i]["tunnel"]["netlink_ms"]["unlink"] > 0
    hive.box.wait_pool_full()


def test_a_plain_build_has_no_wireguard_interface(hive):
    daemon = hive.box.daemon
    net = daemon.network
    hive.box.wait_pool_full()
    i = hive.submit(["sh", "-c", "echo started; sleep 8"], secure=False)
    hive.wait(i, ("running",), timeout=120)
    wait_for(lambda: "started" in hive.log(i), 60, "the plain build to start")
    cell_id = daemon.builds[i]["cell"]
    name = wireguard.tunnel_name(net.tag, cell_id)
    assert net.netns_name(cell_id) in os.listdir("/run/netns")  # the cell is there, its interface is not
    links = interfaces_in(net.netns_name(cell_id))
    assert "tap0" in links and name not in links, links
    assert not [n for n in links if n.startswith(wireguard.box_prefix(net.tag))], links
    assert name not in box_wireguard(net.tag).values()
    assert not Path(wireguard.socket_path(name)).exists()
    b = hive.wait(i)
    assert (b["state"], b["exit_code"]) == ("succeeded", 0), (b, hive.log(i))
    assert "tunnel" not in daemon.builds[i]
    assert daemon.builds[i]["prestart_removed_ms"] > 0  # removed before run, not found missing
    hive.box.wait_pool_full()


# -- kill -9 of a real `hived box` process, and its restart -------------------------------------


def _config(tmp: Path) -> Path:
    name = "tp-" + secrets.token_hex(3)
    path = tmp / "box.toml"
    path.write_text(f"""
[box]
name = "{name}"
state_dir = "{tmp / 'state'}"
reserved_cores = 0
overcommit = true
boot_timeout_s = 180
secure_prestart = true
oci_dir = "{tmp / 'oci'}"
repos_dir = "{tmp / 'repos'}"

[shapes.small]
vcpus = 1
memory_mib = 320
scratch_mib = 128
pool_target = 2
""")
    return path


def _start(config: Path, log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "hived", "box", "--config", str(config)],
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def _ppid(pid: int) -> int:
    return wireguard.parent_pid(pid)


def _warm_records(config) -> set[str]:
    """Cells whose record says warm (what a restarted daemon adopts)."""
    import json

    found = set()
    for path in config.cells_dir.glob("*/cell.json"):
        try:
            if json.loads(path.read_text())["state"] == "warm":
                found.add(path.parent.name)
        except (OSError, ValueError, KeyError):
            pass
    return found


def _prestarted(config, net: CellNetwork, daemon_pid: int, n: int):
    """{pid: interface} once the daemon has `n` warm cells (by their records), each with its
    pre-started interface inside its namespace, and no other."""
    tag = net.tag
    procs = box_wireguard(tag)
    if len(procs) != n or any(_ppid(pid) != daemon_pid for pid in procs):
        return None
    warm = _warm_records(config)
    if {wireguard.cell_of(name, tag) for name in procs.values()} != warm:
        return None
    for name in procs.values():
        if name not in interfaces_in(net.netns_name(wireguard.cell_of(name, tag))):
            return None
    return procs


def test_kill_9_and_restart_leaves_only_the_interfaces_of_the_adopted_cells(tmp_path):
    """...and a detach (SIGTERM) takes the interfaces along; the next daemon remakes them."""
    import shutil

    if os.geteuid() != 0:
        pytest.skip("needs root: namespaces, cgroups")
    if not shutil.which("wireguard-go") and not Path("/sys/module/wireguard").exists():
        pytest.skip("neither kernel WireGuard nor wireguard-go: `apt-get install wireguard-go`")
    find_image()
    path = _config(tmp_path)
    config = load(path)
    net = CellNetwork(config.name)
    tag = net.tag
    log = tmp_path / "box.log"
    first = second = third = None
    try:
        first = _start(path, log)
        old = wait_for(lambda: _prestarted(config, net, first.pid, 2), 300, "two warm cells with their interfaces")
        old_cells = {wireguard.cell_of(name, tag) for name in old.values()}
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        # the old daemon's wireguard-go processes outlive it (their own session): the next start must end them
        assert set(box_wireguard(tag)) == set(old), "wireguard-go died with the daemon: nothing to test"
        second = _start(path, log)
        new = wait_for(lambda: "adopted 2 of 2 cell(s)" in log.read_text() and _prestarted(config, net, second.pid, 2),
                       300, "the restarted daemon to adopt both cells and give them interfaces")
        text = log.read_text()
        assert "removed leftover tunnel process" in text, text[-3000:]
        assert not set(new) & set(old)  # remade, not adopted
        assert not [pid for pid in old if os.path.exists(f"/proc/{pid}") and _ppid(pid) != 0
                    and wireguard._proc_state(pid) != "Z"]
        # the adopted cells (same cells, never booted again) have their interface again, and nothing else is left
        assert {wireguard.cell_of(name, tag) for name in new.values()} == old_cells
        sockets = sorted(p for p in os.listdir(wireguard.UAPI_DIR) if p.startswith(wireguard.box_prefix(tag)))
        assert sockets == sorted(f"{name}.sock" for name in new.values())
        # SIGTERM detaches (a restart keeping the cells): the cells stay, their interfaces go with the
        # daemon, and the next daemon makes them anew
        second.send_signal(signal.SIGTERM)
        assert second.wait(60) == 0
        assert box_wireguard(tag) == {} and set(net.cells()) == old_cells
        third = _start(path, log)
        wait_for(lambda: log.read_text().count("adopted 2 of 2 cell(s)") == 2
                 and _prestarted(config, net, third.pid, 2), 300,
                 "the third daemon to adopt both cells and give them interfaces")
        stop = subprocess.run([sys.executable, "-m", "hived", "box", "stop", "--config", str(path)],
                              capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0, stop.stderr
        third.wait(60)
        assert box_wireguard(tag) == {}
        assert not [p for p in os.listdir(wireguard.UAPI_DIR) if p.startswith(wireguard.box_prefix(tag))]
        assert not net.cells()
    finally:
        for proc in (first, second, third):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
        wireguard.clean_leftovers(wireguard.box_prefix(tag))
        clean_box_config(config)
