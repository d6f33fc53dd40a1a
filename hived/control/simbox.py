"""A simulated box: speaks the real box <-> control protocol over a real socket, runs no cells.

For tests and benchmarks of the control plane's own logic only (scheduling, leases, lost
boxes, reconnects): it registers, heartbeats, takes `build.assign` and answers as told,
either at once (`auto=True`: started, one output chunk, exit 0, written together once per
loop iteration) or step by step from the test. With `report_warm=True` an auto box also
sends a `box.heartbeat` right after a batch of exits, so the control plane learns of the
refilled warm cells at once instead of at the next periodic heartbeat. Anything about
cells is tested against the real box (hived.box.controllink).

    python -m hived.control.simbox --port P --boxes N [--warm W] [--capacity C] [--cpu K]

runs a fleet of auto boxes in a process of its own (the control plane benchmark): it
prints `ready` once every box registered, and ends when its stdin closes (or its parent
dies), printing one JSON line of counts.
"""

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import ssl as ssl_mod
import sys

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
                 capacity: int = 8, auto: bool = False, refill: bool = True, report_warm: bool = False,
                 ssl: ssl_mod.SSLContext | None = None, server_hostname: str | None = None) -> None:
        self.host, self.port, self.box_id, self.token = host, port, box_id, token
        self.warm = dict(warm or {"small": 1})
        self.targets = dict(self.warm)
        self.capacity = capacity
        self.auto = auto
        self.refill = refill
        self.report_warm = report_warm
        self.done = 0                 # builds finished by auto mode
        self.ssl = ssl
        self.server_hostname = server_hostname
        self.channel: Channel | None = None
        self.builds: dict[str, SimBuild] = {}
        self.assigned: asyncio.Queue = asyncio.Queue()
        self.cancels: asyncio.Queue = asyncio.Queue()
        self.pool_targets: list[dict] = []
        self.peer_tokens: list[str] = []  # peering.config's token, each time the control plane sends it
        self.registered: dict | None = None
        self.assigns_seen = 0
        self.heartbeats = True
        self._tasks: set[asyncio.Task] = set()
        self._hb_seq = 0
        self._out: list[bytes] = []   # auto mode: frames written together at the end of the iteration
        self._warm_changed = False

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
                        self._auto(b)
                    else:
                        self.assigned.put_nowait(b)
                elif msg.name == "build.ack":
                    b = self.builds.get(f["build_id"])
                    if b is not None and b.lease == f["lease"]:
                        b.acked = True
                        if self.auto:  # nothing to keep: a long run must not grow without bound
                            del self.builds[b.build_id]
                elif msg.name == "cancel":
                    b = self.builds.get(f["build_id"])
                    if b is not None:
                        b.cancelled = f["reason"]
                    self.cancels.put_nowait((f["build_id"], f["reason"]))
                elif msg.name == "pool.target":
                    self.pool_targets.append(f["targets"])
                elif msg.name == "peering.config":
                    self.peer_tokens.append(f["token"])

    # -- auto mode ---------------------------------------------------------------------------------
    def _auto(self, b: SimBuild) -> None:
        """started, one output chunk, exit 0: queued, written with everything else of this iteration."""
        self._queue("build.started", build_id=b.build_id, lease=b.lease, cell_id="csim0001")
        self._queue("build.output", build_id=b.build_id, lease=b.lease, stream=1, seq=b.seq,
                    data=b" ".join(a.encode() for a in b.argv) + b"\n")
        b.seq += 1
        b.exit = dict(build_id=b.build_id, lease=b.lease, code=0, signal=0, reason="exited", message="",
                      usage={"wall_s": 0.0}, started=True)
        if self.refill:
            self.warm[b.shape] = self.warm.get(b.shape, 0) + 1
            self._warm_changed = True
        self._queue("build.exit", **b.exit)
        self.done += 1

    def _queue(self, name: str, **fields) -> None:
        channel = self.channel
        if channel is None or not channel.is_open:
            return  # exits are held in self.builds and resent after a reconnect
        if not self._out:
            asyncio.get_running_loop().call_soon(self._write_out)
        self._out.append(channel.session.frame(name, **fields))

    def _write_out(self) -> None:
        channel = self.channel
        if channel is not None and channel.is_open and self._out:
            if self.report_warm and self._warm_changed and self.heartbeats:
                self._hb_seq += 1
                running = sum(1 for b in self.builds.values() if b.exit is None)
                self._out.append(channel.session.frame(
                    "box.heartbeat", seq=self._hb_seq, warm=self.warm, booting={}, running=running,
                    assigns_seen=self.assigns_seen))
            channel.transport.write(b"".join(self._out))
        self._warm_changed = False
        self._out.clear()

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


# -- a fleet in a process of its own (hived bench control) ------------------------------------------
def _die_with_parent() -> None:
    """Linux: SIGKILL us when the process that started us dies, whatever way it dies."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def bench_token(seed: str, i: int) -> str:
    return f"{seed}-{i}"


async def fleet(host: str, port: int, n: int, *, warm: int, capacity: int, seed: str, shape: str) -> dict:
    loop = asyncio.get_running_loop()
    boxes = [SimBox(host, port, f"b{i}", bench_token(seed, i), warm={shape: warm}, capacity=capacity,
                    auto=True, report_warm=True) for i in range(n)]
    for i in range(0, n, 50):  # not all at once: the control plane has a listen backlog
        await asyncio.gather(*(b.connect() for b in boxes[i:i + 50]))
    print("ready", flush=True)
    eof = loop.create_future()

    class _Stdin(asyncio.Protocol):
        def connection_lost(self, exc):
            if not eof.done():
                eof.set_result(None)

        def eof_received(self):
            if not eof.done():
                eof.set_result(None)

    await loop.connect_read_pipe(_Stdin, sys.stdin)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: eof.done() or eof.set_result(None))
    await eof
    done = sum(b.done for b in boxes)
    for b in boxes:
        await b.close()
    return {"boxes": n, "builds_done": done}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hived.control.simbox",
                                description="simulated boxes (auto mode) for the control plane benchmark")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--boxes", type=int, default=100)
    p.add_argument("--warm", type=int, default=4)
    p.add_argument("--capacity", type=int, default=8)
    p.add_argument("--seed", required=True, help="box i's token is SEED-i")
    p.add_argument("--shape", default="small")
    p.add_argument("--cpu", type=int, default=-1, help="pin this process to one CPU")
    args = p.parse_args(argv)
    _die_with_parent()
    if args.cpu >= 0:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {args.cpu})
    import uvloop

    t0 = os.times()
    result = uvloop.run(fleet(args.host, args.port, args.boxes, warm=args.warm, capacity=args.capacity,
                              seed=args.seed, shape=args.shape))
    t1 = os.times()
    result["cpu_s"] = round((t1.user - t0.user) + (t1.system - t0.system), 3)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
