"""Template memory on huge pages ([box] template_hugepages, hived/box/templates.py), for real: the
test reserves huge pages through /proc/sys/vm/nr_hugepages and gives the old value back after,
also when it fails. Real cells, confined VMMs (own uid, jail), as tests/test_templates.py.
"""

import fcntl
import hashlib
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hived.box.templates import SEALS, HugePages, new_memfd, reopen_readonly, template_memfds

from boxharness import BoxHarness, find_image

NR = Path("/proc/sys/vm/nr_hugepages")
MEMORY_MIB = 256
SHAPES = {"small": {"vcpus": 1, "memory_mib": MEMORY_MIB, "scratch_mib": 128, "pool_target": 1}}


def _root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: /proc/sys/vm/nr_hugepages, cgroups, namespaces")


def _reserve(pages: int) -> HugePages:
    """Set vm.nr_hugepages to `pages` more than the pages in use; skip if the kernel gives fewer."""
    hp = HugePages.read()
    want = hp.total + pages
    NR.write_text(f"{want}\n")
    got = HugePages.read()
    if got.total < want:
        pytest.skip(f"the kernel reserved {got.total} of {want} huge pages (memory too fragmented)")
    return got


@pytest.fixture
def hugepages():
    """Reserves huge pages for the test (1 GiB); the old vm.nr_hugepages comes back after."""
    _root()
    if not HugePages.read().size:
        pytest.skip("this kernel has no huge pages (no Hugepagesize in /proc/meminfo)")
    old = NR.read_text().strip()
    try:
        yield _reserve(512)
    finally:
        NR.write_text(f"{old}\n")


def test_a_sealed_hugetlb_memfd_refuses_writes_but_maps_copy_on_write(hugepages):
    size = 4 * hugepages.size
    fd = new_memfd("hived-test-huge", size, hugetlb=True)
    try:
        assert os.fstatvfs(fd).f_bsize == hugepages.size  # on hugetlbfs
        shared = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        shared[:8] = b"template"
        shared.close()
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS == SEALS
        clone = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)  # what QEMU 7.2 does, even for share=off
        try:
            with pytest.raises(OSError):  # hugetlbfs has no write(); the seal refuses it anyway
                os.pwrite(clone, b"x", 0)
            with pytest.raises(PermissionError):
                mmap.mmap(clone, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            with pytest.raises(PermissionError):
                os.ftruncate(clone, 2 * size)
            private = mmap.mmap(clone, size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
            private[:8] = b"CLONE!!!"
            again = mmap.mmap(fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ)
            assert again[:8] == b"template"
            again.close()
            private.close()
        finally:
            os.close(clone)
    finally:
        os.close(fd)


def _digest(fd: int, size: int) -> str:
    """sha256 of the template's memory, read through a shared read-only mapping (a private one
    would reserve huge pages of its own)."""
    ro = reopen_readonly(fd)
    try:
        view = mmap.mmap(ro, size, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(ro)
    try:
        return hashlib.sha256(view).hexdigest()
    finally:
        view.close()


def _maps_hugetlb(pid: int, needle: str) -> bool:
    """Does process `pid` map a file named `needle` with 2 MiB (huge) kernel pages?"""
    lines = Path(f"/proc/{pid}/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        if needle in line:
            for follow in lines[i + 1:i + 30]:
                if follow.startswith("KernelPageSize:"):
                    return int(follow.split()[1]) > 4
    return False


@pytest.mark.vm
def test_clones_of_a_hugetlb_template_run_builds_and_never_write_the_template(hugepages):
    find_image()
    h = BoxHarness(SHAPES, box={"vmm_uid_base": 3_310_000, "template_hugepages": True})
    try:
        h.start()
        h.wait_pool_full(300)
        store = h.daemon.templates
        [tpl] = store.templates.values()
        assert tpl.hugetlb and os.fstatvfs(tpl.memory_fd).f_bsize == hugepages.size
        assert fcntl.fcntl(tpl.memory_fd, fcntl.F_GET_SEALS) & SEALS == SEALS
        [rt] = [rt for p in h.daemon.pools.values() for rt in p.warm]
        assert rt.origin == "restore" and rt.template == tpl.id
        assert _maps_hugetlb(rt.cell.pid, "memfd:hived-template-")  # the clone maps the template's huge pages
        before = _digest(tpl.memory_fd, MEMORY_MIB << 20)
        # the build writes 96 MiB of its memory: every page it touches is the clone's own copy
        r = h.build(["python3", "-c", "b = bytearray(96 << 20)\nfor i in range(0, len(b), 4096): b[i] = 7\n"
                     "print(sum(b[::4096]))"])
        assert r.exit["code"] == 0 and r.stdout.strip() == str(7 * (96 << 20) // 4096).encode(), r
        assert _digest(tpl.memory_fd, MEMORY_MIB << 20) == before
        assert h.daemon.templates.templates[tpl.key] is tpl
    finally:
        name = h.name
        h.stop()
    assert template_memfds(name) == []


@pytest.mark.vm
def test_a_pool_too_small_for_a_clone_boots_and_keeps_the_template():
    """Huge pages for the template only: a clone cannot reserve its own, so the cell boots on
    ordinary memory, and the template is not discarded for that."""
    _root()
    find_image()
    hp = HugePages.read()
    if not hp.size:
        pytest.skip("this kernel has no huge pages")
    old = NR.read_text().strip()
    try:
        _reserve(hp.pages(MEMORY_MIB << 20))
        h = BoxHarness(SHAPES, box={"template_hugepages": True})
        try:
            h.start()
            h.wait_pool_full(300)
            [rt] = [rt for p in h.daemon.pools.values() for rt in p.warm]
            assert rt.origin == "boot"
            [tpl] = h.daemon.templates.templates.values()
            assert tpl.hugetlb and h.daemon.templates.discarded == 0
            assert h.build(["true"]).exit["code"] == 0
        finally:
            h.stop()
    finally:
        NR.write_text(f"{old}\n")


def test_asked_for_but_not_reserved_is_one_clear_line(tmp_path):
    """`hived box` with template_hugepages on a host without huge pages: one line naming
    vm.nr_hugepages, no traceback."""
    _root()
    if HugePages.read().total:
        pytest.skip("this host has huge pages reserved: the refusal cannot be seen without taking them away")
    find_image()
    cfg = tmp_path / "box.toml"
    cfg.write_text(f'[box]\nname = "thp-{os.getpid()}"\nstate_dir = "{tmp_path / "s"}"\ntemplate_hugepages = true\n'
                   "reserved_cores = 0\novercommit = true\n\n[shapes.small]\nmemory_mib = 256\n")
    r = subprocess.run([sys.executable, "-m", "hived", "box", "--config", str(cfg)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0
    assert "vm.nr_hugepages" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
