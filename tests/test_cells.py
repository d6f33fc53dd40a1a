"""Builds in real microVMs (QEMU microvm; TCG on this machine kind).

One box for the module with a warm pool of two; every build gets a fresh cell that is
destroyed afterwards, so each test also checks that nothing of its cell is left.
"""

import hashlib
import json
import os
import signal
import socket
import time

import pytest

from boxharness import BoxHarness

pytestmark = [pytest.mark.vm, pytest.mark.root]

SHAPES = {
    "small": {"vcpus": 1, "memory_mib": 384, "scratch_mib": 256, "pool_target": 2},
    "capped": {"vcpus": 1, "memory_mib": 384, "scratch_mib": 256, "pool_target": 0,
               "output_limit": 1 << 20},
}


@pytest.fixture(scope="module")
def box():
    if os.geteuid() != 0:
        pytest.skip("needs root: cells get cgroups")
    harness = BoxHarness(SHAPES)
    try:
        harness.start()
        yield harness
    finally:
        harness.stop()
    assert not list((harness.config.cells_dir).glob("*")) if harness.config.cells_dir.exists() else True


def assert_cell_gone(box, result):
    assert result.cell_id, result
    deadline = time.monotonic() + 10
    while box.cell_resources(result.cell_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert box.cell_resources(result.cell_id) == []


def test_build_runs_in_the_guest_kernel_as_unprivileged_user(box):
    r = box.build(["sh", "-c", "uname -r; id -u; pwd"])
    assert r.exit["reason"] == "exited" and r.exit["code"] == 0, r
    kernel, uid, cwd = r.stdout.decode().split()
    assert kernel != os.uname().release
    assert uid == "1000" and cwd == "/work"
    assert r.exit["usage"]["wall_s"] > 0
    assert_cell_gone(box, r)


def test_each_build_gets_a_fresh_cell(box):
    a = box.build(["sh", "-c", "echo x > /work/marker; cat /proc/sys/kernel/random/boot_id"])
    b = box.build(["sh", "-c", "ls /work/marker 2>&1; cat /proc/sys/kernel/random/boot_id"])
    assert a.cell_id != b.cell_id
    assert a.stdout.split()[-1] != b.stdout.split()[-1]  # different guest boots
    assert b"No such file" in b.stdout


def test_exit_codes_and_signals_pass_through(box):
    r = box.build(["sh", "-c", "exit 7"])
    assert (r.exit["code"], r.exit["signal"], r.exit["reason"]) == (7, 0, "exited")
    r = box.build(["sh", "-c", "kill -TERM $$"])
    assert (r.exit["code"], r.exit["signal"], r.exit["reason"]) == (-1, 15, "signaled")


def test_8mb_of_output_arrives_intact_and_streams_stay_apart(box):
    script = ("import hashlib,sys\n"
              "d=bytes(range(256))*31250\n"
              "sys.stdout.buffer.write(d); sys.stdout.flush()\n"
              "sys.stderr.write(hashlib.sha256(d).hexdigest())\n")
    r = box.build(["python3", "-c", script])
    assert r.exit["code"] == 0, r.exit
    assert len(r.stdout) == 8_000_000
    assert hashlib.sha256(r.stdout).hexdigest() == r.stderr.decode()
    assert r.exit["usage"]["output_bytes"] == 8_000_000 + 64


def test_timeout_kills_the_build(box):
    t0 = time.monotonic()
    r = box.build(["sleep", "600"], timeout_s=2)
    assert r.exit["reason"] == "timeout" and r.exit["signal"] == 9, r.exit
    assert time.monotonic() - t0 < 120
    assert_cell_gone(box, r)


def test_cancel_kills_the_build(box):
    # Cancel once its output arrived, not after a fixed time: a container start under TCG on a
    # busy box can take longer than any such guess.
    r = box.build(["sh", "-c", "echo started; sleep 600"], cancel_after_output=b"started\n")
    assert r.exit["reason"] == "cancelled" and r.exit["signal"] == 9, r.exit
    assert r.stdout == b"started\n"
    assert_cell_gone(box, r)


def test_command_that_does_not_exist(box):
    r = box.build(["/no/such/program"])
    assert r.exit["reason"] == "spawn_failed" and r.exit["code"] == 127
    assert "/no/such/program" in r.exit["message"]


def test_output_limit_stops_a_flood(box):
    r = box.build(["cat", "/dev/zero"], shape="capped")
    assert r.exit["reason"] == "output_limit", r.exit
    assert len(r.stdout) <= 1 << 20
    # the reader is told: how much was kept, that more was cut, and why
    [gap] = r.gaps
    assert (gap["reason"], gap["stream"]) == ("output_limit", 0) and gap["bytes"] >= 0, gap
    assert f"output cut after {len(r.stdout)} bytes" in gap["message"] and "output limit" in gap["message"]
    assert_cell_gone(box, r)


def test_unknown_shape_is_a_clear_error(box):
    r = box.build(["true"], shape="huge")
    assert r.exit["reason"] == "no_capacity"
    assert any("unknown shape 'huge'" in e["message"] and "small" in e["message"] for e in r.errors)


def _kill_vmm(harness, cell_id):
    os.kill(harness.daemon.cells[cell_id].cell.pid, signal.SIGKILL)


async def _kill_vmm_async(harness, cell_id):
    _kill_vmm(harness, cell_id)


async def _reset_guest(harness, cell_id):
    """The guest reboots (as after a panic or power-off): QEMU runs with -no-reboot, so it exits."""
    qmp = socket.socket(socket.AF_UNIX)
    qmp.connect(str(harness.config.cells_dir / cell_id / "qmp.sock"))
    f = qmp.makefile("rw")
    f.readline()
    for cmd in ("qmp_capabilities", "system_reset"):
        f.write(json.dumps({"execute": cmd}) + "\n")
        f.flush()
        f.readline()
    qmp.close()


@pytest.mark.parametrize("fault", [_kill_vmm_async, _reset_guest], ids=["vmm-killed", "guest-reboots"])
def test_cell_dying_mid_build_fails_only_that_build(box, fault):
    r = box.build(["sleep", "600"], on_accepted=fault)
    assert r.exit["reason"] == "cell_failed", r.exit
    assert r.cell_id in r.exit["message"] and "VMM exited" in r.exit["message"]
    assert_cell_gone(box, r)
    ok = box.build(["echo", "still fine"])
    assert ok.exit["code"] == 0 and ok.stdout == b"still fine\n"


def test_concurrent_builds_each_on_their_own_cell(box):
    results = box.builds_at_once(*[(["sh", "-c", f"echo {i}; cat /proc/sys/kernel/random/boot_id"], {})
                                   for i in range(3)])
    assert [r.stdout.split()[0] for r in results] == [b"0", b"1", b"2"]
    assert len({r.cell_id for r in results}) == 3
    assert all(r.exit["code"] == 0 for r in results)


def test_pool_refills_to_target_and_status_reports_it(box):
    box.wait_pool_full()
    status = box.status()
    assert status["pools"]["small"]["warm"] == 2 and status["pools"]["small"]["target"] == 2
    assert status["cells_by_state"]["warm"] == 2
    assert status["accelerator"] == "tcg"
    warm = [c for c in status["cells"] if c["state"] == "warm"]
    for c in warm:  # guest stages: a boot's, or a restored clone's (templates are on by default)
        if c["origin"] == "boot":
            assert c["boot"]["modules"] < c["boot"]["root"] < c["boot"]["hello"], c
        else:
            assert c["origin"] == "restore" and c["boot"]["restore"] < c["boot"]["hello"], c
            assert c["start_stages_ms"]["restored"] <= c["start_stages_ms"]["hello"] == c["start_ms"], c
    done = [b for b in status["builds"] if b.get("state") == "done"]
    assert done and all("reason" in b for b in done)


def test_metrics_are_served(box):
    import urllib.request

    body = urllib.request.urlopen(f"http://127.0.0.1:{box.daemon.metrics_port}/metrics", timeout=5).read()
    text = body.decode()
    assert 'hived_cells{state="warm"}' in text
    assert "hived_cell_boot_seconds_bucket" in text or "hived_cell_restore_seconds_bucket" in text
    assert 'hived_cell_starts_total{origin="restore",shape="small"}' in text or \
        'hived_cell_starts_total{origin="boot",shape="small"}' in text
    assert 'hived_builds_total{result="exited"}' in text
    assert 'hived_pool_target_cells{shape="small"} 2.0' in text
    # What the dashboard (ops/grafana) draws: builds started and their warm start, output,
    # the box's partition.
    from prometheus_client.parser import text_string_to_metric_families

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    started = samples[("hived_build_warm_start_seconds_count", (("shape", "small"),))]
    assert started >= samples[("hived_builds_total", (("result", "exited"),))] > 0
    assert samples[("hived_build_output_bytes_total", ())] > 0
    part = box.status()["partition"]
    assert samples[("hived_partition_cores", (("use", "box"),))] == len(part["box_cores"])
    assert (samples[("hived_partition_cores", (("use", "cells_used"),))]
            + samples[("hived_partition_cores", (("use", "cells_free"),))]) == len(part["cell_cores"])
    assert samples[("hived_partition_memory_bytes", (("use", "allocatable"),))] == \
        part["memory_mib"]["allocatable"] << 20
