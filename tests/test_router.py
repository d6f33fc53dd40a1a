"""The router in front of two real hives (two control planes, separate state dirs, real
HTTP on 127.0.0.1), each with one simulated box (hived.control.simbox: the real protocol,
no cells; these tests are about routing, not cells). Routing by customer and by build
rules, and one hive down not stopping builds routed to the other."""

import asyncio
import hashlib
import hmac
import json

import aiohttp
import pytest
from test_control_api import TOKENS, run, sha

from hived import router
from hived.control.config import parse
from hived.control.server import ControlPlane
from hived.control.simbox import SimBox

TOK = {**TOKENS, "roaming": "tok-roaming-0123456789"}

def hive(tmp_path, name, shapes, *, secure=False):
    return parse({
        "hive": {"name": name, "state_dir": str(tmp_path / name), "api_listen": "127.0.0.1:0",
                 "box_listen": "127.0.0.1:0", "heartbeat_s": 0.1, "box_lost_s": 1.0},
        "shapes": {s: {} for s in shapes},
        "customers": {c: {"api_tokens_sha256": [sha(TOK[c])]} for c in ("acme", "other", "roaming")},
        "networks": {"roaming-private": {"customer": "roaming", "connector_tokens_sha256": [sha("conn")],
                                         "tunnel_subnet": "100.96.0.0/24"}} if secure else {},
        "boxes": {f"box-{name}": {"token_sha256": sha(f"box-{name}-token")}},
        "repos": {"acme/web": {"customer": "acme", "secret": "s3", "command": ["make"]}},
    }, name)


class Fleet:
    """Hives eu1 (small) and us1 (small, gpu, Secure Compute), a box each, and a router."""

    def __init__(self, tmp_path) -> None:
        self.tmp = tmp_path
        self.hives = {"eu1": ControlPlane(hive(tmp_path, "eu1", ["small"])),
                      "us1": ControlPlane(hive(tmp_path, "us1", ["small", "gpu"], secure=True))}

    async def __aenter__(self):
        self.boxes = {}
        for name, cp in self.hives.items():
            await cp.start()
            shapes = {s: 1 for s in cp.config.shapes}
            self.boxes[name] = await SimBox("127.0.0.1", cp.box_port, f"box-{name}", f"box-{name}-token",
                                            warm=shapes, auto=True).connect()
        self.config = router.parse({
            "router": {"listen": "127.0.0.1:0"},
            "hives": {
                "eu1": {"api": f"http://127.0.0.1:{self.hives['eu1'].api_port}", "shapes": ["small"],
                        "region": "eu"},
                "us1": {"api": f"http://127.0.0.1:{self.hives['us1'].api_port}", "shapes": ["small", "gpu"],
                        "region": "us", "secure_networks": ["roaming-private"]},
            },
            "customers": {"acme": {"hives": ["eu1"]}, "other": {"hives": ["us1"]},
                          "roaming": {"hives": ["eu1", "us1"]}},
            "repos": {"acme/web": {"customer": "acme"}},
        })
        self.runner, port = await router.start(self.config)
        self.base = f"http://127.0.0.1:{port}"
        self.http = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc):
        await self.http.close()
        await self.runner.cleanup()
        for box in self.boxes.values():
            await box.close()
        for cp in self.hives.values():
            if cp.store is not None and cp._box_server is not None and cp._box_server.is_serving():
                await cp.stop()

    async def call(self, method, path, token="acme", body=None, raw=None, headers=None):
        h = dict(headers or {})
        if token:
            h["Authorization"] = f"Bearer {TOK[token]}"
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        async with self.http.request(method, self.base + path, data=data, headers=h) as r:
            text = await r.text()
            try:
                return r.status, json.loads(text), r.headers.get("X-Hived-Hive")
            except ValueError:
                return r.status, text, r.headers.get("X-Hived-Hive")

    async def finished(self, build_id, token="acme"):
        for _ in range(500):
            status, b, _ = await self.call("GET", f"/v1/builds/{build_id}", token=token)
            if status == 200 and b["state"] in ("succeeded", "failed", "cancelled"):
                return b
            await asyncio.sleep(0.02)
        raise AssertionError(f"{build_id} did not finish: {b}")


def test_routes_by_customer_and_follows_build_ids(tmp_path):
    async def main():
        async with Fleet(tmp_path) as f:
            status, a, via = await f.call("POST", "/v1/builds",
                                          body={"customer": "acme", "argv": ["echo", "a"]})
            assert (status, via) == (201, "eu1") and a["id"].startswith("eu1_")
            status, o, via = await f.call("POST", "/v1/builds", token="other",
                                          body={"customer": "other", "argv": ["echo", "o"]})
            assert (status, via) == (201, "us1") and o["id"].startswith("us1_")
            assert f.hives["eu1"].store.get_build(a["id"]) is not None
            assert f.hives["us1"].store.get_build(a["id"]) is None
            assert (await f.finished(a["id"]))["state"] == "succeeded"
            assert (await f.finished(o["id"], token="other"))["box"] == "box-us1"
            status, text, via = await f.call("GET", f"/v1/builds/{a['id']}/logs?follow=1")
            assert (status, text, via) == (200, "echo a\n", "eu1")
            # The hive still authenticates: the router checks no tokens itself.
            status, err, _ = await f.call("GET", f"/v1/builds/{a['id']}", token="other")
            assert status == 404 and err["error"]["message"] == f"no build {a['id']!r} in hive eu1"
    run(main)


def test_routes_by_shape_secure_compute_and_region(tmp_path):
    async def main():
        async with Fleet(tmp_path) as f:
            # 'roaming' may use both hives, eu1 first: the build's needs decide.
            for body, expect in (({"shape": "gpu"}, "us1"), ({"options": {"secure_compute": "roaming-private"}}, "us1"),
                                 ({"options": {"region": "us"}}, "us1"), ({"shape": "small"}, "eu1"),
                                 ({}, "eu1")):
                status, b, via = await f.call("POST", "/v1/builds", token="roaming",
                                              body={"customer": "roaming", "argv": ["true"], **body})
                assert (status, via) == (201, expect), (body, status, b)
                assert b["id"].startswith(expect + "_")
            status, err, via = await f.call("POST", "/v1/builds",
                                            body={"customer": "acme", "shape": "gpu", "argv": ["true"]})
            assert status == 400 and via is None
            assert err["error"]["message"] == ("no hive can take this build for customer 'acme' "
                                               "(pinned to eu1): eu1 does not offer shape 'gpu'")
    run(main)


def test_one_hive_down_does_not_stop_the_other(tmp_path):
    async def main():
        async with Fleet(tmp_path) as f:
            await f.hives["eu1"].stop()
            status, err, _ = await f.call("POST", "/v1/builds", body={"customer": "acme", "argv": ["true"]})
            assert status == 503 and err["error"]["code"] == "hive_unavailable"
            assert err["error"]["message"].startswith("hive eu1 (http://127.0.0.1:")
            assert "is unreachable" in err["error"]["message"]
            status, o, via = await f.call("POST", "/v1/builds", token="other",
                                          body={"customer": "other", "argv": ["echo", "still"]})
            assert (status, via) == (201, "us1")
            assert (await f.finished(o["id"], token="other"))["state"] == "succeeded"
            # A customer pinned to both falls over to the one that answers.
            status, r, via = await f.call("POST", "/v1/builds", token="roaming",
                                          body={"customer": "roaming", "argv": ["echo", "r"]})
            assert (status, via) == (201, "us1"), r
            assert (await f.finished(r["id"], token="roaming"))["state"] == "succeeded"
            status, health, _ = await f.call("GET", "/healthz", token=None)
            assert health == {"ok": True, "hives": {"eu1": False, "us1": True}}
    run(main)


@pytest.mark.parametrize("path,body,status,message", [
    ("/v1/builds", {"argv": ["true"]}, 400, "the router needs `customer` in the body to choose a hive"),
    ("/v1/builds", b"{nope", 400, "request body is not valid JSON"),
    ("/v1/builds/zz9_0011/cancel", None, 404, "no build 'zz9_0011': the router knows no hive 'zz9'"),
])
def test_router_refusals(tmp_path, path, body, status, message):
    async def main():
        async with Fleet(tmp_path) as f:
            raw = body if isinstance(body, bytes) else None
            got, err, _ = await f.call("POST", path, body=None if raw else body, raw=raw)
            assert got == status and message in err["error"]["message"], err
            status2, err2, _ = await f.call("POST", "/v1/builds", token=None, body={"customer": "acme"})
            assert status2 == 401 and "Authorization" in err2["error"]["message"]
    run(main)


def test_webhook_goes_to_the_repos_hive(tmp_path):
    async def main():
        async with Fleet(tmp_path) as f:
            body = json.dumps({"ref": "refs/heads/main", "after": "c" * 40,
                               "repository": {"full_name": "acme/web"}}).encode()
            sig = "sha256=" + hmac.new(b"s3", body, hashlib.sha256).hexdigest()
            status, b, via = await f.call("POST", "/v1/webhooks/github", token=None, raw=body,
                                          headers={"X-GitHub-Event": "push", "X-Hub-Signature-256": sig})
            assert (status, via) == (201, "eu1") and b["argv"] == ["make"]
            status, err, via = await f.call("POST", "/v1/webhooks/github", token=None, raw=body,
                                            headers={"X-GitHub-Event": "push",
                                                     "X-Hub-Signature-256": "sha256=" + "0" * 64})
            assert (status, via) == (401, "eu1") and "does not match" in err["error"]["message"]
    run(main)
