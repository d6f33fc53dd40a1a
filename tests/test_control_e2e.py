"""End to end, nothing simulated: the HTTP API -> control plane -> box link -> a real
BoxDaemon (hived.box.controllink) -> a real QEMU microVM cell, and back. Also a control
plane restart in the middle of a real build: the box holds output and exit and reports
them on reconnect, and the build is not run twice.

The link is attached here the way the box daemon's hook does it (ControlLink(daemon,
LinkConfig).start() inside the daemon's loop)."""

import asyncio
import contextlib
import json
import os
import secrets
import socket
import time
import urllib.error
import urllib.request

import pytest
from ports import free_port
from test_control_api import TOKENS, sha

from hived.box.controllink import ControlLink, LinkConfig
from hived.control.config import parse
from hived.control.server import ControlPlane

from boxharness import BoxHarness

pytestmark = [pytest.mark.vm, pytest.mark.root]

SHAPES = {"small": {"vcpus": 1, "memory_mib": 384, "scratch_mib": 256, "pool_target": 1}}
BOX_TOKEN = secrets.token_urlsafe(24)


class E2E:
    def __init__(self, tmp, *, hive: dict | None = None, repos: dict | None = None, shapes: dict = SHAPES,
                 box: dict | None = None) -> None:
        self.api_port, self.box_port = free_port(), free_port()
        self.config = parse({
            "hive": {"name": "e2e", "state_dir": str(tmp / "hive"),
                     "api_listen": f"127.0.0.1:{self.api_port}", "box_listen": f"127.0.0.1:{self.box_port}",
                     "heartbeat_s": 0.5, "box_lost_s": 8.0, **(hive or {})},
            "shapes": {"small": {}},
            "customers": {"acme": {"api_tokens_sha256": [sha(TOKENS["acme"])]}},
            "boxes": {"e2e-box": {"token_sha256": sha(BOX_TOKEN)}},
            "repos": repos or {},
        }, "e2e")
        self.box = BoxHarness(shapes, box=box)
        self.cp = None
        self.link = None

    def start(self) -> "E2E":
        self.box.start()
        try:
            self.start_control()
            link_cfg = LinkConfig("127.0.0.1", self.box_port, BOX_TOKEN, "e2e-box", capacity=2)

            async def attach():
                self.link = ControlLink(self.box.daemon, link_cfg)
                self.link.start()
                await asyncio.wait_for(self.link.registered.wait(), 30)
            self.box.call(attach())
        except BaseException:
            # the box is up, with its cells: a fixture whose start fails never calls stop()
            with contextlib.suppress(Exception):
                self.stop()
            raise
        return self

    def start_control(self) -> None:
        self.cp = ControlPlane(self.config)
        self.box.call(self.cp.start())

    def stop_control(self) -> None:
        self.box.call(self.cp.stop())

    def stop(self) -> None:
        try:
            if self.link is not None:
                self.box.call(self.link.stop())
            if self.cp is not None:
                self.box.call(self.cp.stop())
        finally:
            self.box.stop()

    def http(self, method, path, body=None):
        return api_call(self.api_port, method, path, body)

    def wait(self, build_id, states, timeout=180):
        return wait_build(self.api_port, build_id, states, timeout)


def api_call(port: int, method: str, path: str, body=None, token: str = TOKENS["acme"]):
    """(status, JSON or bytes) of one call to a hive's API on loopback."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            data = r.read()
            is_json = r.headers["Content-Type"].startswith("application/json")
            return r.status, (json.loads(data) if is_json else data)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_build(port: int, build_id: str, states, timeout: float = 180) -> dict:
    """The build once it is in one of `states` (the API may be restarting meanwhile)."""
    deadline = time.monotonic() + timeout
    b = None
    while time.monotonic() < deadline:
        try:
            status, b = api_call(port, "GET", f"/v1/builds/{build_id}")
        except (urllib.error.URLError, ConnectionError):
            status, b = 0, None  # the control plane is restarting
        if status == 200 and b["state"] in states:
            return b
        time.sleep(0.2)
    raise AssertionError(f"build {build_id} not in {states} after {timeout} s: {b}")


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root: cells get cgroups")
    env = E2E(tmp_path_factory.mktemp("e2e")).start()
    try:
        yield env
    finally:
        env.stop()


def test_echo_through_the_api_runs_in_a_real_cell(e2e):
    status, b = e2e.http("POST", "/v1/builds", {"argv": ["sh", "-c", "echo hello; uname -r"]})
    assert status == 201, b
    done = e2e.wait(b["id"], {"succeeded", "failed", "cancelled"})
    assert (done["state"], done["exit_code"], done["box"], done["attempts"]) == \
        ("succeeded", 0, "e2e-box", 1), done
    assert done["cell"].startswith("c")
    status, log = e2e.http("GET", f"/v1/builds/{b['id']}/logs")
    hello, kernel = log.decode().split()
    assert hello == "hello" and kernel != os.uname().release  # it ran in the guest's kernel
    e2e.box.wait_pool_full()


def test_control_plane_restart_mid_build(e2e):
    e2e.box.wait_pool_full()
    script = "echo one; sleep 1.5; echo two; exit 3"
    status, b = e2e.http("POST", "/v1/builds", {"argv": ["sh", "-c", script]})
    assert status == 201
    e2e.wait(b["id"], {"running"}, timeout=60)
    deadline = time.monotonic() + 30
    while e2e.http("GET", f"/v1/builds/{b['id']}/logs")[1] != b"one\n":  # "one" is stored, "two" not yet
        assert time.monotonic() < deadline, "the first line never reached the control plane"
        time.sleep(0.05)
    e2e.stop_control()            # the control plane goes away mid-build ...

    async def held():
        rec = e2e.link.records.get(b["id"])
        return rec is not None and rec.exit is not None, rec and list(rec.outbox)

    deadline = time.monotonic() + 30
    while not e2e.box.call(held())[0]:
        assert time.monotonic() < deadline, "the build did not end on the box"
        time.sleep(0.1)
    finished, outbox = e2e.box.call(held())
    assert [f["data"] for name, f in outbox if name == "build.output"] == [b"two\n"]  # held, not lost
    e2e.start_control()           # ... and comes back on the same state file
    done = e2e.wait(b["id"], {"succeeded", "failed", "cancelled"}, timeout=120)
    assert (done["state"], done["exit_code"], done["attempts"], done["lease"]) == ("failed", 3, 1, 1), done
    status, log = e2e.http("GET", f"/v1/builds/{b['id']}/logs")
    assert log == b"one\ntwo\n"
    assert e2e.link.connects >= 2
    deadline = time.monotonic() + 10
    while e2e.box.call(_records(e2e)):  # acknowledged: the box forgets it
        assert time.monotonic() < deadline
        time.sleep(0.1)


async def _records(e2e):
    return dict(e2e.link.records)


def test_a_harness_whose_start_fails_leaves_nothing(tmp_path):
    """The control plane cannot bind its box port (taken): start() fails after the box and its
    warm cells are up, and takes them down itself (make test once left a box's namespaces and
    cgroups behind this way)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: cells get cgroups")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port()))
        taken.listen()
        env = E2E(tmp_path, hive={"box_listen": f"127.0.0.1:{taken.getsockname()[1]}"})
        with pytest.raises(OSError, match="address already in use"):
            env.start()
    daemon = env.box.daemon
    assert daemon.network is not None and daemon.cgroups is not None  # it got as far as cells
    netns = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
    assert not [n for n in netns if daemon.network.tag in n]
    assert not [d for d in daemon.cgroups.parent_dirs() if d.exists()]
    assert not env.box.tmp.exists()
