"""Where cells' cgroups go (hived/box/placement.py): the decision on a stand-in cgroup root,
then the real thing on a cgroup v2 subtree made (and removed) here.

systemd is not PID 1 on this machine kind, so no test starts a unit: the real tests make
the cgroups systemd would (a delegated unit cgroup, its xattr mark, the daemon's leaf) and
check what the box does with them.
"""

import os
import secrets
import signal
import subprocess
from pathlib import Path

import pytest

from hived.box import leftovers
from hived.box.cgroups import CellLimits, CgroupError, CgroupV2
from hived.box.config import ConfigError, parse
from hived.box.placement import move_into, own_cgroup, place, plan

UNIT = "system.slice/hived-box.service"
LIMITS = CellLimits(memory_bytes=256 << 20, pids_max=64)


def _xattr_ok(path: Path) -> bool:
    try:
        os.setxattr(path, "trusted.hived-probe", b"1")
        os.removexattr(path, "trusted.hived-probe")
        return True
    except OSError:
        return False


@pytest.fixture
def fake_root(tmp_path):
    """A stand-in cgroup v2 root: systemd's tree down to a unit it delegated."""
    root = tmp_path / "cgroup"
    (root / UNIT).mkdir(parents=True)
    if not _xattr_ok(root):
        pytest.skip("needs root and trusted.* xattrs on the temp filesystem (systemd's delegation mark)")
    controllers = "cpuset cpu io memory pids"
    for d in (root, root / "system.slice", root / UNIT):
        (d / "cgroup.controllers").write_text(controllers)
        (d / "cgroup.subtree_control").write_text("")
    return root


def _delegate(path: Path) -> None:
    os.setxattr(path, "trusted.delegate", b"1")


def test_own_cgroup_reads_the_v2_line():
    text = "12:memory:/x\n1:name=systemd:/system.slice/a.service\n0::/system.slice/a.service/daemon\n"
    assert own_cgroup(text) == "system.slice/a.service/daemon"
    assert own_cgroup("0::/\n") == ""
    assert own_cgroup("4:memory:/x\n") is None


def test_not_under_systemd_keeps_the_box_parent(fake_root):
    p = plan("auto", "b1", fake_root, "0::/user.slice/session-3.scope\n", 2)
    assert (p.parent, p.anchor, p.move_self_to) == ("hived/b1", "", "")


def test_cgroup_v1_keeps_the_box_parent(fake_root):
    _delegate(fake_root / UNIT)
    p = plan("auto", "b1", fake_root, f"0::/{UNIT}/daemon\n", 1)
    assert (p.parent, p.move_self_to) == ("hived/b1", "")


def test_delegated_unit_with_the_daemon_in_its_leaf_holds_the_cells(fake_root):
    """systemd >= 254 with DelegateSubgroup=daemon: cells beside the daemon, in the unit."""
    _delegate(fake_root / UNIT)
    p = plan("auto", "b1", fake_root, f"0::/{UNIT}/daemon\n", 2)
    assert (p.parent, p.anchor, p.move_self_to) == (f"{UNIT}/cells", UNIT, "")
    assert "delegated" in p.why


def test_daemon_in_the_delegated_units_own_cgroup_keeps_cells_outside_it(fake_root):
    """systemd < 254 starts every main process in the unit's own cgroup: with controllers handed
    to cells below it the unit could not start again, so the cells go outside the unit."""
    _delegate(fake_root / UNIT)
    p = plan("auto", "b1", fake_root, f"0::/{UNIT}\n", 2)
    assert (p.parent, p.anchor, p.move_self_to) == ("hived/b1", "", "")
    assert "DelegateSubgroup" in p.why


def test_a_leaf_of_an_undelegated_cgroup_is_not_taken(fake_root):
    p = plan("auto", "b1", fake_root, f"0::/{UNIT}/daemon\n", 2)  # no delegation mark
    assert p.parent == "hived/b1"


def test_configured_parent_below_the_daemon_moves_the_daemon_into_a_leaf(fake_root):
    p = plan(f"/{UNIT}/vms", "b1", fake_root, f"0::/{UNIT}\n", 2)
    assert (p.parent, p.anchor, p.move_self_to) == (f"{UNIT}/vms", UNIT, f"{UNIT}/daemon")
    # elsewhere: the daemon stays where it is, the box writes from the root down as before
    p = plan("/hived/elsewhere", "b1", fake_root, f"0::/{UNIT}\n", 2)
    assert (p.parent, p.anchor, p.move_self_to) == ("hived/elsewhere", "", "")


def test_configured_parent_that_would_hold_the_daemon_is_refused(fake_root):
    with pytest.raises(CgroupError, match="among its cells"):
        plan(f"/{UNIT}", "b1", fake_root, f"0::/{UNIT}\n", 2)


def test_bad_cgroup_parent_is_one_clear_line():
    for bad in ("hived/x", "/a/../b", "/", "/a//b", "/.control", "/a b", 7):
        with pytest.raises(ConfigError) as err:
            parse({"box": {"cgroup_parent": bad}, "shapes": {"s": {}}}, "box.toml")
        assert str(err.value).startswith("box.toml: box.cgroup_parent: expected") and "\n" not in str(err.value)
    cfg = parse({"box": {"name": "b", "cgroup_parent": "/hived/vms"}, "shapes": {"s": {}}}, "box.toml")
    assert (cfg.cgroup_placement, cfg.cgroup_parent) == ("/hived/vms", "hived/vms")
    assert parse({"box": {"name": "b"}, "shapes": {"s": {}}}).cgroup_parent == "hived/b"


def test_controllers_are_written_only_from_the_anchor_down(fake_root):
    """systemd owns the root and the slices: the box writes nothing above the unit's cgroup."""
    _delegate(fake_root / UNIT)
    cg = place("auto", "b1", fake_root, f"0::/{UNIT}/daemon\n")
    assert isinstance(cg, CgroupV2) and cg.parent == f"{UNIT}/cells"
    procs = cg.create("c0000abcd", LIMITS)
    assert procs == [fake_root / UNIT / "cells" / "c0000abcd" / "cgroup.procs"]
    assert (fake_root / "cgroup.subtree_control").read_text() == ""
    assert (fake_root / "system.slice" / "cgroup.subtree_control").read_text() == ""
    assert "+memory" in (fake_root / UNIT / "cgroup.subtree_control").read_text()
    assert "+pids" in (fake_root / UNIT / "cells" / "cgroup.subtree_control").read_text()
    assert (fake_root / UNIT / "cells" / "c0000abcd" / "memory.max").read_text() == str(256 << 20)
    assert cg.cells() == ["c0000abcd"]
    (fake_root / UNIT / "cells" / "c0000abcd" / "memory.max").unlink()  # a stand-in dir holds files
    (fake_root / UNIT / "cells" / "c0000abcd" / "pids.max").unlink()
    cg.remove("c0000abcd")
    cg.remove_parent()
    assert (fake_root / UNIT).is_dir()  # the unit's cgroup is systemd's: never removed by the box


def test_legacy_parent_still_enables_from_the_root(fake_root):
    cg = place("auto", "b1", fake_root, "0::/\n")
    assert cg.parent == "hived/b1" and cg.anchor == ""
    cg.create("c0000abce", LIMITS)
    assert "+memory" in (fake_root / "cgroup.subtree_control").read_text()


def test_parent_outside_the_anchor_is_refused(fake_root):
    with pytest.raises(CgroupError, match="not below"):
        CgroupV2(fake_root, "hived/b1", anchor=UNIT)


# ---- a real cgroup v2 subtree ------------------------------------------------------------


def _cgroup2_root() -> Path | None:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2] == "cgroup2":
            return Path(fields[1])
    return None


@pytest.fixture
def real_unit():
    """A cgroup v2 subtree shaped like a delegated systemd unit, with a stand-in daemon
    process (sleep) in it; everything removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root: cgroups")
    root = _cgroup2_root()
    if root is None:
        pytest.skip("no cgroup2 hierarchy mounted")
    unit = f"hived-test-{secrets.token_hex(3)}.service"
    (root / unit).mkdir()
    procs = []

    def spawn(where: str) -> subprocess.Popen:
        proc = subprocess.Popen(["sleep", "300"])
        procs.append(proc)
        move_into(root, where, proc.pid)
        return proc
    try:
        os.setxattr(root / unit, "trusted.delegate", b"1")
        yield root, unit, spawn
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        for d in sorted((p for p in (root / unit).rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            d.rmdir()
        (root / unit).rmdir()


def _cgroup_of(pid: int) -> str:
    return own_cgroup(Path(f"/proc/{pid}/cgroup").read_text())


def test_real_delegated_subtree_cells_beside_the_daemon(real_unit, tmp_path):
    root, unit, spawn = real_unit
    daemon = spawn(f"{unit}/daemon")  # where systemd's DelegateSubgroup=daemon starts it
    assert _cgroup_of(daemon.pid) == f"{unit}/daemon"
    p = plan("auto", "b1", root, Path(f"/proc/{daemon.pid}/cgroup").read_text(), 2)
    assert (p.parent, p.anchor) == (f"{unit}/cells", unit)
    cg = CgroupV2(root, p.parent, p.anchor)
    if not {"memory", "pids"} <= set((root / unit / "cgroup.controllers").read_text().split()):
        # this machine's v2 hierarchy has no controllers (v1 holds them): create() says so
        with pytest.raises(CgroupError, match="Delegate=yes"):
            cg.create("c0000beef", LIMITS)
        (root / p.parent / "c0000beef").mkdir(parents=True)
    else:
        cg.create("c0000beef", LIMITS)
    vmm = spawn(f"{p.parent}/c0000beef")  # a stand-in VMM in its cell's cgroup
    assert cg.cells() == ["c0000beef"] and cg.procs("c0000beef") == {vmm.pid}
    # a later daemon's crash cleanup finds the cell by listing the parent, kills what is in
    # it and removes it; the daemon's own leaf, beside it, is untouched
    (tmp_path / "cells").mkdir()
    assert leftovers.clean(tmp_path / "cells", cg) == ["c0000beef"]
    assert vmm.wait(5) == -signal.SIGKILL
    assert not (root / p.parent / "c0000beef").exists()
    assert daemon.poll() is None and _cgroup_of(daemon.pid) == f"{unit}/daemon"
    cg.remove_parent()
    assert not (root / p.parent).exists() and (root / unit / "daemon").is_dir()


def test_real_daemon_in_the_units_own_cgroup(real_unit):
    """Started in the unit's own cgroup: auto keeps the cells outside; a configured parent below
    it moves the daemon into the leaf first."""
    root, unit, spawn = real_unit
    daemon = spawn(unit)  # where systemd < 254 starts the unit's main process
    text = Path(f"/proc/{daemon.pid}/cgroup").read_text()
    assert own_cgroup(text) == unit
    assert plan("auto", "b1", root, text, 2).parent == "hived/b1"
    p = plan(f"/{unit}/cells", "b1", root, text, 2)
    assert (p.parent, p.anchor, p.move_self_to) == (f"{unit}/cells", unit, f"{unit}/daemon")
    move_into(root, p.move_self_to, daemon.pid)
    assert _cgroup_of(daemon.pid) == f"{unit}/daemon"
    assert (root / unit / "cgroup.procs").read_text().split() == []  # the unit's cgroup is inner now
