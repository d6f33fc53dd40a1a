"""Pre-made build containers (hived/cell/premade.py) in real cells on a real box.

A warm cell makes its build's container ahead; the build must still get exactly its own
command, environment, cwd, exit code and output, and a pre-made container that went bad
must cost the build nothing but the ordinary start. The same through `hived run` is in
tests/test_up_cli.py.
"""

import functools
import os
import time

import pytest

from hived.bench.boot import _driver_factory
from hived.box.daemon import BoxDaemon

from boxharness import BoxHarness

SHAPES = {"small": {"vcpus": 1, "memory_mib": 512, "scratch_mib": 256, "pool_target": 1}}
pytestmark = pytest.mark.vm


def _record(box, build_id) -> dict:
    [rec] = [b for b in box.status()["builds"] if b["id"] == build_id]
    return rec


def _harness(extra_cmdline: str = "") -> BoxHarness:
    if os.geteuid() != 0:
        pytest.skip("needs root: cells get cgroups, a netns and a jailed VMM")
    return BoxHarness(SHAPES, box={"vmm_uid_base": 3_400_000},
                      daemon_cls=functools.partial(BoxDaemon, driver_factory=_driver_factory(extra_cmdline)))


def test_a_build_on_a_premade_container_gets_its_own_command_env_cwd_and_exit_code():
    with _harness() as box:
        cell = _ready_cell(box)
        assert cell["premade"]["premade"] is True and cell["premade"]["made_ms"] > 0, cell["premade"]
        r = box.build(["sh", "-c", 'pwd; echo "$ONLY|$HOME|$PATH"; id -u; echo "$0" "$1"; '
                                   'tr "\\0" " " < /proc/1/cmdline; echo; echo err >&2; exit 9', "zero", "a  b"],
                      env={"ONLY": "this build"}, cwd="/tmp")
        assert (r.exit["reason"], r.exit["code"]) == ("exited", 9), (r.exit, r.stderr)
        assert r.stdout.decode().splitlines() == [
            "/tmp", "this build|/work|/usr/local/bin:/usr/bin:/bin", "1000", "zero a  b", "/.hived/init "]
        assert r.stderr == b"err\n"
        rec = _record(box, r.build_id)
        assert rec["guest_start"]["premade"] == 1, rec  # it did run on the pre-made container
        assert "crun_ms" not in rec["guest_start"], rec  # no crun at all at its start
        # a cwd the build cannot enter fails that build only, as an ordinary start does
        r = box.build(["true"], cwd="/no/such/dir")
        assert (r.exit["reason"], r.exit["code"]) == ("spawn_failed", 127) and "/no/such/dir" in r.exit["message"]
        # the next build is on a fresh cell with a fresh container: nothing of the one before
        first = box.build(["sh", "-c", "echo one > /work/left; echo one > /tmp/left; echo one > /var/tmp/left; "
                                       "sleep 30 & echo started"])
        assert (first.stdout, first.stderr, first.exit["code"]) == (b"started\n", b"", 0), first.exit
        second = box.build(["sh", "-c", "ls -A /work /tmp /var/tmp; cat /proc/[0-9]*/comm | tr '\\n' ' '"])
        assert second.cell_id != first.cell_id and second.exit["code"] == 0, second.exit
        out = second.stdout.decode()
        assert "left" not in out, out
        assert "sleep" not in out, out
        assert _record(box, second.build_id)["guest_start"]["premade"] == 1


def _ready_cell(box, timeout: float = 300) -> dict:
    """The warm cell once it said cell.ready (its status' `premade`)."""
    deadline = time.monotonic() + timeout
    while True:
        box.wait_pool_full(timeout)
        warm = [c for c in box.status()["cells"] if c["state"] == "warm" and c["premade"] is not None]
        if warm:
            return warm[0]
        assert time.monotonic() < deadline, box.status()["cells"]
        time.sleep(0.2)


@pytest.mark.parametrize("cmdline, why", [
    ("hived.fault=premade-dies", "ended before any build"),  # made, then its init killed while warm
    ("hived.premade=off", "turned off"),        # never made: the operator's switch
])
def test_a_premade_container_that_went_bad_falls_back_to_an_ordinary_start(cmdline, why):
    with _harness(cmdline) as box:
        cell = _ready_cell(box)
        assert why in cell["premade"]["message"] and cell["premade"]["premade"] is False, cell["premade"]
        r = box.build(["sh", "-c", 'echo "$ONLY"; pwd; exit 4'], env={"ONLY": "still mine"})
        assert (r.exit["reason"], r.exit["code"]) == ("exited", 4), (r.exit, r.stderr)
        assert r.stdout == b"still mine\n/work\n" and r.stderr == b""
        start = _record(box, r.build_id)["guest_start"]
        assert start["premade"] == 0 and start["crun_ms"] > 0, start  # crun ran at the build's start
