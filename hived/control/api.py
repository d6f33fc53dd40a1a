"""The hive's HTTP API (aiohttp). Every refusal is a 4xx with a JSON body naming what was
wrong, and happens before anything is stored.

    POST /v1/builds                   submit (Bearer token; Idempotency-Key optional)
    GET  /v1/builds/{id}              the build
    GET  /v1/builds/{id}/logs         its output: ?follow=1 streams until it ends;
                                      ?format=ndjson for chunks + an end record; ?after=SEQ
    POST /v1/builds/{id}/cancel
    POST /v1/webhooks/github          a push event signed with X-Hub-Signature-256
    GET  /v1/hive                     (admin token) queue, builds by state, boxes
    GET  /healthz, GET /metrics

Errors: {"error": {"code": "...", "message": "..."}}.
"""

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import math
import re

from aiohttp import web

from hived.control.store import STREAM_MARKER, Build

log = logging.getLogger(__name__)

BUILD_FIELDS = {"customer", "shape", "argv", "env", "cwd", "timeout_s", "options"}
# region: a routing hint for hived router; image, repo, rev: what the build runs in and on (the box
# pulls the image and checks the revision out through its caches)
OPTION_FIELDS = {"retries", "secure_compute", "region", "image", "repo", "rev"}
OPTION_STRINGS = {"image": 512, "repo": 2048, "rev": 256}
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_ARGV, MAX_ITEM, MAX_ENV = 4096, 65536, 1024
STREAMS = {1: "stdout", 2: "stderr", STREAM_MARKER: "hived"}
KEEPALIVE_S = 15.0
WORKSPACE = "/workspace"  # a build's checkout, and its cwd unless it names another (hived/box/builds.py)
CONTROL = web.AppKey("control", object)


class ApiError(web.HTTPException):
    """A refusal with a JSON body: {"error": {"code", "message"}}."""

    def __init__(self, status: int, code: str, message: str, **extra) -> None:
        self.status_code = status
        body = {"error": {"code": code, "message": message, **extra}}
        super().__init__(text=json.dumps(body), content_type="application/json")


def _json(data, status: int = 200, **kw) -> web.Response:
    return web.Response(text=json.dumps(data), status=status, content_type="application/json", **kw)


@web.middleware
async def errors_as_json(request: web.Request, handler):
    try:
        return await handler(request)
    except ApiError:
        raise
    except web.HTTPRequestEntityTooLarge as exc:
        limit = request.app[CONTROL].config.max_body_bytes
        raise ApiError(413, "body_too_large", f"request body is over this hive's limit of {limit} bytes "
                       f"({exc.text})") from None
    except web.HTTPException as exc:
        if exc.status_code < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        raise ApiError(exc.status_code, code, f"{exc.reason}: {request.method} {request.path}") from None
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        raise ApiError(500, "internal", "the control plane failed on this request; see its log") from None


class Api:
    def __init__(self, control) -> None:
        self.cp = control
        cfg = control.config
        self.tokens: dict[str, str | None] = {}  # sha256 -> customer (None: admin, any customer)
        for cust in cfg.customers.values():
            for digest in cust.api_tokens_sha256:
                self.tokens[digest] = cust.name
        for digest in cfg.admin_tokens_sha256:
            self.tokens[digest] = None

    # -- helpers -------------------------------------------------------------------------------
    def auth(self, request: web.Request) -> tuple[bool, str | None]:
        """(authenticated, customer): customer None for an admin token."""
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise ApiError(401, "unauthorized", "missing `Authorization: Bearer <token>` header")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "unauthorized", "Authorization header must be `Bearer <token>`")
        digest = hashlib.sha256(token.strip().encode()).hexdigest()
        for known, customer in self.tokens.items():
            if hmac.compare_digest(known, digest):
                return True, customer
        raise ApiError(401, "unauthorized", "API token not recognised by hive " + self.cp.config.hive)

    async def body(self, request: web.Request) -> bytes:
        limit = self.cp.config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise ApiError(413, "body_too_large", f"request body of {request.content_length} bytes is over "
                           f"this hive's limit of {limit} bytes")
        return await request.read()

    @staticmethod
    def parse_json(raw: bytes) -> dict:
        if not raw:
            raise ApiError(400, "bad_json", "request body is empty: expected a JSON object")
        try:
            data = json.loads(raw)
        except UnicodeDecodeError as exc:
            raise ApiError(400, "bad_json", f"request body is not UTF-8: {exc}") from None
        except json.JSONDecodeError as exc:
            raise ApiError(400, "bad_json", f"request body is not valid JSON: {exc.msg} at line {exc.lineno} "
                           f"column {exc.colno}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "bad_json", f"request body must be a JSON object, not {type(data).__name__}")
        return data

    def visible_build(self, request: web.Request) -> Build:
        _, customer = self.auth(request)
        build_id = request.match_info["build_id"]
        build = self.cp.store.get_build(build_id)
        if build is None or (customer is not None and build.customer != customer):
            raise ApiError(404, "not_found", f"no build {build_id!r} in hive {self.cp.config.hive}")
        return build

    # -- builds ---------------------------------------------------------------------------------
    def validate(self, data: dict, token_customer: str | None) -> dict:
        cfg = self.cp.config
        unknown = sorted(set(data) - BUILD_FIELDS)
        if unknown:
            raise ApiError(400, "bad_field",
                           f"unknown field {unknown[0]!r} (known: {', '.join(sorted(BUILD_FIELDS))})")
        customer = data.get("customer", token_customer)
        if customer is None:
            raise ApiError(400, "bad_field", "`customer` is required with an admin token")
        if not isinstance(customer, str):
            raise ApiError(400, "bad_field", f"`customer` must be a string, not {type(customer).__name__}")
        if token_customer is not None and customer != token_customer:
            raise ApiError(403, "forbidden", f"this token belongs to customer {token_customer!r}, "
                           f"not {customer!r}")
        cust = cfg.customers.get(customer)
        if cust is None:
            raise ApiError(400, "unknown_customer", f"unknown customer {customer!r} in hive {cfg.hive}")
        allowed = list(cust.shapes or cfg.shapes)
        shape = data.get("shape") or allowed[0]
        if not isinstance(shape, str):
            raise ApiError(400, "bad_field", f"`shape` must be a string, not {type(shape).__name__}")
        if shape not in cfg.shapes:
            raise ApiError(400, "unknown_shape", f"unknown shape {shape!r}: hive {cfg.hive} offers "
                           f"{', '.join(cfg.shapes)}")
        if shape not in allowed:
            raise ApiError(400, "unknown_shape", f"customer {customer!r} may not use shape {shape!r} "
                           f"(allowed: {', '.join(allowed)})")
        argv = data.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise ApiError(400, "bad_field", "`argv` must be a non-empty list of strings, "
                           "e.g. [\"make\", \"test\"]")
        if len(argv) > MAX_ARGV or any(len(a.encode()) > MAX_ITEM for a in argv):
            raise ApiError(400, "bad_field",
                           f"`argv` is limited to {MAX_ARGV} items of {MAX_ITEM} bytes each")
        env = data.get("env", {})
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            raise ApiError(400, "bad_field", "`env` must be an object of strings")
        if len(env) > MAX_ENV:
            raise ApiError(400, "bad_field", f"`env` has {len(env)} entries; the limit is {MAX_ENV}")
        for k, v in env.items():
            if not ENV_NAME.match(k) or len(k) > 256 or len(v.encode()) > MAX_ITEM:
                raise ApiError(400, "bad_field", f"`env`: {k[:64]!r} is not a valid variable name "
                               "(letters, digits, _; not starting with a digit) or its value is too long")
        cwd = data.get("cwd", "/work")
        if not isinstance(cwd, str) or not cwd.startswith("/") or len(cwd) > 4096 or "\0" in cwd:
            raise ApiError(400, "bad_field", f"`cwd` must be an absolute path, got {cwd!r:.80}")
        timeout = data.get("timeout_s", 0)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or math.isnan(timeout) \
                or not 0 <= timeout <= 86400:
            raise ApiError(400, "bad_field", f"`timeout_s` must be a number of seconds 0..86400 "
                           f"(0: none), got {timeout!r}")
        options = data.get("options", {})
        if not isinstance(options, dict):
            raise ApiError(400, "bad_field", "`options` must be an object")
        bad = sorted(set(options) - OPTION_FIELDS)
        if bad:
            raise ApiError(400, "bad_field",
                           f"unknown option {bad[0]!r} (known: {', '.join(sorted(OPTION_FIELDS))})")
        retries = options.get("retries", 0)
        if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 10:
            raise ApiError(400, "bad_field", f"`options.retries` must be an integer 0..10, got {retries!r}")
        secure = options.get("secure_compute", "")
        if not isinstance(secure, str) or len(secure) > 64:
            raise ApiError(400, "bad_field", "`options.secure_compute` must be the name of a Secure Compute "
                           "network")
        region = options.get("region", "")
        if not isinstance(region, str) or len(region) > 64:
            raise ApiError(400, "bad_field", "`options.region` must be a short string")
        for key, limit in OPTION_STRINGS.items():
            value = options.get(key, "")
            if not isinstance(value, str) or len(value) > limit or any(c in value for c in "\n\r\0"):
                raise ApiError(400, "bad_field", f"`options.{key}` must be a string of at most {limit} characters")
        if options.get("rev") and not options.get("repo"):
            raise ApiError(400, "bad_field", "`options.rev` needs `options.repo` (the repository's URL)")
        if secure and secure not in cust.secure_networks:
            have = ", ".join(cust.secure_networks) or "none"
            raise ApiError(400, "secure_compute_unavailable",
                           f"customer {customer!r} has no Secure Compute network {secure!r} in hive {cfg.hive} "
                           f"(theirs: {have})")
        if not secure:
            options.pop("secure_compute", None)
        if options.get("repo") and cwd == "/work":
            cwd = WORKSPACE  # where the box runs a build with a checkout: the record says so
        return {"customer": customer, "shape": shape, "argv": argv, "env": env, "cwd": cwd,
                "timeout_s": float(timeout), "options": options}

    async def create_build(self, request: web.Request) -> web.Response:
        _, customer = self.auth(request)
        raw = await self.body(request)
        fields = self.validate(self.parse_json(raw), customer)
        key = request.headers.get("Idempotency-Key")
        if key is not None and not 0 < len(key) <= 128:
            raise ApiError(400, "bad_header", "Idempotency-Key must be 1..128 characters")
        return await self._submit(Build(id=self.cp.new_build_id(), submitted_at=self.cp.clock(),
                                        idem_key=key, source="api", **fields))

    async def _submit(self, build: Build) -> web.Response:
        build, created = await self.cp.submit(build)  # answered once the build is durable
        return _json(build.public(), 201 if created else 200,
                     headers={"Location": f"/v1/builds/{build.id}"})

    async def get_build(self, request: web.Request) -> web.Response:
        return _json(self.visible_build(request).public())

    async def cancel_build(self, request: web.Request) -> web.Response:
        build = self.visible_build(request)
        if build.terminal or not await self.cp.cancel(build.id):
            build = self.cp.store.get_build(build.id)
            raise ApiError(409, "already_finished",
                           f"build {build.id} already {build.state}; nothing to cancel")
        return _json(self.cp.store.get_build(build.id).public(), 202)

    async def logs(self, request: web.Request) -> web.StreamResponse:
        build = self.visible_build(request)
        q = request.query
        follow = q.get("follow", "0").lower() in ("1", "true", "yes")
        fmt = q.get("format", "raw")
        if fmt not in ("raw", "ndjson"):
            raise ApiError(400, "bad_query", f"format must be raw or ndjson, not {fmt!r}")
        try:
            after = int(q.get("after", "-1"))
        except ValueError:
            raise ApiError(400, "bad_query",
                           f"after must be an integer log seq, not {q['after']!r}") from None
        resp = web.StreamResponse(headers={
            "Content-Type": "application/x-ndjson" if fmt == "ndjson" else "application/octet-stream",
            "Cache-Control": "no-store", "X-Hived-Build": build.id})
        await resp.prepare(request)
        store = self.cp.store
        try:
            while True:
                event = self.cp.log_event(build.id)  # before reading: no change is missed
                chunks = store.read_log(build.id, after)
                for c in chunks:
                    after = c.seq
                    if fmt == "raw":
                        await resp.write(c.data)
                    else:
                        await resp.write(json.dumps({
                            "seq": c.seq, "stream": STREAMS.get(c.stream, str(c.stream)),
                            "data_b64": base64.b64encode(c.data).decode()}).encode() + b"\n")
                if chunks:
                    continue
                current = store.get_build(build.id)
                if not follow or current.terminal:
                    if fmt == "ndjson":
                        end = {"end": True, "build": current.public()}
                        await resp.write(json.dumps(end).encode() + b"\n")
                    break
                try:
                    await _wait(event, KEEPALIVE_S)
                except TimeoutError:
                    if request.transport is None or request.transport.is_closing():
                        break  # the follower went away while nothing happened
                    if fmt == "ndjson":
                        await resp.write(b'{"keepalive": true}\n')
            await resp.write_eof()
        except (ConnectionResetError, ConnectionError):
            pass  # the follower went away
        return resp

    # -- webhooks --------------------------------------------------------------------------------
    async def github(self, request: web.Request) -> web.Response:
        cfg = self.cp.config
        event = request.headers.get("X-GitHub-Event")
        if not event:
            raise ApiError(400, "bad_header", "missing X-GitHub-Event header: is this a GitHub webhook?")
        signature = request.headers.get("X-Hub-Signature-256")
        if not signature:
            raise ApiError(401, "bad_signature", "missing X-Hub-Signature-256 header: set a secret on the "
                           "webhook (content type application/json)")
        if not signature.startswith("sha256=") or len(signature) != 71:
            raise ApiError(401, "bad_signature", "X-Hub-Signature-256 must be `sha256=` and 64 hex digits")
        raw = await self.body(request)
        payload = self.parse_json(raw)
        repo_name = (payload.get("repository") or {}).get("full_name") \
            if isinstance(payload.get("repository"), dict) else None
        if not isinstance(repo_name, str):
            raise ApiError(400, "bad_payload", "payload has no repository.full_name")
        repo = cfg.repos.get(repo_name)
        if repo is None:
            raise ApiError(404, "unknown_repository", f"no webhook configured for repository {repo_name!r} "
                           f"in hive {cfg.hive}")
        expected = "sha256=" + hmac.new(repo.secret, raw, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            raise ApiError(401, "bad_signature", f"X-Hub-Signature-256 does not match the body for "
                           f"{repo_name!r}: wrong secret, or the body was changed on the way")
        if event == "ping":
            return _json({"ok": True, "repository": repo_name, "hive": cfg.hive})
        if event != "push":
            return _json({"ignored": f"event {event!r} is not handled (push and ping are)"}, 202)
        ref, sha = payload.get("ref"), payload.get("after")
        if not isinstance(ref, str) or not isinstance(sha, str):
            raise ApiError(400, "bad_payload", "push event without `ref` and `after`")
        if payload.get("deleted") or set(sha) == {"0"}:
            return _json({"ignored": f"{ref} was deleted"}, 202)
        branch = ref.removeprefix("refs/heads/")
        if repo.branches is not None and (not ref.startswith("refs/heads/") or branch not in repo.branches):
            return _json({"ignored": f"{ref} is not one of the branches built for {repo_name} "
                                     f"({', '.join(repo.branches)})"}, 202)
        r = payload["repository"]
        env = dict(repo.env, HIVED_GIT_REPOSITORY=repo_name, HIVED_GIT_REF=ref, HIVED_GIT_SHA=sha,
                   HIVED_GIT_URL=str(r.get("clone_url") or ""))
        delivery = request.headers.get("X-GitHub-Delivery", "")[:100]
        # The build runs in the pushed commit's tree: the box checks `sha` out of its mirror of the
        # repository (clone_url, or the repo's configured url) and starts the build there.
        options = {}
        url = repo.url or str(r.get("clone_url") or "")
        if url:
            options.update(repo=url, rev=sha)
        if repo.image:
            options["image"] = repo.image
        if repo.secure_compute:
            options["secure_compute"] = repo.secure_compute
        build = Build(id=self.cp.new_build_id(), customer=repo.customer, shape=repo.shape,
                      argv=list(repo.command), env=env, cwd=WORKSPACE if url else "/work", timeout_s=repo.timeout_s,
                      options=options, submitted_at=self.cp.clock(),
                      idem_key=f"github:{delivery}" if delivery else None, source="github")
        return await self._submit(build)

    # -- operators -------------------------------------------------------------------------------
    async def hive(self, request: web.Request) -> web.Response:
        _, customer = self.auth(request)
        if customer is not None:
            raise ApiError(403, "forbidden", "the hive's view is for admin tokens; this one belongs to "
                           f"customer {customer!r}")
        cp, sched = self.cp, self.cp.scheduler
        return _json({"hive": cp.config.hive, "shapes": sorted(cp.config.shapes),
                      "queue": sched.queue_lengths(), "builds_by_state": cp.store.count_by_state(),
                      "boxes_connected": sched.boxes_connected(), "boxes": sched.describe()["boxes"]})

    async def healthz(self, request: web.Request) -> web.Response:
        cfg = self.cp.config
        return _json({"ok": True, "hive": cfg.hive, "leader": self.cp.leading, "shapes": sorted(cfg.shapes),
                      "boxes_connected": self.cp.scheduler.boxes_connected(),
                      "queue": self.cp.scheduler.queue_lengths()})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.cp.metrics.render(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def _wait(event, timeout: float) -> None:
    await asyncio.wait_for(event.wait(), timeout)


def make_app(control) -> web.Application:
    api = Api(control)
    app = web.Application(client_max_size=control.config.max_body_bytes, middlewares=[errors_as_json])
    app[CONTROL] = control
    app.router.add_post("/v1/builds", api.create_build)
    app.router.add_get("/v1/builds/{build_id}", api.get_build)
    app.router.add_get("/v1/builds/{build_id}/logs", api.logs)
    app.router.add_post("/v1/builds/{build_id}/cancel", api.cancel_build)
    app.router.add_post("/v1/webhooks/github", api.github)
    app.router.add_get("/v1/hive", api.hive)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/metrics", api.metrics)
    return app


async def start_api(control, host: str, port: int):
    runner = web.AppRunner(make_app(control), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    return runner, runner.addresses[-1][1]
