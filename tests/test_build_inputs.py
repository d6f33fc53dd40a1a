"""Builds that name a build image and a repository + revision, in real cells.

Real parts only: Debian's docker-registry and `git daemon` on loopback, a test image made
here (static busybox + a marker file) and pushed to it, a real box with QEMU cells.
"""

import asyncio
import os
import shutil
import time
from pathlib import Path

import pytest
from test_oci_support import Layer, make_image, need_registry, push, running_registry
from test_repos_support import GitDaemon, TestRepo

from boxharness import BoxHarness

pytestmark = [pytest.mark.vm, pytest.mark.root]

SHAPES = {"small": {"vcpus": 1, "memory_mib": 384, "scratch_mib": 256, "pool_target": 1}}
APPLETS = ("sh", "cat", "id", "grep", "ls", "echo", "pwd", "touch", "wc", "head", "sleep", "true", "tr")


def busybox_image():
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox-static not installed (apt-get install busybox-static)")
    layer = Layer().dir("bin").file("bin/busybox", Path(busybox).read_bytes(), 0o755)
    for applet in APPLETS:
        layer.symlink(f"bin/{applet}", "busybox")
    layer.dir("etc").file("etc/os-release", b"ID=hived-test-image\n")
    return make_image([layer.bytes()], config_extra={"Env": ["PATH=/bin", "FROM_IMAGE=yes"]})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root: cells get cgroups")
    need_registry()
    tmp = tmp_path_factory.mktemp("inputs")
    (tmp / "reg").mkdir()
    (tmp / "git").mkdir()
    repo = TestRepo(tmp / "git" / "proj")
    first = repo.commit({"VERSION": "v1\n", "src/main.c": "int main(void){return 0;}\n"})
    second = repo.commit({"VERSION": "v2\n"})
    with running_registry(tmp / "reg") as registry, GitDaemon(tmp / "git") as daemon:
        ref = f"{registry.host}/test/busybox:1"
        asyncio.run(push(ref, busybox_image()))
        box = BoxHarness(SHAPES, box={"oci_dir": str(tmp / "oci"), "repos_dir": str(tmp / "repos"),
                                      "oci_insecure": [registry.host], "source_slot_mib": 64})
        try:
            box.start()
            yield {"box": box, "ref": ref, "registry": registry, "url": daemon.url("proj"),
                   "first": first, "second": second}
        finally:
            box.stop()


def _guest_start(box, build_id) -> dict:
    [rec] = [b for b in box.status()["builds"] if b["id"] == build_id]
    return rec["guest_start"]


def test_build_runs_in_a_container_of_the_named_image(world):
    box = world["box"]
    script = ("cat /etc/os-release; id -u; grep CapEff /proc/self/status; grep NoNewPrivs /proc/self/status; "
              "echo pid=$$; echo init=$(tr '\\0' ' ' < /proc/1/cmdline); cat /proc/self/cgroup; "
              "echo env=$FROM_IMAGE; echo procs=$(ls /proc | grep -c '^[0-9]')")
    r = box.build(["sh", "-c", script], options={"image": world["ref"]})
    assert r.exit["reason"] == "exited" and r.exit["code"] == 0, (r.exit, r.stderr)
    lines = r.stdout.decode().splitlines()
    assert "ID=hived-test-image" in lines                   # the image's root, not the cell's
    assert "1000" in lines                                   # unprivileged
    assert "CapEff:\t0000000000000000" in lines              # no capabilities
    assert "NoNewPrivs:\t1" in lines
    assert "pid=2" in lines                                  # own pid namespace: the build is PID 2 ...
    assert "init=/.hived/init" in lines  # ... under the container's init, pre-made: its build came on fd 4
    assert _guest_start(box, r.build_id)["premade"] == 1
    assert "0::/" in lines                                   # own cgroup namespace (a cgroup of its own)
    assert "env=yes" in lines                                # the image config's Env
    procs = int(next(x for x in lines if x.startswith("procs="))[6:])
    assert procs <= 6, lines  # init, sh, the $() subshell, ls, grep: the cell (kernel threads) is not visible
    pools = box.status()["pools"]
    assert any(key.startswith("small@sha256:") for key in pools), pools


def test_second_build_of_the_image_is_cached_and_uses_the_image_pool(world):
    box = world["box"]
    first = box.build(["true"], options={"image": world["ref"]})
    assert first.exit["code"] == 0, first.exit
    key = next(k for k in box.status()["pools"] if k.startswith("small@"))
    box.wait_pool_full()
    warm_ids = [c["id"] for c in box.status()["cells"] if c["shape"] == key and c["state"] == "warm"]
    assert len(warm_ids) == 1, box.status()["pools"]
    world["registry"].stop()  # the second start must not need the registry at all
    try:
        r = box.build(["cat", "/etc/os-release"], options={"image": world["ref"]})
    finally:
        world["registry"].start()
    assert r.exit["code"] == 0 and r.stdout == b"ID=hived-test-image\n", (r.exit, r.stderr)
    assert r.cell_id == warm_ids[0]  # the warm cell of the (shape, image) pool was reused


def test_build_starts_in_the_checkout_of_the_named_revision(world):
    box = world["box"]
    r = box.build(["sh", "-c", "pwd; cat VERSION; ls src; echo new > made && cat made; id -u"],
                  options={"repo": world["url"], "rev": world["first"]})
    assert r.exit["code"] == 0, (r.exit, r.stderr)
    assert r.stdout.decode().split() == ["/workspace", "v1", "main.c", "new", "1000"]
    assert _guest_start(box, r.build_id)["premade"] == 1  # the checkout mounted into the pre-made container
    r = box.build(["cat", "VERSION"], options={"repo": world["url"], "rev": "main", "image": world["ref"]})
    assert r.exit["code"] == 0 and r.stdout == b"v2\n", (r.exit, r.stderr)


def test_missing_image_or_revision_fails_only_that_build(world):
    box = world["box"]
    host = world["registry"].host
    results = box.builds_at_once(
        (["true"], {"options": {"image": f"{host}/test/nope:1"}}),
        (["true"], {"options": {"repo": world["url"], "rev": "no-such-branch"}}),
        (["true"], {"options": {"repo": world["url"].replace("proj", "gone")}}),
        (["echo", "fine"], {"options": {"repo": world["url"], "rev": world["second"]}}),
    )
    image, rev, repo, fine = results
    assert image.exit["reason"] == "spawn_failed" and f"{host}/test/nope:1" in image.exit["message"], image.exit
    assert "not found" in image.exit["message"].lower() or "unknown" in image.exit["message"].lower(), image.exit
    assert rev.exit["reason"] == "spawn_failed" and "no-such-branch" in rev.exit["message"], rev.exit
    assert repo.exit["reason"] == "spawn_failed" and "gone" in repo.exit["message"], repo.exit
    assert fine.exit["code"] == 0 and fine.stdout == b"fine\n", fine.exit
    for failed in (image, rev, repo):
        assert not failed.cell_id  # refused before any cell was taken
    oci = Path(box.config.oci_dir)
    assert list((oci / "tmp").iterdir()) == []  # nothing partial in the cache
    deadline = time.monotonic() + 10
    while box.status()["cells_by_state"]["assigned"] and time.monotonic() < deadline:
        time.sleep(0.1)
