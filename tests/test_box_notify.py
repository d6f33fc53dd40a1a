"""`hived box` under a (stand-in) systemd: the real daemon, a real notify socket.
READY=1 only once a warm cell waits; WATCHDOG=1 while serving; STOPPING=1 on SIGTERM, which
restarts without ending cells: the next daemon adopts the warm cell (same VMM, no reboot) and
says READY=1 at once; `hived box stop` (SIGINT, as Ctrl-C) ends them."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from hived.box.config import parse
from hived.box.leftovers import vmm_pids

from boxharness import find_image

pytestmark = [pytest.mark.vm, pytest.mark.root]


def test_ready_watchdog_stopping():
    if os.geteuid() != 0:
        pytest.skip("needs root: cgroups")
    image_root = find_image().parent
    d = Path(tempfile.mkdtemp(prefix="hvn", dir="/tmp"))
    config = d / "box.toml"
    config.write_text(f'[box]\nname = "notify-{os.getpid()}"\nstate_dir = "{d}/s"\nimage_dir = "{image_root}"\n'
                      'reserved_cores = 0\novercommit = true\n'
                      '[shapes.small]\nmemory_mib = 320\nscratch_mib = 128\npool_target = 1\n')
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(d / "notify"))
    sock.settimeout(1)
    env = {**os.environ, "NOTIFY_SOCKET": str(d / "notify"), "WATCHDOG_USEC": "2000000"}
    env.pop("WATCHDOG_PID", None)
    def start():
        return subprocess.Popen([sys.executable, "-m", "hived", "box", "--config", str(config)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait_for(prefix, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not any(m.startswith(prefix) for m in got):
            try:
                got.append(sock.recv(4096).decode())
            except TimeoutError:
                assert proc.poll() is None or prefix == "STOPPING=1", proc.stderr.read().decode()
        return next((m for m in got if m.startswith(prefix)), None)

    proc = start()
    got = []
    try:
        ready = wait_for("READY=1", 180)
        assert ready is not None
        assert "1 warm" in ready  # STATUS= says what it is serving
        cfg = parse({"box": {"name": "x", "state_dir": f"{d}/s"}, "shapes": {"s": {}}})
        first = vmm_pids(cfg.cells_dir)
        assert len(first) >= 1  # READY came with a cell already booted
        assert any(m == "WATCHDOG=1" for m in got)  # pings start before READY, at half the timeout
        proc.send_signal(signal.SIGTERM)  # a restart: the cells stay
        assert wait_for("STOPPING=1", 60) is not None
        assert proc.wait(60) == 0
        assert b"detached: cells keep running" in proc.stderr.read()
        assert set(vmm_pids(cfg.cells_dir)) == set(first)
        got.clear()
        proc = start()
        ready = wait_for("READY=1", 60)
        assert ready is not None and "1 warm" in ready, got
        assert set(vmm_pids(cfg.cells_dir)) == set(first)  # the same VMM: adopted, not booted again
        status = subprocess.run([sys.executable, "-m", "hived", "status", "--home", f"{d}/s", "--json"],
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        [cell] = report["cells"] if "cells" in report else report["box"]["cells"]
        assert cell["adopted"] and cell["state"] == "warm" and cell["pid"] in first
        threads = {int(t) for t in os.listdir(f"/proc/{cell['pid']}/task")}
        assert cell["vcpu_threads"] and set(cell["vcpu_threads"].values()) <= threads  # QMP asked again
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{report['metrics_port']}/metrics", timeout=30) as r:
            metrics = r.read().decode()
        assert 'hived_cell_adoptions_total{result="warm"} 1.0' in metrics, metrics[-2000:]
        # a stop: builds end, cells go (the unit's ExecStop=, without --unless-restarting here)
        while True:  # what systemd would have read by now
            try:
                sock.recv(4096)
            except TimeoutError:
                break
        stop = subprocess.Popen([sys.executable, "-m", "hived", "box", "stop", "--config", str(config)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert wait_for("STOPPING=1", 60) is not None
        out, err = stop.communicate(timeout=120)
        assert stop.returncode == 0 and "stopped; its builds ended and its cells are gone" in out, (out, err)
        assert proc.wait(60) == 0
        assert vmm_pids(cfg.cells_dir) == {}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _clean(config)
        sock.close()
        subprocess.run(["rm", "-rf", str(d)])



def _clean(config: Path) -> None:
    """What a failed run may have left (a detached daemon's cells): what the box's next start removes."""
    from test_up_cli import clean_box_config

    from hived.box.config import load

    clean_box_config(load(str(config)))
