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
from ports import free_port
from test_control_api import TOKENS, Hive, run, sha

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

    def start(self, env: dict | None = None) -> "BoxProcess":
        self.log = open(self.dir / f"{self.name}.log", "ab")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen([sys.executable, "-m", "hived", "box", "--config", str(self.config)],
                                     stdout=self.log, stderr=self.log,
                                     env=dict(os.environ, HIVED_LOG="INFO", **(env or {})))
        return self

    def stop(self, sig=signal.SIGINT) -> None:  # SIGTERM would leave its cells for the next daemon
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


def test_a_real_build_keeps_running_with_complete_output_when_the_leader_is_sigkilled(tmp_path, pg_database):
    """Two `hived control` replicas on PostgreSQL and a real box listing both: the leader dies
    mid-build, the box relinks (through the standby, now the leader) and hands over the output
    it held; the build ends once, with every line."""
    if os.geteuid() != 0:
        pytest.skip("needs root: cgroups, namespaces")
    from test_control_replicas import Replica, write_config

    pw = tmp_path / "db.password"
    pw.write_text(pg_database.password)
    d = Path(tempfile.mkdtemp(prefix="hvfo", dir="/tmp"))
    name = f"fo-{secrets.token_hex(2)}"
    token = "box-a-token"  # write_config's [boxes.box-a]
    replicas = [Replica(write_config(tmp_path, n, pg_database.url, pw), tmp_path / f"{n}.log") for n in "ab"]
    box = None

    async def main():
        nonlocal box
        import aiohttp

        a, b = replicas
        box = BoxProcess(d, name, f"10.{100 + secrets.randbelow(100)}.{16 * secrets.randbelow(16)}.0/28",
                         [f"127.0.0.1:{a.box_port}", f"127.0.0.1:{b.box_port}"], token)
        box.config.write_text(box.config.read_text().replace("[control]\n", '[control]\nbox_id = "box-a"\n'))
        box.start()
        auth = {"Authorization": f"Bearer {TOKENS['acme']}"}
        async with aiohttp.ClientSession(headers=auth) as http:
            async def get(r, path):
                async with http.get(f"{r.api}{path}") as resp:
                    return await (resp.json() if "logs" not in path else resp.text())

            deadline = time.monotonic() + 300
            while (await get(a, "/healthz"))["boxes_connected"] < 1:
                assert time.monotonic() < deadline, "the box did not link"
                await asyncio.sleep(0.5)
            body = {"argv": ["sh", "-c", "echo one; sleep 8; echo two; sleep 2; echo three"], "timeout_s": 300}
            async with http.post(f"{b.api}/v1/builds", json=body) as resp:
                assert resp.status == 201
                build = await resp.json()
            while "one" not in await get(b, f"/v1/builds/{build['id']}/logs"):
                assert time.monotonic() < deadline, "the build did not start"
                await asyncio.sleep(0.2)
            a.kill()                                          # the leader, mid-build
            while True:
                got = await get(b, f"/v1/builds/{build['id']}")
                if got["state"] in ("succeeded", "failed", "cancelled"):
                    break
                assert time.monotonic() < deadline + 120, got
                await asyncio.sleep(0.5)
            assert (got["state"], got["exit_code"], got["attempts"]) == ("succeeded", 0, 1), got
            assert await get(b, f"/v1/builds/{build['id']}/logs") == "one\ntwo\nthree\n"
            assert (await get(b, "/healthz"))["leader"]

    try:
        run(main, timeout=600)
    finally:
        if box is not None:
            box.stop()
        for r in replicas:
            r.kill()
        left = box.cells() if box is not None else []
        shutil.rmtree(d, ignore_errors=True)
    assert not left, "cells left running"


def test_a_build_goes_on_across_a_sigterm_restart_of_hived_box_under_a_notify_socket(tmp_path):
    """systemd's restart of hived-box.service, played by hand: SIGTERM (the daemon says
    STOPPING=1 and detaches), then the daemon again (READY=1 with the cell adopted). The build
    running in the cell goes on; every line reaches the store once, and it succeeds once."""
    if os.geteuid() != 0:
        pytest.skip("needs root: cgroups, namespaces")
    import socket

    d = Path(tempfile.mkdtemp(prefix="hvmt", dir="/tmp"))
    name, token = f"mt-{secrets.token_hex(2)}", secrets.token_urlsafe(16)
    config = parse({
        "hive": {"name": "mt", "state_dir": str(tmp_path / "hive"), "api_listen": "127.0.0.1:0",
                 "box_listen": "127.0.0.1:0", "heartbeat_s": 0.5, "box_lost_s": 15.0},
        "shapes": {"small": {}},
        "customers": {"acme": {"api_tokens_sha256": [sha(TOKENS["acme"])]}},
        "boxes": {name: {"token_sha256": sha(token)}},
    }, "test")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(d / "notify"))
    notify.setblocking(False)
    env = {"NOTIFY_SOCKET": str(d / "notify")}
    said: list[str] = []
    box = None
    left = []

    async def main():
        nonlocal box
        async with Hive(config) as h:
            box = BoxProcess(d, name, f"10.{100 + secrets.randbelow(100)}.32.0/28",
                             [f"127.0.0.1:{h.cp.box_port}"], token).start(env)

            def drain():
                while True:
                    try:
                        said.append(notify.recv(4096).decode())
                    except BlockingIOError:
                        return

            async def until(cond, timeout, what):
                deadline = time.monotonic() + timeout
                while not cond():
                    drain()
                    if time.monotonic() > deadline:
                        raise AssertionError(f"timed out waiting for {what}; said {said[-5:]}")
                    await asyncio.sleep(0.1)
                drain()  # what it said just before cond held (e.g. STOPPING=1, then its exit)

            await until(lambda: any(m.startswith("READY=1") for m in said), 240, "READY=1")
            await until(lambda: (b := h.cp.scheduler.boxes.get(name)) is not None and b.usable
                        and b.warm("small") >= 1, 60, "the box to link with a warm cell")
            body = {"argv": ["sh", "-c", "for i in $(seq 1 60); do echo line $i; sleep 0.2; done"], "timeout_s": 120}
            status, b = await h.call("POST", "/v1/builds", body=body)
            assert status == 201, b
            build_id = b["id"]
            await until(lambda: len(h.cp.store.read_log(build_id)) >= 5, 120, "the build's first lines")
            said.clear()
            box.proc.send_signal(signal.SIGTERM)
            await until(lambda: box.proc.poll() is not None, 60, "the daemon to detach")
            assert box.proc.returncode == 0 and any(m.startswith("STOPPING=1") for m in said)
            assert box.cells(), "SIGTERM must leave the cells running"
            box.log.close()
            said.clear()
            box.start(env)
            await until(lambda: any(m.startswith("READY=1") for m in said), 120, "READY=1 after the restart")
            await until(lambda: h.cp.store.get_build(build_id).terminal, 120, "the build to end")
            done = h.cp.store.get_build(build_id)
            assert (done.state, done.exit_code, done.attempts) == ("succeeded", 0, 1), done.public()
            out = b"".join(c.data for c in h.cp.store.read_log(build_id))
            assert out.decode().splitlines() == [f"line {i}" for i in range(1, 61)]
            assert "adopted" in (d / f"{name}.log").read_text()

    try:
        run(main, timeout=600)
    finally:
        if box is not None:
            box.stop()
            left = box.cells()
            if left:  # a detached daemon's cells (the test failed half-way): remove them
                from test_box_notify import _clean

                _clean(box.config)
        notify.close()
        shutil.rmtree(d, ignore_errors=True)
    assert not left, "cells left running"
