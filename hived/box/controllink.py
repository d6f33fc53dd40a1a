"""The box's link to its hive's control plane: connect (TCP, TLS when configured) with
backoff, register, heartbeat, run what is assigned, and hold every result until the
control plane has acknowledged it, across disconnects and control plane restarts.

    box.register {box_id, token, shapes, capacity, warm, targets, builds held} ->
                                             <- box.registered {heartbeat_s, lost_s}
    box.heartbeat {warm, booting, running, assigns_seen} -> (every heartbeat_s) <- pong
                                             <- build.assign {build_id, lease, ...}
    build.started / build.output / build.exit (each with the lease) ->
                                             <- build.ack (the exit is stored: forget it)
                                             <- cancel, pool.target

Builds run through the same `run_build()` as builds from a local client: `Relay` is the
"client" it talks to, turning build.accepted / output / output.gap / exit into the messages
above. Output and gaps are numbered here, per build, in the order they go out (`seq`, which
the control plane's store follows). While the link is down, output is held up to
HOLD_OUTPUT_BYTES per build (beyond that it is dropped, and a `build.gap` saying how many
bytes and why takes its place in the log) and exits are held without limit; both go out, in
order, after the next registration. Output sent is also kept (up to HOLD_OUTPUT_BYTES) until
the control plane says it is stored (`build.logged`, protocol v3), and sent again after a
reconnect: frames in flight when a control plane dies are not lost (its store drops what it
already has). A build that has not got a cell when the link
has been down for half of `lost_s` is cancelled here (self-fencing): by then the control
plane may give it to another box, and it must not run twice.

Config (the box's TOML):

    [control]
    address = "10.0.0.1:7070"               # or a list: replicas of the control plane (on PostgreSQL),
                                            # tried in turn; any of them links the box to the leader
    token_file = "/etc/hived/box.token"     # or token = "..." (`hived control add-box NAME`)
    box_id = "box-a"                        # default: [box] name
    capacity = 4                            # cells at once; default: the box's cell cores, at least the pools
    ca_file = "/etc/hived/hive-ca.pem"      # TLS, verifying the control plane against the hive CA
    cert_file = "" ; key_file = ""          # a box certificate, if the hive asks for one
    server_name = ""                        # name in the control plane's certificate (default: host)
"""

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import ssl
from pathlib import Path

from hived.box.builds import run_build
from hived.link import REGISTER_TIMEOUT_S, ReconnectLoop, dial, tls_context
from hived.protocol.channel import Channel, ChannelClosed
from hived.protocol.codec import Message
from hived.protocol.errors import ProtocolError

log = logging.getLogger(__name__)

HOLD_OUTPUT_BYTES = 4 << 20


class LinkConfigError(Exception):
    pass


class LinkRefused(Exception):
    """The control plane said no (wrong token, unknown box): retrying soon will not help."""


@dataclasses.dataclass(frozen=True)
class LinkConfig:
    host: str
    port: int
    token: str
    box_id: str
    capacity: int | None = None       # None: from the box (its cell cores, at least its pool targets)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str = ""
    others: tuple[tuple[str, int], ...] = ()   # more control plane replicas, tried in turn

    @property
    def addresses(self) -> tuple[tuple[str, int], ...]:
        return ((self.host, self.port), *self.others)

    @classmethod
    def from_table(cls, table: dict, *, box_name: str, source: str = "[control]") -> "LinkConfig":
        known = {"address", "token", "token_file", "box_id", "capacity", "ca_file", "cert_file", "key_file",
                 "server_name"}
        for key in table:
            if key not in known:
                raise LinkConfigError(f"{source}.{key}: unknown key (known: {', '.join(sorted(known))})")
        address = table.get("address")
        listed = address if isinstance(address, list) and address else [address]
        addresses = []
        for one in listed:
            if not isinstance(one, str) or ":" not in one:
                raise LinkConfigError(f"{source}.address: expected \"HOST:PORT\" of the control plane (or a "
                                      f"list of them), got {one!r}")
            h, _, p = one.rpartition(":")
            if not p.isdigit():
                raise LinkConfigError(f"{source}.address: port {p!r} is not a number")
            addresses.append((h.strip("[]"), int(p)))
        (host, port), others = addresses[0], tuple(addresses[1:])
        if "token_file" in table:
            try:
                token = Path(table["token_file"]).read_text().strip()
            except OSError as exc:
                raise LinkConfigError(f"{source}.token_file: {exc}") from None
        else:
            token = table.get("token", "")
        if not isinstance(token, str) or not token:
            raise LinkConfigError(f"{source}: needs token_file or token (from `hived control add-box NAME`)")
        capacity = table.get("capacity")
        if capacity is not None and (not isinstance(capacity, int) or isinstance(capacity, bool)
                                     or capacity < 1):
            raise LinkConfigError(f"{source}.capacity: expected an integer >= 1, got {capacity!r}")

        def path(key):
            return Path(table[key]) if table.get(key) else None

        return cls(host, port, token, str(table.get("box_id", box_name)), capacity,
                   path("ca_file"), path("cert_file"), path("key_file"), str(table.get("server_name", "")), others)

    def ssl_context(self) -> ssl.SSLContext | None:
        return tls_context(self.ca_file, self.cert_file, self.key_file)


@dataclasses.dataclass
class HeldBuild:
    build_id: str
    lease: int
    shape: str
    started: bool = False         # it has a cell (build.accepted)
    outbox: collections.deque = dataclasses.field(default_factory=collections.deque)
    held_bytes: int = 0
    dropped_bytes: int = 0        # output dropped while held, not yet told as a gap
    dropped_streams: set = dataclasses.field(default_factory=set)
    next_seq: int = 0             # of build.output / build.gap to the control plane
    unacked: collections.deque = dataclasses.field(default_factory=collections.deque)  # (seq, name, fields)
    unacked_bytes: int = 0
    exit: dict | None = None      # until build.ack
    permanent: bool = False       # it can never run as asked: the control plane must not retry it
    fenced: bool = False
    options: dict = dataclasses.field(default_factory=dict, repr=False)  # may carry registry_auth
    safe: collections.deque = dataclasses.field(default_factory=collections.deque)  # (seq, safe point)
    on_safe: object = None        # callable(point): output up to the point is stored (builds.py)
    acked: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)  # build.ack: the exit is stored


class Relay:
    """The `client` run_build() talks to, for one build assigned by the control plane."""

    def __init__(self, link: "ControlLink", rec: HeldBuild) -> None:
        self.link = link
        self.rec = rec

    @property
    def lease(self) -> int:
        return self.rec.lease

    def on_safe(self, callback) -> None:
        """callback(point) once the output sent with `safe=point` (and all before it) is stored."""
        self.rec.on_safe = callback

    async def settled(self, timeout: float) -> bool:
        """Until the control plane has stored the build's exit (build.ack), at most `timeout` s."""
        try:
            async with asyncio.timeout(timeout):
                await self.rec.acked.wait()
            return True
        except TimeoutError:
            return False

    async def send(self, name: str, **fields) -> None:
        rec = self.rec
        if name == "build.accepted":
            rec.started = True
            await self.link.deliver(rec, "build.started", build_id=rec.build_id, lease=rec.lease,
                                    cell_id=fields["cell_id"])
        elif name == "output":
            await self.link.deliver(rec, "build.output", build_id=rec.build_id, lease=rec.lease,
                                    stream=fields["stream"], data=fields["data"], safe=fields.get("safe"))
        elif name == "output.gap":
            await self.link.deliver(rec, "build.gap", build_id=rec.build_id, lease=rec.lease,
                                    stream=fields["stream"], bytes=fields["bytes"], reason=fields["reason"],
                                    message=fields["message"])
        elif name == "exit":
            message = fields["message"]
            if rec.fenced and not rec.started:
                message = "the box lost the control plane before the build got a cell; not started"
            rec.exit = dict(build_id=rec.build_id, lease=rec.lease, code=fields["code"],
                            signal=fields["signal"], reason=fields["reason"][:32], message=message[:4096],
                            usage=fields["usage"], started=rec.started)
            if rec.permanent:
                rec.exit["permanent"] = True
            await self.link.send_exit(rec)
        elif name == "error":
            log.warning("build %s: %s: %s", rec.build_id, fields.get("code"), fields.get("message"))

    def permanent_failure(self) -> None:
        self.rec.permanent = True

    # -- Secure Compute: the key exchange service is reached through the control link --------------
    async def open_tunnel(self, cell_id: str, network: str, public_key: bytes, timeout: float) -> dict:
        """secure.open for this build; the fields of secure.opened (raises KexError)."""
        return await self.link.open_tunnel(self.rec, cell_id, network, public_key, timeout)

    def close_tunnel(self) -> None:
        self.link.close_tunnel(self.rec)

    def tunnel_lost(self) -> asyncio.Future:
        """Resolves with the reason when the key exchange service says the tunnel's far end is gone."""
        return self.link.lost_future(self.rec.build_id)


class KexError(Exception):
    """The key exchange service refused or could not be reached; the message says why."""


class ControlLink(ReconnectLoop):
    def __init__(self, box, config: LinkConfig) -> None:
        self.box = box
        self.config = config
        self.capacity = config.capacity or _default_capacity(box)
        self.records: dict[str, HeldBuild] = {}
        self.channel: Channel | None = None
        self.ready = False             # registered and everything held has been sent
        self.registered = asyncio.Event()
        self.heartbeat_s = 1.0
        self.lost_s = 10.0
        self.assigns_seen = 0
        self.connects = 0
        self.last_error = ""
        self._task: asyncio.Task | None = None
        self._fence: asyncio.TimerHandle | None = None
        self._stopping = False
        self._wake = asyncio.Event()
        self._opening: dict[str, asyncio.Future] = {}   # build id -> secure.opened
        self._lost: dict[str, asyncio.Future] = {}      # build id -> reason of secure.lost
        self.epoch = ""                                 # the control plane's run (box.registered)
        self._turn = 0                                  # which of config.addresses is dialled

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="control-link")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self.channel is not None:
            self.channel.close("box stopping")
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._fence is not None:
            self._fence.cancel()

    def describe(self) -> dict:
        host, port = self._address()
        return {"control": f"{host}:{port}", "box_id": self.config.box_id,
                "connected": self.ready, "connects": self.connects, "last_error": self.last_error,
                "held_builds": {b.build_id: {"lease": b.lease, "started": b.started,
                                             "finished": b.exit is not None,
                                             "held_output_bytes": b.held_bytes}
                                for b in self.records.values()}}

    link_kind = "control link"
    refused_errors = (LinkRefused,)

    def peer_name(self) -> str:
        host, port = self._address()
        return f"control plane {host}:{port} (box {self.config.box_id})"

    def _rotate(self) -> bool:
        """Dial the next replica; True while some of the list were not tried since the last link."""
        self._turn += 1
        return self._turn % len(self.config.addresses) != 0

    def _address(self) -> tuple[str, int]:
        addresses = self.config.addresses
        return addresses[self._turn % len(addresses)]

    async def _connect(self) -> Channel:
        cfg = self.config
        host, port = self._address()
        return await dial("box", cfg.box_id, host, port, cfg.ssl_context(), cfg.server_name)

    async def _register(self, channel: Channel) -> None:
        cfg = self.config
        await channel.handshake()
        pools = self._shape_pools()
        await channel.send("box.register", box_id=cfg.box_id, token=cfg.token, shapes=sorted(pools),
                           capacity=self.capacity, warm=self._warm(),
                           targets={name: p.shape.pool_target for name, p in pools.items()},
                           builds={b.build_id: b.lease for b in self.records.values()}, agent=_version())
        msg = await asyncio.wait_for(channel.recv(), REGISTER_TIMEOUT_S)
        if msg.name == "error":
            raise LinkRefused(f"{msg['code']}: {msg['message']}")
        if msg.name != "box.registered":
            raise ProtocolError("bad_message", f"expected box.registered, got {msg.name}")
        self.heartbeat_s, self.lost_s = msg["heartbeat_s"], msg["lost_s"]
        self._new_epoch(msg["epoch"])
        self.channel = channel
        self.assigns_seen = 0
        self.connects += 1
        if self._fence is not None:
            self._fence.cancel()
            self._fence = None
        log.info("box %s registered with hive %s at %s:%d (holding %d build(s))", cfg.box_id, msg["hive"],
                 cfg.host, cfg.port, len(self.records))
        # What was sent but not confirmed stored goes again (the store drops what it has), then
        # everything held, in order, before anything new: then the link is ready.
        for rec in list(self.records.values()):
            for _, name, fields in list(rec.unacked):
                await channel.send(name, **fields)
        while True:
            pending = [b for b in self.records.values() if b.outbox or b.dropped_bytes]
            if not pending:
                break
            for rec in pending:
                self._gap_for_dropped(rec)
                while rec.outbox:
                    name, fields = rec.outbox.popleft()
                    rec.held_bytes -= len(fields.get("data", b""))
                    if name == "build.gap" and channel.session.version < 3:
                        log.warning("build %s: %s (the control plane is too old to show it)", rec.build_id,
                                    fields["message"])
                        continue
                    await channel.send(name, **fields)
                    self._sent(channel, rec, name, fields)
        for rec in list(self.records.values()):
            if rec.exit is not None:
                await channel.send("build.exit", **_exit_fields(channel, rec))
        self.ready = True
        self.registered.set()
        await self._report_holdings(channel, full=True)

    def _disconnected(self, channel: Channel) -> None:
        channel.close("link ended")
        was_ready = self.ready
        self.ready = False
        self.channel = None
        self.registered.clear()
        if was_ready and not self._stopping and self._fence is None:
            self._fence = asyncio.get_running_loop().call_later(self.lost_s / 2, self._self_fence)

    def _self_fence(self) -> None:
        """Down for half of lost_s: builds without a cell yet are cancelled here, since the
        control plane may soon give them to another box."""
        self._fence = None
        if self.ready:
            return
        for rec in self.records.values():
            if not rec.started and rec.exit is None:
                rec.fenced = True
                event = self.box.cancels.get(rec.build_id)
                if event is not None:
                    event.set()
                log.warning("build %s: control plane unreachable for %.1f s before it got a cell: "
                            "cancelled", rec.build_id, self.lost_s / 2)

    async def _heartbeat(self, channel: Channel) -> None:
        seq = 0
        with contextlib.suppress(ChannelClosed):
            while True:
                seq += 1
                booting = {name: p.booting for name, p in self._shape_pools().items()}
                running = sum(1 for b in self.records.values() if b.exit is None)
                await channel.send("box.heartbeat", seq=seq, warm=self._warm(), booting=booting,
                                   running=running, assigns_seen=self.assigns_seen)
                await self._report_holdings(channel, full=False)
                await asyncio.sleep(self.heartbeat_s)

    async def _report_holdings(self, channel: Channel, full: bool) -> None:
        """Box peers: what this box can serve, all of it after registering, then the changes
        (hived/box/peers.py; protocol v3)."""
        peers = getattr(self.box, "peers", None)
        if peers is None or channel.session.version < 3:
            return
        try:
            reports = peers.reports(full)
        except Exception as exc:  # the cache unreadable now: report next time
            log.warning("box peers: cannot list what this box holds: %s", exc)
            return
        for fields in reports:
            await channel.send("holds.report", **fields)

    def _shape_pools(self) -> dict:
        """The pools the control plane schedules on: one per shape. Pools per (shape, build image)
        are the box's own business (made when a build names an image), not reported."""
        return {key: p for key, p in self.box.pools.items() if key == p.shape.name}

    def _warm(self) -> dict:
        """Warm cells not already promised to a build that is about to take one."""
        promised = collections.Counter(b.shape for b in self.records.values()
                                       if not b.started and b.exit is None)
        return {name: max(0, len(p.warm) - promised[name]) for name, p in self._shape_pools().items()}

    # -- messages from the control plane -------------------------------------------------------------
    def _on_message(self, channel: Channel, msg) -> None:
        f = msg.fields
        peers = getattr(self.box, "peers", None)
        if peers is not None and peers.on_message(msg):  # peering.config, holds.found
            return
        if msg.name == "build.assign":
            self.assigns_seen += 1
            self._assign(msg)
        elif msg.name == "cancel":
            event = self.box.cancels.get(f["build_id"])
            if event is not None:
                log.info("build %s: cancel from the control plane: %s", f["build_id"], f["reason"])
                event.set()
        elif msg.name == "build.logged":
            rec = self.records.get(f["build_id"])
            if rec is not None and rec.lease == f["lease"]:
                while rec.unacked and rec.unacked[0][0] <= f["seq"]:
                    _, _, fields = rec.unacked.popleft()
                    rec.unacked_bytes -= len(fields.get("data", b""))
                _stored(rec, f["seq"])
        elif msg.name == "build.ack":
            rec = self.records.get(f["build_id"])
            if rec is not None and rec.lease == f["lease"] and rec.exit is not None:
                del self.records[rec.build_id]
                rec.acked.set()
        elif msg.name == "pool.target":
            for shape, n in f["targets"].items():
                pool = self._shape_pools().get(shape)
                if pool is not None and n >= 0 and pool.target != n:
                    log.info("pool %s: target %d -> %d (control plane)", shape, pool.target, n)
                    pool.target = n
                    pool.kick()
        elif msg.name == "secure.opened":
            fut = self._opening.pop(f["build_id"], None)
            rec = self.records.get(f["build_id"])
            if fut is not None and not fut.done() and rec is not None and rec.lease == f["lease"]:
                fut.set_result(dict(f))
        elif msg.name == "secure.lost":
            rec = self.records.get(f["build_id"])
            if rec is not None and rec.lease == f["lease"]:
                fut = self.lost_future(rec.build_id)
                if not fut.done():
                    fut.set_result(f["reason"])
        elif msg.name == "error":
            log.warning("control plane says %s: %s (%s)", f["code"], f["message"], f["ref"])
        elif msg.name == "ping" and self.channel is not None:
            self.channel.send_nowait("pong", seq=f["seq"])

    def _assign(self, msg) -> None:
        f = msg.fields
        old = self.records.get(f["build_id"])
        if old is not None:
            if old.exit is None or old.lease == f["lease"]:
                log.warning("build %s: assigned again (lease %d, held %d): ignored", f["build_id"],
                            f["lease"], old.lease)
                return
            del self.records[old.build_id]  # a finished earlier attempt: the new lease wins
        rec = HeldBuild(f["build_id"], f["lease"], f["shape"], options=dict(f["options"]))
        self.records[rec.build_id] = rec
        self.box.cancels[rec.build_id] = asyncio.Event()
        request = Message("build.submit", {
            "request_id": f"{rec.build_id}.{rec.lease}", "shape": f["shape"], "customer": f["customer"],
            "argv": f["argv"], "env": f["env"], "cwd": f["cwd"], "timeout_s": f["timeout_s"],
            "options": {k: v for k, v in rec.options.items()
                        if k in ("image", "repo", "rev", "secure_compute", "registry_auth")}})
        self.box.spawn(run_build(self.box, Relay(self, rec), rec.build_id, request))

    # -- builds a previous box daemon started (hived/box/adopt.py) ----------------------------------
    def adopt_build(self, facts) -> Relay:
        """A running build of an adopted cell: held under its lease (box.register names it), its
        output numbered on from where the control plane has it."""
        rec = self._hold_adopted(facts)
        self.box.cancels.setdefault(rec.build_id, asyncio.Event())
        return Relay(self, rec)

    def fail_adopted(self, facts, reason: str, message: str) -> None:
        """A build whose cell did not survive the daemon's absence: its end goes out at registration."""
        rec = self._hold_adopted(facts)
        rec.exit = dict(build_id=rec.build_id, lease=rec.lease, code=-1, signal=0, reason=reason[:32],
                        message=message[:4096], usage={}, started=facts.started)

    def _hold_adopted(self, facts) -> HeldBuild:
        """A build from a cell record, held under its lease, numbered on from its control seq."""
        rec = HeldBuild(facts.id, facts.lease, facts.shape, started=facts.started, next_seq=facts.control_next)
        self.records[rec.build_id] = rec
        return rec

    # -- Secure Compute ---------------------------------------------------------------------------------
    async def open_tunnel(self, rec: HeldBuild, cell_id: str, network: str, public_key: bytes,
                          timeout: float) -> dict:
        if not self.ready or self.channel is None:
            raise KexError("the key exchange service (the hive's control plane) is not reachable from this box")
        fut = asyncio.get_running_loop().create_future()
        self._opening[rec.build_id] = fut
        try:
            await self.channel.send("secure.open", build_id=rec.build_id, lease=rec.lease, cell_id=cell_id,
                                    network=network, public_key=public_key)
            answer = await asyncio.wait_for(fut, timeout)
        except ChannelClosed:
            raise KexError("the link to the key exchange service closed while opening the tunnel") from None
        except TimeoutError:
            raise KexError(f"the key exchange service did not answer within {timeout:g} s") from None
        finally:
            self._opening.pop(rec.build_id, None)
        if not answer["ok"]:
            raise KexError(answer["message"])
        return answer

    def close_tunnel(self, rec: HeldBuild) -> None:
        self._lost.pop(rec.build_id, None)
        if self.ready and self.channel is not None:
            with contextlib.suppress(ChannelClosed, ProtocolError, OSError):
                self.channel.send_nowait("secure.close", build_id=rec.build_id, lease=rec.lease)
        # else: the control plane removes the peer when the build's exit arrives

    def _new_epoch(self, epoch: str) -> None:
        """A control plane that started again has forgotten every tunnel (its connectors registered
        again with new keys): the Secure Compute builds running here lost theirs."""
        if self.epoch and epoch != self.epoch:
            for build_id, fut in self._lost.items():
                if not fut.done():
                    fut.set_result("the control plane restarted, and with it the key exchange service; the "
                                   "connector's end of the tunnel is gone")
                    log.warning("build %s: Secure Compute tunnel lost with the control plane's restart", build_id)
        self.epoch = epoch

    def lost_future(self, build_id: str) -> asyncio.Future:
        fut = self._lost.get(build_id)
        if fut is None:
            fut = self._lost[build_id] = asyncio.get_running_loop().create_future()
        return fut

    # -- messages to the control plane ------------------------------------------------------------------
    async def deliver(self, rec: HeldBuild, name: str, **fields) -> None:
        """Send now if the link is up and nothing of this build is waiting; else hold it.
        Output and gaps get their seq here, in the order they will go out."""
        safe = fields.pop("safe", None)
        size = len(fields.get("data", b""))
        direct = self.ready and not rec.outbox and not rec.dropped_bytes and self.channel is not None
        if name == "build.output" and not direct and rec.held_bytes + size > HOLD_OUTPUT_BYTES:
            rec.dropped_bytes += size
            rec.dropped_streams.add(fields["stream"])
            return
        if name in ("build.output", "build.gap"):
            self._gap_for_dropped(rec)
            fields["seq"], rec.next_seq = rec.next_seq, rec.next_seq + 1
            if safe is not None:
                rec.safe.append((fields["seq"], safe))
        if direct:
            channel = self.channel
            if name == "build.gap" and channel.session.version < 3:
                log.warning("build %s: %s (the control plane is too old to show it)", rec.build_id,
                            fields["message"])
                return
            try:
                await channel.send(name, **fields)
                self._sent(channel, rec, name, fields)
                return
            except ChannelClosed:
                pass
        rec.held_bytes += size
        rec.outbox.append((name, fields))

    def _gap_for_dropped(self, rec: HeldBuild) -> None:
        """Output dropped while held becomes one gap marker in its place, before what follows."""
        if not rec.dropped_bytes:
            return
        streams = rec.dropped_streams
        stream = next(iter(streams)) if len(streams) == 1 else 0
        message = (f"{rec.dropped_bytes} bytes of output dropped here: the control plane was unreachable and the "
                   f"box holds at most {HOLD_OUTPUT_BYTES} bytes per build meanwhile")
        rec.outbox.append(("build.gap", dict(build_id=rec.build_id, lease=rec.lease, seq=rec.next_seq,
                                             stream=stream, bytes=rec.dropped_bytes, reason="held_overflow",
                                             message=message)))
        rec.next_seq += 1
        rec.dropped_bytes = 0
        rec.dropped_streams = set()
        self.box.metrics.output_gaps.labels("held_overflow").inc()

    @staticmethod
    def _sent(channel: Channel, rec: HeldBuild, name: str, fields: dict) -> None:
        """Output sent is kept until the control plane has stored it (v3: build.logged)."""
        if name not in ("build.output", "build.gap"):
            return
        if channel.session.version < 3:  # no build.logged: sent is as safe as it gets
            _stored(rec, fields["seq"])
            return
        rec.unacked.append((fields["seq"], name, fields))
        rec.unacked_bytes += len(fields.get("data", b""))
        while rec.unacked_bytes > HOLD_OUTPUT_BYTES:  # bounded: what goes here unconfirmed shows
            _, _, old = rec.unacked.popleft()         # as a counted gap if it was lost after all
            rec.unacked_bytes -= len(old.get("data", b""))

    async def send_exit(self, rec: HeldBuild) -> None:
        if self.ready and not rec.outbox and self.channel is not None:
            with contextlib.suppress(ChannelClosed):
                await self.channel.send("build.exit", **_exit_fields(self.channel, rec))
        # else: sent after the next registration, from self.records


def _stored(rec: HeldBuild, seq: int) -> None:
    """The control plane stored this build's output up to `seq`: tell the build's run."""
    point = None
    while rec.safe and rec.safe[0][0] <= seq:
        done_seq, point = rec.safe.popleft()
        point = dict(point, control_next=done_seq + 1)
    if point is not None and rec.on_safe is not None:
        rec.on_safe(point)


def _exit_fields(channel: Channel, rec: HeldBuild) -> dict:
    """build.exit for this link's version (`permanent` came in v3; an older control plane retries)."""
    if channel.session.version < 3:
        return {k: v for k, v in rec.exit.items() if k != "permanent"}
    return rec.exit


def _default_capacity(box) -> int:
    pools = sum(p.shape.pool_target for p in box.pools.values()) if box.pools else \
        sum(s.pool_target for s in box.config.shapes.values())
    partition = getattr(box, "partition", None)
    cores = getattr(partition, "cell_cores", None)
    n = len(cores) if isinstance(cores, list) else (os.cpu_count() or 2) - 1
    return max(1, n, pools)


def _version() -> str:
    try:
        from hived import __version__

        return str(__version__)[:64]
    except ImportError:
        return "hived"
