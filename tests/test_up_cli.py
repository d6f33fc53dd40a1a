"""The newcomer's commands end to end: `hived up`, `hived run`, `hived status`, and a
`kill -9` of the daemon followed by a restart that removes every leftover."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from hived.box.cgroups import open_cgroups
from hived.box.config import embedded
from hived.box.leftovers import vmm_pids

from boxharness import find_image

pytestmark = [pytest.mark.vm, pytest.mark.root]
HIVED = [sys.executable, "-m", "hived"]


class Up:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.log = open(home / "up.log", "ab")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen([*HIVED, "up", "--home", str(home), "--pool", "1"],
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


def host_leftovers(home: Path) -> list[str]:
    config = embedded(home)
    found = [f"process {pid}" for pid in vmm_pids(config.cells_dir)]
    if config.cells_dir.exists():
        found += [f"dir {d}" for d in config.cells_dir.iterdir()]
    found += [f"cgroup {c}" for c in open_cgroups(config.cgroup_parent).cells()]
    return found


@pytest.fixture
def home():
    if os.geteuid() != 0:
        pytest.skip("needs root: cells get cgroups")
    find_image()
    d = Path(tempfile.mkdtemp(prefix="hvup", dir="/tmp"))
    yield d
    for pid in vmm_pids(embedded(d).cells_dir):  # whatever a failed test left
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(d, ignore_errors=True)


def test_up_run_status_and_exit_codes(home):
    up = Up(home)
    try:
        up.wait_ready()
        endpoints = json.loads((home / "endpoints.json").read_text())
        assert Path(endpoints["box"]).exists() and endpoints["metrics"].startswith("http://")
        r = run(home, "sh", "-c", "echo out; echo err >&2; exit 5")
        assert (r.returncode, r.stdout, r.stderr) == (5, b"out\n", b"err\n")
        r = run(home, "sh", "-c", "kill -KILL $$")
        assert r.returncode == 128 + 9
        status = subprocess.run([*HIVED, "status", "--home", str(home), "--json"], capture_output=True,
                                check=True)
        report = json.loads(status.stdout)
        assert report["accelerator"] in ("kvm", "tcg")
        assert [b["code"] for b in report["builds"][-2:]] == [5, -1]
        human = subprocess.run([*HIVED, "status", "--home", str(home)], capture_output=True, check=True)
        assert b"pool small:" in human.stdout
        # hived up on a small machine shares cores and says so
        assert b"partition:" in human.stdout and b"overcommit" in human.stdout
        assert report["partition"]["cell_cores"]
    finally:
        assert up.stop() == 0
    assert host_leftovers(home) == []
    assert not (home / "endpoints.json").exists()


def test_kill_9_then_restart_leaves_nothing(home):
    up = Up(home)
    up.wait_ready()
    before = host_leftovers(home)
    assert any(x.startswith("cgroup") for x in before) and any(x.startswith("dir") for x in before)
    old_vmms = set(vmm_pids(embedded(home).cells_dir))
    up.stop(signal.SIGKILL)
    up2 = Up(home)
    try:
        up2.wait_ready()
        assert "removed leftovers" in (home / "up.log").read_text()
        assert not (old_vmms & set(vmm_pids(embedded(home).cells_dir)))
        assert run(home, "true").returncode == 0
    finally:
        assert up2.stop() == 0
    assert host_leftovers(home) == []


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
