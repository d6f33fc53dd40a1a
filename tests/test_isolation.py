"""Isolation measured from inside real cells and checked from the host.

The box gives each of two cells one dedicated core (this machine has two; none is
reserved for the daemon here), a memory limit, and a disk throttle on its scratch drive.
"""

import os
import re
from pathlib import Path

import pytest

from hived.box.partition import PartitionError

from boxharness import BoxHarness

pytestmark = [pytest.mark.vm, pytest.mark.root]

DISK_BPS = 8 << 20
VMM_UID_BASE = 3_100_000
SHAPES = {
    "one": {"vcpus": 1, "memory_mib": 320, "scratch_mib": 256, "pool_target": 2,
            "disk_bytes_s": DISK_BPS},
}


@pytest.fixture(scope="module")
def box():
    if os.geteuid() != 0:
        pytest.skip("needs root: cgroups")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two cores to give two cells one each")
    harness = BoxHarness(SHAPES, box={"reserved_cores": len(os.sched_getaffinity(0)) - 2,
                                      "overcommit": False, "vmm_uid_base": VMM_UID_BASE})
    try:
        harness.start()
        harness.wait_pool_full()
        yield harness
    finally:
        harness.stop()


def _cpus_allowed(pid: int, tid: int) -> str:
    text = Path(f"/proc/{pid}/task/{tid}/status").read_text()
    return re.search(r"Cpus_allowed_list:\s*(\S+)", text).group(1)


def test_each_cell_has_its_own_core(box):
    box.wait_pool_full()
    cells = [c for c in box.status()["cells"] if c["state"] == "warm"]
    assert len(cells) == 2
    cores = [tuple(c["cores"]) for c in cells]
    assert len(set(cores)) == 2 and all(len(c) == 1 for c in cores)   # no two cells share a core
    for c in cells:
        core = str(c["cores"][0])
        cg = Path(f"/sys/fs/cgroup/cpuset/hived/{box.name}/{c['id']}/cpuset.cpus")
        if cg.exists():  # v1 here; on v2 the same list is in the unified tree
            assert cg.read_text().strip() == core
        # every thread of the VMM may only run on the cell's core; vCPU threads pinned to it
        for tid in os.listdir(f"/proc/{c['pid']}/task"):
            assert _cpus_allowed(c["pid"], int(tid)) == core
        assert c["vcpu_threads"] and all(_cpus_allowed(c["pid"], t) == core
                                         for t in c["vcpu_threads"].values())
    part = box.status()["partition"]
    assert not part["overcommitted"] and sorted(part["free_cores"]) == []


def test_nproc_and_meminfo_match_the_shape(box):
    r = box.build(["sh", "-c", "nproc; grep MemTotal /proc/meminfo"])
    nproc, _, kib, _ = r.stdout.decode().split()
    assert int(nproc) == 1
    mib = int(kib) / 1024
    assert 0.8 * 320 < mib <= 320   # the kernel keeps a little for itself


def test_memory_limit_of_the_vmm_cgroup(box):
    box.wait_pool_full()
    cells = [c for c in box.status()["cells"] if c["state"] == "warm"]
    for c in cells:
        limit = Path(f"/sys/fs/cgroup/memory/hived/{box.name}/{c['id']}/memory.limit_in_bytes")
        if limit.exists():
            assert int(limit.read_text()) == (320 + box.config.vmm_overhead_mib) << 20


def test_memory_hog_kills_only_its_own_build(box):
    hog = ["python3", "-c", "x = bytearray(1 << 30); print('allocated', len(x))"]
    calm = ["sh", "-c", "sleep 3; echo calm"]
    bad, good = box.builds_at_once((hog, {}), (calm, {}))
    assert bad.exit["reason"] in ("signaled", "exited") and bad.exit["code"] != 0, bad.exit
    assert b"allocated" not in bad.stdout
    assert good.exit["code"] == 0 and good.stdout == b"calm\n"


def _disk_write_rate(box, mib: int) -> float:
    script = (f"s=$(date +%s.%N); dd if=/dev/zero of=/work/f bs=4M count={mib // 4} oflag=direct 2>/dev/null; "
              "e=$(date +%s.%N); echo $s $e")
    r = box.build(["sh", "-c", script])
    start, end = map(float, r.stdout.split())
    return (mib << 20) / (end - start)


def test_disk_writes_run_at_the_limit(box):
    rate = _disk_write_rate(box, 24)
    if rate < 0.85 * DISK_BPS:
        # Under TCG a guest starved of CPU by a busy host writes slower than any limit:
        # measure once more. Going *over* the limit is never retried.
        rate = _disk_write_rate(box, 24)
    print(f"disk write rate in the cell: {rate / 2**20:.2f} MiB/s (limit {DISK_BPS / 2**20:g} MiB/s)")
    assert 0.85 * DISK_BPS <= rate <= 1.15 * DISK_BPS


def test_blkio_throttle_is_set(box):
    box.wait_pool_full()
    cells = [c for c in box.status()["cells"] if c["state"] == "warm"]
    knob = Path(f"/sys/fs/cgroup/blkio/hived/{box.name}/{cells[0]['id']}/blkio.throttle.write_bps_device")
    if not knob.exists():
        pytest.skip("no blkio controller in cgroup v1 here")
    assert knob.read_text().split()[-1] == str(DISK_BPS)


def test_shape_larger_than_the_box_refuses_to_start():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    h = BoxHarness({"huge": {"vcpus": 64, "pool_target": 1}}, box={"overcommit": False})
    try:
        with pytest.raises(PartitionError, match="shape huge wants 64 vCPUs"):
            h.start()
        assert not h.config.cells_dir.exists()
    finally:
        h.stop()


def _status_fields(pid: int) -> dict:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.split()
    return out


def test_vmm_runs_confined(box):
    box.wait_pool_full()
    cells = [c for c in box.status()["cells"] if c["state"] == "warm"]
    uids = set()
    for c in cells:
        pid = c["pid"]
        st = _status_fields(pid)
        assert len(set(st["Uid"])) == 1 and int(st["Uid"][0]) >= VMM_UID_BASE  # real, effective, saved
        uids.add(st["Uid"][0])
        assert int(st["CapEff"][0], 16) == 0 and int(st["CapBnd"][0], 16) == 0
        assert st["NoNewPrivs"] == ["1"] and st["Seccomp"] == ["2"]
        assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        root = Path(f"/proc/{pid}/root")
        assert sorted(os.listdir(root)) <= sorted(["bin", "dev", "etc", "lib", "lib64", "sbin", "tmp", "usr",
                                                   "var"])
        assert not (root / "root").exists() and not (root / "home").exists()
        # only its own cell directory is visible, not its neighbours'
        visible = os.listdir(root / str(box.config.cells_dir).lstrip("/"))
        assert visible == [c["id"]]
        assert sorted(os.listdir(root / "dev")) <= ["kvm", "null", "random", "urandom", "zero"]
    assert len(uids) == len(cells)  # one uid per cell: a VMM cannot signal or ptrace another


def test_more_builds_than_room_wait_for_it(box):
    """Two cores, no overcommit: a third build waits until a cell is destroyed, then runs."""
    results = box.builds_at_once(*[(["sh", "-c", f"sleep 1; echo {i}"], {}) for i in range(3)])
    assert [r.exit["code"] for r in results] == [0, 0, 0], [r.exit for r in results]
    assert [r.stdout for r in results] == [b"0\n", b"1\n", b"2\n"]
    assert box.status()["pools"]["one"]["consecutive_failures"] == 0  # no room is not a failure
