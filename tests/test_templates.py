"""Cells restored from templates (hived/box/templates.py), on a real box with real microVMs.

A template is a cell booted to its snapshot point and saved; warm pools fill with its
clones. Each clone must become its own cell (RNG, clock, name, network, disk) before its
hello, a template whose inputs changed or that fails to restore must never be used again,
and nothing of a template may outlive its box.
"""

import asyncio
import fcntl
import os
import shutil
import time

import pytest

from hived.box.daemon import CellImage
from hived.box.network import cell_mac
from hived.box.templates import SEALS, Template, TemplateStore, new_memfd, template_memfds

from boxharness import BoxHarness

SHAPES = {"small": {"vcpus": 1, "memory_mib": 512, "scratch_mib": 256, "pool_target": 1}}


# -- pure logic (stand-in make): the real box below covers the same paths -------------------

def test_a_template_is_unusable_after_its_inputs_change_its_age_or_its_clones():
    tpl = Template(id="t1", key="small", digest="aaa", memory_fd=-1, state_fd=-1, made_at=100.0)
    assert tpl.unusable("aaa", 150.0, max_age_s=60, max_clones=2) == ""
    assert "inputs changed" in tpl.unusable("bbb", 150.0, max_age_s=60, max_clones=2)
    assert "older than 60 s" in tpl.unusable("aaa", 160.0, max_age_s=60, max_clones=2)
    tpl.clones = 2
    assert "made its 2 clones" in tpl.unusable("aaa", 150.0, max_age_s=60, max_clones=2)
    assert tpl.unusable("aaa", 1e9, max_age_s=0, max_clones=0) == ""  # 0: no limit


def test_store_makes_one_template_at_a_time_and_backs_off_after_a_failure():
    async def main():
        now = [0.0]
        made = []

        async def make(key, digest, shape, image):
            made.append(digest)
            await asyncio.sleep(0.01)
            if digest == "bad":
                raise RuntimeError("no guest")
            return Template(id=f"t{len(made)}", key=key, digest=digest, memory_fd=new_memfd("t"),
                            state_fd=new_memfd("s"), made_at=now[0])

        store = TemplateStore(make, max_age_s=60, max_clones=0, clock=lambda: now[0])
        a, b = await asyncio.gather(store.get("small", "d1", None, None), store.get("small", "d1", None, None))
        assert a is b and made == ["d1"]  # two cells waiting for one template
        assert await store.get("small", "bad", None, None) is None  # inputs changed, remake failed
        assert made == ["d1", "bad"] and store.templates == {} and store.discarded == 1
        assert await store.get("small", "bad", None, None) is None and made == ["d1", "bad"]  # backing off
        now[0] = 10.0
        assert await store.get("small", "bad", None, None) is None and made == ["d1", "bad", "bad"]
        now[0] = 100.0
        c = await store.get("small", "d2", None, None)
        assert c.digest == "d2" and c.memory_fd >= 0
        await store.close()
        assert c.memory_fd == -1

    asyncio.run(main())


def test_a_sealed_template_memory_refuses_writes_but_maps_copy_on_write():
    import mmap

    fd = new_memfd("hived-test", 1 << 16)
    os.pwrite(fd, b"template", 0)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    clone = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)  # what QEMU 7.2 does, even for share=off
    try:
        with pytest.raises(PermissionError):
            os.pwrite(clone, b"x", 0)
        with pytest.raises(PermissionError):
            mmap.mmap(clone, 1 << 16, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        private = mmap.mmap(clone, 1 << 16, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
        private[:8] = b"CLONE!!!"
        assert os.pread(fd, 8, 0) == b"template"
        private.close()
    finally:
        os.close(clone)
        os.close(fd)


# -- real cells --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def box():
    if os.geteuid() != 0:
        pytest.skip("needs root: cells get cgroups, a netns and a jailed VMM")
    # VMMs confined (own uid, jail): the clone's memory is reached through the jail's /fds.
    h = BoxHarness(SHAPES, box={"vmm_uid_base": 3_300_000, "template_max_clones": 50})
    h.start()
    yield h
    name = h.name
    h.stop()
    assert template_memfds(name) == []  # nothing of a template outlives its box


def _warm_cell(box) -> dict:
    box.wait_pool_full(300)
    [cell] = [c for c in box.status()["cells"] if c["state"] == "warm"]
    return cell


def _record(box, build_id) -> dict:
    [rec] = [b for b in box.status()["builds"] if b["id"] == build_id]
    return rec


@pytest.mark.vm
def test_a_build_runs_on_a_restored_cell_that_is_its_own(box):
    cell = _warm_cell(box)
    assert cell["origin"] == "restore" and cell["template"].startswith("t"), cell
    # The build shares the cell's hostname (no UTS namespace of its own) and cannot change it.
    r = box.build(["sh", "-c", "hostname other 2>/dev/null; cat /proc/sys/kernel/hostname /sys/class/net/eth0/address; "
                   "grep -c '^eth0\t00000000' /proc/net/route; grep ' /work ' /proc/mounts | cut -d' ' -f1,3; "
                   "echo hi > /work/f && cat /work/f"])
    assert r.exit["code"] == 0, (r.exit, r.stderr)
    host, mac, default_routes, work, hi = r.stdout.decode().split("\n")[:5]
    assert r.cell_id == cell["id"] and host == cell["id"]
    assert mac == cell_mac(cell["id"])  # not the template's
    assert default_routes == "1" and work.endswith(" ext4") and hi == "hi"
    rec = _record(box, r.build_id)
    assert rec["origin"] == "restore"
    # ... in the build container its template made: renamed for this cell (the hostname above)
    assert rec["guest_start"]["premade"] == 1, rec
    metrics = box.daemon.metrics.registry
    assert metrics.get_sample_value("hived_cell_starts_total", {"shape": "small", "origin": "restore"}) >= 1
    assert metrics.get_sample_value("hived_cell_restore_seconds_count", {"shape": "small"}) >= 1


@pytest.mark.vm
def test_consecutive_clones_give_different_random_bytes_and_the_right_time(box):
    seen = []
    for _ in range(2):
        cell = _warm_cell(box)
        before = time.time()
        # Each clone's scratch disk is its own copy of the template's: a file one clone wrote is not
        # in the next one's.
        r = box.build(["sh", "-c", "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s; "
                       "test ! -e /work/mark && echo mine > /work/mark && ls -A /work | tr '\\n' ' '"])
        after = time.time()
        assert r.exit["code"] == 0, (r.exit, r.stderr)
        rand, guest_time, *work = r.stdout.decode().split()
        assert work == ["lost+found", "mark"] or work == ["mark"], work
        assert len(rand) == 64 and before - 2 <= int(guest_time) <= after + 2, (rand, guest_time, before, after)
        seen.append((cell["template"], rand))
    (t1, r1), (t2, r2) = seen
    assert t1 == t2 and t1, seen  # the same template's memory, yet...
    assert r1 != r2


@pytest.mark.vm
def test_a_corrupt_template_falls_back_to_boot_and_is_remade(box):
    cell = _warm_cell(box)
    tpl = box.daemon.templates.templates["small"]
    failures = box.daemon.metrics.registry.get_sample_value(
        "hived_cell_start_failures_total", {"shape": "small", "origin": "restore"}) or 0

    async def corrupt():  # as if the saved device state were damaged: garbage, sealed like the real one
        garbage = new_memfd("hived-test-garbage")
        os.write(garbage, b"\x51\x45\x56\x4d" + os.urandom(4096))
        fcntl.fcntl(garbage, fcntl.F_ADD_SEALS, SEALS)
        os.close(tpl.state_fd)
        tpl.state_fd = garbage
    box.call(corrupt())
    r = box.build(["echo", "on the cell restored before"])  # takes the warm cell; the refill fails
    assert r.exit["code"] == 0 and r.cell_id == cell["id"]
    box.wait_pool_full(300)
    after = box.daemon.metrics.registry.get_sample_value(
        "hived_cell_start_failures_total", {"shape": "small", "origin": "restore"})
    assert after == failures + 1
    assert box.daemon.templates.templates.get("small") is not tpl  # discarded, never used again
    assert tpl.memory_fd == -1
    cell = _warm_cell(box)
    assert cell["origin"] == "boot" or cell["template"] != tpl.id, cell  # booted instead
    r = box.build(["echo", "still builds"])
    assert (r.exit["code"], r.stdout) == (0, b"still builds\n")
    cell = _warm_cell(box)  # the next refill restores from a new template
    assert cell["origin"] == "restore" and cell["template"] != tpl.id, cell


@pytest.mark.vm
def test_a_template_whose_inputs_changed_is_never_used_and_is_remade(box, tmp_path):
    cell = _warm_cell(box)
    old = box.daemon.templates.templates["small"]
    assert cell["template"] == old.id
    # The cell image is rebuilt under the running box (same content, new files).
    copy = tmp_path / "image"
    copy.mkdir()
    for f in ("vmlinuz", "initrd.img", "root.ext4"):
        shutil.copy(box.image.kernel.parent / f, copy / f)

    async def swap():
        box.daemon.image = CellImage.at(copy)
    box.call(swap())
    try:
        r = box.build(["true"])  # takes the cell restored earlier; its replacement needs a new template
        assert r.exit["code"] == 0
        cell = _warm_cell(box)
        new = box.daemon.templates.templates["small"]
        assert new.id != old.id and new.digest != old.digest and old.memory_fd == -1
        assert cell["origin"] == "restore" and cell["template"] == new.id
        r = box.build(["cat", "/proc/sys/kernel/hostname"])
        assert (r.exit["code"], r.stdout.decode().strip()) == (0, r.cell_id)
        assert _record(box, r.build_id)["origin"] == "restore"
    finally:
        async def back():
            box.daemon.image = CellImage.at(box.image.kernel.parent)
        box.call(back())


def test_a_clone_configures_its_network_by_ioctl_as_init_does_with_ip():
    """The guest's configure_net() run for real in a fresh network namespace (a tap as eth0)."""
    import subprocess
    import sys

    from hived.cell import identity

    assert identity.parse_net("") == {}
    with pytest.raises(identity.IdentityError):
        identity.parse_net("hived.ip=10.0.0.2 hived.gw=10.0.0.1")  # no prefix
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 for a network namespace with a tap")
    for in_template in ("", "identity.links_up(); "):
        # A template brings the links up at its snapshot point (links_up); its clones then change
        # the MAC of an up link. Without it (an older template), configure_net brings them up.
        code = ("import sys; sys.path.insert(0, '.'); from hived.cell import identity; " + in_template +
                "identity.configure_net('hived.ip=10.213.7.2/30 hived.gw=10.213.7.1 hived.mtu=1400', "
                "'02:68:01:02:03:04')")
        script = f'ip tuntap add eth0 mode tap && {sys.executable} -c "{code}" && ip -o addr show eth0 && ' \
                 'ip -o link show eth0 && ip -o link show lo && ip route show default'
        r = subprocess.run(["unshare", "--net", "--", "sh", "-c", script], capture_output=True, text=True,
                           timeout=60, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert r.returncode == 0, r.stderr
        assert "inet 10.213.7.2/30" in r.stdout and "mtu 1400" in r.stdout and "02:68:01:02:03:04" in r.stdout
        assert "default via 10.213.7.1 dev eth0" in r.stdout and "LOOPBACK,UP" in r.stdout
        if in_template and os.path.isdir("/proc/sys/net/ipv6"):
            assert "inet6" not in r.stdout  # no link-local address from the template's MAC


def test_only_a_translated_guest_is_told_to_warm_its_clones_translations():
    """hived.accel=tcg makes a clone's agent run one process before cell.ready (warm_translations):
    worth it only where guest code is translated; under KVM it would be idle work for nothing."""
    from pathlib import Path

    from hived.vmm.base import CellSpec
    from hived.vmm.qemu import guest_cmdline

    def spec(accel: str) -> CellSpec:
        return CellSpec(cell_id="c1", cell_dir=Path("/nonexistent"), vcpus=1, memory_mib=512, scratch_mib=64,
                        kernel=Path("k"), initrd=Path("i"), rootfs=Path("r"), accelerator=accel)

    assert "hived.accel=tcg" in guest_cmdline(spec("tcg")).split()
    assert "hived.accel" not in guest_cmdline(spec("kvm"))


def test_a_clone_qemu_is_given_no_kernel_to_keep():
    """A clone never boots (its guest booted in its template; -no-reboot): its QEMU gets no -kernel
    or -initrd, which it would read and keep in memory for fw_cfg. Restores with it: the tests above."""
    import dataclasses
    from pathlib import Path

    from hived.vmm.base import CellSpec
    from hived.vmm.qemu import build_cmdline

    boot = CellSpec(cell_id="c1", cell_dir=Path("/nonexistent"), vcpus=1, memory_mib=512, scratch_mib=64,
                    kernel=Path("/img/vmlinuz"), initrd=Path("/img/initrd.img"), rootfs=Path("/img/root.ext4"),
                    accelerator="tcg")
    paths = [Path(f"/nonexistent/{n}") for n in ("chan.sock", "qmp.sock", "console.log", "scratch.ext4", "qemu.pid")]
    booted = build_cmdline(boot, *paths)
    clone = build_cmdline(dataclasses.replace(boot, restore=True), *paths)
    assert "-kernel" in booted and "-initrd" in booted and "/img/vmlinuz" in booted
    assert not {"-kernel", "-initrd", "-append"} & set(clone) and "/img/vmlinuz" not in clone
    assert clone[clone.index("-incoming") + 1] == "defer"
