"""`hived up` (the embedded default: a box on this machine) and `hived box --config`."""

import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

from hived.cli import UserError

log = logging.getLogger(__name__)


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


def up(home: str, pool: int = 1, verbose: bool = False) -> int:
    from hived.box.config import embedded

    home_path = Path(home).resolve()
    home_path.mkdir(parents=True, exist_ok=True)
    config = embedded(home_path, pool_target=pool)
    return serve_box(config, home=home_path, verbose=verbose, build_image=True)


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
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
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
        await box.stop()
        print("stopped", file=sys.stderr, flush=True)
