r"""Several `hived control` processes on one PostgreSQL database: one leads, the others stand by.

    replica A (leader)                 PostgreSQL                   replica B (standby)
    holds advisory lock LEADER_LOCK ── session lock ──────────────  tries it every 0.2 s
    epoch N in `leader` (fencing) ──── every commit checks it ───
    scheduler, box links, commits  ─── NOTIFY hived_builds ───────▶ wakes its log followers
    adopts queued builds, cancels  ◀── NOTIFY hived_submitted / hived_cancels ── API submits, cancels
    box port: box links                                              box port: TCP proxy to A's box port

* Election: a session advisory lock on a connection of the leader's own. PostgreSQL drops it
  when that connection ends, which a SIGKILLed process's does at once; a standby takes it at
  its next try, bumps the epoch in `leader` and loads the live builds. The leader renews
  `leader.renewed_at` every second; a standby ends the session of a leader silent for
  LEASE_S (stopped or stuck, its connection still open), and takes the lock. The lock is only who
  may try: what makes a stale leader harmless is the epoch. Every commit of the leader
  share-locks the `leader` row and fails if the epoch moved (a takeover waits for a commit in
  progress), so a leader that lost the lock writes nothing more.
* A control plane that finds it no longer leads (its lock connection ended, a commit fenced
  off) stops (exit 1) like on any failed commit; its supervisor (systemd) starts it again as
  a standby. Nothing it acknowledged is lost: acknowledgements wait for commits.
* Every replica serves the API. A standby stores submitted builds in a transaction of its own
  (acknowledged once committed) and announces them; the leader adopts them (announcements
  are a shortcut: the leader also sweeps for queued builds it does not have). Cancels on a
  standby are rows in `build_cancels` the leader carries out and deletes.
* Boxes (and Secure Compute connectors) may dial any replica: a standby forwards the TCP
  connection to the leader's box port (TLS stays end to end), so a box is always linked to
  the leader. When the leader dies, its links (direct or forwarded) drop, boxes reconnect
  and register with the new leader, claiming the builds they hold; running builds go on and
  their held output and exits are taken by the new leader. Key exchange state lives in the
  leader's memory: the new leader's epoch in `box.registered` makes boxes fail their Secure
  Compute builds clearly, as after a restart.
"""

import asyncio
import contextlib
import logging
import time

log = logging.getLogger(__name__)

LEADER_LOCK = 0x68697665_64000002  # pg advisory lock key: "hived" + 2
TRY_EVERY_S = 0.2
CHECK_EVERY_S = 1.0     # the leader renews `leader.renewed_at` this often
LEASE_S = 5.0           # a leader that has not renewed for this long (hung, not dead) is ended
SWEEP_EVERY_S = 2.0
_RENEW = ("UPDATE leader SET renewed_at = extract(epoch FROM clock_timestamp()) WHERE id = 1 AND epoch = $1 "
          "RETURNING epoch")
# The session holding the leader lock, if the leader has not renewed within the lease (pg_locks shows
# a bigint advisory key as two 32-bit halves).
_STALE_HOLDER = ("SELECT l.pid, extract(epoch FROM clock_timestamp()) - leader.renewed_at AS silent "
                 "FROM leader, pg_locks AS l WHERE leader.id = 1 "
                 "AND extract(epoch FROM clock_timestamp()) - leader.renewed_at > $1 AND l.locktype = 'advisory' "
                 "AND l.classid = $2 AND l.objid = $3 AND l.objsubid = 1 AND l.granted")


class Replica:
    """This control plane's part in a hive of several replicas."""

    def __init__(self, control, store, url: str, password: str | None) -> None:
        self.cp = control
        self.store = store
        self.url = url
        self.password = password
        self.lock_conn = None
        self.listen_conn = None
        self.leader_box: tuple[str, int] | None = None  # where a standby forwards boxes to
        self.own_pids = store.writer_pids()
        self._tasks: list[asyncio.Task] = []
        self.stopping = False
        self.epoch: int | None = None

    async def _connect(self):
        import asyncpg

        return await asyncpg.connect(self.url, password=self.password, timeout=30,
                                     server_settings={"application_name": f"hived-control-{self.cp.config.hive}"})

    async def start(self) -> None:
        """Listen first (nothing announced after this is missed), then try to lead once."""
        self.listen_conn = await self._connect()
        for channel in ("hived_builds", "hived_submitted", "hived_cancels", "hived_leader"):
            await self.listen_conn.add_listener(channel, self._notified)
        self.lock_conn = await self._connect()
        if not await self._try_lead():
            await self._learn_leader()
            self._tasks.append(asyncio.get_running_loop().create_task(self._campaign()))

    async def stop(self) -> None:
        self.stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for conn in (self.listen_conn, self.lock_conn):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close(timeout=5)

    async def _try_lead(self) -> bool:
        if not await self.lock_conn.fetchval("SELECT pg_try_advisory_lock($1)", LEADER_LOCK):
            return False
        ends = self.cp.endpoints()
        epoch = await self.store.take_lead(f"{_hostname()}:{ends['pid']}", self.cp.box_endpoint(), ends["api"],
                                           time.time())
        self.epoch = epoch
        self.lock_conn.add_termination_listener(self._lock_lost)
        # the leader's own commits are the only ones that announce build changes: nothing to hear
        await self.listen_conn.remove_listener("hived_builds", self._notified)
        await self.lock_conn.execute("SELECT pg_notify('hived_leader', $1)", str(epoch))
        self.cp.become_leader(epoch)
        self._tasks.append(asyncio.get_running_loop().create_task(self._hold()))
        return True

    def _lock_lost(self, _conn) -> None:
        if not self.stopping:
            self.cp.lost_lead("its leader lock connection ended")

    async def _campaign(self) -> None:
        while True:
            await asyncio.sleep(TRY_EVERY_S)
            try:
                if await self._try_lead():
                    return
                await self._end_hung_leader()
            except Exception as exc:  # the database away: keep trying (the API answers 5xx meanwhile)
                log.warning("hive %s: cannot try to lead: %s", self.cp.config.hive, exc)

    async def _end_hung_leader(self) -> None:
        """A leader alive enough to hold its lock but not renewing (stopped, stuck) is ended:
        its lock goes with its session, its writes are fenced off by the next epoch."""
        row = await self.lock_conn.fetchrow(_STALE_HOLDER, LEASE_S, LEADER_LOCK >> 32, LEADER_LOCK & 0xFFFFFFFF)
        if row is not None:
            log.warning("hive %s: the leader has not renewed its lease for %.1f s: ending its session (pid %d)",
                        self.cp.config.hive, row["silent"], row["pid"])
            await self.lock_conn.execute("SELECT pg_terminate_backend($1)", row["pid"])

    async def _hold(self) -> None:
        """While leading: notice a dead lock connection (a broken network does not always say
        so), and sweep for what announcements may have missed."""
        swept = time.monotonic()
        while True:
            await asyncio.sleep(CHECK_EVERY_S)
            try:
                async with asyncio.timeout(LEASE_S):
                    renewed = await self.lock_conn.fetchval(_RENEW, self.epoch)
            except Exception as exc:
                self.cp.lost_lead(f"its leader lock connection failed: {exc}")
                return
            if renewed is None:
                self.cp.lost_lead("another control plane took the lead (a newer epoch)")
                return
            if time.monotonic() - swept >= SWEEP_EVERY_S:
                swept = time.monotonic()
                self.cp.sweep()

    async def _learn_leader(self) -> None:
        try:
            row = await self.store.leader()
        except Exception as exc:
            log.warning("hive %s: cannot read who leads: %s", self.cp.config.hive, exc)
            return
        if row is not None:
            host, _, port = row["box_endpoint"].rpartition(":")
            self.leader_box = (host.strip("[]"), int(port))

    def _notified(self, _conn, pid: int, channel: str, payload: str) -> None:
        cp = self.cp
        if channel == "hived_builds":
            if pid not in self.own_pids:
                cp.wake_remote(payload.split(","))
        elif channel == "hived_submitted":
            if cp.leading:
                cp.adopt(payload)
        elif channel == "hived_cancels":
            if cp.leading:
                cp.carry_out_cancels()
        elif channel == "hived_leader" and not cp.leading:
            asyncio.get_running_loop().create_task(self._learn_leader())


def _hostname() -> str:
    import socket

    return socket.gethostname()


class BoxForwarder(asyncio.Protocol):
    """A standby's box port: each connection is forwarded, bytes as they are, to the leader's."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.transport = None
        self.upstream = None
        self.pending: list[bytes] = []

    def connection_made(self, transport) -> None:
        self.transport = transport
        target = self.replica.leader_box
        if target is None:
            transport.close()  # nobody leads right now: the box tries again
            return
        asyncio.get_running_loop().create_task(self._dial(*target))

    async def _dial(self, host: str, port: int) -> None:
        try:
            async with asyncio.timeout(5):
                transport, _ = await asyncio.get_running_loop().create_connection(
                    lambda: _Upstream(self), host, port)
        except (OSError, TimeoutError):
            self.transport.close()
            return
        if self.transport.is_closing():
            transport.close()
            return
        self.upstream = transport
        if self.pending:
            transport.write(b"".join(self.pending))
            self.pending.clear()

    def data_received(self, data: bytes) -> None:
        if self.upstream is None:
            self.pending.append(data)
        else:
            self.upstream.write(data)

    def eof_received(self):
        if self.upstream is not None:
            self.upstream.close()
        return False

    def connection_lost(self, exc) -> None:
        if self.upstream is not None:
            self.upstream.close()

    # flow control: a side that cannot take more stops the other side's reading
    def pause_writing(self) -> None:
        _flow(self.upstream, "pause_reading")

    def resume_writing(self) -> None:
        _flow(self.upstream, "resume_reading")


class _Upstream(asyncio.Protocol):
    def __init__(self, down: BoxForwarder) -> None:
        self.down = down

    def data_received(self, data: bytes) -> None:
        self.down.transport.write(data)

    def connection_lost(self, exc) -> None:
        self.down.transport.close()

    def pause_writing(self) -> None:
        _flow(self.down.transport, "pause_reading")

    def resume_writing(self) -> None:
        _flow(self.down.transport, "resume_reading")


def _flow(transport, what: str) -> None:
    if transport is not None and not transport.is_closing():
        with contextlib.suppress(RuntimeError):  # closed meanwhile
            getattr(transport, what)()
