"""A simulated box: speaks the real box <-> control protocol over a real socket, runs no cells.

For tests and benchmarks of the control plane's own logic only (scheduling, leases, lost
boxes, reconnects): it registers, heartbeats, takes `build.assign` and answers as told,
either at once (`auto=True`: started, one output chunk, exit 0) or step by step from the
test. Anything about cells is tested against the real box (hived.box.controllink).
"""

import asyncio
import contextlib
import dataclasses
import ssl as ssl_mod

from hived.protocol.channel import Channel, ChannelClosed
from hived.protocol.session import Session


@dataclasses.dataclass
class SimBuild:
    build_id: str
    lease: int
    argv: list
    shape: str
    env: dict
    exit: dict | None = None   # held until build.ack
    acked: bool = False
    cancelled: str = ""
    seq: int = 0


class SimBox:
    def __init__(self, host: str, port: int, box_id: str, token: str, *, warm: dict | None = None,
                 capacity: int = 8, auto: bool = False, refill: bool = True,
                 ssl: ssl_mod.SSLContext | None = None, server_hostname: str | None = None) -> None:
        self.host, self.port, self.box_id, self.token = host, port, box_id, token
        self.warm = dict(warm or {"small": 1})
        self.targets = dict(self.warm)
        self.capacity = capacity
        self.auto = auto
        self.refill = refill
        self.ssl = ssl
        self.server_hostname = server_hostname
        self.channel: Channel | None = None
        self.builds: dict[str, SimBuild] = {}
        self.assigned: asyncio.Queue = asyncio.Queue()
        self.cancels: asyncio.Queue = asyncio.Queue()
        self.pool_targets: list[dict] = []
        self.registered: dict | None = None
        self.assigns_seen = 0
        self.heartbeats = True
        self._tasks: set[asyncio.Task] = set()
        self._hb_seq = 0

    # -- link ---------------------------------------------------------------------------------
    async def connect(self) -> "SimBox":
        loop = asyncio.get_running_loop()
        session = Session("box", self.box_id, {"control"})
        _, self.channel = await loop.create_connection(
            lambda: Channel(session, hello_timeout=10.0), self.host, self.port, ssl=self.ssl,
            server_hostname=self.server_hostname if self.ssl else None)
        await self.channel.handshake()
        self.assigns_seen = 0
        held = {b.build_id: b.lease for b in self.builds.values() if not b.acked}
        await self.channel.send("box.register", box_id=self.box_id, token=self.token,
                                shapes=sorted(self.warm), capacity=self.capacity, warm=self.warm,
                                targets=self.targets, builds=held, agent="simbox")
        msg = await asyncio.wait_for(self.channel.recv(), 10)
        if msg.name != "box.registered":
            raise ConnectionError(f"control plane refused box {self.box_id}: {msg.fields}")
        self.registered = msg.fields
        for b in self.builds.values():  # results held while we were away
            if b.exit is not None and not b.acked:
                await self.channel.send("build.exit", **b.exit)
        self._spawn(self._reader(self.channel))
        self._spawn(self._heartbeat(self.channel, msg["heartbeat_s"]))
        return self

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _heartbeat(self, channel: Channel, every: float) -> None:
        with contextlib.suppress(ChannelClosed):
            while channel.is_open:
                if self.heartbeats:
                    self._hb_seq += 1
                    running = sum(1 for b in self.builds.values() if b.exit is None)
                    await channel.send("box.heartbeat", seq=self._hb_seq, warm=self.warm, booting={},
                                       running=running, assigns_seen=self.assigns_seen)
                await asyncio.sleep(every)

    async def _reader(self, channel: Channel) -> None:
        with contextlib.suppress(ChannelClosed):
            while True:
                msg = await channel.recv()
                f = msg.fields
                if msg.name == "build.assign":
                    self.assigns_seen += 1
                    b = SimBuild(f["build_id"], f["lease"], f["argv"], f["shape"], f["env"])
                    self.builds[b.build_id] = b
                    if self.warm.get(b.shape, 0) > 0:
                        self.warm[b.shape] -= 1
                    if self.auto:
                        await self.start(b.build_id)
                        await self.output(b.build_id, b" ".join(a.encode() for a in b.argv) + b"\n")
                        await self.finish(b.build_id, 0)
                    else:
                        self.assigned.put_nowait(b)
                elif msg.name == "build.ack":
                    b = self.builds.get(f["build_id"])
                    if b is not None and b.lease == f["lease"]:
                        b.acked = True
                elif msg.name == "cancel":
                    b = self.builds.get(f["build_id"])
                    if b is not None:
                        b.cancelled = f["reason"]
                    self.cancels.put_nowait((f["build_id"], f["reason"]))
                elif msg.name == "pool.target":
                    self.pool_targets.append(f["targets"])

    # -- what the test drives ------------------------------------------------------------------
    async def start(self, build_id: str, cell_id: str = "csim0001") -> None:
        b = self.builds[build_id]
        await self._send("build.started", build_id=build_id, lease=b.lease, cell_id=cell_id)

    async def output(self, build_id: str, data: bytes, stream: int = 1) -> None:
        b = self.builds[build_id]
        await self._send("build.output", build_id=build_id, lease=b.lease, stream=stream, seq=b.seq,
                         data=data)
        b.seq += 1

    async def finish(self, build_id: str, code: int = 0, *, reason: str = "exited", started: bool = True,
                     message: str = "") -> None:
        b = self.builds[build_id]
        b.exit = dict(build_id=build_id, lease=b.lease, code=code, signal=0, reason=reason, message=message,
                      usage={"wall_s": 0.01}, started=started)
        if self.refill:
            self.warm[b.shape] = self.warm.get(b.shape, 0) + 1
        await self._send("build.exit", **b.exit)

    def set_warm(self, shape: str, n: int) -> None:
        self.warm[shape] = n

    async def _send(self, name: str, **fields) -> None:
        if self.channel is None or not self.channel.is_open:
            return  # held (exits) or lost (output) until a reconnect, like a real box
        with contextlib.suppress(ChannelClosed):
            await self.channel.send(name, **fields)

    async def wait_acked(self, build_id: str, timeout: float = 10) -> None:
        async def poll():
            while not self.builds[build_id].acked:
                await asyncio.sleep(0.01)
        await asyncio.wait_for(poll(), timeout)

    def kill(self) -> None:
        """Vanish: no goodbye, no more heartbeats (like a box losing power)."""
        self.heartbeats = False
        if self.channel is not None and self.channel.transport is not None:
            self.channel.transport.abort()

    async def close(self) -> None:
        if self.channel is not None:
            self.channel.close("simulated box closing")
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
