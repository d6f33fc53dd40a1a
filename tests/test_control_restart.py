"""A control plane process killed with SIGKILL mid-build and started again on the same
SQLite file: nothing submitted is lost, nothing runs twice, and the box's result held
while the control plane was away is taken on reconnect.

The box here is simulated (hived.control.simbox: the real protocol over a real socket, no
cells): this test is about the control plane's durability and reconnect logic."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import aiohttp
from ports import free_port
from test_control_api import TOKENS, run, sha

from hived.control.simbox import SimBox


def write_config(tmp_path, api_port, box_port) -> str:
    path = tmp_path / "hive.toml"
    path.write_text(f"""
[hive]
name = "r1"
state_dir = "{tmp_path / 'state'}"
api_listen = "127.0.0.1:{api_port}"
box_listen = "127.0.0.1:{box_port}"
heartbeat_s = 0.2
box_lost_s = 5.0

[shapes.small]

[customers.acme]
api_tokens_sha256 = ["{sha(TOKENS['acme'])}"]

[boxes.box-a]
token_sha256 = "{sha('box-a-token')}"
""")
    return str(path)


class ControlProcess:
    def __init__(self, config: str, log_path) -> None:
        self.log = open(log_path, "ab")  # noqa: SIM115 (closed in kill())
        env = dict(os.environ, HIVED_LOG="INFO")
        self.proc = subprocess.Popen([sys.executable, "-m", "hived", "control", "--config", config],
                                     stdout=subprocess.PIPE, stderr=self.log, env=env)
        line = self.proc.stdout.readline().decode()
        if not line.startswith("ready "):
            self.proc.kill()
            raise AssertionError(f"control plane did not start: {line!r} {log_path.read_text()[-3000:]}")
        self.endpoints = json.loads(line[len("ready "):])
        self.api = self.endpoints["api"]
        self.box_port = int(self.endpoints["box"].rpartition(":")[2])

    def kill(self, sig=signal.SIGKILL) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(30)
        finally:
            self.log.close()


def test_restart_mid_build_loses_nothing_and_runs_nothing_twice(tmp_path):
    api_port, box_port = free_port(), free_port()
    config = write_config(tmp_path, api_port, box_port)
    base = f"http://127.0.0.1:{api_port}"
    auth = {"Authorization": f"Bearer {TOKENS['acme']}"}
    first = ControlProcess(config, tmp_path / "control.log")

    async def main():
        nonlocal first
        async with aiohttp.ClientSession(headers=auth) as http:
            box = await SimBox("127.0.0.1", box_port, "box-a", "box-a-token", warm={"small": 1}).connect()
            ids = []
            for i in range(2):
                async with http.post(base + "/v1/builds", json={"argv": ["echo", str(i)]}) as r:
                    assert r.status == 201
                    ids.append((await r.json())["id"])
            x, y = ids  # x gets the one warm cell; y waits in the queue
            got = await asyncio.wait_for(box.assigned.get(), 10)
            assert (got.build_id, got.lease) == (x, 1)
            await box.start(x)
            await box.output(x, b"before the crash\n")
            await asyncio.sleep(0.3)  # let the control plane store it

            assert first.kill() == -signal.SIGKILL
            await asyncio.sleep(0.2)
            await box.finish(x, 0)  # the control plane is gone: the box holds the result

            second = ControlProcess(config, tmp_path / "control.log")
            try:
                # The box reconnects (with backoff, as hived.box.controllink does).
                for attempt in range(50):
                    try:
                        await box.connect()
                        break
                    except (ConnectionError, OSError):
                        await asyncio.sleep(min(0.05 * 2 ** attempt, 1))
                await box.wait_acked(x)
                async with http.get(f"{base}/v1/builds/{x}") as r:
                    bx = await r.json()
                assert (bx["state"], bx["attempts"], bx["lease"], bx["exit_code"]) == ("succeeded", 1, 1, 0)
                async with http.get(f"{base}/v1/builds/{x}/logs") as r:
                    assert await r.read() == b"before the crash\n"
                # y was submitted before the crash: it is still there and now runs, once.
                got = await asyncio.wait_for(box.assigned.get(), 10)
                assert (got.build_id, got.lease) == (y, 1)
                await box.start(y)
                await box.finish(y, 0)
                deadline = time.monotonic() + 10
                while True:
                    async with http.get(f"{base}/v1/builds/{y}") as r:
                        by = await r.json()
                    if by["state"] == "succeeded" or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.05)
                assert (by["state"], by["attempts"]) == ("succeeded", 1)
                assert box.assigned.empty()  # nothing was assigned twice
                await box.close()
            finally:
                second.kill(signal.SIGTERM)

    try:
        run(main, timeout=90)
    finally:
        if first.proc.poll() is None:
            first.kill()


def test_a_build_acknowledged_with_201_survives_sigkill(tmp_path):
    api_port, box_port = free_port(), free_port()
    config = write_config(tmp_path, api_port, box_port)
    base = f"http://127.0.0.1:{api_port}"
    auth = {"Authorization": f"Bearer {TOKENS['acme']}"}
    proc = ControlProcess(config, tmp_path / "control.log")

    async def submit():
        async with aiohttp.ClientSession(headers=auth) as http, \
                http.post(base + "/v1/builds", json={"argv": ["true"]}) as r:
            assert r.status == 201
            return (await r.json())["id"]

    build_id = run(submit)
    proc.kill()
    proc = ControlProcess(config, tmp_path / "control.log")

    async def get():
        async with aiohttp.ClientSession(headers=auth) as http, http.get(f"{base}/v1/builds/{build_id}") as r:
            return r.status, await r.json()

    try:
        status, body = run(get)
        assert status == 200 and body["state"] == "queued"
    finally:
        assert proc.kill(signal.SIGTERM) == 0
