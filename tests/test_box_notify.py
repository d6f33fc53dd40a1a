"""`hived box` under a (stand-in) systemd: the real daemon, a real notify socket.
READY=1 only once a warm cell waits; WATCHDOG=1 while serving; STOPPING=1 on SIGTERM."""

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
    proc = subprocess.Popen([sys.executable, "-m", "hived", "box", "--config", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    got = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not any(m.startswith("READY=1") for m in got):
            try:
                got.append(sock.recv(4096).decode())
            except TimeoutError:
                assert proc.poll() is None, proc.stderr.read().decode()
        ready = next(m for m in got if m.startswith("READY=1"))
        assert "1 warm" in ready  # STATUS= says what it is serving
        cfg = parse({"box": {"name": "x", "state_dir": f"{d}/s"}, "shapes": {"s": {}}})
        assert len(vmm_pids(cfg.cells_dir)) >= 1  # READY came with a cell already booted
        assert any(m == "WATCHDOG=1" for m in got)  # pings start before READY, at half the timeout
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(m.startswith("STOPPING=1") for m in got):
            try:
                got.append(sock.recv(4096).decode())
            except TimeoutError:
                pass
        assert any(m.startswith("STOPPING=1") for m in got)
        assert proc.wait(60) == 0
        assert vmm_pids(cfg.cells_dir) == {}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()
        subprocess.run(["rm", "-rf", str(d)])
