"""`hived router --config FILE`: a stateless front for several hives' APIs.

It picks the hive for a new build from rules on the customer and the build (customer
pinned to hives, region, shapes a hive offers, Secure Compute) and forwards the request
unchanged; everything about an existing build goes to the hive named in its id
(`<hive>_<hex>`). It keeps no state and checks no tokens: each hive authenticates. A hive
that does not answer only affects builds that must go to it; a customer pinned to several
hives falls over to the next one when a hive cannot be reached at all.

    [router]
    listen = "127.0.0.1:8000"
    max_body_bytes = 1048576
    connect_timeout_s = 2.0
    timeout_s = 30.0                  # per forwarded request (log follows are not cut)

    [hives.eu1]
    api = "http://10.0.0.1:8080"
    shapes = ["small", "large"]
    region = "eu"
    secure_networks = ["acme-private"]   # Secure Compute networks it has connectors for

    [customers.acme]
    hives = ["eu1", "eu2"]            # pinned, in order of preference (default: every hive)
    region = "eu"                     # optional: only hives of this region

    [repos."acme/web"]                # GitHub webhooks go where the repo's customer goes
    customer = "acme"
"""

import asyncio
import dataclasses
import json
import logging
import re
import signal
import sys
from pathlib import Path

import aiohttp
from aiohttp import web

from hived import tomlfile

log = logging.getLogger(__name__)

HIVE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
FORWARD_HEADERS = ("Authorization", "Content-Type", "Idempotency-Key", "X-GitHub-Event", "X-GitHub-Delivery",
                   "X-Hub-Signature-256", "User-Agent", "Accept")
BACK_HEADERS = ("Content-Type", "Location", "X-Hived-Build", "Cache-Control")


class RouterConfigError(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class HiveRule:
    name: str
    api: str
    shapes: tuple[str, ...] | None = None   # None: not said, do not filter on it
    region: str = ""
    secure_networks: tuple[str, ...] = ()   # Secure Compute networks the hive has connectors for


@dataclasses.dataclass(frozen=True)
class CustomerRule:
    name: str
    hives: tuple[str, ...] | None = None
    region: str = ""


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    host: str
    port: int
    hives: dict
    customers: dict
    repos: dict
    max_body_bytes: int = 1 << 20
    connect_timeout_s: float = 2.0
    timeout_s: float = 30.0


def parse(data: dict, source: str = "<config>") -> RouterConfig:
    def known(where, table, keys):
        for key in table:
            if key not in keys:
                raise RouterConfigError(f"{where}.{key}: unknown key (known: {', '.join(sorted(keys))})")

    known(source, data, {"router", "hives", "customers", "repos"})
    r = data.get("router", {})
    known(f"{source}: router", r, {"listen", "max_body_bytes", "connect_timeout_s", "timeout_s"})
    listen = r.get("listen", "127.0.0.1:8000")
    host, _, port = str(listen).rpartition(":")
    if not port.isdigit():
        raise RouterConfigError(f"{source}: router.listen: expected \"HOST:PORT\", got {listen!r}")
    hives = {}
    for name, raw in data.get("hives", {}).items():
        where = f"{source}: hives.{name}"
        if not HIVE_NAME.match(name):
            raise RouterConfigError(f"{where}: hive names are lower-case letters, digits and '-'")
        known(where, raw, {"api", "shapes", "region", "secure_networks"})
        api = raw.get("api")
        if not isinstance(api, str) or not api.startswith(("http://", "https://")):
            raise RouterConfigError(f"{where}.api: expected the hive's API URL, e.g. \"http://10.0.0.1:8080\"")
        shapes = raw.get("shapes")
        if shapes is not None and (not isinstance(shapes, list)
                                   or not all(isinstance(s, str) for s in shapes)):
            raise RouterConfigError(f"{where}.shapes: expected a list of shape names")
        secure = raw.get("secure_networks", [])
        if not isinstance(secure, list) or not all(isinstance(s, str) for s in secure):
            raise RouterConfigError(f"{where}.secure_networks: expected a list of Secure Compute network names")
        hives[name] = HiveRule(name, api.rstrip("/"), tuple(shapes) if shapes is not None else None,
                               str(raw.get("region", "")), tuple(secure))
    if not hives:
        raise RouterConfigError(f"{source}: no [hives.NAME] table: the router needs at least one hive")
    customers = {}
    for name, raw in data.get("customers", {}).items():
        where = f"{source}: customers.{name}"
        known(where, raw, {"hives", "region"})
        pinned = raw.get("hives")
        if pinned is not None:
            if not isinstance(pinned, list) or not pinned:
                raise RouterConfigError(f"{where}.hives: expected a non-empty list of hive names")
            for h in pinned:
                if h not in hives:
                    raise RouterConfigError(f"{where}.hives: {h!r} is not a [hives.NAME] of this router")
        customers[name] = CustomerRule(name, tuple(pinned) if pinned else None, str(raw.get("region", "")))
    repos = {}
    for name, raw in data.get("repos", {}).items():
        known(f"{source}: repos.{name}", raw, {"customer"})
        if not isinstance(raw.get("customer"), str):
            raise RouterConfigError(f"{source}: repos.{name}.customer: expected the customer's name")
        repos[name] = raw["customer"]
    return RouterConfig(host.strip("[]"), int(port), hives, customers, repos,
                        int(r.get("max_body_bytes", 1 << 20)), float(r.get("connect_timeout_s", 2.0)),
                        float(r.get("timeout_s", 30.0)))


def load(path) -> RouterConfig:
    return parse(tomlfile.read(path, RouterConfigError), str(path))


class NoHive(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def choose(config: RouterConfig, customer: str, *, shape: str = "", secure_compute: str = "",
           region: str = "") -> list[HiveRule]:
    """The hives a build may go to, best first. Pure: the rules and nothing else."""
    rule = config.customers.get(customer, CustomerRule(customer))
    names = rule.hives or tuple(config.hives)
    region = region or rule.region
    out, why = [], []
    for name in names:
        hive = config.hives[name]
        if shape and hive.shapes is not None and shape not in hive.shapes:
            why.append(f"{name} does not offer shape {shape!r}")
        elif secure_compute and secure_compute not in hive.secure_networks:
            why.append(f"{name} does not serve Secure Compute network {secure_compute!r}")
        elif region and hive.region != region:
            why.append(f"{name} is in region {hive.region or '(none)'!r}, not {region!r}")
        else:
            out.append(hive)
    if not out:
        pinned = f" (pinned to {', '.join(rule.hives)})" if rule.hives else ""
        raise NoHive(400, "no_hive", f"no hive can take this build for customer {customer!r}{pinned}: "
                     + "; ".join(why))
    return out


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


class Router:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.http: aiohttp.ClientSession | None = None

    async def start_client(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, connect=self.config.connect_timeout_s,
                                        sock_read=self.config.timeout_s)
        self.http = aiohttp.ClientSession(timeout=timeout, auto_decompress=False)

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()

    # -- forwarding --------------------------------------------------------------------------
    async def forward(self, request: web.Request, hives: list[HiveRule], body: bytes | None,
                      *, stream: bool = False) -> web.StreamResponse:
        headers = {k: request.headers[k] for k in FORWARD_HEADERS if k in request.headers}
        headers["X-Forwarded-For"] = request.remote or ""
        failures = []
        for hive in hives:
            url = hive.api + request.rel_url.path_qs
            try:
                resp = await self.http.request(request.method, url, data=body, headers=headers,
                                               timeout=aiohttp.ClientTimeout(
                                                   total=None, connect=self.config.connect_timeout_s,
                                                   sock_read=None if stream else self.config.timeout_s))
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                # Nothing reached the hive: safe to try the next one, even for a POST.
                log.warning("hive %s unreachable at %s: %s", hive.name, hive.api, exc)
                failures.append(f"hive {hive.name} ({hive.api}) is unreachable: {exc.__class__.__name__}")
                continue
            except (aiohttp.ClientError, TimeoutError) as exc:
                return _error(502, "hive_failed", f"hive {hive.name} ({hive.api}) failed mid-request: "
                              f"{exc.__class__.__name__}: {exc}")
            try:
                out = web.StreamResponse(status=resp.status)
                for k in BACK_HEADERS:
                    if k in resp.headers:
                        out.headers[k] = resp.headers[k]
                out.headers["X-Hived-Hive"] = hive.name
                await out.prepare(request)
                async for chunk in resp.content.iter_any():
                    await out.write(chunk)
                await out.write_eof()
                return out
            except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
                log.warning("hive %s: relaying %s failed: %s", hive.name, request.path, exc)
                return out
            finally:
                resp.release()
        return _error(503, "hive_unavailable", "; ".join(failures))

    async def read_json(self, request: web.Request) -> tuple[bytes, dict]:
        limit = self.config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise NoHive(413, "body_too_large", f"request body of {request.content_length} bytes is over "
                         f"the router's limit of {limit} bytes")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise NoHive(413, "body_too_large", f"request body is over the router's limit of {limit} bytes") \
                from None
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise NoHive(400, "bad_json", f"request body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise NoHive(400, "bad_json", "request body must be a JSON object")
        return raw, data

    # -- handlers -----------------------------------------------------------------------------
    async def create_build(self, request: web.Request) -> web.StreamResponse:
        try:
            if "Authorization" not in request.headers:
                raise NoHive(401, "unauthorized", "missing `Authorization: Bearer <token>` header")
            raw, data = await self.read_json(request)
            customer = data.get("customer")
            if not isinstance(customer, str) or not customer:
                raise NoHive(400, "bad_field", "the router needs `customer` in the body to choose a hive")
            options = data.get("options") if isinstance(data.get("options"), dict) else {}
            hives = choose(self.config, customer, shape=str(data.get("shape") or ""),
                           secure_compute=str(options.get("secure_compute") or ""),
                           region=str(options.get("region") or ""))
        except NoHive as exc:
            return _error(exc.status, exc.code, exc.message)
        return await self.forward(request, hives, raw)

    async def by_build(self, request: web.Request) -> web.StreamResponse:
        build_id = request.match_info["build_id"]
        hive_name = build_id.partition("_")[0]
        hive = self.config.hives.get(hive_name)
        if hive is None:
            return _error(404, "not_found", f"no build {build_id!r}: the router knows no hive {hive_name!r}")
        body = await request.read() if request.method == "POST" else None
        return await self.forward(request, [hive], body, stream=request.path.endswith("/logs"))

    async def github(self, request: web.Request) -> web.StreamResponse:
        try:
            raw, data = await self.read_json(request)
            repo = data.get("repository", {}).get("full_name") if isinstance(data.get("repository"), dict) \
                else None
            customer = self.config.repos.get(repo) if isinstance(repo, str) else None
            if customer is None:
                raise NoHive(404, "unknown_repository",
                             f"the router has no [repos] rule for repository {repo!r}")
            hives = choose(self.config, customer)
        except NoHive as exc:
            return _error(exc.status, exc.code, exc.message)
        return await self.forward(request, hives, raw)

    async def healthz(self, request: web.Request) -> web.Response:
        timeout = aiohttp.ClientTimeout(total=self.config.connect_timeout_s)

        async def probe(hive):
            try:
                async with self.http.get(hive.api + "/healthz", timeout=timeout) as r:
                    return hive.name, r.status == 200
            except (aiohttp.ClientError, TimeoutError):
                return hive.name, False
        results = dict(await asyncio.gather(*(probe(h) for h in self.config.hives.values())))
        return web.json_response({"ok": any(results.values()), "hives": results})


def make_app(config: RouterConfig) -> tuple[web.Application, Router]:
    router = Router(config)
    app = web.Application(client_max_size=config.max_body_bytes)
    app.router.add_post("/v1/builds", router.create_build)
    app.router.add_get("/v1/builds/{build_id}", router.by_build)
    app.router.add_get("/v1/builds/{build_id}/logs", router.by_build)
    app.router.add_post("/v1/builds/{build_id}/cancel", router.by_build)
    app.router.add_post("/v1/webhooks/github", router.github)
    app.router.add_get("/healthz", router.healthz)

    async def on_startup(app):
        await router.start_client()

    async def on_cleanup(app):
        await router.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app, router


async def start(config: RouterConfig):
    """Start serving; returns (runner, port)."""
    app, _ = make_app(config)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, reuse_address=True)
    await site.start()
    return runner, runner.addresses[-1][1]


async def serve(config: RouterConfig) -> int:
    runner, port = await start(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"ready {json.dumps({'api': f'http://{config.host}:{port}', 'hives': sorted(config.hives)})}",
          flush=True)
    try:
        await stop.wait()
        return 0
    finally:
        await runner.cleanup()


def main(config_path: str) -> int:
    """`hived router --config FILE`."""
    import uvloop

    from hived.errors import UserError

    try:
        config = load(Path(config_path))
    except RouterConfigError as exc:
        raise UserError(str(exc)) from None
    try:
        return uvloop.run(serve(config))
    except OSError as exc:
        raise UserError(f"router cannot listen on {config.host}:{config.port}: {exc}") from None


if __name__ == "__main__":
    import argparse

    from hived.errors import guard

    p = argparse.ArgumentParser(prog="hived router")
    p.add_argument("--config", required=True)
    args = p.parse_args()
    sys.exit(guard(lambda: main(args.config)))
