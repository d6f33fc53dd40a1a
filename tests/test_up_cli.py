"""The newcomer's commands end to end: `hived up` (a control plane, a box linked to it and a
router, in one process), `hived run` through the HTTP API, `hived status`, and a `kill -9`
of `hived up` followed by a restart that removes every leftover."""

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from hived.box.cgroups import open_cgroups
from hived.box.config import embedded
from hived.box.leftovers import clean, vmm_pids
from hived.box.network import CellNetwork, list_netns
from hived.box.templates import template_memfds
from hived.vmm.qemu import process_start_ticks

from boxharness import find_image

pytestmark = [pytest.mark.vm, pytest.mark.root]
HIVED = [sys.executable, "-m", "hived"]


class Up:
    def __init__(self, home: Path, pool: int = 1) -> None:
        self.home = home
        self.log = open(home / "up.log", "ab")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen([*HIVED, "up", "--home", str(home), "--pool", str(pool)],
                                     stdout=subprocess.PIPE, stderr=self.log)

    def wait_ready(self, timeout=240) -> None:
        deadline = time.monotonic() + timeout
        os.set_blocking(self.proc.stdout.fileno(), False)
        buf = b""
        while time.monotonic() < deadline:
            chunk = self.proc.stdout.read()
            buf += chunk or b""
            if b"ready\n" in buf:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"hived up not ready: {buf!r} {(self.home / 'up.log').read_text()[-2000:]}")

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(120)
        finally:
            self.log.close()


def run(home, *argv, timeout=240):
    return subprocess.run([*HIVED, "run", "--home", str(home), "--", *argv],
                          capture_output=True, timeout=timeout)


def start_run(home, *argv):
    return subprocess.Popen([*HIVED, "run", "--home", str(home), "--", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def endpoints(home: Path) -> dict:
    return json.loads((home / "endpoints.json").read_text())


def api(home: Path, path: str, admin=False):
    ep = endpoints(home)
    req = urllib.request.Request(ep["hives"]["local"]["api"] + path, headers={
        "Authorization": f"Bearer {ep['admin_token' if admin else 'token']}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        body = r.read()
        return json.loads(body) if r.headers["Content-Type"].startswith("application/json") else body


def stored(home: Path) -> dict:
    """The control plane's store, read straight from its SQLite file: id -> row."""
    db = sqlite3.connect(f"file:{home / 'control' / 'local.db'}?mode=ro", uri=True)
    try:
        db.row_factory = sqlite3.Row
        return {r["id"]: dict(r) for r in db.execute("SELECT * FROM builds")}
    finally:
        db.close()


def processes_naming(text: str, but=()) -> list[str]:
    """Every process (but us and `but`) whose command line names `text`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid() or int(entry) in but:
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(f"{entry}: {cmd[:200]}")
    return found


def _ppid(proc_line: str) -> int:
    try:
        stat = Path(f"/proc/{proc_line.split(':')[0]}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def host_leftovers(home: Path) -> list[str]:
    config = embedded(home)
    found = [f"process {pid}" for pid in vmm_pids(config.cells_dir)]
    if config.cells_dir.exists():
        found += [f"dir {d}" for d in config.cells_dir.iterdir()]
    found += [f"cgroup {c}" for c in open_cgroups(config.cgroup_parent).cells()]
    tag = CellNetwork(config.name).tag
    found += [f"netns {n}" for n in list_netns() if n.startswith((f"hv-{tag}-", f"hvr-{tag}"))]
    found += [f"template memory held by {p}" for p in template_memfds(config.name)]
    return found


def clean_box(home: Path) -> None:
    """What the box's next start would remove: for a test that failed half-way."""
    clean_box_config(embedded(home))


def clean_box_config(config) -> None:
    """What a box with this config would remove at its next start (its cells, kept by a
    detached or killed daemon, included): for a test that failed half-way."""
    import asyncio

    cgroups = open_cgroups(config.cgroup_parent)
    clean(config.cells_dir, cgroups)

    async def network():
        net = CellNetwork(config.name)
        for cell_id in net.cells():
            await net.teardown(cell_id)
        await net.close()

    asyncio.run(network())
    cgroups.remove_parent()


def up_home(prefix: str = "hvup"):
    """A fresh `hived up` home; afterwards whatever a failed test left is removed (a passing
    test asserts there was nothing)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: cells get cgroups")
    find_image()
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    yield d
    clean_box(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def home():
    yield from up_home()


def cell_records(home: Path) -> dict:
    """cell id -> its record (cells/<id>/cell.json), for the cells that have one."""
    out = {}
    for path in embedded(home).cells_dir.glob("*/cell.json"):
        try:
            out[path.parent.name] = json.loads(path.read_text())
        except (OSError, ValueError):
            pass
    return out


def running_cell(home: Path) -> dict:
    return wait_for(lambda: next((r for r in cell_records(home).values() if r["state"] == "running"), None),
                    120, "a cell record of a running build")


def test_up_run_status_and_exit_codes(home):
    up = Up(home)
    try:
        up.wait_ready()
        ep = endpoints(home)
        assert Path(ep["box"]).exists() and ep["metrics"].startswith("http://")
        assert ep["api"].startswith("http://") and ep["hives"]["local"]["api"] != ep["api"]  # router, hive
        assert ep["token"] and ep["control_metrics"].endswith("/metrics")
        assert (home / "endpoints.json").stat().st_mode & 0o077 == 0  # it holds tokens
        # one process (and the cells' VMMs): control plane, box and router are tasks in it
        others = processes_naming(str(home), but={up.proc.pid})
        vmms = vmm_pids(embedded(home).cells_dir)  # after: a VMM started meanwhile is in it
        assert [p for p in others if int(p.split(":")[0]) not in vmms and _ppid(p) != up.proc.pid] == []
        # stdout and stderr stay apart, in order; the build's exit code is ours
        r = run(home, "sh", "-c", "echo out; echo err >&2; echo out2; exit 5")
        assert (r.returncode, r.stdout, r.stderr) == (5, b"out\nout2\n", b"err\n")
        # a signal is 128+N
        r = run(home, "sh", "-c", "kill -KILL $$")
        assert r.returncode == 128 + 9, r.stderr
        r = run(home, "sh", "-c", "kill -TERM $$")
        assert r.returncode == 128 + 15, r.stderr
        # a build that succeeds is in the control plane's store and API as succeeded
        r = run(home, "sh", "-c", "echo hello from the cell")
        assert (r.returncode, r.stdout, r.stderr) == (0, b"hello from the cell\n", b"")
        status = subprocess.run([*HIVED, "status", "--home", str(home), "--json"], capture_output=True,
                                check=True)
        report = json.loads(status.stdout)
        assert report["accelerator"] in ("kvm", "tcg")
        # the pool fills by restoring clones of a template made at start
        assert report["templates"]["made"] >= 1 and report["builds"][-1]["origin"] == "restore", report
        assert [b["code"] for b in report["builds"][-4:]] == [5, -1, -1, 0]
        build_id = report["builds"][-1]["id"]  # the box ran it under the control plane's id
        assert build_id.startswith("local_")
        b = api(home, f"/v1/builds/{build_id}")
        assert (b["state"], b["exit_code"], b["box"], b["attempts"]) == ("succeeded", 0, ep["box_id"], 1), b
        assert api(home, f"/v1/builds/{build_id}/logs") == b"hello from the cell\n"
        row = stored(home)[build_id]
        assert (row["state"], row["exit_code"], row["box"]) == ("succeeded", 0, ep["box_id"])
        assert [x["state"] for x in sorted(stored(home).values(), key=lambda x: x["submitted_at"])] == \
            ["failed", "failed", "failed", "succeeded"]
        # the hive's view in `hived status`
        assert report["hive"]["builds_by_state"]["succeeded"] == 1
        assert report["hive"]["builds_by_state"]["failed"] == 3
        assert report["hive"]["boxes_connected"] == 1 and report["control"]["connected"]
        human = subprocess.run([*HIVED, "status", "--home", str(home)], capture_output=True, check=True)
        assert b"pool small:" in human.stdout and b"hive local: 1 box(es) connected" in human.stdout
        # hived up on a small machine shares cores and says so
        assert b"partition:" in human.stdout and b"overcommit" in human.stdout
        assert report["partition"]["cell_cores"]
        # ... and its cells yield those cores to the daemon ([box] cells_cpu_weight)
        assert report["partition"]["cells_cpu_weight"] == 1 and b"cells' CPU weight 1" in human.stdout
        # refusals are one line and exit 2; nothing is stored
        before = len(stored(home))
        r = subprocess.run([*HIVED, "run", "--home", str(home), "--customer", "nobody", "--", "true"],
                           capture_output=True, timeout=60)
        assert r.returncode == 2 and b"unknown customer 'nobody'" in r.stderr and r.stderr.count(b"\n") == 1
        r = subprocess.run([*HIVED, "run", "--home", str(home), "--hive", "mars", "--", "true"],
                           capture_output=True, timeout=60)
        assert r.returncode == 2 and b"unknown hive 'mars'" in r.stderr
        assert len(stored(home)) == before
    finally:
        assert up.stop() == 0
    assert host_leftovers(home) == []
    assert not (home / "endpoints.json").exists()
    assert processes_naming(str(home)) == []


def test_ctrl_c_cancels_the_build_and_two_runs_queue_with_a_pool_of_1(home):
    up = Up(home)
    try:
        up.wait_ready()
        # one hived up per home
        r = subprocess.run([*HIVED, "up", "--home", str(home)], capture_output=True, timeout=60)
        assert r.returncode == 2 and f"another hived up is running at {home} (pid {up.proc.pid})".encode() \
            in r.stderr, r.stderr
        # Ctrl-C: the build is cancelled through the API; we exit 130 once it has ended
        proc = start_run(home, "sh", "-c", "echo started; sleep 60; echo never")
        assert proc.stdout.readline() == b"started\n"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and out == b"", (out, err)
        assert b"cancelling build local_" in err
        [cancelled] = [b for b in stored(home).values() if b["state"] != "succeeded"]
        assert (cancelled["state"], cancelled["cancel_requested"]) == ("cancelled", 1)
        # two builds at once, one warm cell: the second waits in the hive's queue, both run once
        wait_for(lambda: api(home, "/v1/hive", admin=True)["boxes"][endpoints(home)["box_id"]]["warm"]["small"],
                 180, "the pool to refill")
        earlier = set(stored(home))  # the cancelled build may be under a second old by now
        a = start_run(home, "sh", "-c", "sleep 1; echo A")
        b = start_run(home, "sh", "-c", "echo B")
        out_a, err_a = a.communicate(timeout=300)
        out_b, err_b = b.communicate(timeout=300)
        assert (a.returncode, out_a, b.returncode, out_b) == (0, b"A\n", 0, b"B\n"), (err_a, err_b)
        two = [x for k, x in stored(home).items() if k not in earlier]
        assert len(two) == 2 and all(x["state"] == "succeeded" and x["attempts"] == 1 for x in two), two
        assert two[0]["cell"] != two[1]["cell"]
        waited = sorted(x["assigned_at"] - x["submitted_at"] for x in two)
        # one took the warm cell at once; the other was queued until a cell was free or warm again
        # (a template's clone can be warm in ~0.7 s: sooner than the first build's 1 s)
        assert waited[0] < 0.3 < waited[1], waited
        hive = api(home, "/v1/hive", admin=True)
        assert hive["queue"] == {"small": 0} and hive["builds_by_state"]["succeeded"] == 2
    finally:
        assert up.stop() == 0
    assert host_leftovers(home) == []


def test_builds_on_premade_containers_get_their_own_command_env_and_files(home):
    """Warm cells make their build's container ahead (hived/cell/premade.py): through `hived run`
    each build still gets its own argv, env, cwd, exit code and output, and never another's files."""
    up = Up(home)
    try:
        up.wait_ready()
        r = subprocess.run([*HIVED, "run", "--home", str(home), "--env", "ONLY=first build", "--cwd", "/tmp", "--",
                            "sh", "-c", 'pwd; echo "$ONLY|$HOME"; echo "$1"; echo mine > /work/f; '
                            'echo mine > /tmp/f; echo oops >&2; exit 6', "sh", "x  y"],
                           capture_output=True, timeout=240)
        assert (r.returncode, r.stdout, r.stderr) == (6, b"/tmp\nfirst build|/work\nx  y\n", b"oops\n"), r.stderr
        r = run(home, "sh", "-c", 'echo "[$ONLY]"; ls -A /work /tmp; pwd')
        assert (r.returncode, r.stdout) == (0, b"[]\n/tmp:\n\n/work:\n/work\n"), (r.stdout, r.stderr)
        report = json.loads(subprocess.run([*HIVED, "status", "--home", str(home), "--json"],
                                           capture_output=True, check=True).stdout)
        last_two = report["builds"][-2:]
        assert [b["guest_start"]["premade"] for b in last_two] == [1, 1], last_two
        assert last_two[0]["cell"] != last_two[1]["cell"]
    finally:
        assert up.stop() == 0
    assert host_leftovers(home) == []


def test_kill_9_then_restart_adopts_the_cells_and_leaves_nothing(home):
    up = Up(home)
    up.wait_ready()
    before = host_leftovers(home)
    assert any(x.startswith("cgroup") for x in before) and any(x.startswith("dir") for x in before)
    # a build in flight when everything is killed
    follower = start_run(home, "sh", "-c", "echo running; sleep 20; echo done")
    assert follower.stdout.readline() == b"running\n"
    rec = running_cell(home)
    up.stop(signal.SIGKILL)
    # One process: nothing of hived up outlives it but the cells' VMMs (with the stages that
    # start them), which the next start adopts (hived/box/adopt.py).
    assert processes_naming(str(home), but={follower.pid, *vmm_pids(embedded(home).cells_dir)}) == []
    up2 = Up(home)
    try:
        up2.wait_ready()
        assert re.search(r"adopted [1-9] of \d+ cell", (home / "up.log").read_text())
        # the same VMM goes on running the build: adopted, never booted again
        assert process_start_ticks(rec["vmm_pid"]) == rec["vmm_start_ticks"]
        # The build was not lost: its cell (same VMM, never booted again) finished it, and the
        # `hived run` that followed it found the new API.
        out, err = follower.communicate(timeout=120)
        assert (follower.returncode, out) == (0, b"done\n"), (out, err)
        [kept] = stored(home).values()
        assert (kept["state"], kept["attempts"]) == ("succeeded", 1)
        wait_for(lambda: process_start_ticks(rec["vmm_pid"]) != rec["vmm_start_ticks"], 30,
                 "the build's cell to go once its build ended")
        assert run(home, "true").returncode == 0
    finally:
        if follower.poll() is None:
            follower.kill()
        assert up2.stop() == 0
    assert host_leftovers(home) == []
    assert processes_naming(str(home)) == []


def test_run_without_a_box_is_one_clear_line(home):
    r = run(home, "true", timeout=30)
    assert r.returncode == 2
    assert r.stderr.decode().count("\n") == 1 and "hived up --home" in r.stderr.decode()
    assert b"Traceback" not in r.stderr


def test_box_with_a_bad_config_is_one_clear_line(tmp_path):
    bad = tmp_path / "box.toml"
    bad.write_text('[box]\nname = "b"\n[shapes.small]\nvcpus = "two"\n')
    r = subprocess.run([*HIVED, "box", "--config", str(bad)], capture_output=True, timeout=30)
    assert r.returncode == 2 and b"Traceback" not in r.stderr
    assert b"shapes.small.vcpus" in r.stderr and b"'two'" in r.stderr
    bad.write_text("[box\n")
    r = subprocess.run([*HIVED, "box", "--config", str(bad)], capture_output=True, timeout=30)
    assert r.returncode == 2 and b"not valid TOML" in r.stderr
