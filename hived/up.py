"""`hived up`: a whole hive on this machine, and `hived box --config` (one box daemon).

`hived up --home DIR` runs, in this one process and one event loop:

    router (HTTP, 127.0.0.1:auto) --> control plane of hive "local" (HTTP API + box link,
                                       SQLite under DIR/control)
                                          ^ msgpack over TCP (127.0.0.1:auto), token minted
                                          | by the control plane's own `add-box` code
                                       box daemon (warm pool, cells; socket under DIR/state)

Every part talks to the others the way it would across machines (HTTP, the box link); only
the process is shared. One process because it is the most robust shape for a foreground
command: SIGTERM/Ctrl-C stops the parts in order from one place (builds end, cells go). After
a `kill -9` (or a crash) only the cells' VMMs remain, and they go on: the next `hived up` on
the same DIR adopts them and their builds continue (hived/box/adopt.py); a cell left without
a daemon for 5 minutes powers itself off. There are no child daemons to reap, to kill with
the parent, or to wait for.

DIR/endpoints.json (mode 0600, written as soon as the API serves; "ready" on stdout follows
once a warm cell waits) says where everything is: the router's and the hive's API
URL, an API token for customer "local" (and an admin token), metrics URLs, and the box's
socket (for `hived status`). DIR/control/hive.toml is the hive's config (so `hived control
add-box --config DIR/control/hive.toml NAME` attaches another box to this hive).
"""

import asyncio
import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from hived.errors import UserError

log = logging.getLogger(__name__)

HIVE = "local"
CUSTOMER = "local"
STOP_CANCEL_S = 10.0  # at a clean stop, how long builds in flight get to end as cancelled


def _accelerator(configured: str) -> str:
    if configured:
        return configured
    from hived import kvm

    try:
        return kvm.accelerator()
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _image(image_dir: Path, build: bool):
    from hived import image
    from hived.box.daemon import CellImage

    try:
        if build:
            return CellImage.at(image.build_image(image_dir))
        return CellImage.at(image.find_image(image_dir, required=True))
    except image.ImageError as exc:
        raise UserError(str(exc)) from None


def _write_private(path: Path, text: str) -> None:
    """Write atomically, readable by the owner only (the file holds tokens)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.rename(path)


# -- hived up ----------------------------------------------------------------------------------
def up(home: str, pool: int = 1, verbose: bool = False) -> int:
    import uvloop

    from hived.box.config import embedded

    home_path = Path(home).resolve()
    home_path.mkdir(parents=True, exist_ok=True)
    lock = _lock(home_path)  # held until we exit, however we exit (kill -9 included)
    box_config = embedded(home_path, pool_target=pool)
    image = _image(box_config.image_dir, True)
    accel = _accelerator(box_config.accelerator)
    try:
        return uvloop.run(_up(LocalHive(home_path, box_config, image, accel)))
    finally:
        lock.close()


def _lock(home: Path):
    """One `hived up` per home: a second would take the first's socket and clean up its cells."""
    import fcntl

    f = open(home / "up.lock", "a+")  # noqa: SIM115 (held for the life of the process)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise UserError(f"another hived up is running at {home} (pid {holder}): stop it first") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


class LocalHive:
    """The control plane, the box and the router of `hived up`, started and stopped in order."""

    def __init__(self, home: Path, box_config, image, accelerator: str) -> None:
        self.home = home
        self.control_dir = home / "control"
        self.box_config = box_config
        self.image = image
        self.accelerator = accelerator
        self.box_id = box_config.name  # "up-" + hash of the home: a valid box id
        self.cp = None
        self.box = None
        self.router_runner = None
        self.router_url = ""
        self.tokens: dict = {}

    # -- config ---------------------------------------------------------------------------------
    def _load_tokens(self) -> dict:
        path = self.control_dir / "tokens.json"
        try:
            tokens = json.loads(path.read_text())
            if isinstance(tokens.get(CUSTOMER), str) and isinstance(tokens.get("admin"), str):
                return tokens
        except (OSError, ValueError, AttributeError):
            pass
        from hived.control.server import new_token

        tokens = {CUSTOMER: new_token(), "admin": new_token()}
        _write_private(path, json.dumps(tokens, indent=2) + "\n")
        return tokens

    def _write_hive_config(self) -> Path:
        def sha(token: str) -> str:
            return hashlib.sha256(token.encode()).hexdigest()

        shapes = "\n".join(f"[shapes.{name}]" for name in self.box_config.shapes)
        path = self.control_dir / "hive.toml"
        path.write_text(f"""# Written by `hived up` at every start: the hive of this machine.
[hive]
name = "{HIVE}"
state_dir = "{self.control_dir}"
api_listen = "127.0.0.1:0"
box_listen = "127.0.0.1:0"
heartbeat_s = 1.0
box_lost_s = 10.0

{shapes}

[customers.{CUSTOMER}]
api_tokens_sha256 = ["{sha(self.tokens[CUSTOMER])}"]

[admin]
api_tokens_sha256 = ["{sha(self.tokens['admin'])}"]
""")
        return path

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        from hived import router
        from hived.box.cgroups import CgroupError
        from hived.box.controllink import LinkConfig
        from hived.box.daemon import BoxDaemon
        from hived.control.config import ConfigError, load
        from hived.control.server import ControlPlane, mint_box_token
        from hived.control.store import StoreError

        self.control_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.control_dir, 0o700)  # the database holds builds' env; tokens.json the API tokens
        self.tokens = self._load_tokens()
        config_path = self._write_hive_config()
        try:
            hive_config = load(config_path)
        except ConfigError as exc:
            raise UserError(str(exc)) from None
        # The box's credential, minted and stored (hashed) by the control plane's own admin code.
        try:
            box_token = mint_box_token(hive_config, self.box_id)
        except (ValueError, StoreError, ConfigError) as exc:
            raise UserError(f"hive {HIVE}: box {self.box_id}: {exc}") from None
        self.cp = ControlPlane(hive_config)
        try:
            await self.cp.start()
        except (StoreError, OSError) as exc:
            raise UserError(f"hive {HIVE} cannot start: {exc}") from None
        link = LinkConfig("127.0.0.1", self.cp.box_port, box_token, self.box_id)
        box_config = dataclasses.replace(self.box_config, extra={**self.box_config.extra, "control": link})
        self.box = BoxDaemon(box_config, image=self.image, accelerator=self.accelerator)
        try:
            await self.box.start()
        except (CgroupError, OSError) as exc:
            raise UserError(f"box {box_config.name} cannot start: {exc}") from None
        hive_url = self.cp.endpoints()["api"]
        rconfig = router.parse({"router": {"listen": "127.0.0.1:0"},
                                "hives": {HIVE: {"api": hive_url, "shapes": sorted(box_config.shapes)}}},
                               "hived up")
        self.router_runner, port = await router.start(rconfig)
        self.router_url = f"http://127.0.0.1:{port}"

    async def wait_ready(self) -> None:
        """A warm cell waits on the box, the hive knows it, and the API answers through the router."""
        await self.box.wait_ready()
        wanted = [name for name, pool in self.box.pools.items() if pool.target > 0]
        while True:
            box = self.cp.scheduler.boxes.get(self.box_id)
            if box is not None and box.usable and all(box.warm(s) > 0 for s in wanted):
                break
            await asyncio.sleep(0.05)
        import aiohttp

        async with aiohttp.ClientSession() as http:
            while True:
                try:
                    async with http.get(self.router_url + "/healthz") as r:
                        body = await r.json()
                        if r.status == 200 and body.get("hives", {}).get(HIVE):
                            return
                except (aiohttp.ClientError, ValueError):
                    pass
                await asyncio.sleep(0.1)

    def endpoints(self) -> dict:
        hive_url = self.cp.endpoints()["api"]
        return {
            "api": self.router_url,
            "hive": HIVE,
            "hives": {HIVE: {"api": hive_url, "metrics": f"{hive_url}/metrics"}},
            "customer": CUSTOMER,
            "token": self.tokens[CUSTOMER],
            "admin_token": self.tokens["admin"],
            "box": str(self.box.config.client_socket),
            "box_id": self.box_id,
            "control_box_link": f"127.0.0.1:{self.cp.box_port}",
            "peer_link": self.box.peers.peer_addr if self.box.peers is not None else "",
            "metrics": f"http://{self.box.config.metrics_addr}:{self.box.metrics_port}/metrics",
            "control_metrics": f"{hive_url}/metrics",
            "pid": os.getpid(),
            "accelerator": self.accelerator,
        }

    async def cancel_live_builds(self, timeout: float) -> None:
        """A clean stop ends what is in flight as cancelled (followers see it), within `timeout`."""
        cp = self.cp
        if cp is None or cp.failed is None or cp.failed.done() or not cp.scheduler.builds:
            return
        ids = list(cp.scheduler.builds)
        log.warning("hived up stopping: cancelling %d build(s) in flight", len(ids))
        for build_id in ids:
            with contextlib.suppress(Exception):
                await cp.cancel(build_id)
        deadline = time.monotonic() + timeout
        while cp.scheduler.builds and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # followers read the end of their build's log

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.cancel_live_builds(STOP_CANCEL_S)
        if self.router_runner is not None:
            await self.router_runner.cleanup()
        if self.box is not None:
            await self.box.stop()
        if self.cp is not None and self.cp.store is not None:
            await self.cp.stop()


async def _up(hive: LocalHive) -> int:
    endpoints = hive.home / "endpoints.json"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopper = loop.create_task(stop.wait())
    code = 0
    try:
        await hive.start()
        gc.freeze()  # start-up's objects live as long as we do: keep them out of full collections
        # Where the API is, as soon as it serves: a `hived run` following a build across a restart
        # finds it at once (the build goes on in its adopted cell), before a warm pool is ready.
        _write_private(endpoints, json.dumps(hive.endpoints(), indent=2) + "\n")
        ready = loop.create_task(hive.wait_ready())
        failed = hive.cp.failed
        done, _ = await asyncio.wait({ready, stopper, failed}, return_when=asyncio.FIRST_COMPLETED)
        if ready in done:
            ready.result()
            print("ready", flush=True)
            done, _ = await asyncio.wait({stopper, failed}, return_when=asyncio.FIRST_COMPLETED)
        else:
            ready.cancel()
            await asyncio.gather(ready, return_exceptions=True)
        if failed.done():
            print(f"hived: {failed.exception()}", file=sys.stderr, flush=True)
            code = 1
        return code
    finally:
        stopper.cancel()
        with contextlib.suppress(FileNotFoundError):
            endpoints.unlink()
        await hive.stop()
        print("stopped", file=sys.stderr, flush=True)


# -- hived box --config ------------------------------------------------------------------------
def serve_box(config, home: Path | None, verbose: bool = False, build_image: bool = False) -> int:
    import uvloop

    image = _image(config.image_dir, build_image)
    accel = _accelerator(config.accelerator)
    endpoints = (home or config.state_dir) / "endpoints.json"
    return uvloop.run(_serve(config, image, accel, endpoints))


async def _serve(config, image, accel, endpoints: Path) -> int:
    from hived.box.cgroups import CgroupError
    from hived.box.daemon import BoxDaemon

    box = BoxDaemon(config, image=image, accelerator=accel)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # SIGTERM (systemd's stop *and* restart, a plain `kill`): the daemon goes, its cells stay
    # and the next daemon adopts them. SIGINT (Ctrl-C, `hived box stop`): builds end, cells go.
    ending = {"how": "stop"}

    def on_signal(how: str) -> None:
        ending["how"] = how
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, on_signal, "detach" if config.adopt_cells else "stop")
    loop.add_signal_handler(signal.SIGINT, on_signal, "stop")
    try:
        await box.start()
    except (CgroupError, OSError) as exc:
        await box.stop()
        raise UserError(f"box {config.name} cannot start: {exc}") from None
    try:
        ready = loop.create_task(box.wait_ready())
        stopper = loop.create_task(stop.wait())
        done, _ = await asyncio.wait({ready, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if ready in done:
            tmp = endpoints.with_suffix(".tmp")
            tmp.write_text(json.dumps({
                "box": str(config.client_socket),
                "metrics": f"http://{config.metrics_addr}:{box.metrics_port}/metrics",
                "pid": os.getpid(),
                "accelerator": accel,
            }, indent=2) + "\n")
            tmp.rename(endpoints)
            print("ready", flush=True)
            await stopper
        else:
            ready.cancel()
        return 0
    finally:
        try:
            endpoints.unlink()
        except FileNotFoundError:
            pass
        if ending["how"] == "detach":
            await box.detach()
            print("detached: cells keep running for the next daemon", file=sys.stderr, flush=True)
        else:
            await box.stop()
            print("stopped", file=sys.stderr, flush=True)

