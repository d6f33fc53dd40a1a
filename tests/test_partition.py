"""The box partition's bookkeeping (pure logic; the real cgroups and pinning it drives are
checked from inside real cells in test_isolation.py)."""

import pytest

from hived.box.config import Shape
from hived.box.partition import NoCapacity, Partition, PartitionError


def part(cores=4, reserved=1, memory=4096, overcommit=False):
    return Partition(list(range(cores)), reserved, memory, vmm_overhead_mib=256, overcommit=overcommit)


def test_dedicated_cores_never_shared():
    p = part()
    a = p.admit("c1", Shape("s", vcpus=2, memory_mib=512))
    b = p.admit("c2", Shape("s", vcpus=1, memory_mib=512))
    assert a.cores == (1, 2) and b.cores == (3,)
    assert not a.shared and not b.shared and a.slot != b.slot
    with pytest.raises(NoCapacity, match="needs 1 dedicated cores; 0 of 3 are free"):
        p.admit("c3", Shape("s", vcpus=1, memory_mib=512))
    p.release("c1")
    assert p.admit("c3", Shape("s", vcpus=2, memory_mib=512)).cores == (1, 2)


def test_memory_is_admitted_with_vmm_overhead():
    p = part(memory=1600)
    p.admit("c1", Shape("s", vcpus=1, memory_mib=512))   # 768
    with pytest.raises(NoCapacity, match="needs 1280 MiB; 832 MiB of 1600 are free"):
        p.admit("c2", Shape("s", vcpus=1, memory_mib=1024))


def test_overcommit_shares_the_least_loaded_cores_and_says_so():
    p = part(cores=2, reserved=0, overcommit=True)
    cells = [p.admit(f"c{i}", Shape("s", vcpus=1, memory_mib=512)) for i in range(3)]
    assert [c.cores for c in cells] == [(0,), (1,), (0,)]
    assert cells[2].shared and p.describe()["overcommitted"]


def test_shape_larger_than_the_box_is_refused_at_start():
    with pytest.raises(PartitionError, match="shape big wants 8 vCPUs but the box has 3 cores"):
        part().check_shapes([Shape("big", vcpus=8)])
    with pytest.raises(PartitionError, match="raise box.memory_mib"):
        part(memory=512).check_shapes([Shape("s", memory_mib=512)])


def test_pools_that_overcommit_are_refused_unless_allowed():
    shapes = [Shape("s", vcpus=2, pool_target=2)]
    with pytest.raises(PartitionError, match=r"4 cores of 3.*box.overcommit = true"):
        part().check_shapes(shapes)
    part(overcommit=True).check_shapes(shapes)


def test_reserving_every_core_is_an_error():
    with pytest.raises(PartitionError, match="reserved_cores = 2 leaves none"):
        part(cores=2, reserved=2)


def test_describe_shows_who_owns_which_core():
    p = part()
    p.admit("c1", Shape("s", vcpus=1, memory_mib=512))
    d = p.describe()
    assert d["box_cores"] == [0] and d["cell_cores"] == {"1": ["c1"], "2": [], "3": []}
    assert d["free_cores"] == [2, 3] and d["memory_mib"]["used"] == 768


def test_partition_metrics_follow_admissions():
    """hived_partition_* (the dashboard's per-box partition) read the partition at scrape time."""
    from prometheus_client import generate_latest

    from hived.box.metrics import BoxMetrics

    p = part(cores=4, reserved=1, memory=4096)
    metrics = BoxMetrics()
    metrics.watch_partition(p)

    def scrape() -> str:
        return generate_latest(metrics.registry).decode()

    assert 'hived_partition_cores{use="cells_free"} 3.0' in scrape()
    p.admit("c1", Shape("s", vcpus=2, memory_mib=512))
    text = scrape()
    assert 'hived_partition_cores{use="box"} 1.0' in text
    assert 'hived_partition_cores{use="cells_used"} 2.0' in text
    assert 'hived_partition_cores{use="cells_free"} 1.0' in text
    assert "hived_partition_memory_bytes{use=\"used\"} 8.05306368e+08" in text   # 768 MiB
    assert "hived_partition_memory_bytes{use=\"allocatable\"} 4.294967296e+09" in text   # 4 GiB
    p.release("c1")
    assert 'hived_partition_cores{use="cells_used"} 0.0' in scrape()
