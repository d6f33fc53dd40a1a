"""Client side of `hived run` and `hived status`, from what DIR/endpoints.json says.

`hived run` goes the way every build goes: the HTTP API (through the router, or straight to
one hive with --hive), `POST /v1/builds`, then `GET /v1/builds/{id}/logs?follow=1&format=ndjson`
writing each chunk to stdout or stderr as it comes, and the build's exit code at the end
(128+N for a signal; 125 when the build could not run, with the reason on stderr). Ctrl-C
cancels the build through the API and waits for its end; a second Ctrl-C stops waiting.

`hived status` asks the box (its Unix socket: cells, pools, builds it ran) and the hive
(`GET /v1/hive`: queue, builds by state, boxes).
"""

import asyncio
import base64
import contextlib
import json
import os
import secrets
import signal
import sys
from pathlib import Path

from hived.errors import EXIT_INFRA, UserError
from hived.protocol.channel import ChannelClosed, connect_unix
from hived.protocol.session import Session

INFRA_REASONS = ("cell_failed", "no_capacity", "infrastructure")
FOLLOW_RETRY_S = 60.0  # how long a broken log stream is retried (hived up may be restarting)
QUEUED_HINT_S = 30.0   # a build still queued this long gets one line on stderr saying why we wait


def endpoints(home: str) -> dict:
    path = Path(home) / "endpoints.json"
    try:
        ep = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"no hived running at {home} ({path} missing): start one with "
                        f"`hived up --home {home}`") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if not isinstance(ep, dict):
        raise UserError(f"cannot read {path}: not a JSON object")
    return ep


def _control_plane_dir(ep: dict) -> bool:
    """DIR is the state directory of a `hived control` (one hive's control plane), not of `hived up`."""
    return "hive" in ep and "api" in ep and "token" not in ep and "hives" not in ep


def _not_for_control(home: str, ep: dict, command: str, instead: str) -> UserError:
    return UserError(f"{home} is the state directory of `hived control` (hive {ep.get('hive')}, API "
                     f"{ep.get('api')}), not of `hived up`: `hived {command} --home` takes a `hived up` home; "
                     f"{instead}")


# -- hived run ---------------------------------------------------------------------------------
def run(home, argv, *, hive="", shape="", customer="", env=None, cwd="/work", timeout_s=0.0,
        verbose=False, image="", repo="", rev="", options: dict | None = None, apis=(), token="") -> int:
    """`apis`: the API URLs of one hive's control plane replicas (with `token`), instead of what
    the home's endpoints.json says."""
    import uvloop

    if apis:
        if not token:
            raise UserError("--api needs the customer's API token: --token-file FILE or $HIVED_API_TOKEN")
        if not customer:
            raise UserError("--api needs --customer (the customer the build belongs to)")
        bases = [_api_url(url, "--api") for url in apis]
        home = ""
    else:
        ep = endpoints(home)
        if _control_plane_dir(ep):
            raise _not_for_control(home, ep, "run", f"submit to this hive with POST {ep.get('api')}/v1/builds "
                                   "and a customer's API token (hived control token), or `hived run --api URL`")
        customer = customer or ep.get("customer", "local")
        bases, token = _api(ep, home, hive, customer)
    body = {"customer": customer, "argv": list(argv), "env": dict(env or {}), "cwd": cwd,
            "timeout_s": float(timeout_s)}
    if shape:
        body["shape"] = shape
    if rev and not repo:
        raise UserError("--rev needs --repo URL (the repository to check the revision out of)")
    options = {**(options or {}), **{k: v for k, v in (("image", image), ("repo", repo), ("rev", rev)) if v}}
    if options:
        body["options"] = options
    return uvloop.run(Run(bases, token, body, home, hive, verbose).main())


def _api_url(url, where: str) -> str:
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise UserError(f"{where}: expected an API URL like http://10.0.0.1:8080, got {url!r}")
    return url.rstrip("/")


def _api(ep: dict, home: str, hive: str, customer: str) -> tuple[list[str], str]:
    """(API base URLs, token) for a build of `customer`: the router, or one hive's own API. A
    hive of several control plane replicas lists each one's ("api": [URL, ...]); any of them
    takes builds and serves logs, and the next is tried when one fails."""
    if "api" not in ep:
        raise UserError(f"the hived up at {home} has no API (an older version): restart it "
                        f"with `hived up --home {home}`")
    base = ep["api"]
    if hive:
        hives = ep.get("hives", {})
        if hive not in hives:
            raise UserError(f"unknown hive {hive!r}: the hived up at {home} runs "
                            f"{', '.join(sorted(hives)) or 'none'}")
        base = hives[hive]["api"]
    token = ep.get("token") if customer == ep.get("customer") else ep.get("admin_token", ep.get("token"))
    if not token:
        raise UserError(f"{home}/endpoints.json has no API token: restart `hived up --home {home}`")
    where = f"{home}/endpoints.json: api"
    bases = [_api_url(url, where) for url in base] if isinstance(base, list) and base else [_api_url(base, where)]
    return bases, token


class Run:
    def __init__(self, bases: list[str], token: str, body: dict, home: str, hive: str, verbose: bool) -> None:
        self.bases = list(bases)
        self.turn = 0                # which of `bases` is asked: the next after a failure
        self.headers = {"Authorization": f"Bearer {token}"}
        self.body = body
        self.home = home
        self.hive = hive
        self.verbose = verbose
        self.build_id = ""
        self.interrupted = 0         # the signal that asked us to cancel (SIGINT, SIGTERM)
        self.cancel_task: asyncio.Task | None = None
        self.abandon = asyncio.Event()  # a second signal: stop waiting for the build
        self.http = None
        self.after = -1
        self.out = sys.stdout.buffer
        self.err = sys.stderr.buffer

    @property
    def base(self) -> str:
        return self.bases[self.turn % len(self.bases)]

    def _next_base(self, why: str) -> None:
        """Ask the next replica of the hive from now on (one of several: the leader may be gone)."""
        if len(self.bases) > 1:
            self.turn += 1
            if self.verbose:
                self.say(f"{why}: trying {self.base}")

    def say(self, text: str) -> None:
        self.err.write(f"hived: {text}\n".encode())
        self.err.flush()

    async def main(self) -> int:
        import aiohttp

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.on_signal, sig)
        timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=None)
        async with aiohttp.ClientSession(timeout=timeout) as self.http:
            work = loop.create_task(self._run())
            abandon = loop.create_task(self.abandon.wait())
            try:
                done, _ = await asyncio.wait({work, abandon}, return_when=asyncio.FIRST_COMPLETED)
                if work in done:
                    return work.result()
                self.say(f"stopped waiting; build {self.build_id or '(not submitted)'} was asked to cancel")
                return 128 + self.interrupted
            finally:
                if self.cancel_task is not None and not self.cancel_task.done():
                    await asyncio.wait({self.cancel_task}, timeout=5)  # let the cancel reach the hive
                for task in (work, abandon, self.cancel_task):
                    if task is not None and not task.done():
                        task.cancel()
                        with contextlib.suppress(BaseException):
                            await task

    def on_signal(self, sig: int) -> None:
        if self.interrupted:
            self.abandon.set()
            return
        self.interrupted = sig
        if self.build_id:
            self._cancel()
        # else: cancelled as soon as the submit answers with the build's id

    def _cancel(self) -> None:
        if self.cancel_task is None:
            self.say(f"cancelling build {self.build_id} (again to stop waiting)")
            self.cancel_task = asyncio.get_running_loop().create_task(self._post_cancel())

    async def _post_cancel(self) -> None:
        import aiohttp

        try:
            async with self.http.post(f"{self.base}/v1/builds/{self.build_id}/cancel", headers=self.headers) as r:
                if r.status not in (202, 409):  # 409: it ended meanwhile
                    self.say(f"cancel refused: {await _error_text(r)}")
        except aiohttp.ClientError as exc:
            self.say(f"could not cancel build {self.build_id}: {exc}")

    async def _run(self) -> int:
        try:
            build = await self._submit()
        except UserError as exc:
            self.say(str(exc))
            return 2
        except _Infra as exc:
            self.say(str(exc))
            return EXIT_INFRA
        self.build_id = build["id"]
        if self.verbose:
            self.say(f"build {self.build_id} submitted to hive {self.build_id.partition('_')[0]} "
                     f"({build['state']})")
        if self.interrupted:
            self._cancel()
        hint = asyncio.get_running_loop().create_task(self._queued_hint())
        try:
            end = await self._follow()
        except _Infra as exc:
            self.say(str(exc))
            return EXIT_INFRA
        finally:
            hint.cancel()
        return self._exit_code(end)

    async def _queued_hint(self) -> None:
        """The hive queues a build until a warm cell of its shape is free, for as long as it
        takes: if that is long, say so once (a pool that cannot boot cells looks like a hang)."""
        await asyncio.sleep(QUEUED_HINT_S)
        if self.after >= 0:
            return
        with contextlib.suppress(Exception):
            async with self.http.get(f"{self.base}/v1/builds/{self.build_id}", headers=self.headers) as r:
                b = await r.json()
            if b.get("state") == "queued":
                self.say(f"build {self.build_id} still queued after {QUEUED_HINT_S:g} s: no free warm cell of "
                         f"shape {b.get('shape')} yet (`hived status --home {self.home}` shows the pools; "
                         "Ctrl-C cancels)")

    async def _submit(self) -> dict:
        import aiohttp

        headers = dict(self.headers, **{"Idempotency-Key": secrets.token_hex(16)})
        attempts = max(3, len(self.bases) + 1)
        unreachable = 0  # replicas in a row that did not answer at all
        for attempt in range(attempts):  # the same Idempotency-Key: a retry never makes a second build
            url = f"{self.base}/v1/builds"
            try:
                async with self.http.post(url, json=self.body, headers=headers) as r:
                    if r.status in (200, 201):
                        return await r.json()
                    text = await _error_text(r)
                    if 400 <= r.status < 500:
                        raise UserError(f"the hive refused the build: {text}")
                    if attempt == attempts - 1 or len(self.bases) == 1:
                        raise _Infra(f"the build could not be submitted ({r.status}): {text}")
                    self._next_base(f"{self.base} answered {r.status}")
            except aiohttp.ClientConnectorError as exc:
                unreachable += 1
                if unreachable >= len(self.bases):
                    where = self.base if len(self.bases) == 1 else f"any of {', '.join(self.bases)}"
                    hint = f" (is `hived up --home {self.home}` still running?)" if self.home else ""
                    raise UserError(f"cannot reach the hive's API at {where}: {exc.os_error or exc}{hint}") from None
                self._next_base(f"cannot reach {self.base}")
                continue
            except (aiohttp.ClientError, TimeoutError) as exc:
                if attempt == attempts - 1:
                    raise _Infra(f"the build could not be submitted: {type(exc).__name__}: {exc}") from None
                self._next_base(f"{self.base}: {type(exc).__name__}")
            unreachable = 0
            await asyncio.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _follow(self) -> dict:
        """Stream the log until the end record; reconnect (from the last chunk) if the stream breaks."""
        import aiohttp

        retry_until = None
        last_error = ""
        while True:
            url = f"{self.base}/v1/builds/{self.build_id}/logs"
            params = {"follow": "1", "format": "ndjson", "after": str(self.after)}
            try:
                async with self.http.get(url, params=params, headers=self.headers) as r:
                    if r.status != 200:
                        text = await _error_text(r)
                        if r.status < 500:
                            raise _Infra(f"cannot follow build {self.build_id}: {text}")
                        raise aiohttp.ClientPayloadError(f"{r.status}: {text}")
                    retry_until = None
                    async for line in r.content:
                        end = self._line(line)
                        if end is not None:
                            return end
                last_error = "the log stream ended before the build did"
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            now = asyncio.get_running_loop().time()
            retry_until = retry_until or now + FOLLOW_RETRY_S
            if now > retry_until:
                raise _Infra(f"lost the hive before build {self.build_id} ended ({last_error}); "
                             f"`curl {self.base}/v1/builds/{self.build_id}` tells its fate later")
            await asyncio.sleep(0.5)
            self._next_base(f"following from {self.base}: {last_error}")
            self._reresolve()

    def _reresolve(self) -> None:
        """`hived up` may have restarted (new ports): follow it to where endpoints.json says."""
        if not self.home:
            return
        try:
            bases, token = _api(endpoints(self.home), self.home, self.hive, self.body["customer"])
        except (UserError, KeyError, TypeError):
            return
        if bases != self.bases:
            if self.verbose:
                self.say(f"the API moved to {', '.join(bases)}")
            self.bases, self.turn = bases, 0
        self.headers = {"Authorization": f"Bearer {token}"}

    def _line(self, line: bytes) -> dict | None:
        line = line.strip()
        if not line:
            return None
        rec = json.loads(line)
        if rec.get("end"):
            return rec["build"]
        if "data_b64" in rec:
            self.after = max(self.after, rec["seq"])
            data = base64.b64decode(rec["data_b64"])
            stream = self.out if rec.get("stream") == "stdout" else self.err  # stderr and "hived" notes
            try:
                stream.write(data)
                stream.flush()
            except BrokenPipeError:  # our reader went away (`| head`): the rest of that stream is dropped
                devnull = open(os.devnull, "wb")  # noqa: SIM115 (lives as long as the process)
                if stream is self.out:
                    self.out = devnull
                else:
                    self.err = devnull
        return None

    def _exit_code(self, b: dict) -> int:
        reason, message = b.get("reason") or "", b.get("message") or ""
        if self.verbose:
            self.say(f"build {b['id']} {b['state']} on box {b.get('box')} cell {b.get('cell')}: "
                     f"exit {b.get('exit_code')}, signal {b.get('signal')}, reason {reason or '-'}")
        if reason in INFRA_REASONS:
            self.say(f"build could not complete ({reason}): {message}")
            return EXIT_INFRA
        if self.interrupted and b["state"] == "cancelled":
            return 128 + self.interrupted
        if b["state"] == "cancelled" or reason in ("timeout", "output_limit"):
            self.say(f"build {reason or b['state']}: {message}".rstrip(": "))
        if b.get("signal"):
            return 128 + b["signal"]
        code = b.get("exit_code")
        if isinstance(code, int) and code >= 0:
            return code
        if b["state"] != "cancelled":
            self.say(f"build {b['state']} without an exit code ({reason or 'no reason'}): {message}")
        return EXIT_INFRA


class _Infra(Exception):
    """The build could not run, or we lost track of it: exit 125 with this reason."""


async def _error_text(r) -> str:
    text = await r.text()
    try:
        err = json.loads(text)["error"]
        return f"{err['code']}: {err['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {r.status}: {text[:200]}"


# -- hived status ------------------------------------------------------------------------------
async def _connect(home: str):
    ep = endpoints(home)
    if _control_plane_dir(ep):
        raise _not_for_control(home, ep, "status", f"ask this hive with GET {ep.get('api')}/v1/hive and an "
                               "admin token, or run `hived status --home` on a box's state directory")
    if "box" not in ep:
        raise UserError(f"{home}/endpoints.json names no box socket: is {home} the home of `hived up` or "
                        "the state directory of `hived box`?")
    try:
        return await connect_unix(ep["box"], Session("client", f"cli-{os.getpid()}", {"box", "control"}))
    except (OSError, ChannelClosed) as exc:
        raise UserError(f"cannot reach the box at {ep['box']}: {exc} "
                        "(is `hived up` still running?)") from None


def status(home: str) -> dict:
    import uvloop

    async def box_report():
        ch = await _connect(home)
        try:
            await ch.send("status.get")
            while True:
                msg = await ch.recv()
                if msg.name == "status":
                    return msg["report"]
        except ChannelClosed as exc:
            raise UserError(f"the box closed the connection before answering: {exc.reason}") from None
        finally:
            ch.close()

    async def get():
        report = await box_report()
        report["hive"] = await _hive_view(endpoints(home))
        return report

    return uvloop.run(get())


async def _hive_view(ep: dict) -> dict | None:
    """The hive's own view (queue, builds by state, boxes), if this hived up has a hive."""
    hives = ep.get("hives")
    if not hives:
        return None
    import aiohttp

    name = ep.get("hive") or next(iter(hives))
    url = hives[name]["api"] + "/v1/hive"
    token = ep.get("admin_token") or ep.get("token")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http, \
                http.get(url, headers={"Authorization": f"Bearer {token}"}) as r:
            if r.status != 200:
                return {"hive": name, "error": await _error_text(r)}
            return await r.json()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return {"hive": name, "error": f"{type(exc).__name__}: {exc}"}


def render_status(report: dict) -> str:
    lines = [f"box {report['box']} (accelerator {report['accelerator']})"]
    counts = ", ".join(f"{k} {v}" for k, v in report["cells_by_state"].items() if v)
    lines.append(f"cells: {counts or 'none'}")
    for name, pool in report["pools"].items():
        lines.append(f"pool {name}: {pool['warm']}/{pool['target']} warm, {pool['booting']} booting, "
                     f"{pool['waiting_builds']} waiting" +
                     (f", last error: {pool['last_error']}" if pool["last_error"] else ""))
    part = report.get("partition")
    if part:
        owners = ", ".join(f"{core}: {'+'.join(cells) or 'free'}" for core, cells in part["cell_cores"].items())
        mem = part["memory_mib"]
        lines.append(f"partition: box daemon cores {part['box_cores'] or 'none reserved'}; cell cores {owners}")
        lines.append(f"  memory {mem['used']}/{mem['allocatable']} MiB used; overcommit "
                     f"{'allowed' if part['overcommit_allowed'] else 'refused'}"
                     f"{', OVERCOMMITTED now' if part['overcommitted'] else ''}"
                     + (f"; cells' CPU weight {part['cells_cpu_weight']} (the daemon's 100)"
                        if "cells_cpu_weight" in part else ""))
    for cell in report["cells"]:
        lines.append(f"  {cell['id']} {cell['shape']} {cell['state']} pid {cell['pid']} cores "
                     f"{','.join(map(str, cell.get('cores', []))) or '-'} {cell.get('origin', 'boot')} "
                     f"{cell['boot_s']} s {cell['build']}")
    templates = report.get("templates")
    for key, tpl in (templates or {}).get("templates", {}).items():
        lines.append(f"template {tpl['id']} for {key}: {tpl['clones']} clones, {tpl['age_s']} s old")
    for b in report["builds"][-10:]:
        lines.append(f"build {b['id']} {b.get('state')} {b.get('reason', '')} cell {b.get('cell', '-')} "
                     f"{' '.join(b.get('argv', []))[:60]}")
    control = report.get("control")
    if control:
        lines.append(f"control link: {control['box_id']} -> {control['control']} "
                     f"{'connected' if control['connected'] else 'DISCONNECTED'}"
                     f"{', last error: ' + control['last_error'] if control['last_error'] else ''}")
    hive = report.get("hive")
    if hive:
        if "error" in hive:
            lines.append(f"hive {hive.get('hive')}: cannot ask it: {hive['error']}")
        else:
            queue = ", ".join(f"{k} {v}" for k, v in hive["queue"].items()) or "empty"
            states = ", ".join(f"{k} {v}" for k, v in hive["builds_by_state"].items() if v) or "none"
            lines.append(f"hive {hive['hive']}: {hive['boxes_connected']} box(es) connected; queue: {queue}; "
                         f"builds: {states}")
    return "\n".join(lines)
