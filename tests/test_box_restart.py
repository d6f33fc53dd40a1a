"""A box restart loses no build (issue 14), through the public surface: `hived up` SIGKILLed and
started again on the same home while a build runs, followed by `hived run` the whole time.

Real cells: the VMMs outlive the killed daemon, the next one adopts them from their records
(hived/box/adopt.py), and each cell sends again what the control plane had not stored.
"""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_up_cli import Up, cell_records, host_leftovers, running_cell, start_run, stored, up_home, wait_for

from hived.box.config import embedded
from hived.vmm.qemu import process_start_ticks

pytestmark = [pytest.mark.vm, pytest.mark.root]

LINES = 150


@pytest.fixture
def home():
    yield from up_home("hvrs")


def numbered(n: int, pause: float, code: int) -> list[str]:
    return ["sh", "-c", f"for i in $(seq 1 {n}); do echo \"line $i\"; sleep {pause}; done; exit {code}"]


def restart(up: Up, home: Path) -> Up:
    up.stop(signal.SIGKILL)
    return Up(home)


def uplog(home: Path) -> str:
    return (home / "up.log").read_text(errors="replace")[-12000:]


def assert_every_line_once(out: bytes, n: int) -> None:
    lines = out.decode().splitlines()
    seen = {int(x.split()[1]) for x in lines if x.startswith("line ")}
    assert lines == [f"line {i}" for i in range(1, n + 1)], \
        f"{len(lines)} lines; missing {sorted(set(range(1, n + 1)) - seen)[:10]}, " \
        f"repeated {[x for x in set(lines) if lines.count(x) > 1][:10]}"


def test_a_build_survives_sigkills_of_hived_up_at_1_3_and_5_s(home):
    up = Up(home)
    follower = None
    try:
        up.wait_ready()
        follower = start_run(home, *numbered(LINES, 0.1, 3))
        assert follower.stdout.readline() == b"line 1\n"
        t0 = time.monotonic()
        rec = running_cell(home)
        for at in (1, 3, 5):
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            up = restart(up, home)
        out, err = follower.communicate(timeout=240)
        assert follower.returncode == 3, err.decode()[-2000:] + "\n--- up.log ---\n" + uplog(home)
        assert_every_line_once(b"line 1\n" + out, LINES)
        [build] = stored(home).values()
        assert (build["state"], build["exit_code"], build["attempts"]) == ("failed", 3, 1), build
        # the same cell ran it all along: adopted, never booted again
        log = (home / "up.log").read_text()
        # (a kill may land before a daemon got that far: under load a start takes seconds)
        assert re.search(r"adopted [1-9] of \d+ cell", log), log[-3000:]
        assert b"gap" not in err and b"never" not in err, err
        # its cell (the one VMM that ran it through every restart) goes once the build is over
        wait_for(lambda: process_start_ticks(rec["vmm_pid"]) != rec["vmm_start_ticks"], 60, "the build's cell to go")
    finally:
        if follower is not None and follower.poll() is None:
            follower.kill()
        assert up.stop() == 0
    assert host_leftovers(home) == []


def test_ten_restarts_in_a_row_during_one_build(home):
    up = Up(home)
    follower = None
    try:
        up.wait_ready()
        follower = start_run(home, *numbered(80, 0.25, 0))
        assert follower.stdout.readline() == b"line 1\n"
        for _ in range(10):
            time.sleep(1.5)
            up = restart(up, home)
        out, err = follower.communicate(timeout=300)
        assert follower.returncode == 0, err.decode()[-2000:] + "\n--- up.log ---\n" + uplog(home)
        assert_every_line_once(b"line 1\n" + out, 80)
    finally:
        if follower is not None and follower.poll() is None:
            follower.kill()
        assert up.stop() == 0
    assert host_leftovers(home) == []


def test_a_cell_that_died_while_the_daemon_was_away_fails_its_build_and_is_removed(home):
    up = Up(home)
    follower = None
    try:
        up.wait_ready()
        follower = start_run(home, "sh", "-c", "echo started; sleep 120")
        assert follower.stdout.readline() == b"started\n"
        rec = running_cell(home)
        up.stop(signal.SIGKILL)
        os.kill(rec["vmm_pid"], signal.SIGKILL)  # the cell dies while no daemon watches
        wait_for(lambda: process_start_ticks(rec["vmm_pid"]) != rec["vmm_start_ticks"], 30, "the VMM to die")
        up = Up(home)
        out, err = follower.communicate(timeout=180)
        assert follower.returncode == 125, f"{out!r} {err.decode()[-2000:]}\n--- up.log ---\n{uplog(home)}"
        assert f"cell {rec['cell_id']}".encode() in err and b"exited while the box daemon was away" in err, err
        [build] = stored(home).values()
        assert (build["state"], build["reason"]) == ("failed", "cell_failed"), build
        # everything the dead cell owned is gone
        assert rec["cell_id"] not in cell_records(home)
        assert not (embedded(home).cells_dir / rec["cell_id"]).exists()
        assert not any(rec["cell_id"] in x for x in host_leftovers(home))
    finally:
        if follower is not None and follower.poll() is None:
            follower.kill()
        assert up.stop() == 0
    assert host_leftovers(home) == []


def test_a_record_whose_pid_now_belongs_to_another_process_is_not_adopted(home):
    up = Up(home)
    other = None
    try:
        up.wait_ready()
        cell_id, rec = next(iter(wait_for(lambda: cell_records(home), 60, "the warm cell's record").items()))
        up.stop(signal.SIGKILL)
        os.kill(rec["vmm_pid"], signal.SIGKILL)
        wait_for(lambda: process_start_ticks(rec["vmm_pid"]) == 0, 30, "the VMM to die")
        # Another process now has a pid the record names (pid reuse: same number, other start time).
        other = subprocess.Popen(["sleep", "600"])
        path = embedded(home).cells_dir / cell_id / "cell.json"
        path.write_text(json.dumps(dict(rec, vmm_pid=other.pid)))
        up = Up(home)
        up.wait_ready()
        assert other.poll() is None  # not killed, not adopted
        log = (home / "up.log").read_text()
        assert "pid now belongs to another process" in log, log[-3000:]
        assert cell_id not in cell_records(home)
    finally:
        if other is not None:
            other.kill()
            other.wait()
        assert up.stop() == 0
    assert host_leftovers(home) == []
