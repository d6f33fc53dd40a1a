"""The hive's HTTP API against a real control plane (real aiohttp server on 127.0.0.1, real
store: every test on SQLite and on PostgreSQL): good paths, every refusal with its status and
message and no state change, signed GitHub webhooks, metrics."""

import asyncio
import hashlib
import hmac
import json

import aiohttp
import pytest
import uvloop

from hived.control.config import ConfigError, parse
from hived.control.server import ControlPlane

TOKENS = {"acme": "tok-acme-0123456789", "other": "tok-other-0123456789", "admin": "tok-admin-0123456789"}
SECRET = "webhook-secret"


def sha(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


STORE: dict = {}  # [hive] keys that select the store under test (this module's tests: both)


@pytest.fixture(autouse=True, params=["sqlite", "postgresql"])
def store_kind(request, monkeypatch):
    extra = {}
    if request.param == "postgresql":
        db = request.getfixturevalue("pg_database")
        monkeypatch.setenv("HIVED_DATABASE_PASSWORD", db.password)
        extra = {"database": db.url}
    monkeypatch.setattr(__import__(__name__), "STORE", extra)
    return request.param


def hive_config(tmp_path, name="t1", **hive):
    return parse({
        "hive": {"name": name, "state_dir": str(tmp_path / name), "api_listen": "127.0.0.1:0",
                 "box_listen": "127.0.0.1:0", "heartbeat_s": 0.1, "box_lost_s": 1.0, "max_body_bytes": 4096,
                 **STORE, **hive},
        "shapes": {"small": {}, "large": {}},
        "customers": {"acme": {"shapes": ["small"], "api_tokens_sha256": [sha(TOKENS["acme"])]},
                      "other": {"api_tokens_sha256": [sha(TOKENS["other"])]}},
        "admin": {"api_tokens_sha256": [sha(TOKENS["admin"])]},
        "boxes": {"box-a": {"token_sha256": sha("box-a-token")},
                  "box-b": {"token_sha256": sha("box-b-token")}},
        "repos": {"acme/web": {"customer": "acme", "secret": SECRET, "command": ["make", "test"],
                               "branches": ["main"]}},
    }, "test")


def run(coro_fn, timeout=60):
    async def main():
        return await asyncio.wait_for(coro_fn(), timeout)
    return uvloop.run(main())


class Hive:
    """A control plane in this test's event loop, and an HTTP client for it."""

    def __init__(self, config) -> None:
        self.cp = ControlPlane(config)

    async def __aenter__(self):
        await self.cp.start()
        self.base = f"http://127.0.0.1:{self.cp.api_port}"
        self.http = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc):
        await self.http.close()
        await self.cp.stop()

    async def call(self, method, path, *, token="acme", body=None, raw=None, headers=None):
        h = dict(headers or {})
        if token:
            h["Authorization"] = f"Bearer {TOKENS.get(token, token)}"
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        async with self.http.request(method, self.base + path, data=data, headers=h) as r:
            text = await r.text()
            try:
                return r.status, json.loads(text)
            except ValueError:
                return r.status, text

    def counts(self):
        return self.cp.store.count_by_state()


GOOD = {"shape": "small", "argv": ["echo", "hi"], "env": {"A": "1"}, "timeout_s": 30}


def test_submit_get_cancel(tmp_path):
    async def main():
        async with Hive(hive_config(tmp_path)) as h:
            status, b = await h.call("POST", "/v1/builds", body=GOOD)
            assert status == 201, b
            assert b["id"].startswith("t1_") and b["state"] == "queued" and b["customer"] == "acme"
            assert b["env_keys"] == ["A"] and "env" not in b  # values may be secrets
            status, got = await h.call("GET", f"/v1/builds/{b['id']}")
            assert status == 200 and got["argv"] == ["echo", "hi"]
            status, got = await h.call("GET", f"/v1/builds/{b['id']}", token="admin")
            assert status == 200
            status, c = await h.call("POST", f"/v1/builds/{b['id']}/cancel")
            assert status == 202 and c["state"] == "cancelled", c
            status, again = await h.call("POST", f"/v1/builds/{b['id']}/cancel")
            assert status == 409 and again["error"]["message"] == f"build {b['id']} already cancelled; " \
                                                                 "nothing to cancel"
            # An admin token names the customer; the shape defaults to the customer's first.
            status, b2 = await h.call("POST", "/v1/builds", token="admin",
                                      body={"customer": "other", "argv": ["true"]})
            assert status == 201 and b2["shape"] == "small" and b2["customer"] == "other"
    run(main)


def test_idempotency_key(tmp_path):
    async def main():
        async with Hive(hive_config(tmp_path)) as h:
            s1, a = await h.call("POST", "/v1/builds", body=GOOD, headers={"Idempotency-Key": "k-1"})
            s2, b = await h.call("POST", "/v1/builds", body=GOOD, headers={"Idempotency-Key": "k-1"})
            assert (s1, s2, a["id"]) == (201, 200, b["id"])
            assert h.counts()["queued"] == 1
    run(main)


BAD = [
    # (token, body or raw bytes, status, code, message fragment)
    (None, GOOD, 401, "unauthorized", "missing `Authorization: Bearer <token>` header"),
    ("not-a-token", GOOD, 401, "unauthorized", "API token not recognised by hive t1"),
    ("acme", b"{not json", 400, "bad_json", "request body is not valid JSON: Expecting property name "
                                            "enclosed in double quotes at line 1 column 2"),
    ("acme", b"", 400, "bad_json", "request body is empty"),
    ("acme", b"[1, 2]", 400, "bad_json", "request body must be a JSON object, not list"),
    ("acme", {**GOOD, "shape": "huge"}, 400, "unknown_shape",
     "unknown shape 'huge': hive t1 offers small, large"),
    ("acme", {**GOOD, "shape": "large"}, 400, "unknown_shape", "customer 'acme' may not use shape 'large'"),
    ("admin", {**GOOD, "customer": "nobody"}, 400, "unknown_customer",
     "unknown customer 'nobody' in hive t1"),
    ("admin", GOOD, 400, "bad_field", "`customer` is required with an admin token"),
    ("acme", {**GOOD, "customer": "other"}, 403, "forbidden",
     "this token belongs to customer 'acme', not 'other'"),
    ("acme", {**GOOD, "argv": []}, 400, "bad_field", "`argv` must be a non-empty list of strings"),
    ("acme", {**GOOD, "argv": "make"}, 400, "bad_field", "`argv` must be a non-empty list of strings"),
    ("acme", {**GOOD, "colour": "red"}, 400, "bad_field", "unknown field 'colour'"),
    ("acme", {**GOOD, "timeout_s": -1}, 400, "bad_field", "`timeout_s` must be a number of seconds 0..86400"),
    ("acme", {**GOOD, "env": {"1BAD": "x"}}, 400, "bad_field", "`env`: '1BAD' is not a valid variable name"),
    ("acme", {**GOOD, "cwd": "relative"}, 400, "bad_field", "`cwd` must be an absolute path"),
    ("acme", {**GOOD, "options": {"secure_compute": "acme-private"}}, 400, "secure_compute_unavailable",
     "customer 'acme' has no Secure Compute network 'acme-private' in hive t1 (theirs: none)"),
    ("acme", {**GOOD, "options": {"secure_compute": True}}, 400, "bad_field",
     "`options.secure_compute` must be the name of a Secure Compute network"),
    ("acme", {**GOOD, "options": {"retries": 99}}, 400, "bad_field",
     "`options.retries` must be an integer 0..10"),
    ("acme", {**GOOD, "options": {"rev": "main"}}, 400, "bad_field",
     "`options.rev` needs `options.repo` (the repository's URL)"),
    ("acme", {**GOOD, "options": {"image": ["debian"]}}, 400, "bad_field",
     "`options.image` must be a string of at most 512 characters"),
    ("acme", {**GOOD, "argv": ["x" * 5000]}, 413, "body_too_large",
     "request body of 5068 bytes is over this hive's limit of 4096 bytes"),
]


@pytest.mark.parametrize("token,body,status,code,message", BAD,
                         ids=[f"{b[2]}-{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_requests_are_refused_precisely_and_change_nothing(tmp_path, token, body, status, code, message):
    async def main():
        async with Hive(hive_config(tmp_path)) as h:
            before = h.counts()
            raw = body if isinstance(body, bytes) else None
            got_status, got = await h.call("POST", "/v1/builds", token=token, raw=raw,
                                           body=None if raw is not None else body)
            assert got_status == status, got
            assert got["error"]["code"] == code
            assert message in got["error"]["message"], got["error"]["message"]
            assert h.counts() == before
    run(main)


def test_oversize_chunked_body_is_413(tmp_path):
    async def main():
        async with Hive(hive_config(tmp_path)) as h:
            async def gen():
                for _ in range(10):
                    yield b"x" * 1024
            async with h.http.post(h.base + "/v1/builds", data=gen(),
                                   headers={"Authorization": f"Bearer {TOKENS['acme']}"}) as r:
                body = await r.json()
            assert r.status == 413 and body["error"]["code"] == "body_too_large"
            assert "limit of 4096 bytes" in body["error"]["message"]
            assert h.counts()["queued"] == 0
    run(main)


def test_builds_of_other_customers_and_unknown_ids_are_404(tmp_path):
    async def main():
        async with Hive(hive_config(tmp_path)) as h:
            _, b = await h.call("POST", "/v1/builds", body=GOOD)
            for method, path in (("GET", f"/v1/builds/{b['id']}"), ("GET", f"/v1/builds/{b['id']}/logs"),
                                 ("POST", f"/v1/builds/{b['id']}/cancel")):
                status, err = await h.call(method, path, token="other")
                assert status == 404 and err["error"]["message"] == f"no build {b['id']!r} in hive t1"
            status, err = await h.call("GET", "/v1/builds/t1_nope")
            assert status == 404 and err["error"]["code"] == "not_found"
            status, err = await h.call("GET", "/v2/anything")
            assert status == 404 and err["error"]["message"] == "Not Found: GET /v2/anything"
            assert h.counts()["queued"] == 1 and h.counts()["cancelled"] == 0
    run(main)


def push(ref="refs/heads/main", sha_="a" * 40, repo="acme/web"):
    return json.dumps({"ref": ref, "after": sha_, "deleted": False,
                       "repository": {"full_name": repo, "clone_url": f"https://github.com/{repo}.git"},
                       "pusher": {"name": "dev"}}).encode()


def sign(body: bytes, secret=SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def test_github_push_with_a_good_signature_starts_the_repos_build(tmp_path):
    async def main():
        async with Hive(hive_config(tmp_path)) as h:
            body = push()
            headers = {"X-GitHub-Event": "push", "X-Hub-Signature-256": sign(body),
                       "X-GitHub-Delivery": "d-1", "Content-Type": "application/json"}
            status, b = await h.call("POST", "/v1/webhooks/github", token=None, raw=body, headers=headers)
            assert status == 201, b
            assert (b["customer"], b["argv"], b["source"]) == ("acme", ["make", "test"], "github")
            build = h.cp.store.get_build(b["id"])
            assert build.env["HIVED_GIT_SHA"] == "a" * 40 and build.env["HIVED_GIT_REF"] == "refs/heads/main"
            # The box checks the pushed commit out of its mirror and starts the build there.
            assert build.options == {"repo": "https://github.com/acme/web.git", "rev": "a" * 40}
            # GitHub redelivers: the same build, not a second one.
            status, again = await h.call("POST", "/v1/webhooks/github", token=None, raw=body, headers=headers)
            assert status == 200 and again["id"] == b["id"]
            # Pushes to other branches and pings are answered, not built.
            other = push(ref="refs/heads/feature")
            status, r = await h.call("POST", "/v1/webhooks/github", token=None, raw=other,
                                     headers={"X-GitHub-Event": "push", "X-Hub-Signature-256": sign(other)})
            assert status == 202 and "not one of the branches" in r["ignored"]
            ping = json.dumps({"zen": "hi", "repository": {"full_name": "acme/web"}}).encode()
            status, r = await h.call("POST", "/v1/webhooks/github", token=None, raw=ping,
                                     headers={"X-GitHub-Event": "ping", "X-Hub-Signature-256": sign(ping)})
            assert status == 200 and r["ok"]
            assert h.counts()["queued"] == 1
    run(main)


WEBHOOK_BAD = [
    ({"X-GitHub-Event": "push"}, push(), 401, "missing X-Hub-Signature-256 header"),
    ({"X-GitHub-Event": "push", "X-Hub-Signature-256": sign(push(), "wrong-secret")}, push(), 401,
     "X-Hub-Signature-256 does not match the body for 'acme/web'"),
    ({"X-GitHub-Event": "push", "X-Hub-Signature-256": sign(push())}, push(sha_="b" * 40), 401,
     "does not match the body"),  # body changed on the way
    ({"X-GitHub-Event": "push", "X-Hub-Signature-256": "sha1=abc"}, push(), 401,
     "X-Hub-Signature-256 must be `sha256=` and 64 hex digits"),
    ({"X-Hub-Signature-256": sign(push())}, push(), 400, "missing X-GitHub-Event header"),
    ({"X-GitHub-Event": "push", "X-Hub-Signature-256": sign(push(repo="evil/x"))}, push(repo="evil/x"), 404,
     "no webhook configured for repository 'evil/x' in hive t1"),
    ({"X-GitHub-Event": "push", "X-Hub-Signature-256": sign(b"{oops")}, b"{oops", 400,
     "request body is not valid JSON"),
]


@pytest.mark.parametrize("headers,body,status,message", WEBHOOK_BAD,
                         ids=[str(i) for i in range(len(WEBHOOK_BAD))])
def test_github_webhook_refusals(tmp_path, headers, body, status, message):
    async def main():
        async with Hive(hive_config(tmp_path)) as h:
            got_status, got = await h.call("POST", "/v1/webhooks/github", token=None, raw=body,
                                           headers=headers)
            assert got_status == status, got
            assert message in got["error"]["message"], got
            assert sum(h.counts().values()) == 0
    run(main)


def test_metrics(tmp_path):
    async def main():
        async with Hive(hive_config(tmp_path)) as h:
            await h.call("POST", "/v1/builds", body=GOOD)
            async with h.http.get(h.base + "/metrics") as r:
                text = await r.text()
            assert 'hived_control_builds{state="queued"} 1.0' in text
            assert 'hived_control_queue_length{shape="small"} 1.0' in text
            assert "hived_control_boxes_connected 0.0" in text
            assert "hived_control_schedule_seconds_bucket" in text
            status, health = await h.call("GET", "/healthz", token=None)
            assert status == 200 and health["queue"] == {"small": 1}
    run(main)


def test_github_push_of_a_secure_compute_repo_builds_on_its_network(tmp_path):
    data = {
        "hive": {"name": "t1", "state_dir": str(tmp_path / "t1"), "api_listen": "127.0.0.1:0",
                 "box_listen": "127.0.0.1:0", "heartbeat_s": 0.1, "box_lost_s": 1.0},
        "shapes": {"small": {}},
        "customers": {"acme": {"api_tokens_sha256": [sha(TOKENS["acme"])]}},
        "networks": {"acme-private": {"customer": "acme", "connector_tokens_sha256": [sha("c")],
                                      "tunnel_subnet": "100.96.0.0/24"}},
        "repos": {"acme/web": {"customer": "acme", "secret": SECRET, "command": ["make"],
                               "secure_compute": "acme-private"}},
    }
    cfg = parse(data, "test")
    assert cfg.repos["acme/web"].secure_compute == "acme-private"
    assert cfg.customers["acme"].secure_networks == ("acme-private",)

    async def main():
        async with Hive(cfg) as h:
            body = push()
            status, b = await h.call("POST", "/v1/webhooks/github", token=None, raw=body,
                                     headers={"X-GitHub-Event": "push", "X-Hub-Signature-256": sign(body)})
            assert status == 201, b
            assert h.cp.store.get_build(b["id"]).options["secure_compute"] == "acme-private"
    run(main)
    data["repos"]["acme/web"]["secure_compute"] = "someone-elses"
    with pytest.raises(ConfigError, match=r"repos.acme/web.secure_compute: 'someone-elses' is not a "
                                          r"\[networks.NAME\] of customer 'acme'"):
        parse(data, "test")
    data["repos"]["acme/web"]["secure_compute"] = ""
    data["networks"]["acme-private"]["tunnel_subnet"] = "100.96.0.0/31"
    with pytest.raises(ConfigError, match="tunnel_subnet: 100.96.0.0/31 is too small"):
        parse(data, "test")


def test_a_build_with_a_checkout_is_recorded_where_it_runs(tmp_path):
    async def main():
        async with Hive(hive_config(tmp_path)) as h:
            status, b = await h.call("POST", "/v1/builds", body=dict(GOOD, options={"repo": "https://x/y.git"}))
            assert status == 201 and b["cwd"] == "/workspace"  # the box runs it in the checkout
            status, b = await h.call("POST", "/v1/builds", body=dict(GOOD, cwd="/work/sub",
                                                                     options={"repo": "https://x/y.git"}))
            assert status == 201 and b["cwd"] == "/work/sub"  # one it names is kept
            status, b = await h.call("POST", "/v1/builds", body=GOOD)
            assert status == 201 and b["cwd"] == "/work"      # no checkout: the build's home
            status, b = await h.call("POST", "/v1/webhooks/github", token=None, raw=push(), headers={
                "X-GitHub-Event": "push", "X-Hub-Signature-256": sign(push())})
            assert status == 201 and b["cwd"] == "/workspace", b
    run(main)
