"""Several real box daemons in one hive, on this machine: each `hived box` process has its own
name, state dir and cell subnet, boots real microVM cells (TCG) and links to one control
plane. Builds spread over the boxes; a box SIGKILLed mid-build fails its build with reason
"infrastructure" and the other box's build runs to the end, untouched. A box given several
control plane addresses (replicas) goes on to the next when one does not answer. Kept small (two
boxes, one warm cell each): the machine is shared."""

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_control_api import TOKENS, Hive, run, sha
from test_control_restart import free_port

from hived.box.leftovers import vmm_pids
from hived.control.config import parse

from boxharness import find_image

pytestmark = [pytest.mark.vm, pytest.mark.root]


class BoxProcess:
    """`hived box --config` with a [control] section: a real box daemon, killable."""

    def __init__(self, d: Path, name: str, subnet: str, addresses: list[str], token: str) -> None:
        self.name, self.dir = name, d
        self.config = d / f"{name}.toml"
        self.config.write_text(f"""
[box]
name = "{name}"
state_dir = "{d / name}"
image_dir = "{find_image().parent}"
reserved_cores = 0
overcommit = true
net_subnet = "{subnet}"
boot_timeout_s = 180

[shapes.small]
memory_mib = 320
scratch_mib = 128
pool_target = 1

[control]
address = [{", ".join(f'"{a}"' for a in addresses)}]
token = "{token}"
capacity = 1
""")
        self.proc = None

    def start(self) -> "BoxProcess":
        self.log = open(self.dir / f"{self.name}.log", "ab")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen([sys.executable, "-m", "hived", "box", "--config", str(self.config)],
                                     stdout=self.log, stderr=self.log, env=dict(os.environ, HIVED_LOG="INFO"))
        return self

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def cells(self) -> list[int]:
        return vmm_pids(self.dir / self.name / "cells")


def test_builds_spread_over_real_boxes_and_a_killed_box_fails_only_its_own(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root: cgroups, namespaces")
    d = Path(tempfile.mkdtemp(prefix="hvmb", dir="/tmp"))
    tag = secrets.token_hex(2)
    names = [f"mb{i}-{tag}" for i in (1, 2)]
    tokens = {n: secrets.token_urlsafe(16) for n in names}
    octet = 100 + secrets.randbelow(100)
    config = parse({
        "hive": {"name": "mb", "state_dir": str(tmp_path / "hive"), "api_listen": "127.0.0.1:0",
                 "box_listen": "127.0.0.1:0", "heartbeat_s": 0.5, "box_lost_s": 4.0},
        "shapes": {"small": {}},
        "customers": {"acme": {"api_tokens_sha256": [sha(TOKENS["acme"])]}},
        "boxes": {n: {"token_sha256": sha(t)} for n, t in tokens.items()},
    }, "test")
    boxes = []

    async def main():
        async with Hive(config) as h:
            nobody = free_port()  # the second box lists a dead replica first: it goes on to the next
            addresses = [[f"127.0.0.1:{h.cp.box_port}"], [f"127.0.0.1:{nobody}", f"127.0.0.1:{h.cp.box_port}"]]
            for i, name in enumerate(names):
                boxes.append(BoxProcess(d, name, f"10.{octet}.{16 * i}.0/28", addresses[i], tokens[name]).start())

            async def until(cond, timeout, what):
                deadline = time.monotonic() + timeout
                while not cond():
                    if time.monotonic() > deadline:
                        raise AssertionError(f"timed out waiting for {what}")
                    await asyncio.sleep(0.2)

            def warm(name):
                box = h.cp.scheduler.boxes.get(name)
                return box is not None and box.usable and box.warm("small") >= 1
            await until(lambda: all(warm(n) for n in names), 240, "both boxes linked with a warm cell")
            body = {"argv": ["sh", "-c", "echo start; sleep 12; echo end"], "timeout_s": 120}
            ids = []
            for _ in names:
                status, b = await h.call("POST", "/v1/builds", body=body)
                assert status == 201, b
                ids.append(b["id"])

            def running():
                return [h.cp.store.get_build(i) for i in ids if h.cp.store.get_build(i).state == "running"]
            await until(lambda: len(running()) == 2, 120, "both builds running")
            on = {h.cp.store.get_build(i).box: i for i in ids}
            assert sorted(on) == sorted(names)          # spread: one build per box
            await until(lambda: all(h.cp.store.read_log(i) for i in ids), 60, "both builds' first output")
            victim, survivor = boxes[0], boxes[1]
            victim.stop(signal.SIGKILL)                 # mid-build
            await until(lambda: h.cp.store.get_build(on[victim.name]).terminal, 30, "the lost box's build to end")
            lost = h.cp.store.get_build(on[victim.name])
            assert (lost.state, lost.reason) == ("failed", "infrastructure"), lost.public()
            assert victim.name in lost.message
            await until(lambda: h.cp.store.get_build(on[survivor.name]).terminal, 120, "the other build to end")
            kept = h.cp.store.get_build(on[survivor.name])
            assert (kept.state, kept.exit_code, kept.attempts) == ("succeeded", 0, 1), kept.public()
            out = b"".join(c.data for c in h.cp.store.read_log(kept.id))
            assert out == b"start\nend\n"
            # the killed box, started again, cleans what its cells left and links again
            victim.start()
            await until(lambda: warm(victim.name), 240, "the restarted box to link with a warm cell")

    try:
        run(main, timeout=900)
    finally:
        for box in boxes:
            box.stop()
        left = [b.name for b in boxes if b.cells()]
        shutil.rmtree(d, ignore_errors=True)
    assert not left, f"cells left running by {left}"
