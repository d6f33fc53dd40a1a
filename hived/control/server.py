"""The control plane of one hive (`hived control --config FILE`): one process, uvloop.

    API (aiohttp) --submit/cancel--> ControlPlane --actions--> store (durable first)
                                         |  Scheduler (pure)        |
                                         v                          v
                         box links (msgpack over TCP/TLS) <-- build.assign / cancel / pool.target
                         box.register, heartbeat, build.started/output/exit (with the lease) -->

Order for every decision: the scheduler decides in memory, the store records it (a
conditional update on the lease), then the box is told. A box's exit is acknowledged
(`build.ack`) only after the store has it, so a box holds results across our restarts.

Group commit: everything that happens in one turn of the event loop (submits, box
messages, ticks) writes into one open store batch; at the end of the turn (`_flush`,
scheduled with call_soon by the first write) the batch is committed once, and only then
is anything said to anyone: submitters get their answer, frames queued for each box go
out in one write per box, log followers are woken. Under load a turn carries many builds
and one fsync serves them all; when idle a turn carries one and nothing waits for a timer.
If a commit fails, memory and the store may disagree: the control plane stops (fail-stop)
and a restart rebuilds memory from the store.
"""

import asyncio
import collections
import contextlib
import dataclasses
import gc
import hashlib
import hmac
import json
import logging
import os
import secrets
import signal
import sys
import time

from hived.control import scheduler as sch
from hived.control.config import ControlConfig
from hived.control.holdings import HoldingsIndex
from hived.control.keyexchange import ConnectorLink, KeyExchange
from hived.control.metrics import ControlMetrics
from hived.control.store import STREAM_MARKER, Build, Store
from hived.control.stores import open_store
from hived.link import peer_address
from hived.protocol.channel import Channel, ChannelClosed
from hived.protocol.errors import ProtocolError
from hived.protocol.session import Session

log = logging.getLogger(__name__)

REGISTER_TIMEOUT_S = 10.0
BOX_ROW_EVERY_S = 10.0  # how often a heartbeating box's row in the store is refreshed
CHECKPOINT_EVERY_S = 1.0


def token_hash(token: str) -> str:
    """Tokens are 256-bit random strings: one SHA-256 is enough (no password stretching)."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


def mint_box_token(config, name: str) -> str:
    """A new token for box `name`, its hash stored in the hive's store (`hived control
    add-box`, `hived up`); the token itself is returned once and kept nowhere.
    ValueError for a bad name; StoreError or ConfigError when the store cannot be opened."""
    from hived.control.config import NAME_RE
    from hived.control.stores import open_store

    if not NAME_RE.match(name):
        raise ValueError(f"box name {name!r}: use lower-case letters, digits and '-' (at most 32)")
    token = new_token()
    store = open_store(config)
    try:
        store.set_box_token(name, token_hash(token))
    finally:
        store.close()
    return token


class BoxLink:
    """One registered box's connection. Frames for it wait in `out` until the control
    plane's next commit, then go out together (one write)."""

    def __init__(self, box_id: str, channel: Channel, control: "ControlPlane") -> None:
        self.box_id = box_id
        self.channel = channel
        self.control = control
        self.stale_cancelled: set[str] = set()
        self.row_written = 0.0
        self.out: list[bytes] = []
        self.logged: dict[str, int] = {}  # build id -> lease: tell the box how far its output is stored
        self.ticket_key: bytes | None = None  # box peers: the key its checkout tickets are made with

    def send(self, name: str, **fields) -> None:
        try:
            frame = self.channel.session.frame(name, **fields)
        except (ProtocolError, OSError, RuntimeError) as exc:
            log.warning("box %s: cannot send %s: %s", self.box_id, name, exc)
            return
        if not self.out and not self.logged:
            self.control._dirty(self)
        self.out.append(frame)

    def output_stored(self, build_id: str, lease: int) -> None:
        """With this turn's commit, one `build.logged` per build says how far its output is
        durable (v3 boxes keep what they sent until then)."""
        if self.channel.session.version < 3:
            return
        if not self.out and not self.logged:
            self.control._dirty(self)
        self.logged[build_id] = lease

    def take_out(self) -> list[bytes]:
        """This turn's frames, said once its commit has landed. The log positions are read now,
        from the batch that commit makes durable."""
        frames, self.out = self.out, []
        logged, self.logged = self.logged, {}
        for build_id, lease in logged.items():
            position = self.control.store.log_position(build_id)
            if position >= 0:
                try:
                    frames.append(self.channel.session.frame("build.logged", build_id=build_id, lease=lease,
                                                             seq=position))
                except ProtocolError:  # the link closed meanwhile: the box sends it all again
                    break
        return frames

    def write_frames(self, frames: list[bytes]) -> None:
        channel = self.channel
        if frames and channel.closed_reason is None and channel.transport is not None \
                and not channel.transport.is_closing():
            channel.transport.write(frames[0] if len(frames) == 1 else b"".join(frames))


class ControlPlane:
    def __init__(self, config: ControlConfig, *, store: Store | None = None, clock=time.time) -> None:
        self.config = config
        self.clock = clock
        self.store = store
        self.scheduler = sch.Scheduler(lost_s=config.box_lost_s)
        self.metrics = ControlMetrics(self)
        self.links: dict[str, BoxLink] = {}
        self.connector_channels: set[Channel] = set()
        self.epoch = secrets.token_hex(8)  # boxes learn from it that tunnels of an earlier run are gone
        self.kex = KeyExchange(config.networks, hive=config.hive, send_box=self._send_box,
                               holds=self.scheduler.holds, build_network=self._build_network)
        self.api_port = 0
        self.box_port = 0
        self._log_events: dict[str, asyncio.Event] = {}
        self.schedule_samples: collections.deque = collections.deque(maxlen=100_000)  # seconds
        self._box_server = None
        self._api_runner = None
        self._tasks: set[asyncio.Task] = set()
        self._ticker: asyncio.Task | None = None
        self.started_at = 0.0
        self.finished_builds = 0          # stored as finished since start
        self.finish_listeners: list = []  # fn(state), called once a build's end is durable
        # group commit (see the module's docstring)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_handle: asyncio.Handle | None = None
        self._after: list = []            # (fn, args) to run once the batch is durable, in order
        self._dirty_links: list[BoxLink] = []
        self._acks: list[tuple[asyncio.Future, object]] = []
        self._assigned: list[float] = []  # submitted_at of builds whose build.assign is queued
        self._wake_ids: set[str] = set()  # builds whose followers are woken after the commit
        self._pipelined = 0               # commits in flight at most (a store that commits off the loop)
        self._in_flight: collections.deque = collections.deque()  # (future, _Turn): commits in flight, in order
        self.failed: asyncio.Future | None = None  # set (with the exception) if a commit fails
        self.leading = True               # False: a standby replica (hived/control/replicas.py)
        self.replica = None
        self.commits = 0
        self.commit_seconds: collections.deque = collections.deque(maxlen=10_000)
        self.holdings = HoldingsIndex()   # who holds which build/checkout image (box peers)
        self.peer_token = ""              # the hive's peer link secret, handed to boxes (peering.config)

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        self._loop = asyncio.get_running_loop()
        self.failed = self._loop.create_future()
        if self.store is None:
            self.store = open_store(cfg, background_checkpoint=True)
        self.store.sync_config({k: {"shapes": v.shapes, "secure_networks": v.secure_networks}
                                for k, v in cfg.customers.items()}, cfg.shapes)
        for box_id, digest in cfg.box_tokens_sha256.items():
            self.store.set_box_token(box_id, digest)
        self.peer_token = hive_peer_token(self.store, cfg.state_dir)
        self.started_at = self.clock()
        self._pipelined = getattr(self.store, "commits_in_flight", 0) if callable(
            getattr(self.store, "commit_start", None)) else 0
        if callable(getattr(self.store, "take_lead", None)):  # PostgreSQL: maybe one replica of several
            from hived.control.replicas import Replica

            self.leading = False
            self.replica = Replica(self, self.store, cfg.database, cfg.database_password())
        else:
            self.scheduler.load(self.store.live_builds(), self.started_at)
            self._apply(self.scheduler.dispatch(self.started_at))
            self.metrics.leader_changes.inc()
        loop = asyncio.get_running_loop()
        ssl_ctx = None
        if cfg.tls_dir is not None:
            from hived.control import tls

            ssl_ctx = tls.server_context(cfg.tls_dir)
        self._box_server = await loop.create_server(self._box_factory, cfg.box_host, cfg.box_port,
                                                    ssl=ssl_ctx, reuse_address=True)
        self.box_port = self._box_server.sockets[0].getsockname()[1]
        from hived.control.api import start_api

        self._api_runner, self.api_port = await start_api(self, cfg.api_host, cfg.api_port)
        if self.replica is not None:
            await self.replica.start()  # leads at once if nobody else does
        self._ticker = loop.create_task(self._tick_loop())
        if getattr(self.store, "background_checkpoint", False):
            self.spawn(self._checkpoint_loop())

    async def stop(self) -> None:
        if self._ticker:
            self._ticker.cancel()
        self._flush()  # whatever the last turn wrote is committed and said
        await self._drain()
        if self._box_server:
            self._box_server.close()
        for link in list(self.links.values()):
            link.channel.close("control plane stopping")
        for channel in list(self.connector_channels):
            channel.close("control plane stopping")
        if self._api_runner:
            await self._api_runner.cleanup()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._ticker:
            await asyncio.gather(self._ticker, return_exceptions=True)
        for event in self._log_events.values():
            event.set()
        self._flush()
        await self._drain()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self.replica is not None:
            await self.replica.stop()
        if self.store is not None:
            self.store.close()

    def endpoints(self) -> dict:
        host = self.config.api_host or "127.0.0.1"
        return {"hive": self.config.hive, "api": f"http://{_url_host(host)}:{self.api_port}",
                "box": f"{self.config.box_host}:{self.box_port}", "tls": self.config.tls_dir is not None,
                "pid": os.getpid()}

    def box_endpoint(self) -> str:
        """HOST:PORT where the other replicas forward boxes to (box_listen; 0.0.0.0 is loopback)."""
        return f"{_url_host(self.config.box_host)}:{self.box_port}"

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _tick_loop(self) -> None:
        period = min(self.config.heartbeat_s, self.config.box_lost_s / 4)
        while True:
            await asyncio.sleep(period)
            try:
                self._apply(self.scheduler.tick(self.clock()))
                self.kex.tick(self.clock())
            except Exception:  # a bug here must not stop loss detection for good
                log.exception("scheduler tick failed")

    # -- group commit ---------------------------------------------------------------------------
    def _begin(self) -> None:
        """Writes follow: open the turn's batch (once) and make sure it is flushed."""
        if not self.store.in_batch:
            if self.failed is not None and self.failed.done():
                raise StoreFailed("the hive's store failed: the control plane is stopping")
            self.store.begin()
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._flush_handle is None and self._loop is not None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _dirty(self, link: BoxLink) -> None:
        self._dirty_links.append(link)
        self._schedule_flush()

    def _after_commit(self, fn, *args) -> None:
        self._after.append((fn, args))
        self._schedule_flush()

    def _flush(self) -> None:
        """Commit the turn's batch, then say everything that waited for it. A store that commits
        off this loop (`commit_start`: PostgreSQL) is not waited for: while its commits are in
        flight the loop goes on; the next turn's batch is sent at once while fewer than
        `commits_in_flight` are (the store orders batches that share rows), else the next turns'
        writes and words gather in one batch, sent when one lands (the batch's size follows the
        load). Turns are said in the order they were committed in."""
        self._flush_handle = None
        store = self.store
        if self._pipelined:
            if self._in_flight and (len(self._in_flight) >= self._pipelined or not store.in_batch):
                return  # a landing flushes again (a turn that wrote nothing is said after those in flight)
            if store.in_batch:
                t0 = time.perf_counter()
                try:
                    fut = store.commit_start()
                except Exception as exc:
                    self._commit_failed(exc)
                    return
                self._in_flight.append((fut, self._take_turn(t0)))
                fut.add_done_callback(self._commit_landed)
                return
        elif store is not None and store.in_batch:
            t0 = time.perf_counter()
            try:
                store.commit()
            except Exception as exc:
                self._commit_failed(exc)
                return
            self.commits += 1
            self.commit_seconds.append(time.perf_counter() - t0)
        self._say(self._take_turn(0.0))

    def _take_turn(self, t0: float) -> "_Turn":
        links, self._dirty_links = self._dirty_links, []
        turn = _Turn(self._acks, [(link, link.take_out()) for link in links], self._assigned, self._after,
                     self._wake_ids, t0)
        self._acks, self._assigned, self._after, self._wake_ids = [], [], [], set()
        return turn

    def _commit_landed(self, _fut) -> None:
        """(any thread) A pipelined commit ended: go on in the loop."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._commits_done)

    def _commits_done(self) -> None:
        landed = False
        while self._in_flight and self._in_flight[0][0].done():  # a later one waits for the earlier
            fut, turn = self._in_flight[0]
            exc = fut.exception()
            if exc is not None:
                self._commit_failed(exc)  # (fails the waiting turns' submitters too, this one's first)
                return
            self._in_flight.popleft()
            self.commits += 1
            self.commit_seconds.append(time.perf_counter() - turn.t0)
            self._say(turn)
            landed = True
        if landed:
            self._flush()  # what gathered meanwhile

    async def _drain(self, timeout: float = 30.0) -> None:
        """Wait for pipelined commits in flight (stopping)."""
        deadline = time.monotonic() + timeout
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    def _say(self, turn: "_Turn") -> None:
        for fut, result in turn.acks:
            if not fut.done():
                fut.set_result(result)
        for link, frames in turn.frames:
            link.write_frames(frames)
        if turn.assigned:  # build.assign is on its way: the scheduling latency ends here
            now = self.clock()
            observe = self.metrics.schedule_seconds.observe
            samples = self.schedule_samples
            for submitted in turn.assigned:
                waited = max(0.0, now - submitted)
                observe(waited)
                samples.append(waited)
        for fn, args in turn.after:
            fn(*args)
        if turn.wake:
            self._wake(turn.wake)

    def _commit_failed(self, exc: Exception) -> None:
        log.critical("hive %s: the store could not commit (%s): stopping; a restart recovers from the "
                     "last commit", self.config.hive, exc)
        err = StoreFailed(f"the hive's store could not commit: {exc}")
        turns = [turn for _, turn in self._in_flight] + [self._take_turn(0.0)]
        self._in_flight.clear()
        for turn in turns:  # nothing of these turns is said: their frames, wake-ups, callbacks go
            for fut, _ in turn.acks:
                if not fut.done():
                    fut.set_exception(err)
        for link in list(self.links.values()):
            link.channel.close("control plane store failure")
        if self.failed is not None and not self.failed.done():
            self.failed.set_exception(err)
            self.failed.exception()  # retrieved by serve(); not an unhandled-exception warning

    def _durable(self, result) -> asyncio.Future:
        """A future that gets `result` once the current batch is committed."""
        fut = self._loop.create_future()
        if self.failed is not None and self.failed.done():
            fut.set_exception(StoreFailed("the hive's store failed earlier; the control plane is stopping"))
            return fut
        self._acks.append((fut, result))
        self._schedule_flush()
        return fut

    async def _checkpoint_loop(self) -> None:
        """WAL checkpoints on a thread, so that no commit on the loop has to do one."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(CHECKPOINT_EVERY_S)
            try:
                await loop.run_in_executor(None, self.store.checkpoint)
            except Exception as exc:  # busy or failing: SQLite's own checkpoint is the backstop
                log.debug("checkpoint: %s", exc)

    # -- builds (the API calls these) -------------------------------------------------------
    def new_build_id(self) -> str:
        return f"{self.config.hive}_{secrets.token_hex(8)}"

    def submit_nowait(self, build: Build) -> asyncio.Future:
        """Store and schedule the build in this turn's batch; the future gives (build, created)
        once that is durable."""
        if not self.leading:
            return asyncio.ensure_future(self.submit(build))
        self._begin()
        build, created = self.store.create_build(build)
        if created:
            self._apply(self.scheduler.submit(build, self.clock()))
        return self._durable((build, created))

    async def submit(self, build: Build) -> tuple[Build, bool]:
        """Store the build durably, then schedule it. Returns (build, created) once durable.
        Among replicas, a standby (and the leader, for a build with an idempotency key, which
        another replica may take at the same time) stores it in a transaction of its own."""
        if self.replica is not None and (not self.leading or build.idem_key is not None):
            if self.failed is not None and self.failed.done():
                raise StoreFailed("the control plane is stopping")
            build, created = await self.store.insert_now(build)
            if created and self.leading and build.id not in self.scheduler.builds:
                self._apply(self.scheduler.submit(build, self.clock()))
            return build, created
        return await self.submit_nowait(build)

    async def cancel(self, build_id: str) -> bool:
        if not self.leading:
            return await self.store.cancel_now(build_id, self.clock())
        self._begin()
        if not self.store.request_cancel(build_id):
            return await self._durable(False)
        self._apply(self.scheduler.cancel(build_id, self.clock()))
        return await self._durable(True)

    # -- replicas (hived/control/replicas.py) ---------------------------------------------------
    def become_leader(self, epoch: int) -> None:
        """This replica leads from now on: every commit is fenced by `epoch`; memory is loaded
        from the store as after a restart (boxes reconnect and claim what they hold)."""
        self.store.lead(epoch)
        self.leading = True
        self.metrics.leader_changes.inc()
        now = self.clock()
        self.scheduler.load(self.store.live_builds(), now)
        self._apply(self.scheduler.dispatch(now))
        self.carry_out_cancels()
        log.warning("hive %s: this control plane leads now (epoch %d, %d live builds)", self.config.hive,
                    epoch, len(self.scheduler.builds))

    def lost_lead(self, reason: str) -> None:
        """Fail-stop: whoever leads now owns the builds; a restart makes this one a standby."""
        if not self.leading or self.failed is None or self.failed.done():
            return
        self.leading = False
        log.critical("hive %s: this control plane no longer leads (%s): stopping", self.config.hive, reason)
        self._commit_failed(StoreFailed(f"this control plane no longer leads hive {self.config.hive}: {reason}"))

    def adopt(self, build_id: str) -> None:
        """A build a standby stored: schedule it (once)."""
        if not self.leading or build_id in self.scheduler.builds:
            return
        build = self.store.get_build(build_id)
        if build is not None and build.state == "queued" and build.id not in self.scheduler.builds:
            self._apply(self.scheduler.submit(build, self.clock()))

    def carry_out_cancels(self) -> None:
        """Cancels taken by standbys (build_cancels): done here, and forgotten in the same batch."""
        for build_id in self.store.pending_cancels():
            self.adopt(build_id)
            self._begin()
            self.store.cancel_done(build_id)
            if self.store.request_cancel(build_id):
                self._apply(self.scheduler.cancel(build_id, self.clock()))
            self._notify(build_id)

    def sweep(self) -> None:
        """What announcements may have missed: queued builds not scheduled, cancels not done."""
        if not self.leading:
            return
        for build_id in self.store.queued_ids():
            self.adopt(build_id)
        self.carry_out_cancels()

    def wake_remote(self, build_ids) -> None:
        """Another replica committed changes to these builds: wake their followers here."""
        self._wake(set(build_ids))

    # -- log followers -------------------------------------------------------------------------
    def log_event(self, build_id: str) -> asyncio.Event:
        """An event set at the next change of the build's log or state: take it *before*
        reading, so a change between the read and the wait is not missed."""
        event = self._log_events.get(build_id)
        if event is None:
            event = self._log_events[build_id] = asyncio.Event()
        return event

    def _notify(self, build_id: str) -> None:
        """Wake the build's followers once this turn's batch is committed. Whether anyone
        follows is looked at then, not now: a follower that starts reading between this
        change and its commit does not see the change, and must still be woken."""
        if not self._wake_ids:
            self._schedule_flush()
        self._wake_ids.add(build_id)

    def _wake(self, ids: set[str]) -> None:
        if self._log_events:
            for build_id in ids:
                event = self._log_events.pop(build_id, None)
                if event is not None:
                    event.set()

    # -- actions -------------------------------------------------------------------------------
    def _apply(self, actions) -> None:
        if not actions:
            return
        self._begin()
        for action in actions:
            if isinstance(action, sch.Assign):
                b = action.build
                if not self.store.assign(b.id, action.box_id, action.old_lease, action.lease, self.clock()):
                    log.error("build %s: the store refused assignment to %s (lease %d)", b.id,
                              action.box_id, action.lease)
                    continue
                self._assigned.append(b.submitted_at)
                link = self.links.get(action.box_id)
                if link is not None:  # else: the box reconnects without it and it is requeued
                    link.send("build.assign", build_id=b.id, lease=action.lease, shape=b.shape,
                              customer=b.customer, argv=b.argv, env=b.env, cwd=b.cwd,
                              timeout_s=b.timeout_s, options=self._assign_options(b))
                self._notify(b.id)
            elif isinstance(action, sch.Requeue):
                self.kex.build_over(action.build_id)
                self.store.requeue(action.build_id, action.lease, action.reason)
                log.info("build %s requeued: %s", action.build_id, action.reason)
                self._notify(action.build_id)
            elif isinstance(action, sch.Finish):
                self.kex.build_over(action.build_id)
                ok = self.store.finish(action.build_id, action.lease, action.state, code=action.code,
                                       signal=action.signal, reason=action.reason, message=action.message,
                                       usage=action.usage, now=self.clock())
                if ok:
                    self._after_commit(self._finished, action.state)
                    if action.reason == "infrastructure":
                        log.warning("build %s %s: %s", action.build_id, action.state, action.message)
                self._notify(action.build_id)
            elif isinstance(action, sch.CancelOnBox):
                link = self.links.get(action.box_id)
                if link is not None:
                    link.send("cancel", build_id=action.build_id, reason=action.reason[:256])
            elif isinstance(action, sch.PoolTarget):
                link = self.links.get(action.box_id)
                if link is not None:
                    link.send("pool.target", targets=action.targets)
            elif isinstance(action, sch.DropBox):
                link = self.links.get(action.box_id)
                if link is not None:
                    log.warning("box %s: dropping its link: %s", action.box_id, action.reason)
                    self._after_commit(link.channel.close, action.reason)
            else:  # pragma: no cover - a new action type without a handler is a bug
                raise TypeError(f"unknown scheduler action {action!r}")

    def _finished(self, state: str) -> None:
        self.finished_builds += 1
        self.metrics.finished.labels(state).inc()
        for fn in self.finish_listeners:
            fn(state)

    # -- box links ------------------------------------------------------------------------------
    def _box_factory(self):
        if not self.leading:  # a standby forwards boxes to the leader
            from hived.control.replicas import BoxForwarder

            return BoxForwarder(self.replica)
        channel = Channel(Session("control", self.config.hive, {"box", "connector"}),
                          hello_timeout=REGISTER_TIMEOUT_S)
        self.spawn(self._serve_box(channel))
        return channel

    def _send_box(self, box_id: str, name: str, **fields) -> bool:
        link = self.links.get(box_id)
        if link is None:
            return False
        link.send(name, **fields)
        return True

    def _build_network(self, build_id: str) -> str | None:
        st = self.scheduler.builds.get(build_id)
        options = getattr(st.build, "options", None) if st is not None else None
        return (options or {}).get("secure_compute") or None

    def _authenticate(self, msg, channel: Channel) -> str | None:
        """None if the box may register, else why not (said to the box, and logged)."""
        box_id, token = msg["box_id"], msg["token"]
        if self.config.tls_dir is not None:
            from hived.control.tls import peer_common_name

            cn = peer_common_name(channel.transport)
            if cn is not None and cn != box_id:
                return f"the certificate presented is for box {cn!r}, not {box_id!r}"
            if cn is None and self.config.require_box_certs:
                return f"box {box_id!r} presented no certificate and this hive requires one"
        record = self.store.get_box(box_id)
        if record is None or not record.token_hash:
            return (f"unknown box {box_id!r}: give it a token with `hived control add-box {box_id}` "
                    "or [boxes.NAME] token_sha256 in the hive's config")
        if not hmac.compare_digest(token_hash(token), record.token_hash):
            return f"wrong token for box {box_id!r}"
        return None

    async def _serve_box(self, channel: Channel) -> None:
        link = None
        try:
            await channel.handshake()
            msg = await asyncio.wait_for(channel.recv(), REGISTER_TIMEOUT_S)
            if channel.session.peer_role == "connector":
                await self._serve_connector(channel, msg)
                return
            if msg.name != "box.register":
                raise ProtocolError("bad_message", f"a box must send box.register first, not {msg.name}")
            refused = self._authenticate(msg, channel)
            if refused:
                log.warning("box link from %s refused: %s", peer_address(channel), refused)
                raise ProtocolError("not_allowed", refused)
            box_id = msg["box_id"]
            old = self.links.get(box_id)
            if old is not None:
                old.channel.close("the box connected again")
            link = self.links[box_id] = BoxLink(box_id, channel, self)
            now = self.clock()
            link.row_written = now
            self._begin()
            self.store.box_seen(box_id, capacity=msg["capacity"], shapes=msg["shapes"], warm=msg["warm"],
                                now=now, registered=True)
            link.send("box.registered", box_id=box_id, hive=self.config.hive,
                      heartbeat_s=self.config.heartbeat_s, lost_s=self.config.box_lost_s, epoch=self.epoch)
            if channel.session.version >= 3:  # box peers: the hive's peer link secret
                link.send("peering.config", hive=self.config.hive, token=self.peer_token)
            if channel.session.version >= 5:  # box peers: the key this box checks checkout tickets with
                link.ticket_key = secrets.token_bytes(32)
                link.send("peering.tickets", key=link.ticket_key)
            log.info("box %s registered from %s: shapes %s, capacity %d, warm %s, holding %d build(s)",
                     box_id, peer_address(channel), msg["shapes"], msg["capacity"], msg["warm"], len(msg["builds"]))
            self._apply(self.scheduler.box_connected(
                box_id, shapes=msg["shapes"], capacity=msg["capacity"], warm=msg["warm"],
                targets=msg["targets"], held=msg["builds"], now=now))
            while True:
                msg = await channel.recv()
                self._on_box_message(link, msg)
        except ProtocolError as exc:
            with contextlib.suppress(Exception):
                channel.transport.write(channel.session.error_frame(exc))
            channel.close(str(exc))
        except (ChannelClosed, TimeoutError) as exc:
            if link is None:
                log.info("box link from %s closed before registering: %s", peer_address(channel), exc)
        except Exception:  # a bug (or the store failing) ends this link only; the box reconnects
            log.exception("box link %s failed", link.box_id if link else peer_address(channel))
        finally:
            channel.close("link ended")
            if link is not None and self.links.get(link.box_id) is link:
                del self.links[link.box_id]
                self.holdings.forget(link.box_id)
                log.warning("box %s disconnected: %s", link.box_id, channel.closed_reason)
                self._apply(self.scheduler.box_disconnected(link.box_id, self.clock()))

    async def _serve_connector(self, channel: Channel, msg) -> None:
        """A Secure Compute connector's link: register, then peer answers and pings."""
        if msg.name != "connector.register":
            raise ProtocolError("bad_message", f"a connector must send connector.register first, not {msg.name}")
        f = msg.fields
        refused = self.kex.authenticate_connector(f["network"], f["token"], f["public_key"])
        if refused:
            log.warning("connector link from %s refused: %s", peer_address(channel), refused)
            raise ProtocolError("not_allowed", refused)
        link = BoxLink(f"connector:{f['network']}", channel, self)
        self.connector_channels.add(channel)
        conn = ConnectorLink(f["network"], link.send, channel.close, f["public_key"], f["endpoint"],
                             peer_address(channel), self.clock())
        try:
            link.send("connector.registered", **self.kex.connector_up(conn),
                      heartbeat_s=self.config.heartbeat_s, lost_s=self.config.box_lost_s)
            while True:
                try:
                    # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel that
                    # races with a message, and then stop() would wait for this loop for ever.
                    async with asyncio.timeout(self.config.box_lost_s):
                        msg = await channel.recv()
                except TimeoutError:
                    raise ChannelClosed(f"silent for {self.config.box_lost_s:g} s") from None
                if msg.name == "peer.added":
                    self.kex.peer_added(conn, msg["peer_id"], msg["ok"], msg["message"])
                elif msg.name == "ping":
                    link.send("pong", seq=msg["seq"])
                elif msg.name == "error":
                    log.warning("connector %s says %s: %s", conn.network, msg["code"], msg["message"])
                elif msg.name != "pong":
                    link.send("error", code="not_allowed", fatal=False, ref="",
                              message=f"the control plane does not take {msg.name} from a connector")
        except ChannelClosed as exc:
            channel.close(str(exc))
        finally:
            self.connector_channels.discard(channel)
            self.kex.connector_down(conn, channel.closed_reason or "link ended")

    def _on_box_message(self, link: BoxLink, msg) -> None:
        now = self.clock()
        box_id, f = link.box_id, msg.fields
        self.scheduler.seen(box_id, now)
        name = msg.name
        if name == "box.heartbeat":
            link.send("pong", seq=f["seq"])
            if now - link.row_written >= BOX_ROW_EVERY_S:
                link.row_written = now
                self._begin()
                box = self.scheduler.boxes.get(box_id)
                self.store.box_seen(box_id, capacity=box.capacity if box else 0,
                                    shapes=sorted(box.shapes) if box else [], warm=f["warm"], now=now)
            self._apply(self.scheduler.heartbeat(box_id, warm=f["warm"], assigns_seen=f["assigns_seen"],
                                                 now=now))
        elif name == "build.started":
            if self.scheduler.started(box_id, f["build_id"], f["lease"]):
                self._begin()
                self.store.mark_started(f["build_id"], f["lease"], f["cell_id"], now)
                self._notify(f["build_id"])
            else:
                self._stale(link, f["build_id"], f["lease"], name)
        elif name in ("build.output", "build.gap"):
            if self.scheduler.holds(box_id, f["build_id"], f["lease"]):
                self._begin()
                if name == "build.output":
                    stored = self.store.append_log(f["build_id"], f["lease"], f["seq"], f["stream"], f["data"])
                else:
                    marker = f"\n[hived: {f['message']}]\n".encode()
                    stored = self.store.append_log(f["build_id"], f["lease"], f["seq"], STREAM_MARKER, marker,
                                                   gap=(f["reason"], f["bytes"]))
                if stored is not None:
                    self._notify(f["build_id"])
                link.output_stored(f["build_id"], f["lease"])
            else:
                self._stale(link, f["build_id"], f["lease"], name)
        elif name == "build.exit":
            actions = self.scheduler.exited(box_id, f["build_id"], f["lease"], started=f["started"],
                                            reason=f["reason"], code=f["code"], signal=f["signal"],
                                            message=f["message"], usage=f["usage"], now=now,
                                            permanent=f.get("permanent", False))
            if not actions:
                self.metrics.refused.inc()
                log.info("box %s: exit of %s with stale lease %d: acknowledged, ignored", box_id,
                         f["build_id"], f["lease"])
            self._apply(actions)  # durable first ...
            link.send("build.ack", build_id=f["build_id"], lease=f["lease"])  # ... then the box forgets
        elif name == "secure.open":
            self.kex.open(box_id, f["build_id"], f["lease"], f["cell_id"], f["network"], f["public_key"], now)
        elif name == "secure.close":
            self.kex.close(box_id, f["build_id"], f["lease"])
        elif name == "holds.report":
            self.holdings.report(box_id, full=f["full"], added=f["added"], removed=f["removed"],
                                 peer_addr=f["peer_addr"])
        elif name == "holds.find":
            link.send("holds.found", request_id=f["request_id"], key=f["key"],
                      holders=self.holdings.find(f["key"], asking=box_id, load=self._box_load))
        elif name == "checkout.find":
            self._checkout_find(link, f)
        elif name == "error":
            log.warning("box %s says %s: %s (%s)", box_id, f["code"], f["message"], f["ref"])
        elif name == "ping":
            link.send("pong", seq=f["seq"])
        elif name == "pong":
            pass
        else:
            link.send("error", code="not_allowed", fatal=False, ref="",
                      message=f"the control plane does not take {name} from a box")

    def _assign_options(self, b) -> dict:
        """The build's options, plus its customer's registry credentials for its image when the
        hive's config has them: in the message only, never in the store."""
        options = b.options or {}
        customer = self.config.customers.get(b.customer)
        if not options.get("image") or customer is None or not customer.registry_credentials:
            return options
        from hived.oci.credentials import for_assignment

        auth = for_assignment(customer.registry_credentials, str(options["image"]), b.customer)
        return {**options, "registry_auth": auth} if auth else options

    def _box_load(self, box_id: str) -> int:
        box = self.scheduler.boxes.get(box_id)
        return len(box.builds) if box is not None else 0

    def _checkout_find(self, link: BoxLink, f) -> None:
        """Box peers, checkouts: vouch for a fetch only for a build the asking box holds (its
        lease), of the repository that build names (the customer named it; the origin still
        decides access: the fetcher asks it with the build's credentials first), and not of a
        repository the hive's config gives another customer ([repos.NAME]). Each holder comes
        with a ticket made with that holder's key, which it checks before sending."""
        from hived import tickets
        from hived.repos.errors import RepoError
        from hived.repos.url import ALL_PROTOCOLS, FULL_SHA, parse_url

        key, commit = f["repo_key"], f["commit"]
        refused = ""
        st = self.scheduler.builds.get(f["build_id"])
        if st is None or not self.scheduler.holds(link.box_id, f["build_id"], f["lease"]):
            refused = f"box {link.box_id} does not hold build {f['build_id']} (lease {f['lease']})"
        elif not FULL_SHA.match(commit):
            refused = "a checkout is asked for by its full commit id"
        else:
            try:
                remote, _ = parse_url(str((getattr(st.build, "options", None) or {}).get("repo") or ""),
                                      ALL_PROTOCOLS)
                owner = self._repo_owners().get(key)
                if remote.key != key:
                    refused = f"build {f['build_id']} does not name that repository"
                elif owner is not None and owner != getattr(st.build, "customer", None):
                    refused = f"repository {remote.normal} is customer {owner}'s (the hive's repos config)"
            except RepoError:
                refused = f"build {f['build_id']} names no repository"
        holders = []
        if refused:
            log.warning("box %s: checkout.find refused: %s", link.box_id, refused)
        else:
            expires = int(time.time()) + tickets.TTL_S
            for h in self.holdings.find(f"checkout:{key}@{commit}", asking=link.box_id, load=self._box_load):
                other = self.links.get(h["box_id"])
                if other is None or other.ticket_key is None:
                    continue  # a holder that cannot check tickets would refuse anyway
                holders.append({"box_id": h["box_id"], "addr": h["addr"], "expires": expires,
                                "ticket": tickets.checkout_ticket(other.ticket_key, link.box_id, h["box_id"], key,
                                                                  commit, expires)})
        link.send("checkout.found", request_id=f["request_id"], holders=holders, refused=refused)

    def _repo_owners(self) -> dict[str, str]:
        """Repository key -> the customer the hive's config gives it ([repos.NAME]: its url, and
        the GitHub clone URL its push events carry)."""
        owners = getattr(self, "_repo_owner_keys", None)
        if owners is None:
            from hived.repos.errors import RepoError
            from hived.repos.url import ALL_PROTOCOLS, parse_url

            owners = {}
            for repo in self.config.repos.values():
                for url in (repo.url, f"https://github.com/{repo.name}.git"):
                    with contextlib.suppress(RepoError):
                        if url:
                            owners[parse_url(url, ALL_PROTOCOLS)[0].key] = repo.customer
            self._repo_owner_keys = owners
        return owners

    def _stale(self, link: BoxLink, build_id: str, lease: int, what: str) -> None:
        """A message for a build this box no longer holds: tell it (once) to stop that build."""
        self.metrics.refused.inc()
        if build_id not in link.stale_cancelled:
            link.stale_cancelled.add(build_id)
            log.warning("box %s: %s for %s with stale lease %d: telling it to cancel", link.box_id, what,
                        build_id, lease)
            link.send("cancel", build_id=build_id, reason="this box no longer holds the build's lease")


def hive_peer_token(store, state_dir) -> str:
    """The hive's peer link secret. A store shared by several replicas (PostgreSQL) keeps it,
    so that boxes still peer after a failover: the first replica to start puts it there (the
    token of an earlier single control plane's state_dir/peer.token if there is one, so its
    boxes go on peering; else a new one), the others read it. Else state_dir/peer.token."""
    shared = getattr(store, "peer_token", None)
    if callable(shared):
        return shared(_read_peer_token(state_dir) or new_token())
    return load_peer_token(state_dir)


def _read_peer_token(state_dir) -> str:
    from pathlib import Path

    try:
        return (Path(state_dir) / "peer.token").read_text().strip()
    except FileNotFoundError:
        return ""


def load_peer_token(state_dir) -> str:
    """The hive's peer link secret: made once (state_dir/peer.token, 0600), kept across restarts."""
    from pathlib import Path

    path = Path(state_dir) / "peer.token"
    token = _read_peer_token(state_dir)
    if token:
        return token
    token = new_token()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".peer.token.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(tmp, path)
    return token


@dataclasses.dataclass
class _Turn:
    """What one turn of the loop says once its batch is durable."""
    acks: list            # (future, result) for submitters
    frames: list          # (BoxLink, [frame, ...])
    assigned: list        # submitted_at of the builds whose build.assign goes out
    after: list           # (fn, args)
    wake: set             # builds whose log followers are woken
    t0: float             # when the commit started (perf_counter)


class StoreFailed(Exception):
    """The store could not make a batch durable: the control plane stops."""



def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


# -- process -----------------------------------------------------------------------------------
async def serve(config: ControlConfig, *, ready_file=None) -> int:
    from hived import sdnotify

    cp = ControlPlane(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await cp.start()
    gc.freeze()  # what start-up made lives as long as we do: keep it out of every full collection
    endpoints = config.state_dir / "endpoints.json"
    try:
        config.state_dir.mkdir(parents=True, exist_ok=True)  # (a PostgreSQL hive keeps nothing else there)
        tmp = endpoints.with_suffix(".tmp")
        tmp.write_text(json.dumps(cp.endpoints(), indent=2) + "\n")
        tmp.rename(endpoints)
        print(f"ready {json.dumps(cp.endpoints())}", flush=True)
        sdnotify.notify(f"READY=1\nSTATUS=hive {config.hive}: API on port {cp.api_port}, "
                        f"boxes on port {cp.box_port}")
        stopper = loop.create_task(stop.wait())
        await asyncio.wait({stopper, cp.failed}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if cp.failed.done():
            print(f"hived control: {cp.failed.exception()}", file=sys.stderr, flush=True)
            return 1
        return 0
    finally:
        sdnotify.notify("STOPPING=1")
        with contextlib.suppress(FileNotFoundError):
            endpoints.unlink()
        await cp.stop()
        print("stopped", file=sys.stderr, flush=True)


def main(config_path: str) -> int:
    """`hived control --config FILE`. Raises hived.errors.UserError on a bad config or state file."""
    import uvloop

    from hived.control.config import ConfigError, load
    from hived.control.store import StoreError
    from hived.errors import UserError

    try:
        config = load(config_path)
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    try:
        return uvloop.run(serve(config))
    except (StoreError, ConfigError) as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:
        raise UserError(f"hive {config.hive} cannot start: {exc}") from None
