"""Hostile and broken guests, for real: a box runs a good shape beside shapes whose
cells boot a hostile initramfs (built here from the real one, /init replaced). Each
misbehaviour must fail only its own cell or build, with a precise reason, and leave
nothing on the host; the good shape keeps serving."""

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from hived.box.daemon import BoxDaemon, CellImage
from hived.protocol import codec
from hived.protocol.framing_py import pack_frame
from hived.protocol.session import Session

from boxharness import BoxHarness, find_image

pytestmark = [pytest.mark.vm, pytest.mark.root]

HOSTILE_INIT = r"""#!/bin/sh
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
while read -r m; do [ -n "$m" ] && insmod /lib/modules/$m.ko; done < /lib/modules/order
mode=; pre=
for a in $(cat /proc/cmdline); do
    case $a in
        hostile=*) mode=${a#hostile=};; hostile.pre=*) pre=${a#hostile.pre=};;
        hostile.skip=*) skip=${a#hostile.skip=};; wrong=*) wrong=${a#wrong=};;
    esac
done
for d in /sys/class/virtio-ports/*; do [ "$(cat $d/name)" = hived.0 ] && port=/dev/${d##*/}; done
# Hold the port open throughout: virtio_console drops what arrives while it is closed.
exec 3<>"$port"
echo "hostile init: $mode on $port" > /dev/console
# The resync marker (protocol/SPEC.md, v4): echo the box's marker and nonce (14 + 16 bytes), then drop what
# follows for a moment (its repeats, and its hello once it has our echo).
resync() {
    m=$(busybox head -c 30 <&3 | busybox xxd -p); echo $m | busybox xxd -r -p >&3
    busybox timeout 1 cat <&3 > /dev/null
}
case $mode in
    silent) ;;
    mute) resync; echo $pre | busybox xxd -r -p >&3 ;;   # announces itself, then ignores `run`
    garbage) resync; printf '\000\000\000\010garbage!' >&3 ;;
    oversize) resync; printf '\177\377\377\377' >&3 ;;
    midbuild)
        resync; echo $pre | busybox xxd -r -p >&3
        busybox head -c $skip <&3 > /dev/null   # the first byte of the box's run
        printf '\000\000\000\003\301\301\301' >&3 ;;
    wrongbuild)
        resync; echo $pre | busybox xxd -r -p >&3
        busybox head -c $skip <&3 > /dev/null
        echo $wrong | busybox xxd -r -p >&3 ;;
esac
sleep 100000
"""

SHAPES = {
    "good": {"memory_mib": 384, "scratch_mib": 128, "pool_target": 1},
    "silent": {"memory_mib": 256, "scratch_mib": 64, "pool_target": 1},
    "garbage": {"memory_mib": 256, "scratch_mib": 64, "pool_target": 0},
    "oversize": {"memory_mib": 256, "scratch_mib": 64, "pool_target": 0},
    "midbuild": {"memory_mib": 256, "scratch_mib": 64, "pool_target": 0},
    "wrongbuild": {"memory_mib": 256, "scratch_mib": 64, "pool_target": 0},
    "mute": {"memory_mib": 256, "scratch_mib": 64, "pool_target": 0},
}


def hostile_initrd(real: Path, dest: Path) -> Path:
    tree = dest / "tree"
    tree.mkdir()
    with open(real, "rb") as f:
        subprocess.run(["cpio", "-idm", "--quiet"], stdin=f, cwd=tree, check=True)
    (tree / "init").write_text(HOSTILE_INIT)
    (tree / "init").chmod(0o755)
    out = dest / "hostile-initrd.img"
    files = subprocess.run(["find", "."], cwd=tree, capture_output=True, check=True).stdout
    with open(out, "wb") as f:
        subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], input=files, stdout=f, cwd=tree, check=True)
    return out


def announce_frames(cell_id: str) -> str:
    """What a well-behaved guest says first: hello and cell.hello, as hex for the cmdline."""
    hello = Session("cell", cell_id, {"box"}).hello_frame()
    ann = pack_frame(codec.encode("cell.hello", cell_id=cell_id, kernel="evil", boot={}, agent_version="0"),
                     4096)
    return (hello + ann).hex()


class HostileBox(BoxDaemon):
    hostile_initrd: Path

    def cell_spec(self, cell, shape, cgroup_procs, mode="agent", **kw):
        import dataclasses

        spec = super().cell_spec(cell, shape, cgroup_procs, mode, **kw)
        if shape.name == "good":
            return spec
        skip = 1  # the first byte of the box's run (resync() dropped its marker repeats and hello)
        extra = f"hostile={shape.name} hostile.pre={announce_frames(cell.id)} hostile.skip={skip}"
        if shape.name == "wrongbuild":
            wrong = pack_frame(codec.encode("started", build_id="someone-else", pid=1, uptime=1.0), 4096)
            extra += f" wrong={wrong.hex()}"
        return dataclasses.replace(spec, initrd=self.hostile_initrd, extra_cmdline=extra)


@pytest.fixture(scope="module")
def box():
    if os.geteuid() != 0:
        pytest.skip("needs root: cells get cgroups")
    image = find_image()
    work = Path(tempfile.mkdtemp(prefix="hvh", dir="/tmp"))
    HostileBox.hostile_initrd = hostile_initrd(image / "initrd.img", work)
    harness = BoxHarness(SHAPES, image=CellImage.at(image), daemon_cls=HostileBox,
                         box={"boot_timeout_s": 25, "queue_timeout_s": 60, "boot_concurrency": 2})
    try:
        harness.start(wait_ready=False)
        yield harness
    finally:
        harness.stop()
        shutil.rmtree(work, ignore_errors=True)


def no_cells_left_of(box, shape):
    return [c for c in box.status()["cells"] if c["shape"] == shape and c["state"] not in ("booting",
                                                                                          "pending")]


@pytest.mark.parametrize("shape,expect", [
    ("garbage", "not valid msgpack"),
    ("oversize", "over the limit"),
])
def test_garbage_at_boot_fails_only_that_cell(box, shape, expect):
    r = box.build(["true"], shape=shape)
    assert r.exit["reason"] == "no_capacity", r.exit
    assert "failed to boot" in r.exit["message"] and expect in r.exit["message"], r.exit["message"]
    good = box.build(["echo", "ok"], shape="good")
    assert good.exit["code"] == 0 and good.stdout == b"ok\n"


def test_guest_that_never_says_hello_times_out(box):
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        pool = box.status()["pools"]["silent"]
        if pool["consecutive_failures"]:
            break
        time.sleep(1)
    assert "never said hello" in pool["last_error"] and "25 s" in pool["last_error"], pool
    assert "hostile init: silent" in pool["last_error"]  # the console tail names what the guest did


@pytest.mark.parametrize("shape,expect", [
    ("midbuild", "not valid msgpack"),
    ("wrongbuild", "someone-else"),
])
def test_hostile_cell_during_a_build_fails_only_that_build(box, shape, expect):
    bad, good = box.builds_at_once((["sleep", "5"], {"shape": shape}),
                                   (["sh", "-c", "sleep 2; echo fine"], {"shape": "good"}))
    assert bad.exit["reason"] == "cell_failed", bad.exit
    assert expect in bad.exit["message"], bad.exit["message"]
    assert good.exit["code"] == 0 and good.stdout == b"fine\n"
    deadline = time.monotonic() + 10
    while box.cell_resources(bad.cell_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert box.cell_resources(bad.cell_id) == []


def test_cell_that_never_starts_its_build_fails_it(box):
    """No build timeout asked for, yet a cell silent after `run` cannot hold the build forever."""
    r = box.build(["true"], shape="mute")
    assert r.exit["reason"] == "cell_failed", r.exit
    assert "did not start the build within 25 s" in r.exit["message"]
    deadline = time.monotonic() + 10
    while box.cell_resources(r.cell_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert box.cell_resources(r.cell_id) == []


def test_missing_image_is_a_precise_error(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root: cells get cgroups")
    image = CellImage(tmp_path / "vmlinuz", tmp_path / "initrd.img", tmp_path / "root.ext4")
    h = BoxHarness({"small": {"pool_target": 0}}, image=image, box={"queue_timeout_s": 60})
    try:
        h.start(wait_ready=False)
        r = h.build(["true"])
        assert r.exit["reason"] == "no_capacity"
        assert str(tmp_path / "vmlinuz") in r.exit["message"] and "hived image build" in r.exit["message"]
        assert list(h.config.cells_dir.iterdir()) == []
    finally:
        h.stop()


def test_full_disk_is_a_precise_error():
    if os.geteuid() != 0:
        pytest.skip("needs root: mounts a tiny tmpfs")
    image = find_image()
    h = BoxHarness({"small": {"pool_target": 0, "scratch_mib": 512}}, image=CellImage.at(image),
                   box={"queue_timeout_s": 60})
    h.config.state_dir.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "hvfull", str(h.config.state_dir)], check=True)
    try:
        h.start(wait_ready=False)
        r = h.build(["true"])
        assert r.exit["reason"] == "no_capacity"
        assert "mke2fs" in r.exit["message"] and "disk full" in r.exit["message"], r.exit["message"]
        assert list(h.config.cells_dir.iterdir()) == []
    finally:
        try:
            h.stop()
        finally:
            subprocess.run(["umount", "-l", str(h.config.state_dir)], check=False)
            shutil.rmtree(h.tmp, ignore_errors=True)  # stop() could not: state_dir was a mount point


class BuggyBox(BoxDaemon):
    def cell_spec(self, *args, **kw):
        raise RuntimeError("a bug in the box")


def test_internal_error_while_booting_leaks_nothing():
    if os.geteuid() != 0:
        pytest.skip("needs root: cells get cgroups")
    h = BoxHarness({"small": {"pool_target": 0}}, daemon_cls=BuggyBox, box={"queue_timeout_s": 60})
    try:
        h.start(wait_ready=False)
        r = h.build(["true"])
        assert r.exit["reason"] == "no_capacity" and "internal error" in r.exit["message"], r.exit
        assert h.daemon.partition.cells == {}          # allocations released
        assert h.daemon.cgroups.cells() == []          # cgroups removed
        assert list(h.config.cells_dir.iterdir()) == []
        assert h.status()["cells"] == []
    finally:
        h.stop()
