"""A real BoxDaemon on its own uvloop thread, driven synchronously from tests.

Nothing here is a stand-in: real QEMU cells, real cgroups, the real client protocol.
`leftovers()` lists what the box left on the host, for the no-leak assertions.
"""

import asyncio
import contextlib
import dataclasses
import os
import secrets
import shutil
import tempfile
import threading
from pathlib import Path

import pytest

from hived.box import leftovers as leftover_scan
from hived.box.config import parse
from hived.box.daemon import BoxDaemon, CellImage
from hived.protocol.channel import connect_unix
from hived.protocol.session import Session

IMAGE_ROOT = Path(os.environ.get("HIVED_IMAGE_DIR", "/var/lib/hived/images"))


def find_image() -> Path:
    from hived import image

    found = image.find_image(IMAGE_ROOT)
    if found is None:
        pytest.skip(f"no cell image in {IMAGE_ROOT}: run `hived image build` (make test does)")
    return found


@dataclasses.dataclass
class BuildResult:
    exit: dict
    stdout: bytes
    stderr: bytes
    build_id: str
    cell_id: str
    errors: list
    gaps: list = dataclasses.field(default_factory=list)  # output.gap markers: cut or missing output


class BoxHarness:
    def __init__(self, shapes: dict, *, image: CellImage | None = None, box: dict | None = None,
                 daemon_cls=BoxDaemon, tables: dict | None = None) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="hv", dir="/tmp"))
        self.name = "t-" + secrets.token_hex(3)
        cfg = {"box": {"name": self.name, "state_dir": str(self.tmp / "s"), "boot_timeout_s": 180,
                       "reserved_cores": 0, "overcommit": True,
                       "queue_timeout_s": 120, **(box or {})},
               "shapes": shapes, **(tables or {})}
        self.config = parse(cfg, "test")
        self.image = image or CellImage.at(find_image())
        import uvloop

        self.loop = uvloop.new_event_loop()
        self.daemon = daemon_cls(self.config, image=self.image, accelerator="tcg")
        self.thread = threading.Thread(target=self._run_loop, daemon=True)
        self.stopped = False

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro, timeout: float = 300):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, wait_ready: bool = True) -> "BoxHarness":
        self.thread.start()

        async def boot():
            await self.daemon.start()
            if wait_ready:
                await asyncio.wait_for(self.daemon.wait_ready(), 240)

        try:
            self.call(boot())
        except BaseException:
            # a box that started half way owns cells, namespaces and cgroups: a fixture whose
            # start fails never reaches its own stop(), so they go here
            with contextlib.suppress(Exception):
                self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the box and its loop; once (a second call does nothing)."""
        if self.stopped:
            return
        self.stopped = True
        try:
            self.call(self.daemon.stop(), 120)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- builds ---------------------------------------------------------------------------
    async def _client(self):
        return await connect_unix(str(self.config.client_socket), Session("client", "test", {"box"}))

    async def _build(self, argv, *, shape="", timeout_s=0.0, env=None, cancel_after_started=None,
                     cancel_after_output: bytes | None = None, on_accepted=None, options=None, cwd="/work"):
        ch = await self._client()
        out, err, errors, gaps = bytearray(), bytearray(), [], []
        build_id = cell_id = ""
        try:
            await ch.send("build.submit", request_id="r1", shape=shape, customer="test", argv=argv,
                          env=env or {}, cwd=cwd, timeout_s=timeout_s, options=options or {})
            while True:
                msg = await ch.recv()
                if msg.name == "build.accepted":
                    build_id, cell_id = msg["build_id"], msg["cell_id"]
                    if on_accepted:
                        await on_accepted(self, cell_id)
                    if cancel_after_started is not None:
                        async def later(build_id=build_id):
                            await asyncio.sleep(cancel_after_started)
                            await ch.send("cancel", build_id=build_id, reason="test")
                        asyncio.get_running_loop().create_task(later())
                elif msg.name == "output":
                    (out if msg["stream"] == 1 else err).extend(msg["data"])
                    if cancel_after_output is not None and cancel_after_output in out:
                        cancel_after_output = None  # once: the build has visibly run
                        await ch.send("cancel", build_id=build_id, reason="test")
                elif msg.name == "error":
                    errors.append(msg.fields)
                elif msg.name == "output.gap":
                    gaps.append(msg.fields)
                elif msg.name == "exit":
                    return BuildResult(msg.fields, bytes(out), bytes(err), build_id, cell_id, errors, gaps)
        finally:
            ch.close()

    def build(self, argv, **kw) -> BuildResult:
        return self.call(self._build(argv, **kw))

    def builds_at_once(self, *jobs) -> list[BuildResult]:
        async def all_of():
            return await asyncio.gather(*(self._build(argv, **kw) for argv, kw in jobs))
        return self.call(all_of())

    def status(self) -> dict:
        async def get():
            return self.daemon.status()
        return self.call(get())

    def wait_pool_full(self, timeout: float = 180) -> None:
        async def wait():
            while True:
                pools = self.daemon.pools.values()
                if all(len(p.warm) >= p.target for p in pools):
                    return
                await asyncio.sleep(0.2)
        self.call(asyncio.wait_for(wait(), timeout), timeout + 5)

    # -- leaks ----------------------------------------------------------------------------
    def cell_resources(self, cell_id: str) -> list[str]:
        """What of one cell is still on the host: process, directory, sockets, cgroups."""
        found = []
        cell_dir = self.config.cells_dir / cell_id
        if cell_dir.exists():
            found.append(f"dir {cell_dir}")
        for pid, cid in leftover_scan.vmm_pids(self.config.cells_dir).items():
            if cid == cell_id:
                found.append(f"process {pid}")
        cg = self.daemon.cgroups
        if cg is not None:
            found += [f"cgroup {d}" for d in cg.dirs(cell_id) if d.exists()]
        return found
