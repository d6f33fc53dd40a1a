"""Cells yield the CPU to the box daemon where they share cores ([box] cells_cpu_weight).

The cgroups a box makes for its cells carry a low CPU weight from below the box's anchor
down to the cells' parent: first on a stand-in cgroup root (where it is written, where not),
then on this machine's real hierarchy, where a busy process beside a busy "cell" on one
core gets the core's time in the ratio of the weights. The public surface (a `hived box`
daemon's cells) is checked in tests/test_isolation.py::test_vmm_runs_confined.
"""

import os
import secrets
import subprocess
import time
from pathlib import Path

import pytest
from test_cgroup_placement import UNIT, _xattr_ok

from hived.box.cgroups import CellLimits, detect, open_cgroups
from hived.box.config import ConfigError, parse
from hived.box.placement import place

ROOT = Path("/sys/fs/cgroup")


@pytest.fixture
def fake_v2(tmp_path):
    """A stand-in cgroup v2 root down to a unit systemd delegated, each level weighing 100."""
    root = tmp_path / "cgroup"
    (root / UNIT).mkdir(parents=True)
    for d in (root, root / "system.slice", root / UNIT):
        (d / "cgroup.controllers").write_text("cpuset cpu io memory pids")
        (d / "cgroup.subtree_control").write_text("")
        (d / "cpu.weight").write_text("100\n")
    return root


def _stand_in(root: Path, path: str) -> None:
    """Cgroups down `path` with what the kernel puts in a new one, as far as these tests read it."""
    d = root
    for part in Path(path).parts:
        d = d / part
        d.mkdir(exist_ok=True)
        (d / "cpu.weight").write_text("100\n")


def test_weight_goes_on_every_cgroup_below_the_anchor_down_to_the_parent(fake_v2):
    _stand_in(fake_v2, "hived/b1")
    cg = open_cgroups("hived/b1", fake_v2, "", cpu_weight=1)
    cg.create("c0000abcd", CellLimits())
    assert (fake_v2 / "hived" / "cpu.weight").read_text() == "1"  # beside the daemon's cgroup
    assert (fake_v2 / "hived" / "b1" / "cpu.weight").read_text() == "1"
    assert (fake_v2 / "cpu.weight").read_text() == "100\n"  # the root is not the box's


def test_under_a_delegated_unit_only_the_cells_subtree_is_weighed(fake_v2):
    if not _xattr_ok(fake_v2):
        pytest.skip("needs root and trusted.* xattrs on the temp filesystem (systemd's delegation mark)")
    os.setxattr(fake_v2 / UNIT, "trusted.delegate", b"1")
    _stand_in(fake_v2 / UNIT, "cells")
    cg = place("auto", "b1", fake_v2, f"0::/{UNIT}/daemon\n", cpu_weight=5)
    assert cg.parent == f"{UNIT}/cells"
    cg.create("c0000abcd", CellLimits())
    assert (fake_v2 / UNIT / "cells" / "cpu.weight").read_text() == "5"
    assert (fake_v2 / UNIT / "cpu.weight").read_text() == "100\n"  # systemd's: CPUWeight= of the unit
    assert (fake_v2 / "system.slice" / "cpu.weight").read_text() == "100\n"


def test_weight_zero_leaves_the_cgroups_alone(fake_v2):
    _stand_in(fake_v2, "hived/b1")
    open_cgroups("hived/b1", fake_v2, "").create("c0000abcd", CellLimits())
    assert (fake_v2 / "hived" / "cpu.weight").read_text() == "100\n"


def test_config_default_and_bad_values():
    assert parse({"box": {"name": "b"}, "shapes": {"s": {}}}).cells_cpu_weight == 1
    assert parse({"box": {"name": "b", "cells_cpu_weight": 100}, "shapes": {"s": {}}}).cells_cpu_weight == 100
    for bad in (0, 10001, "low", True):
        with pytest.raises(ConfigError) as err:
            parse({"box": {"name": "b", "cells_cpu_weight": bad}, "shapes": {"s": {}}}, "box.toml")
        assert str(err.value) == (f"box.toml: box.cells_cpu_weight: expected an integer from 1 to 10000, "
                                  f"got {bad!r}")


# ---- the real hierarchy ------------------------------------------------------------------


def _cpu_knob() -> tuple[Path, str]:
    """(where this machine's cpu controller is, its weight knob)."""
    version = detect(ROOT)
    if version == 1 and (ROOT / "cpu" / "cpu.shares").exists():
        return ROOT / "cpu", "cpu.shares"
    if version == 2 and "cpu" in (ROOT / "cgroup.controllers").read_text().split():
        return ROOT, "cpu.weight"
    pytest.skip("no cgroup cpu controller on this machine (v1 cpu or v2 with cpu enabled)")


def _busy_on(core: int) -> subprocess.Popen:
    """A shell spinning on `core`, in this process's cgroups."""
    return subprocess.Popen(["taskset", "-c", str(core), "sh", "-c", "while :; do :; done"])


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


@pytest.mark.parametrize("weight", [1, 100])
def test_real_cells_yield_a_shared_core_to_the_host(weight):
    """A spinning "cell" and a spinning host process on one core: at weight 1 the host
    process gets nearly all of it; at 100 (equal) about half (the control)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: cgroups")
    top, knob = _cpu_knob()
    name = f"hived-test-{secrets.token_hex(3)}"
    cg = open_cgroups(f"{name}/box", ROOT, "", cpu_weight=weight)
    core = sorted(os.sched_getaffinity(0))[-1]
    procs = []
    try:
        joins = cg.create("c0000cafe", CellLimits(cpus=str(core)))
        expected = max(2, weight * 1024 // 100) if knob == "cpu.shares" else weight
        assert int((top / name / knob).read_text()) == expected
        cell = _busy_on(core)
        procs.append(cell)
        for f in joins:
            f.write_text(str(cell.pid))
        host = _busy_on(core)
        procs.append(host)
        time.sleep(0.3)
        c0, h0 = _cpu_ticks(cell.pid), _cpu_ticks(host.pid)
        time.sleep(1.5)
        c1, h1 = _cpu_ticks(cell.pid), _cpu_ticks(host.pid)
        share = (h1 - h0) / max(1, (h1 - h0) + (c1 - c0))
        if weight == 1:
            assert share > 0.85, f"the host process got {share:.0%} of a core it shares with a cell"
        else:
            assert 0.25 < share < 0.75, f"at equal weight the host process got {share:.0%}"
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        cg.remove("c0000cafe")
        cg.remove_parent()  # leaves a v2 root's direct child (it may be another box's): ours goes here
        if (ROOT / name).is_dir():
            (ROOT / name).rmdir()
    assert not list(ROOT.glob(f"*/{name}")) and not (ROOT / name).exists()
