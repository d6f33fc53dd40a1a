r"""The hive's store on PostgreSQL (asyncpg): the same `Store` interface and the same build
semantics as `SQLiteStore`, for hives that outgrow one machine's file.

    [hive]
    database = "postgresql://hived@db.example/eu1"    # no password in the URL
    database_password_file = "/etc/hived/eu1-db.password"   # or $HIVED_DATABASE_PASSWORD, $PGPASSWORD

Shape:
* asyncpg runs on an event loop of its own, on a thread of its own; the Store methods are
  plain calls that wait for it (like SQLite's, which wait for the disk).
* Writes are written behind. The store keeps a copy of every live build (queued, assigned,
  running: what a restart loads anyway); each write method decides on that copy with the
  same conditions as the SQLite store's conditional UPDATEs (state, lease, box_seq, the log
  cap) and returns at once, and `commit()` sends the whole batch as one statement (its own
  transaction, one round trip): new builds, changed builds, log chunks and box rows, each
  as arrays through `unnest`. `commit_start()` does the same without waiting (the control
  plane's pipelined group commit).
* Up to WRITERS commits are in flight at once, each on a writer connection of its own. A
  batch that touches a build (or box row) an earlier batch in flight touches, or has plain
  statements, waits for that batch first: what depends on a batch lands after it; batches
  on disjoint rows land in any order (the control plane says them in order anyway). With
  two, a batch need not wait for the one before it to land: a build's schedule latency is
  one commit, not one and a half (bench control here: p99 5 ms with two, 11 ms with one).
  Writers plan the commit statement once, as index lookups (see _WRITER_SETTINGS: a plan
  made on a small table scanned the whole table every commit).
* The database stays the judge: the UPDATE of a changed build is compare-and-set on the
  row as this store last knew it (state, lease, next log seq, cancel flag). If anything
  else changed that row, the commit fails and is rolled back whole, the copy goes back to
  the last commit, and the control plane stops (as on any failed commit); a restart
  reloads from the database.
* Reads (`get_build`, `read_log`, ...) go to the database on a connection of their own:
  committed state only, as with SQLite.
* Schema migrations are numbered and applied at open, under an advisory lock; a database
  whose schema is newer than this code is refused.
* Leading several replicas (hived/control/replicas.py), every commit is also fenced by the
  leader's epoch and announces the builds it changed (NOTIFY hived_builds).
* `append_log` is SQLiteStore.append_log's rules in Python: a change to those (how output
  is ordered by box_seq, the cap) is made in both (the store tests run on both stores). One
  difference: chunks waiting behind a hole are kept in the live copy, not in a table; the
  box keeps them too until `build.logged` passes them (log_position is below the hole), so a
  restart loses nothing: the box sends them again.
"""

import asyncio
import collections
import concurrent.futures
import contextlib
import copy
import dataclasses
import json
import threading
from urllib.parse import urlsplit

from hived.control.store import (
    ASSIGNED,
    LIVE,
    PENDING_MAX_CHUNKS,
    QUEUED,
    RUNNING,
    STATES,
    STREAM_MARKER,
    TERMINAL,
    BoxRecord,
    Build,
    LogChunk,
    Store,
    StoreError,
    _dumps,
    _gap_marker,
)

# Each migration is applied once, in order, in one transaction; never edit one that shipped.
MIGRATIONS: tuple[str, ...] = (
    # 1: the SQLite store's tables
    """
    CREATE TABLE config (kind TEXT NOT NULL, name TEXT NOT NULL, body JSONB NOT NULL, PRIMARY KEY (kind, name));
    CREATE TABLE boxes (
        id TEXT PRIMARY KEY, token_hash TEXT NOT NULL DEFAULT '', capacity INTEGER NOT NULL DEFAULT 0,
        shapes JSONB NOT NULL DEFAULT '[]', warm JSONB NOT NULL DEFAULT '{}',
        last_heartbeat DOUBLE PRECISION, registered_at DOUBLE PRECISION);
    CREATE TABLE builds (
        id TEXT PRIMARY KEY, customer TEXT NOT NULL, shape TEXT NOT NULL, argv JSONB NOT NULL,
        env JSONB NOT NULL, cwd TEXT NOT NULL, timeout_s DOUBLE PRECISION NOT NULL, options JSONB NOT NULL,
        state TEXT NOT NULL, box TEXT NOT NULL DEFAULT '', cell TEXT NOT NULL DEFAULT '',
        lease BIGINT NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,
        exit_code INTEGER, signal INTEGER, reason TEXT NOT NULL DEFAULT '',
        message TEXT NOT NULL DEFAULT '', usage JSONB NOT NULL DEFAULT '{}',
        submitted_at DOUBLE PRECISION NOT NULL, assigned_at DOUBLE PRECISION, started_at DOUBLE PRECISION,
        finished_at DOUBLE PRECISION, idem_key TEXT, source TEXT NOT NULL DEFAULT 'api',
        log_bytes BIGINT NOT NULL DEFAULT 0, log_truncated BOOLEAN NOT NULL DEFAULT false,
        log_next_seq BIGINT NOT NULL DEFAULT 0, log_box_seq BIGINT NOT NULL DEFAULT -1,
        cancel_requested BOOLEAN NOT NULL DEFAULT false);
    CREATE UNIQUE INDEX builds_idem ON builds (customer, idem_key) WHERE idem_key IS NOT NULL;
    CREATE INDEX builds_live ON builds (state) WHERE state IN ('queued', 'assigned', 'running');
    CREATE TABLE build_logs (
        build_id TEXT NOT NULL, seq BIGINT NOT NULL, stream INTEGER NOT NULL, data BYTEA NOT NULL,
        PRIMARY KEY (build_id, seq));
    CREATE FUNCTION hived_conflict(missed BIGINT) RETURNS BIGINT LANGUAGE plpgsql AS $$
    BEGIN
        IF missed <> 0 THEN
            RAISE EXCEPTION 'hived: % build(s) changed in the database behind this control plane''s back '
                            '(another writer?): the batch is rolled back', missed
                USING ERRCODE = 'serialization_failure';
        END IF;
        RETURN 0;
    END $$;
    """,
    # 2: several control planes on one database (hived/control/replicas.py): who leads, with which
    # epoch (the fencing token every commit of the leader checks), and cancels taken by a replica
    # that does not lead, kept until the leader has carried them out
    """
    CREATE TABLE leader (id INTEGER PRIMARY KEY CHECK (id = 1), epoch BIGINT NOT NULL, holder TEXT NOT NULL,
                         box_endpoint TEXT NOT NULL, api_endpoint TEXT NOT NULL, since DOUBLE PRECISION NOT NULL,
                         renewed_at DOUBLE PRECISION NOT NULL DEFAULT 0);  -- the database's clock
    CREATE TABLE build_cancels (build_id TEXT PRIMARY KEY, requested_at DOUBLE PRECISION NOT NULL);
    CREATE FUNCTION hived_fenced(expected BIGINT, current BIGINT) RETURNS BIGINT LANGUAGE plpgsql AS $$
    BEGIN
        IF current IS DISTINCT FROM expected THEN
            RAISE EXCEPTION 'hived: this control plane no longer leads the hive (epoch % is now %)',
                expected, current USING ERRCODE = 'lock_not_available';
        END IF;
        RETURN 0;
    END $$;
    """,
    # 3: what a log holds is said in it (markers for cuts and holes): their bytes, and the output cut at the cap
    """
    ALTER TABLE builds ADD COLUMN log_cut_bytes BIGINT NOT NULL DEFAULT 0,
                       ADD COLUMN log_marker_bytes BIGINT NOT NULL DEFAULT 0;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
_MIGRATE_LOCK = 0x68697665_64000001  # pg_advisory_xact_lock key: "hived" + 1

_COLS = ("id", "customer", "shape", "argv", "env", "cwd", "timeout_s", "options", "state", "box",
         "cell", "lease", "attempts", "exit_code", "signal", "reason", "message", "usage",
         "submitted_at", "assigned_at", "started_at", "finished_at", "idem_key", "source",
         "log_bytes", "log_truncated", "cancel_requested", "log_cut_bytes")
_TYPES = {"argv": "text", "env": "text", "options": "text", "usage": "text", "timeout_s": "float8",
          "submitted_at": "float8", "assigned_at": "float8", "started_at": "float8", "finished_at": "float8",
          "lease": "int8", "attempts": "int4", "exit_code": "int4", "signal": "int4", "log_bytes": "int8",
          "log_truncated": "bool", "cancel_requested": "bool", "log_next_seq": "int8", "log_box_seq": "int8",
          "log_cut_bytes": "int8", "log_marker_bytes": "int8"}
_JSON = {"argv", "env", "options", "usage"}
_SELECT = f"SELECT {', '.join(_COLS)} FROM builds"
_LIVE_SQL = f"{_SELECT} WHERE state IN ('queued', 'assigned', 'running') ORDER BY submitted_at, id"
_LOG_COUNTERS = ("log_next_seq", "log_box_seq", "log_marker_bytes")
_LIVE_COLS = ", log_next_seq, log_box_seq, log_marker_bytes FROM"  # what _Live adds to a Build

# What a write changes on a build that exists: written by one compare-and-set UPDATE per commit.
_MUTABLE = ("state", "box", "cell", "lease", "attempts", "exit_code", "signal", "reason", "message", "usage",
            "assigned_at", "started_at", "finished_at", "log_bytes", "log_truncated", "cancel_requested",
            "log_cut_bytes")
_EXPECT = (("old_state", "text"), ("old_lease", "int8"), ("old_next_seq", "int8"), ("old_cancel", "bool"))


def _unnest(names: list[tuple[str, str]], first: int) -> str:
    arrays = ", ".join(f"${i}::{t}[]" for i, (_, t) in enumerate(names, first))
    return f"unnest({arrays}) AS u({', '.join(n for n, _ in names)})"


def _val(col: str) -> str:
    return f"u.{col}::jsonb" if col in _JSON else f"u.{col}"


# One commit is one statement (one round trip, its own transaction): new builds, changed builds
# (compare-and-set; a miss raises and the whole statement is undone), log chunks, box rows. Every
# part takes arrays, empty when it has nothing to do.
_INSERT_COLS = [(c, _TYPES.get(c, "text")) for c in _COLS + _LOG_COUNTERS]
_UPDATE_COLS = [("id", "text"), *_EXPECT, *((c, _TYPES.get(c, "text")) for c in _MUTABLE + _LOG_COUNTERS)]
_LOG_COLS = [("build_id", "text"), ("seq", "int8"), ("stream", "int4"), ("data", "bytea")]
_BOXES_COLS = [("id", "text"), ("capacity", "int4"), ("shapes", "text"), ("warm", "text"),
               ("last_heartbeat", "float8"), ("registered_at", "float8")]
_P_UPDATE = 1 + len(_INSERT_COLS)
_P_LOGS = _P_UPDATE + len(_UPDATE_COLS)
_P_BOXES = _P_LOGS + len(_LOG_COLS)
_P_EXPECTED = _P_BOXES + len(_BOXES_COLS)
_COMMIT_SQL = (
    f"WITH ins AS (INSERT INTO builds ({', '.join(c for c, _ in _INSERT_COLS)}) "
    f"SELECT {', '.join(_val(c) for c, _ in _INSERT_COLS)} FROM {_unnest(_INSERT_COLS, 1)}), "
    "upd AS (UPDATE builds AS b SET " + ", ".join(f"{c} = {_val(c)}" for c in _MUTABLE + _LOG_COUNTERS)
    + f" FROM {_unnest(_UPDATE_COLS, _P_UPDATE)} WHERE b.id = u.id AND b.state = u.old_state "
      "AND b.lease = u.old_lease AND b.log_next_seq = u.old_next_seq AND b.cancel_requested = u.old_cancel "
      "RETURNING 1), "
    f"logs AS (INSERT INTO build_logs (build_id, seq, stream, data) SELECT * FROM {_unnest(_LOG_COLS, _P_LOGS)}), "
    "bx AS (INSERT INTO boxes (id, capacity, shapes, warm, last_heartbeat, registered_at) "
    f"SELECT u.id, u.capacity, u.shapes::jsonb, u.warm::jsonb, u.last_heartbeat, u.registered_at "
    f"FROM {_unnest(_BOXES_COLS, _P_BOXES)} ON CONFLICT (id) DO UPDATE SET capacity = excluded.capacity, "
    "shapes = excluded.shapes, warm = excluded.warm, last_heartbeat = excluded.last_heartbeat, "
    "registered_at = COALESCE(excluded.registered_at, boxes.registered_at)) "
    f"SELECT hived_conflict(${_P_EXPECTED} - (SELECT count(*) FROM upd))")
_INSERT_SQL_ONE = (f"INSERT INTO builds ({', '.join(c for c, _ in _INSERT_COLS)}) "
                   f"SELECT {', '.join(_val(c) for c, _ in _INSERT_COLS)} FROM {_unnest(_INSERT_COLS, 1)} "
                   "ON CONFLICT (customer, idem_key) WHERE idem_key IS NOT NULL DO NOTHING RETURNING id")
# The leader of several replicas: its epoch must still be the one in `leader` (the row is share-locked
# to the end of the commit, so a takeover waits for it, or the commit fails), and the builds it
# changed are announced (NOTIFY is sent at commit: log followers on every replica wake).
NOTIFY_CHANNEL = "hived_builds"
_P_EPOCH, _P_NOTIFY = _P_EXPECTED + 1, _P_EXPECTED + 2
_COMMIT_FENCED_SQL = (
    _COMMIT_SQL.replace("WITH ins AS", "WITH fence AS (SELECT epoch FROM leader WHERE id = 1 FOR SHARE), ins AS", 1)
    + f", hived_fenced(${_P_EPOCH}, (SELECT epoch FROM fence)), "
      f"(SELECT count(pg_notify('{NOTIFY_CHANNEL}', n)) FROM unnest(${_P_NOTIFY}::text[]) AS n)")
NOTIFY_MAX = 7000  # bytes of ids per notification (PostgreSQL's limit is 8000)
_BOX_COLS = "id, token_hash, capacity, shapes, warm, last_heartbeat, registered_at"


def redact(url: str) -> str:
    """The URL with any password replaced (for messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


@dataclasses.dataclass
class _Live:
    """This store's copy of one live build, and its log counters (not in `Build`)."""
    build: Build
    next_seq: int = 0
    box_seq: int = -1
    marker_bytes: int = 0
    pending: dict = dataclasses.field(default_factory=dict)  # box_seq -> (stream, data, gap): behind a hole

    def snapshot(self) -> "_Live":
        return _Live(copy.copy(self.build), self.next_seq, self.box_seq, self.marker_bytes, dict(self.pending))

    def same(self, other: "_Live") -> bool:
        a, b = self.build, other.build
        return (self.next_seq, self.box_seq, self.marker_bytes) == (other.next_seq, other.box_seq,
                                                                    other.marker_bytes) and \
            all(getattr(a, c) == getattr(b, c) for c in _MUTABLE)


class _DbLoop:
    """An event loop on a thread of its own for asyncpg; `call` runs a coroutine there and waits."""

    def __init__(self) -> None:
        import uvloop

        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="hived-pgstore", daemon=True)
        self.thread.start()

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


async def _make_lock() -> asyncio.Lock:
    return asyncio.Lock()  # made on the database's loop


async def _make_pool(conns: list) -> asyncio.Queue:
    free: asyncio.Queue = asyncio.Queue()  # made on the database's loop: the writers not in use
    for conn in conns:
        free.put_nowait(conn)
    return free


WRITERS = 2  # commits in flight at once (see the module's docstring)
# The writers' planner settings. The commit statement finds every row it changes by primary key,
# a handful per batch: its plan must be index lookups whatever the table's size. A plan made
# while `builds` was small (a new hive, a generic plan cached at the first commit) hash-joined
# the batch with a sequential scan of the whole table, and kept doing so as the table grew:
# each commit cost time in proportion to the builds ever stored (17-build commits: 3 ms at
# 3,400 builds, 9 ms at 20,400 here; seconds on a hive with millions). So the writers do not
# scan or hash-join at all, and plan the statement once (it is the same every time).
_WRITER_SETTINGS = {"plan_cache_mode": "force_generic_plan", "enable_seqscan": "off",
                    "enable_hashjoin": "off", "enable_mergejoin": "off"}


def _overlap(a: frozenset | None, b: frozenset | None) -> bool:
    """Whether two batches touch a row in common (None: the batch has plain statements)."""
    return a is None or b is None or not a.isdisjoint(b)


async def _init_connection(conn) -> None:
    await conn.set_type_codec("jsonb", encoder=str, decoder=json.loads, schema="pg_catalog")


class PostgresStore(Store):
    """One hive's state in one PostgreSQL database. Safe to call from several threads (one lock
    for the writer, one for the reader)."""

    def __init__(self, url: str, hive: str, *, password: str | None = None, log_max_bytes: int = 8 << 20,
                 timeout_s: float = 30.0, writers: int = WRITERS) -> None:
        import asyncpg

        self.asyncpg = asyncpg
        self.url = url
        self.hive = hive
        self.log_max_bytes = log_max_bytes
        self.timeout_s = timeout_s
        self.lock = threading.RLock()   # the writer and the live copy; held from begin() to commit()
        self.rlock = threading.Lock()   # the reader connection
        self.in_batch = False
        self.poisoned = ""
        self._live: dict[str, _Live] = {}
        self.gaps: collections.Counter = collections.Counter()      # markers written since start (metrics)
        self.cut_bytes: collections.Counter = collections.Counter()
        self.duplicates = 0
        self._idem_live: dict[tuple, str] = {}   # (customer, idem_key) -> id, for builds in _live
        self._in_flight: list[tuple] = []        # (future, ids the batch ended, rows it touched), oldest first
        self.broken = ""                         # why commits stopped (a pipelined commit failed)
        self.epoch: int | None = None            # leading several replicas: the fencing token
        self.commits_in_flight = max(1, writers)  # writer connections: commits in flight at most
        self._reset_batch()
        self._db = _DbLoop()
        self._password = password
        self.w = self.r = self.side = None
        self._writers: list = []
        try:
            self.w = self._db.call(self._connect(password, _WRITER_SETTINGS))
            self._writers.append(self.w)
            self.r = self._db.call(self._connect(password))
            self._db.call(self._migrate())
            for _ in range(self.commits_in_flight - 1):
                self._writers.append(self._db.call(self._connect(password, _WRITER_SETTINGS)))
            self._free = self._db.call(_make_pool(self._writers))
            self._side_lock = self._db.call(_make_lock())
            for live in self._db.call(self._load_live()):
                self._remember(live)
        except BaseException:
            self.close()
            raise

    # -- plumbing -----------------------------------------------------------------------------
    async def _connect(self, password, settings: dict | None = None):
        asyncpg = self.asyncpg
        try:
            conn = await asyncpg.connect(self.url, password=password, timeout=self.timeout_s,
                                         command_timeout=self.timeout_s,
                                         server_settings={"application_name": f"hived-control-{self.hive}",
                                                          **(settings or {})})
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as exc:
            raise StoreError(f"cannot connect to the hive's database {redact(self.url)}: "
                             f"{type(exc).__name__}: {exc}") from None
        await _init_connection(conn)
        return conn

    async def _migrate(self) -> None:
        w = self.w
        async with w.transaction():
            await w.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATE_LOCK)  # one replica migrates
            await w.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            rows = dict(await w.fetch("SELECT key, value FROM meta"))
            if not rows:
                await w.execute("INSERT INTO meta VALUES ('hive', $1), ('schema', '0')", self.hive)
                rows = {"hive": self.hive, "schema": "0"}
            if rows.get("hive") != self.hive:
                raise StoreError(f"database {redact(self.url)} holds hive {rows.get('hive')!r}, not "
                                 f"{self.hive!r}: each hive needs its own database")
            have = int(rows.get("schema", 0))
            if have > SCHEMA_VERSION:
                raise StoreError(f"database {redact(self.url)} has schema {have}, newer than this hived "
                                 f"({SCHEMA_VERSION}): upgrade hived (every control plane of the hive)")
            for version in range(have + 1, SCHEMA_VERSION + 1):
                await w.execute(MIGRATIONS[version - 1])
                await w.execute("UPDATE meta SET value = $1 WHERE key = 'schema'", str(version))

    async def _load_live(self) -> list:
        rows = await self.w.fetch(f"{_SELECT.replace(' FROM', _LIVE_COLS)} "
                                  "WHERE state IN ('queued', 'assigned', 'running')")
        return [_live_row(r) for r in rows]

    def peer_token(self, candidate: str) -> str:
        """The hive's peer link secret (meta 'peer_token'), shared by every replica: `candidate`
        if the database has none yet, else the one it has (whoever put it there first)."""
        async def go():
            await self.r.execute("INSERT INTO meta VALUES ('peer_token', $1) ON CONFLICT (key) DO NOTHING",
                                 candidate)
            return await self.r.fetchval("SELECT value FROM meta WHERE key = 'peer_token'")
        with self.rlock:
            return self._db.call(go())

    def schema_version(self) -> int:
        return int(self._read("fetchval", "SELECT value FROM meta WHERE key = 'schema'"))

    def _read(self, how: str, sql: str, *args):
        with self.rlock:
            return self._db.call(getattr(self.r, how)(sql, *args))

    def _remember(self, live: _Live) -> None:
        b = live.build
        self._live[b.id] = live
        if b.idem_key is not None:
            self._idem_live[(b.customer, b.idem_key)] = b.id

    def _forget(self, build_id: str) -> None:
        live = self._live.pop(build_id, None)
        if live is not None and live.build.idem_key is not None:
            self._idem_live.pop((live.build.customer, live.build.idem_key), None)

    def _reset_batch(self) -> None:
        self._before: dict[str, _Live] = {}    # live copies as they were at the last commit
        self._created: dict[str, None] = {}    # ids inserted by this batch (in order)
        self._logs: list[tuple] = []
        self._boxes: dict[str, tuple] = {}     # box rows seen in this batch (the last word of each)
        self._plain: list[tuple] = []          # (sql, args) in order: box tokens, config

    @contextlib.contextmanager
    def _tx(self):
        """One method's writes: part of the open batch, or a batch of their own."""
        with self.lock:
            own = not self.in_batch
            if own:
                self.begin()
            try:
                yield
            except BaseException as exc:
                if own:
                    self.rollback()
                else:
                    self.poisoned = self.poisoned or f"{type(exc).__name__}: {exc}"
                raise
            if own:
                self.commit()

    def _touch(self, build_id: str) -> _Live | None:
        """The live copy of a build, remembered as it was before this batch changed it."""
        live = self._live.get(build_id)
        if live is None:
            # Not live here: no commit in flight touches it (ended builds stay until theirs
            # landed), so the committed row is the whole truth.
            row = self._read("fetchrow", f"{_SELECT.replace(' FROM', _LIVE_COLS)} WHERE id = $1", build_id)
            if row is None or row["state"] not in LIVE:
                return None  # unknown or over: every write below needs a live build
            live = _live_row(row)
            self._remember(live)
        if build_id not in self._before and build_id not in self._created:
            self._before[build_id] = live.snapshot()
        return live

    # -- group commit ---------------------------------------------------------------------------
    def begin(self) -> None:
        self.lock.acquire()
        if self.in_batch:
            self.lock.release()
            raise RuntimeError("a batch is already open")
        self.in_batch = True
        self._landed()

    def _landed(self) -> None:
        """Builds that ended in commits that have landed leave the live copy."""
        while self._in_flight and self._in_flight[0][0].done():
            fut, ended, _ = self._in_flight.pop(0)
            if fut.exception() is None:
                for i in ended:
                    self._forget(i)

    def _close_batch(self):
        """The batch's writes, taken out of it; the batch is closed (the lock released) after."""
        if self.broken:
            raise StoreError(f"an earlier commit of this store failed ({self.broken}): restart the control plane")
        if self.poisoned:
            raise StoreError(f"a write in this batch failed ({self.poisoned}): the batch is rolled back")
        creates = [_row(self._live[i]) for i in self._created]
        updates = [(i, old.build.state, old.build.lease, old.next_seq, old.build.cancel_requested,
                    *_row(self._live[i], _MUTABLE))
                   for i, old in self._before.items() if not self._live[i].same(old)]
        ended = [i for i in (*self._created, *self._before) if self._live[i].build.state in TERMINAL]
        boxes = [(box_id, *row) for box_id, row in self._boxes.items()]
        fence = None
        if self.epoch is not None:
            fence = (self.epoch, _notices(list(self._created) + list(self._before)))
        touched = None if self._plain else frozenset(
            (*self._created, *self._before, *(("box", box_id) for box_id in self._boxes)))
        return (creates, updates, self._logs, boxes, self._plain, fence), ended, touched

    def commit_start(self) -> "concurrent.futures.Future":
        """Close the batch and send it without waiting: the future is done once it is durable
        (or failed). For a caller that says nothing before then (the control plane's pipelined
        group commit), and that has at most `commits_in_flight` in flight. A batch lands after every batch
        in flight it depends on (same rows); once one fails, no batch that depends on it lands, nor any
        sent after the failure. One already on its way that shares no row with it may land: durable
        but never said (the control plane stops on the failure), like a crash right after a commit."""
        if not self.in_batch:
            raise RuntimeError("no batch is open")
        try:
            payload, ended, touched = self._close_batch()
        except BaseException:
            self._undo()
            raise
        finally:
            self._end_batch()
        after = [f for f, _, rows in self._in_flight if not f.done() and _overlap(rows, touched)]
        fut = asyncio.run_coroutine_threadsafe(self._write_after(after, *payload, pipelined=True),
                                               self._db.loop)
        self._in_flight.append((fut, ended, touched))
        return fut

    def commit(self) -> None:
        if not self.in_batch:
            return
        try:
            concurrent.futures.wait([fut for fut, _, _ in self._in_flight])  # pipelined batches land first
            self._landed()
            payload, ended, _ = self._close_batch()
            if any(payload):
                self._db.call(self._write_after([], *payload))
        except BaseException:
            self._undo()
            raise
        else:
            for i in ended:
                self._forget(i)
        finally:
            self._end_batch()

    def _end_batch(self) -> None:
        self._reset_batch()
        self.in_batch = False
        self.poisoned = ""
        self.lock.release()

    async def _write_after(self, after: list, creates: list, updates: list, logs: list, boxes: list,
                           plain: list, fence: tuple | None, *, pipelined: bool = False) -> None:
        """Write a batch once the batches in `after` (futures) landed, on a free writer."""
        for earlier in after:
            with contextlib.suppress(BaseException):  # its failure sets `broken`
                await asyncio.wrap_future(earlier)
        if self.broken:
            raise StoreError(f"an earlier commit of this store failed ({self.broken})")
        w = await self._free.get()
        try:
            await self._write(w, creates, updates, logs, boxes, plain, fence)
        except BaseException as exc:
            if pipelined:  # later batches were decided on top of this one: they must not land
                self.broken = self.broken or f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self._free.put_nowait(w)

    async def _write(self, w, creates: list, updates: list, logs: list, boxes: list, plain: list,
                     fence: tuple | None) -> None:
        args = []
        for rows, cols in ((creates, _INSERT_COLS), (updates, _UPDATE_COLS), (logs, _LOG_COLS),
                           (boxes, _BOXES_COLS)):
            args += [list(col) for col in zip(*rows, strict=True)] if rows else [[] for _ in cols]
        args.append(len(updates))
        sql = _COMMIT_SQL
        if fence is not None:
            sql = _COMMIT_FENCED_SQL
            args += fence
        try:
            if not plain:
                await w.fetchval(sql, *args)
                return
            async with w.transaction():
                await w.fetchval(sql, *args)
                for stmt, stmt_args in plain:
                    await w.execute(stmt, *stmt_args)
        except self.asyncpg.SerializationError as exc:
            raise StoreError(str(exc).removeprefix("hived: ")) from None
        except self.asyncpg.LockNotAvailableError as exc:
            raise NotLeader(str(exc).removeprefix("hived: ")) from None

    def _undo(self) -> None:
        for i in self._created:
            self._forget(i)
        for old in self._before.values():
            self._remember(old)

    def rollback(self) -> None:
        if not self.in_batch:
            return
        try:
            self._undo()
        finally:
            self._end_batch()

    # -- several control planes (hived/control/replicas.py) -------------------------------------
    # Awaitables for the caller's loop; they run on a connection of their own ("side"), never
    # in a batch: a replica that does not lead only adds builds and cancel requests.
    def _side(self, fn, *args) -> asyncio.Future:
        async def run():
            async with self._side_lock:
                if self.side is None:
                    self.side = await self._connect(self._password)
                return await fn(self.side, *args)
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(run(), self._db.loop))

    def insert_now(self, build: Build) -> asyncio.Future:
        """Store a queued build in a transaction of its own and tell the leader (NOTIFY
        hived_submitted). Gives (build, created); an idempotency key already used gives that build."""
        live = _Live(build)

        async def go(conn):
            async with conn.transaction():
                if await conn.fetchval(_INSERT_SQL_ONE, *[[v] for v in _row(live)]):
                    await conn.execute("SELECT pg_notify('hived_submitted', $1)", build.id)
                    return build, True
                row = await conn.fetchrow(f"{_SELECT} WHERE customer = $1 AND idem_key = $2", build.customer,
                                          build.idem_key)
                if row is None:
                    raise StoreError(f"build id {build.id!r} is already taken")
                return _build(row), False
        return self._side(go)

    def cancel_now(self, build_id: str, now: float) -> asyncio.Future:
        """Ask the leader to cancel a live build (kept in build_cancels until it has); False if
        the build is over."""
        async def go(conn):
            async with conn.transaction():
                if await conn.fetchval("SELECT state FROM builds WHERE id = $1", build_id) not in LIVE:
                    return False
                await conn.execute("INSERT INTO build_cancels VALUES ($1, $2) ON CONFLICT DO NOTHING",
                                   build_id, now)
                await conn.execute("SELECT pg_notify('hived_cancels', $1)", build_id)
                return True
        return self._side(go)

    def take_lead(self, holder: str, box_endpoint: str, api_endpoint: str, now: float) -> asyncio.Future:
        """Bump the hive's epoch for this control plane (its caller holds the leader lock)."""
        async def go(conn):
            return await conn.fetchval(
                "INSERT INTO leader VALUES (1, 1, $1, $2, $3, $4, extract(epoch FROM clock_timestamp())) "
                "ON CONFLICT (id) DO UPDATE SET epoch = leader.epoch + 1, holder = $1, box_endpoint = $2, "
                "api_endpoint = $3, since = $4, renewed_at = excluded.renewed_at RETURNING epoch",
                holder, box_endpoint, api_endpoint, now)
        return self._side(go)

    def leader(self) -> asyncio.Future:
        """The leader row: epoch, holder, box_endpoint, api_endpoint, since (or None)."""
        async def go(conn):
            row = await conn.fetchrow("SELECT epoch, holder, box_endpoint, api_endpoint, since FROM leader")
            return dict(row) if row else None
        return self._side(go)

    def lead(self, epoch: int) -> None:
        """From now on every commit is fenced by `epoch`; the live copy is read again (the last
        leader changed the builds)."""
        with self.lock:
            if self.in_batch:
                raise RuntimeError("lead() inside a batch")
            concurrent.futures.wait([fut for fut, _, _ in self._in_flight])
            self._in_flight.clear()
            self._live.clear()
            self._idem_live.clear()
            for live in self._db.call(self._load_live()):
                self._remember(live)
            self.epoch = epoch

    def queued_ids(self) -> list[str]:
        return [r[0] for r in self._read("fetch", "SELECT id FROM builds WHERE state = 'queued' ORDER BY submitted_at")]

    def pending_cancels(self) -> list[str]:
        return [r[0] for r in self._read("fetch", "SELECT build_id FROM build_cancels ORDER BY requested_at")]

    def cancel_done(self, build_id: str) -> None:
        """The leader carried out a replica's cancel request (in its batch)."""
        with self._tx():
            self._plain.append(("DELETE FROM build_cancels WHERE build_id = $1", (build_id,)))

    def writer_pids(self) -> set[int]:
        """The writer connections' backends: notifications they sent are this store's own."""
        return {w.get_server_pid() for w in self._writers}

    def close(self) -> None:
        if self.in_batch:
            self.rollback()
        concurrent.futures.wait([fut for fut, _, _ in self._in_flight], timeout=self.timeout_s)
        self._in_flight.clear()
        for conn in (*self._writers, self.r, self.side):
            if conn is not None:
                with contextlib.suppress(Exception):
                    self._db.call(conn.close(timeout=5))
        self._writers = []
        self.w = self.r = self.side = None
        self._db.close()

    # -- hive -----------------------------------------------------------------------------------
    def sync_config(self, customers: dict, shapes: dict) -> None:
        with self._tx():
            self._plain.append(("DELETE FROM config", ()))
            for kind, table in (("customer", customers), ("shape", shapes)):
                for name, body in table.items():
                    self._plain.append(("INSERT INTO config VALUES ($1, $2, $3::jsonb) ON CONFLICT (kind, name) "
                                        "DO UPDATE SET body = excluded.body",
                                        (kind, name, json.dumps(body, sort_keys=True, default=str))))

    def config(self, kind: str) -> dict:
        return dict(self._read("fetch", "SELECT name, body FROM config WHERE kind = $1", kind))

    # -- boxes ----------------------------------------------------------------------------------
    def set_box_token(self, box_id: str, token_hash: str) -> None:
        with self._tx():
            self._plain.append(("INSERT INTO boxes (id, token_hash) VALUES ($1, $2) ON CONFLICT (id) "
                                "DO UPDATE SET token_hash = excluded.token_hash", (box_id, token_hash)))

    def get_box(self, box_id: str) -> BoxRecord | None:
        row = self._read("fetchrow", f"SELECT {_BOX_COLS} FROM boxes WHERE id = $1", box_id)
        return BoxRecord(*row) if row else None

    def box_seen(self, box_id: str, *, capacity: int, shapes: list[str], warm: dict, now: float,
                 registered: bool = False) -> None:
        with self._tx():
            earlier = self._boxes.get(box_id)
            registered_at = now if registered else (earlier[4] if earlier else None)
            self._boxes[box_id] = (capacity, json.dumps(shapes), json.dumps(warm), now, registered_at)

    def boxes(self) -> list[BoxRecord]:
        return [BoxRecord(*r) for r in self._read("fetch", f"SELECT {_BOX_COLS} FROM boxes ORDER BY id")]

    # -- builds ---------------------------------------------------------------------------------
    def create_build(self, build: Build) -> tuple[Build, bool]:
        with self._tx():
            if build.idem_key is not None:
                key = (build.customer, build.idem_key)
                if key in self._idem_live:
                    return copy.copy(self._live[self._idem_live[key]].build), False
                row = self._read("fetchrow", f"{_SELECT} WHERE customer = $1 AND idem_key = $2", *key)
                if row is not None:
                    return _build(row), False
            if build.id in self._live:
                raise StoreError(f"build id {build.id!r} is already taken")
            self._remember(_Live(copy.copy(build)))
            self._created[build.id] = None
        return build, True

    def get_build(self, build_id: str) -> Build | None:
        row = self._read("fetchrow", f"{_SELECT} WHERE id = $1", build_id)
        return _build(row) if row else None

    def live_builds(self) -> list[Build]:
        return [_build(r) for r in self._read("fetch", _LIVE_SQL)]

    def assign(self, build_id: str, box: str, old_lease: int, new_lease: int, now: float) -> bool:
        with self._tx():
            live = self._touch(build_id)
            b = live.build if live else None
            if b is None or b.state != QUEUED or b.lease != old_lease or b.cancel_requested:
                return False
            b.state, b.box, b.lease, b.attempts, b.assigned_at = ASSIGNED, box, new_lease, b.attempts + 1, now
            return True

    def mark_started(self, build_id: str, lease: int, cell: str, now: float) -> bool:
        with self._tx():
            live = self._touch(build_id)
            b = live.build if live else None
            if b is None or b.state != ASSIGNED or b.lease != lease:
                return False
            b.state, b.cell, b.started_at = RUNNING, cell, now
            return True

    def requeue(self, build_id: str, lease: int, reason: str) -> bool:
        with self._tx():
            live = self._touch(build_id)
            b = live.build if live else None
            if b is None or b.state != ASSIGNED or b.lease != lease:
                return False
            b.state, b.box, b.cell, b.message = QUEUED, "", "", reason
            return True

    def finish(self, build_id: str, lease: int | None, state: str, *, code: int | None, signal: int | None,
               reason: str, message: str, usage: dict | None, now: float) -> bool:
        if state not in TERMINAL:
            raise ValueError(f"finish() needs a terminal state, not {state!r}")
        with self._tx():
            live = self._touch(build_id)
            b = live.build if live else None
            if b is None or b.state not in LIVE or (lease is not None and b.lease != lease):
                return False
            b.state, b.exit_code, b.signal, b.reason, b.message = state, code, signal, reason, message
            b.usage, b.finished_at = dict(usage or {}), now
            self._close_log(live)
            return True

    def request_cancel(self, build_id: str) -> bool:
        with self._tx():
            live = self._touch(build_id)
            if live is None or live.build.state not in LIVE:
                return False
            live.build.cancel_requested = True
            return True

    def count_by_state(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        counts.update(self._read("fetch", "SELECT state, count(*) FROM builds GROUP BY state"))
        return counts

    # -- logs -----------------------------------------------------------------------------------
    def append_log(self, build_id: str, lease: int, box_seq: int, stream: int, data: bytes,
                   gap: tuple[str, int] | None = None) -> int | None:
        """SQLiteStore.append_log's rules, decided on the live copy (see there)."""
        with self._tx():
            live = self._touch(build_id)
            if live is None:
                return None
            b = live.build
            if b.lease != lease or b.state not in LIVE:
                return None
            if box_seq <= live.box_seq:
                self.duplicates += 1
                return None
            if box_seq > live.box_seq + 1:  # a hole before it: wait for it to fill
                live.pending.setdefault(box_seq, (stream, bytes(data), gap))
                if len(live.pending) > PENDING_MAX_CHUNKS:
                    self._flush_pending(live, holes=True)
                return None
            seq = self._place(live, stream, data, gap)
            live.box_seq = box_seq
            if live.pending:
                self._flush_pending(live, holes=False)
            return seq

    def _place(self, live: _Live, stream: int, data: bytes, gap: tuple[str, int] | None) -> int | None:
        b = live.build
        if gap is not None:
            reason, lost = gap
            self.gaps[reason] += 1
            if lost > 0:
                self.cut_bytes[reason] += lost
            return self._log_write(live, STREAM_MARKER, data)
        if b.log_truncated:
            self.cut_bytes["log_max_bytes"] += len(data)
            b.log_cut_bytes += len(data)
            return None
        output = b.log_bytes - live.marker_bytes
        if output + len(data) <= self.log_max_bytes:
            return self._log_write(live, stream, data)
        room = max(0, self.log_max_bytes - output)
        if room > 0:
            self._log_write(live, stream, data[:room])
        cut = len(data) - room
        self.gaps["log_max_bytes"] += 1
        self.cut_bytes["log_max_bytes"] += cut
        seq = self._log_write(live, STREAM_MARKER, (
            f"\n[hived: log truncated at {self.log_max_bytes} bytes: the hive keeps that much output per "
            "build (hive.log_max_bytes); the rest is cut, its size follows at the end]\n").encode())
        b.log_truncated, b.log_cut_bytes = True, b.log_cut_bytes + cut
        return seq

    def _log_write(self, live: _Live, stream: int, data: bytes) -> int:
        seq = live.next_seq
        self._logs.append((live.build.id, seq, stream, bytes(data)))
        live.next_seq += 1
        live.build.log_bytes += len(data)
        if stream == STREAM_MARKER:
            live.marker_bytes += len(data)
        return seq

    def _flush_pending(self, live: _Live, *, holes: bool) -> None:
        last = live.box_seq
        for box_seq in sorted(live.pending):
            if box_seq > last + 1:
                if not holes:
                    break
                self._place(live, STREAM_MARKER, _gap_marker(
                    f"{box_seq - last - 1} chunk(s) of output never reached the control plane (box seq "
                    f"{last + 1}..{box_seq - 1}); what follows came after them"), ("sequence", -1))
            stream, data, gap = live.pending.pop(box_seq)
            self._place(live, stream, data, gap)
            last = box_seq
        live.box_seq = last

    def _close_log(self, live: _Live) -> None:
        if live.pending:
            self._flush_pending(live, holes=True)
        b = live.build
        if b.log_truncated:
            self._place(live, STREAM_MARKER, _gap_marker(
                f"{b.log_cut_bytes} bytes of output were cut after the first {self.log_max_bytes} "
                "(hive.log_max_bytes)"), ("log_max_bytes", 0))
            self.gaps["log_max_bytes"] -= 1  # the same cut as the first marker, counted once

    def log_position(self, build_id: str) -> int:
        with self.lock:
            live = self._live.get(build_id)
            return live.box_seq if live is not None else -1

    @property
    def pending_builds(self) -> set[str]:
        with self.lock:
            return {i for i, live in self._live.items() if live.pending}

    def read_log(self, build_id: str, after: int = -1, limit: int = 256) -> list[LogChunk]:
        return [LogChunk(r[0], r[1], bytes(r[2])) for r in self._read(
            "fetch", "SELECT seq, stream, data FROM build_logs WHERE build_id = $1 AND seq > $2 ORDER BY seq "
            "LIMIT $3", build_id, after, limit)]


class NotLeader(StoreError):
    """Another control plane took the lead (a newer epoch): this one must stop writing."""


def _notices(ids: list[str]) -> list[str]:
    """Build ids, comma-joined into payloads that fit one notification each."""
    out, cur, size = [], [], 0
    for i in ids:
        if cur and size + len(i) + 1 > NOTIFY_MAX:
            out.append(",".join(cur))
            cur, size = [], 0
        cur.append(i)
        size += len(i) + 1
    if cur:
        out.append(",".join(cur))
    return out


def _build(row) -> Build:
    return Build(**{c: row[c] for c in _COLS})


def _live_row(row) -> _Live:
    return _Live(_build(row), row["log_next_seq"], row["log_box_seq"], row["log_marker_bytes"])


def _row(live: _Live, cols=_COLS) -> tuple:
    b = live.build
    values = tuple(_dumps(getattr(b, c)) if c in _JSON else getattr(b, c) for c in cols)
    return (*values, live.next_seq, live.box_seq, live.marker_bytes)
