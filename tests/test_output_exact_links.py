"""Every byte arrives when the way is disturbed, and what is cut on purpose says so.

Real parts: a real box with QEMU cells linked to a real control plane (in this process, as
tests/test_control_e2e.py does), the HTTP API, `git daemon` for webhook builds. The build is
the seeded writer of tests/test_output_exact.py; a SHA-256 per stream is compared.
"""

import asyncio
import base64
import json
import os
import secrets
import time
import urllib.request

import pytest
from test_control_api import TOKENS, sign
from test_control_e2e import E2E
from test_output_exact import WRITER, digest, expected
from test_repos_support import GitDaemon, TestRepo

pytestmark = [pytest.mark.vm, pytest.mark.root]

OUTPUT_LIMIT = 3_000_000
LOG_MAX = 2_500_000
SHAPES = {"small": {"vcpus": 1, "memory_mib": 384, "scratch_mib": 256, "pool_target": 1,
                    "output_limit": OUTPUT_LIMIT}}
WEBHOOK_SECRET = "s3cret-" + secrets.token_hex(4)
WEBHOOK_PIECES = [[1, 300_000, 11], [2, 5_000, 12], [1, 7, 13], [2, 4, 14]]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root: cells get cgroups")
    tmp = tmp_path_factory.mktemp("exact")
    (tmp / "git").mkdir()
    repo = TestRepo(tmp / "git" / "proj")
    commit = repo.commit({"gen.py": WRITER, "pieces.json": json.dumps(WEBHOOK_PIECES)})
    with GitDaemon(tmp / "git") as daemon:
        e2e = E2E(tmp, hive={"log_max_bytes": LOG_MAX}, shapes=SHAPES,
                  box={"repos_dir": str(tmp / "repos"), "source_slot_mib": 64},
                  repos={"acme/proj": {"customer": "acme", "secret": WEBHOOK_SECRET, "url": daemon.url("proj"),
                                       "command": ["sh", "-c", 'exec python3 gen.py "$(cat pieces.json)"']}})
        e2e.start()
        try:
            yield {"e2e": e2e, "commit": commit}
        finally:
            e2e.stop()


def submit(e2e, pieces) -> str:
    status, b = e2e.http("POST", "/v1/builds", {"argv": ["python3", "-c", WRITER, json.dumps(pieces)]})
    assert status == 201, b
    return b["id"]


def log_streams(e2e, build_id: str) -> tuple[dict, list, dict]:
    """Per stream bytes, the markers, and the build, from a following ndjson read."""
    req = urllib.request.Request(f"http://127.0.0.1:{e2e.api_port}/v1/builds/{build_id}/logs?format=ndjson"
                                 "&follow=1", headers={"Authorization": f"Bearer {TOKENS['acme']}"})
    with urllib.request.urlopen(req, timeout=600) as r:
        records = [json.loads(line) for line in r.read().splitlines()]
    out = {"stdout": b"", "stderr": b""}
    markers = []
    for rec in records:
        if "data_b64" in rec:
            data = base64.b64decode(rec["data_b64"])
            if rec["stream"] == "hived":
                markers.append(data.decode())
            else:
                out[rec["stream"]] += data
    assert records[-1].get("end"), records[-1]
    return out, markers, records[-1]["build"]


def assert_exact(e2e, build_id: str, pieces) -> dict:
    out, markers, build = log_streams(e2e, build_id)
    want = expected(pieces)
    assert (build["state"], markers) == ("succeeded", []), (build, markers)
    assert (digest(out["stdout"]), digest(out["stderr"])) == (digest(want[1]), digest(want[2]))
    assert build["log_bytes"] == len(want[1]) + len(want[2])
    return build


def metric(e2e, name: str, reason: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{e2e.api_port}/metrics", timeout=30).read().decode()
    for line in text.splitlines():
        if line.startswith(f'{name}{{reason="{reason}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"{name}{{reason={reason}}} not in /metrics")


def push(e2e, sha: str) -> dict:
    body = json.dumps({"ref": "refs/heads/main", "after": sha, "deleted": False,
                       "repository": {"full_name": "acme/proj", "clone_url": "https://example.invalid/proj.git"}
                       }).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{e2e.api_port}/v1/webhooks/github", data=body, method="POST",
                                 headers={"X-GitHub-Event": "push", "X-Hub-Signature-256": sign(body, WEBHOOK_SECRET),
                                          "X-GitHub-Delivery": secrets.token_hex(8)})
    with urllib.request.urlopen(req, timeout=60) as r:
        b = json.loads(r.read())
    assert b["source"] == "github"
    return b


def test_webhook_build_output_is_exact(world):
    e2e = world["e2e"]
    b = push(e2e, world["commit"])
    e2e.wait(b["id"], {"succeeded", "failed", "cancelled"}, timeout=300)
    build = assert_exact(e2e, b["id"], WEBHOOK_PIECES)
    assert build["cwd"] == "/workspace"  # where it ran: the checkout (gen.py was found there)


def test_push_of_a_missing_commit_fails_once_with_its_reason(world):
    e2e = world["e2e"]
    missing = "f" * 40
    b = push(e2e, missing)
    done = e2e.wait(b["id"], {"succeeded", "failed", "cancelled"}, timeout=300)
    assert (done["state"], done["reason"], done["attempts"]) == ("failed", "spawn_failed", 1), done
    assert missing in done["message"] and "does not exist" in done["message"], done["message"]


def _wait_logged(e2e, build_id: str, at_least: int, timeout=120) -> None:
    deadline = time.monotonic() + timeout
    while e2e.cp.store.get_build(build_id).log_bytes < at_least:
        assert time.monotonic() < deadline, "output did not reach the control plane"
        time.sleep(0.02)


def stall_then(e2e, cut) -> None:
    """The control plane stops reading its box link for a moment (the box keeps writing: its
    frames wait in the sockets), then `cut` runs: whatever was in flight is lost, as on a real
    cut, and only what the box kept and sends again can fill the hole."""
    async def stall():
        e2e.cp.links["e2e-box"].channel.transport.pause_reading()
        await asyncio.sleep(1.5)
        cut()
    e2e.box.call(stall())


def test_control_link_dropped_mid_build_loses_nothing(world):
    e2e = world["e2e"]
    e2e.box.wait_pool_full()
    pieces = [[1, 400_000, 21], [2, 3, 22], [1, 600_000, 23], [2, 100_000, 24, 2.0], [1, 50_000, 25], [2, 4, 26]]
    build_id = submit(e2e, pieces)
    _wait_logged(e2e, build_id, 1)
    connects = e2e.link.connects
    stall_then(e2e, lambda: e2e.cp.links["e2e-box"].channel.transport.abort())
    e2e.wait(build_id, {"succeeded", "failed", "cancelled"}, timeout=300)
    assert e2e.link.connects > connects
    assert_exact(e2e, build_id, pieces)
    assert metric(e2e, "hived_output_gaps_total", "sequence") == 0


def test_control_plane_restart_mid_build_loses_nothing(world):
    e2e = world["e2e"]
    e2e.box.wait_pool_full()
    pieces = [[1, 700_000, 31], [2, 5, 32, 1.0], [1, 500_000, 33, 1.5], [2, 70_000, 34], [1, 3, 35]]
    build_id = submit(e2e, pieces)
    _wait_logged(e2e, build_id, 100_000)
    stall_then(e2e, lambda: None)
    e2e.stop_control()  # what it had not read yet is gone with it
    time.sleep(1.0)
    e2e.start_control()
    e2e.wait(build_id, {"succeeded", "failed", "cancelled"}, timeout=300)
    build = assert_exact(e2e, build_id, pieces)
    assert build["attempts"] == 1
    assert metric(e2e, "hived_output_gaps_total", "sequence") == 0


def test_cuts_on_purpose_say_how_much_and_why(world):
    """Over the hive's log cap (LOG_MAX) and then over the shape's output limit (OUTPUT_LIMIT)."""
    e2e = world["e2e"]
    e2e.box.wait_pool_full()
    pieces = [[1, 4_000_000, 41], [2, 4, 42]]
    build_id = submit(e2e, pieces)
    e2e.wait(build_id, {"succeeded", "failed", "cancelled"}, timeout=300)
    out, markers, build = log_streams(e2e, build_id)
    want = expected(pieces)
    assert (build["state"], build["reason"]) == ("failed", "output_limit"), build
    assert out["stdout"] == want[1][:LOG_MAX] and out["stderr"] == b""
    assert len(markers) == 3, markers
    assert f"log truncated at {LOG_MAX} bytes" in markers[0]
    assert f"output cut after {OUTPUT_LIMIT} bytes" in markers[1] and "output limit" in markers[1]
    assert f"{OUTPUT_LIMIT - LOG_MAX} bytes of output were cut" in markers[2]
    assert build["log_cut_bytes"] == OUTPUT_LIMIT - LOG_MAX
    assert build["log_bytes"] == LOG_MAX + sum(len(m.encode()) for m in markers)
    assert metric(e2e, "hived_output_cut_bytes_total", "log_max_bytes") >= OUTPUT_LIMIT - LOG_MAX
    assert metric(e2e, "hived_output_gaps_total", "output_limit") >= 1
