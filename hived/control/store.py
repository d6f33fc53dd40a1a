r"""The control plane's durable state behind one small interface; SQLite (WAL) implements it.

Every method is atomic. Outside a batch it is also its own transaction: when it returns,
the change is on disk (with `synchronous = full`, also after a power cut). Inside a batch
(`begin()` ... `commit()`: the control plane's group commit, one per event-loop tick) the
changes become durable together at `commit()`, and the caller acknowledges nothing
before that. Reads (`get_build`, `read_log`, ...) go through a second connection and see
committed state only, so nobody outside the control plane ever sees a change that a crash
could still take back.
Build transitions are compare-and-set on (state, lease): the lease is the fencing token,
so a late message from a box that lost its lease cannot change a build, whatever the
caller's memory says. Nothing here is SQLite-specific beyond `SQLiteStore`; a PostgreSQL
store implements the same methods with the same conditional UPDATEs.

    builds:  queued -> assigned -> running -> succeeded | failed | cancelled
                \  ^      |  \________________________^
                 \  \-----'  (requeue: never started, retry policy)
                  \-> cancelled | failed (before any box had it)
"""

import abc
import collections
import contextlib
import dataclasses
import json
import sqlite3
import threading
from pathlib import Path

QUEUED, ASSIGNED, RUNNING = "queued", "assigned", "running"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
STATES = (QUEUED, ASSIGNED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
LIVE = (QUEUED, ASSIGNED, RUNNING)
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)

STREAM_MARKER = 0  # a log chunk written by hived itself: a cut or a gap, saying how much and why
SCHEMA_VERSION = 2  # 2: build_log_pending, builds.log_cut_bytes and log_marker_bytes
PENDING_MAX_CHUNKS = 256  # chunks held back behind a hole before the hole is declared a gap
GAP_REASONS = ("output_limit", "log_max_bytes", "held_overflow", "sequence", "not_drained")


class StoreError(Exception):
    """The store cannot be used as asked (wrong hive's file, newer schema, bad path)."""


@dataclasses.dataclass
class Build:
    id: str
    customer: str
    shape: str
    argv: list[str]
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    cwd: str = "/work"
    timeout_s: float = 0.0
    options: dict = dataclasses.field(default_factory=dict)
    state: str = QUEUED
    box: str = ""
    cell: str = ""
    lease: int = 0              # fencing counter: +1 on every assignment
    attempts: int = 0
    exit_code: int | None = None
    signal: int | None = None
    reason: str = ""
    message: str = ""
    usage: dict = dataclasses.field(default_factory=dict)
    submitted_at: float = 0.0
    assigned_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    idem_key: str | None = None  # per customer: a second submit with the same key gets this build
    source: str = "api"
    log_bytes: int = 0          # bytes a reader of the whole log gets (markers included)
    log_truncated: bool = False
    cancel_requested: bool = False
    log_cut_bytes: int = 0      # output refused beyond log_max_bytes

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def public(self) -> dict:
        """What the API shows (no env values: they may hold secrets)."""
        return {
            "id": self.id, "customer": self.customer, "shape": self.shape, "argv": self.argv,
            "env_keys": sorted(self.env), "cwd": self.cwd, "timeout_s": self.timeout_s,
            "options": self.options, "state": self.state, "box": self.box or None,
            "cell": self.cell or None, "attempts": self.attempts, "lease": self.lease,
            "exit_code": self.exit_code, "signal": self.signal, "reason": self.reason or None,
            "message": self.message or None, "usage": self.usage, "submitted_at": self.submitted_at,
            "assigned_at": self.assigned_at, "started_at": self.started_at,
            "finished_at": self.finished_at, "source": self.source, "log_bytes": self.log_bytes,
            "log_truncated": self.log_truncated, "log_cut_bytes": self.log_cut_bytes,
            "cancel_requested": self.cancel_requested,
        }


@dataclasses.dataclass
class BoxRecord:
    id: str
    token_hash: str = ""
    capacity: int = 0
    shapes: list[str] = dataclasses.field(default_factory=list)
    warm: dict[str, int] = dataclasses.field(default_factory=dict)
    last_heartbeat: float | None = None
    registered_at: float | None = None


@dataclasses.dataclass(frozen=True)
class LogChunk:
    seq: int
    stream: int  # 1 stdout, 2 stderr, 0 a marker from the control plane
    data: bytes


class Store(abc.ABC):
    """Durable state of one hive. Each method is atomic and durable when it returns, unless a
    batch is open: then the batch's changes become durable together at commit()."""

    # -- group commit (a store without batches makes every call its own transaction) ---
    in_batch = False

    def begin(self) -> None:  # noqa: B027 (optional: a store without batches keeps this)
        """Open a batch: the writes until commit() are one transaction."""

    def commit(self) -> None:  # noqa: B027
        """Make the batch durable. Raises if it could not be: the batch is then rolled back."""

    def rollback(self) -> None:  # noqa: B027
        """Drop the batch."""

    # -- hive ---------------------------------------------------------------------------
    @abc.abstractmethod
    def sync_config(self, customers: dict, shapes: dict) -> None:
        """Record the hive's customers and shapes (from its config file) for operators."""

    @abc.abstractmethod
    def close(self) -> None: ...

    # -- boxes --------------------------------------------------------------------------
    @abc.abstractmethod
    def set_box_token(self, box_id: str, token_hash: str) -> None: ...

    @abc.abstractmethod
    def get_box(self, box_id: str) -> BoxRecord | None: ...

    @abc.abstractmethod
    def box_seen(self, box_id: str, *, capacity: int, shapes: list[str], warm: dict, now: float,
                 registered: bool = False) -> None: ...

    @abc.abstractmethod
    def boxes(self) -> list[BoxRecord]: ...

    # -- builds -------------------------------------------------------------------------
    @abc.abstractmethod
    def create_build(self, build: Build) -> tuple[Build, bool]:
        """Insert a queued build; with an idem_key already used by the customer, return that
        build instead. Returns (build, created)."""

    @abc.abstractmethod
    def get_build(self, build_id: str) -> Build | None: ...

    @abc.abstractmethod
    def live_builds(self) -> list[Build]:
        """Queued, assigned and running builds, oldest first (a restart rebuilds from these)."""

    @abc.abstractmethod
    def assign(self, build_id: str, box: str, old_lease: int, new_lease: int, now: float) -> bool:
        """queued -> assigned to `box` with `new_lease`, if the build is queued at `old_lease`."""

    @abc.abstractmethod
    def mark_started(self, build_id: str, lease: int, cell: str, now: float) -> bool:
        """assigned -> running, if `lease` is current."""

    @abc.abstractmethod
    def requeue(self, build_id: str, lease: int, reason: str) -> bool:
        """assigned -> queued (the box never started it), if `lease` is current."""

    @abc.abstractmethod
    def finish(self, build_id: str, lease: int | None, state: str, *, code: int | None, signal: int | None,
               reason: str, message: str, usage: dict | None, now: float) -> bool:
        """A live build -> a terminal state. `lease` None: whatever the lease (cancel of a
        queued build, a box lost); otherwise only if it is current."""

    @abc.abstractmethod
    def request_cancel(self, build_id: str) -> bool: ...

    @abc.abstractmethod
    def count_by_state(self) -> dict[str, int]: ...

    # -- logs ---------------------------------------------------------------------------
    @abc.abstractmethod
    def append_log(self, build_id: str, lease: int, box_seq: int, stream: int, data: bytes,
                   gap: tuple[str, int] | None = None) -> int | None:
        """Store a chunk from the box holding `lease`, in the order of `box_seq` (contiguous per
        build): a duplicate (box_seq already stored) is dropped; one ahead of a hole waits
        (durably) for the hole to fill, and a hole still open when the build ends, or too long,
        becomes a visible marker counted in `gaps`. Past the build's cap, output is cut with
        a marker. `gap` (reason, bytes) makes the chunk a marker the box sent (`build.gap`,
        stream 0). Returns the log seq the chunk got now, or None."""

    @abc.abstractmethod
    def log_position(self, build_id: str) -> int:
        """The last box_seq up to which the build's output is stored without a hole (-1: none)."""

    @abc.abstractmethod
    def read_log(self, build_id: str, after: int = -1, limit: int = 256) -> list[LogChunk]: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS config (kind TEXT NOT NULL, name TEXT NOT NULL, body TEXT NOT NULL,
                                   PRIMARY KEY (kind, name));
CREATE TABLE IF NOT EXISTS boxes (
    id TEXT PRIMARY KEY, token_hash TEXT NOT NULL DEFAULT '', capacity INTEGER NOT NULL DEFAULT 0,
    shapes TEXT NOT NULL DEFAULT '[]', warm TEXT NOT NULL DEFAULT '{}', last_heartbeat REAL,
    registered_at REAL);
CREATE TABLE IF NOT EXISTS builds (
    id TEXT PRIMARY KEY, customer TEXT NOT NULL, shape TEXT NOT NULL, argv TEXT NOT NULL,
    env TEXT NOT NULL, cwd TEXT NOT NULL, timeout_s REAL NOT NULL, options TEXT NOT NULL,
    state TEXT NOT NULL, box TEXT NOT NULL DEFAULT '', cell TEXT NOT NULL DEFAULT '',
    lease INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,
    exit_code INTEGER, signal INTEGER, reason TEXT NOT NULL DEFAULT '',
    message TEXT NOT NULL DEFAULT '', usage TEXT NOT NULL DEFAULT '{}',
    submitted_at REAL NOT NULL, assigned_at REAL, started_at REAL, finished_at REAL,
    idem_key TEXT, source TEXT NOT NULL DEFAULT 'api',
    log_bytes INTEGER NOT NULL DEFAULT 0, log_truncated INTEGER NOT NULL DEFAULT 0,
    log_next_seq INTEGER NOT NULL DEFAULT 0, log_box_seq INTEGER NOT NULL DEFAULT -1,
    cancel_requested INTEGER NOT NULL DEFAULT 0, log_cut_bytes INTEGER NOT NULL DEFAULT 0,
    log_marker_bytes INTEGER NOT NULL DEFAULT 0);
CREATE UNIQUE INDEX IF NOT EXISTS builds_idem ON builds (customer, idem_key) WHERE idem_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS builds_live ON builds (state) WHERE state IN ('queued', 'assigned', 'running');
CREATE TABLE IF NOT EXISTS build_logs (
    build_id TEXT NOT NULL, seq INTEGER NOT NULL, stream INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (build_id, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS build_log_pending (
    build_id TEXT NOT NULL, box_seq INTEGER NOT NULL, stream INTEGER NOT NULL, data BLOB NOT NULL,
    gap_reason TEXT, gap_bytes INTEGER, PRIMARY KEY (build_id, box_seq)) WITHOUT ROWID;
"""

_BUILD_COLS = ("id", "customer", "shape", "argv", "env", "cwd", "timeout_s", "options", "state", "box",
               "cell", "lease", "attempts", "exit_code", "signal", "reason", "message", "usage",
               "submitted_at", "assigned_at", "started_at", "finished_at", "idem_key", "source",
               "log_bytes", "log_truncated", "cancel_requested", "log_cut_bytes")
_JSON_COLS = {"argv", "env", "options", "usage"}
_BOOL_COLS = {"log_truncated", "cancel_requested"}
_COLS = ", ".join(_BUILD_COLS)
_SELECT_BUILD = f"SELECT {_COLS} FROM builds"
_GET_BUILD = f"{_SELECT_BUILD} WHERE id = ?"
_GET_IDEM = f"{_SELECT_BUILD} WHERE customer = ? AND idem_key = ?"
_LIVE_BUILDS = f"{_SELECT_BUILD} WHERE state IN ('queued', 'assigned', 'running') ORDER BY submitted_at, id"
_INSERT_BUILD = f"INSERT INTO builds ({_COLS}) VALUES ({', '.join('?' * len(_BUILD_COLS))})"
_CONVERT = tuple((json.loads if c in _JSON_COLS else bool if c in _BOOL_COLS else None) for c in _BUILD_COLS)


def _gap_marker(text: str) -> bytes:
    return f"\n[hived: {text}]\n".encode()


def _row_to_build(row) -> Build:
    kw = {}
    for col, conv, value in zip(_BUILD_COLS, _CONVERT, row, strict=True):
        if conv is not None:
            value = conv(value)
        kw[col] = value
    return Build(**kw)


_encode = json.JSONEncoder(separators=(",", ":")).encode  # made once: json.dumps(..., separators=) is not


def _dumps(value) -> str:
    """JSON for a column; the empty list and map (most builds' env and options) without encoding."""
    if not value:
        return "[]" if isinstance(value, list) else "{}"
    return _encode(value)


_APPEND_FAST = (  # the usual chunk: in order, under the cap; one statement decides and counts it
    "UPDATE builds SET log_bytes = log_bytes + ?, log_next_seq = log_next_seq + 1, log_box_seq = ? "
    "WHERE id = ? AND lease = ? AND state IN ('queued', 'assigned', 'running') AND log_box_seq = ? - 1 "
    "AND log_truncated = 0 AND log_bytes - log_marker_bytes + ? <= ? RETURNING log_next_seq - 1")


class SQLiteStore(Store):
    """One SQLite file per hive, WAL mode. Safe to call from several threads (one lock)."""

    def __init__(self, path: Path | str, hive: str, *, synchronous: str = "full",
                 log_max_bytes: int = 8 << 20, background_checkpoint: bool = False) -> None:
        if synchronous not in ("full", "normal", "extra"):
            raise StoreError(f"synchronous must be full, normal or extra, not {synchronous!r}")
        self.path = Path(path)
        self.hive = hive
        self.log_max_bytes = log_max_bytes
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the hive's database {self.path}: {exc}") from None
        self.lock = threading.RLock()  # the writer; held from begin() to commit() by a batch
        self.rlock = threading.Lock()   # the reader
        # Markers written since start, by reason, and output bytes they stand for (metrics).
        self.gaps: collections.Counter = collections.Counter()
        self.cut_bytes: collections.Counter = collections.Counter()
        self.duplicates = 0
        self.pending_builds: set[str] = set()  # builds with chunks waiting behind a hole
        self.rdb = None
        self.in_batch = False
        self.poisoned = ""              # why the open batch must not be committed
        db = self.db
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.Error as exc:
            db.close()
            raise StoreError(f"cannot use {self.path} as the hive's database: {exc}") from None
        if mode.lower() != "wal":
            raise StoreError(f"{self.path}: SQLite refused WAL mode (got {mode}); is it on a network fs?")
        db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        db.execute("PRAGMA busy_timeout=5000")
        self.background_checkpoint = background_checkpoint
        self.cdb = None
        self.ckpt_lock = threading.Lock()
        if background_checkpoint:
            # The owner calls checkpoint() off its event loop; the commit that crosses SQLite's
            # own threshold (which would copy the WAL into the database inside a commit) only
            # happens if that falls far behind.
            db.execute("PRAGMA wal_autocheckpoint=16384")
        with self._tx():
            for statement in _SCHEMA.split(";"):  # executescript() would commit the transaction
                if statement.strip():
                    db.execute(statement)
            rows = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if not rows:
                db.execute("INSERT INTO meta VALUES ('hive', ?), ('schema', ?)", (hive, str(SCHEMA_VERSION)))
            else:
                if rows.get("hive") != hive:
                    raise StoreError(f"{self.path} holds hive {rows.get('hive')!r}, not {hive!r}: "
                                     "each hive needs its own state file")
                if int(rows.get("schema", 0)) > SCHEMA_VERSION:
                    raise StoreError(f"{self.path} has schema {rows['schema']}, newer than this hived "
                                     f"({SCHEMA_VERSION}): upgrade hived")
                if int(rows.get("schema", 0)) < SCHEMA_VERSION:  # 1 -> 2: one column (the table came above)
                    columns = {r[1] for r in db.execute("PRAGMA table_info(builds)")}
                    for column in ("log_cut_bytes", "log_marker_bytes"):
                        if column not in columns:
                            db.execute(f"ALTER TABLE builds ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")
                    db.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (str(SCHEMA_VERSION),))
            self.pending_builds = {r[0] for r in db.execute("SELECT DISTINCT build_id FROM build_log_pending")}
        # Reads on a connection of their own: in WAL mode they see the last commit, never an
        # open batch, and never wait for the writer.
        self.rdb = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self.rdb.execute("PRAGMA busy_timeout=5000")
        self.rdb.execute("PRAGMA query_only=1")

    def checkpoint(self) -> tuple[int, int]:
        """Copy committed WAL frames into the database file (PASSIVE: never waits for, nor
        blocks, the writer or readers). For a thread other than the writer's. Returns
        (frames in the WAL, frames checkpointed)."""
        with self.ckpt_lock:
            if self.cdb is None:
                self.cdb = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
                self.cdb.execute("PRAGMA busy_timeout=0")
            _, log_frames, done = self.cdb.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            return log_frames, done

    # -- plumbing ---------------------------------------------------------------------------
    class _Tx:
        """One method's writes: a transaction of their own; or, inside a batch, part of the
        batch. A batch in which any write failed is poisoned: commit() rolls it all back and
        raises, so nothing half-done is ever made durable (and the control plane stops)."""

        def __init__(self, store: "SQLiteStore") -> None:
            self.store = store

        def __enter__(self):
            store = self.store
            store.lock.acquire()
            if store.in_batch:
                return store.db
            try:
                store.db.execute("BEGIN IMMEDIATE")
            except BaseException:
                store.lock.release()
                raise
            return store.db

        def __exit__(self, exc_type, exc, tb):
            store = self.store
            try:
                if store.in_batch:
                    if exc_type is not None:
                        store.poisoned = store.poisoned or f"{exc_type.__name__}: {exc}"
                else:
                    store.db.execute("ROLLBACK" if exc_type else "COMMIT")
            finally:
                store.lock.release()
            return False

    def _tx(self) -> "_Tx":
        return self._Tx(self)

    def _read(self, sql: str, args=()) -> list:
        with self.rlock:
            return self.rdb.execute(sql, args).fetchall()

    def _update(self, sql: str, args) -> bool:
        """One statement: atomic by itself, inside a batch or as its own transaction."""
        with self.lock:
            if self.in_batch:
                try:
                    return self.db.execute(sql, args).rowcount == 1
                except BaseException as exc:
                    self.poisoned = self.poisoned or f"{type(exc).__name__}: {exc}"
                    raise
            self.db.execute("BEGIN IMMEDIATE")
            try:
                n = self.db.execute(sql, args).rowcount
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
            return n == 1

    # -- group commit -------------------------------------------------------------------------
    def begin(self) -> None:
        self.lock.acquire()
        try:
            if self.in_batch:
                raise RuntimeError("a batch is already open")
            self.db.execute("BEGIN IMMEDIATE")
            self.in_batch = True
        except BaseException:
            self.lock.release()
            raise

    def commit(self) -> None:
        if not self.in_batch:
            return
        try:
            if self.poisoned:
                raise StoreError(f"a write in this batch failed ({self.poisoned}): the batch is rolled back")
            self.db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
            raise
        finally:
            self.in_batch = False
            self.poisoned = ""
            self.lock.release()

    def rollback(self) -> None:
        if not self.in_batch:
            return
        try:
            self.db.execute("ROLLBACK")
        finally:
            self.in_batch = False
            self.poisoned = ""
            self.lock.release()

    def close(self) -> None:
        if self.in_batch:
            self.rollback()
        with self.lock:
            self.db.close()
        if self.rdb is not None:
            with self.rlock:
                self.rdb.close()
        with self.ckpt_lock:
            if self.cdb is not None:
                self.cdb.close()
                self.cdb = None

    def journal_mode(self) -> str:
        return self._read("PRAGMA journal_mode")[0][0]

    # -- hive -----------------------------------------------------------------------------
    def sync_config(self, customers: dict, shapes: dict) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM config")
            db.executemany("INSERT INTO config VALUES (?, ?, ?)",
                           [("customer", k, json.dumps(v, sort_keys=True, default=str))
                            for k, v in customers.items()] +
                           [("shape", k, json.dumps(v, sort_keys=True, default=str))
                            for k, v in shapes.items()])

    def config(self, kind: str) -> dict:
        return {name: json.loads(body) for name, body in
                self._read("SELECT name, body FROM config WHERE kind = ?", (kind,))}

    # -- boxes ----------------------------------------------------------------------------
    def set_box_token(self, box_id: str, token_hash: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO boxes (id, token_hash) VALUES (?, ?) "
                       "ON CONFLICT (id) DO UPDATE SET token_hash = excluded.token_hash",
                       (box_id, token_hash))

    def get_box(self, box_id: str) -> BoxRecord | None:
        rows = self._read("SELECT id, token_hash, capacity, shapes, warm, last_heartbeat, registered_at "
                          "FROM boxes WHERE id = ?", (box_id,))
        return self._box(rows[0]) if rows else None

    @staticmethod
    def _box(row) -> BoxRecord:
        return BoxRecord(row[0], row[1], row[2], json.loads(row[3]), json.loads(row[4]), row[5], row[6])

    def box_seen(self, box_id: str, *, capacity: int, shapes: list[str], warm: dict, now: float,
                 registered: bool = False) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO boxes (id, capacity, shapes, warm, last_heartbeat, registered_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET capacity = excluded.capacity, "
                "shapes = excluded.shapes, warm = excluded.warm, last_heartbeat = excluded.last_heartbeat, "
                "registered_at = COALESCE(excluded.registered_at, boxes.registered_at)",
                (box_id, capacity, json.dumps(shapes), json.dumps(warm), now, now if registered else None))

    def boxes(self) -> list[BoxRecord]:
        return [self._box(r) for r in self._read(
            "SELECT id, token_hash, capacity, shapes, warm, last_heartbeat, registered_at "
            "FROM boxes ORDER BY id")]

    # -- builds ---------------------------------------------------------------------------
    def create_build(self, build: Build) -> tuple[Build, bool]:
        b = build
        values = (b.id, b.customer, b.shape, _dumps(b.argv), _dumps(b.env), b.cwd, b.timeout_s,
                  _dumps(b.options), b.state, b.box, b.cell, b.lease, b.attempts, b.exit_code, b.signal,
                  b.reason, b.message, _dumps(b.usage), b.submitted_at, b.assigned_at, b.started_at,
                  b.finished_at, b.idem_key, b.source, b.log_bytes, int(b.log_truncated),
                  int(b.cancel_requested), b.log_cut_bytes)
        with self._tx() as db:
            if build.idem_key is not None:
                row = db.execute(_GET_IDEM, (build.customer, build.idem_key)).fetchone()
                if row:
                    return _row_to_build(row), False
            db.execute(_INSERT_BUILD, values)
        return build, True

    def get_build(self, build_id: str) -> Build | None:
        rows = self._read(_GET_BUILD, (build_id,))
        return _row_to_build(rows[0]) if rows else None

    def live_builds(self) -> list[Build]:
        rows = self._read(_LIVE_BUILDS)
        return [_row_to_build(r) for r in rows]

    def assign(self, build_id: str, box: str, old_lease: int, new_lease: int, now: float) -> bool:
        return self._update(
            "UPDATE builds SET state = 'assigned', box = ?, lease = ?, attempts = attempts + 1, "
            "assigned_at = ? WHERE id = ? AND state = 'queued' AND lease = ? AND cancel_requested = 0",
            (box, new_lease, now, build_id, old_lease))

    def mark_started(self, build_id: str, lease: int, cell: str, now: float) -> bool:
        return self._update(
            "UPDATE builds SET state = 'running', cell = ?, started_at = ? "
            "WHERE id = ? AND state = 'assigned' AND lease = ?", (cell, now, build_id, lease))

    def requeue(self, build_id: str, lease: int, reason: str) -> bool:
        return self._update(
            "UPDATE builds SET state = 'queued', box = '', cell = '', message = ? "
            "WHERE id = ? AND state = 'assigned' AND lease = ?", (reason, build_id, lease))

    def finish(self, build_id: str, lease: int | None, state: str, *, code: int | None, signal: int | None,
               reason: str, message: str, usage: dict | None, now: float) -> bool:
        if state not in TERMINAL:
            raise ValueError(f"finish() needs a terminal state, not {state!r}")
        sql = ("UPDATE builds SET state = ?, exit_code = ?, signal = ?, reason = ?, message = ?, usage = ?, "
               "finished_at = ? WHERE id = ? AND state IN ('queued', 'assigned', 'running')")
        args = [state, code, signal, reason, message, _dumps(usage or {}), now, build_id]
        if lease is not None:
            sql += " AND lease = ?"
            args.append(lease)
        with self._tx() as db:
            if db.execute(sql, args).rowcount != 1:
                return False
            self._close_log(db, build_id)
            return True

    def request_cancel(self, build_id: str) -> bool:
        return self._update("UPDATE builds SET cancel_requested = 1 WHERE id = ? AND state IN "
                            "('queued', 'assigned', 'running')", (build_id,))

    def count_by_state(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        counts.update(self._read("SELECT state, count(*) FROM builds GROUP BY state"))
        return counts

    # -- logs -------------------------------------------------------------------------------
    def append_log(self, build_id: str, lease: int, box_seq: int, stream: int, data: bytes,
                   gap: tuple[str, int] | None = None) -> int | None:
        n = len(data)
        with self._tx() as db:
            if gap is None and build_id not in self.pending_builds:
                rows = db.execute(_APPEND_FAST, (n, box_seq, build_id, lease, box_seq, n,
                                                 self.log_max_bytes)).fetchall()
                if rows:
                    seq = rows[0][0]
                    db.execute("INSERT INTO build_logs VALUES (?, ?, ?, ?)", (build_id, seq, stream, bytes(data)))
                    return seq
            # Not the usual chunk (stale, duplicate, ahead of a hole, over the cap, a marker): say which.
            row = db.execute("SELECT lease, state, log_box_seq FROM builds WHERE id = ?", (build_id,)).fetchone()
            if row is None:
                return None
            cur_lease, state, last_box_seq = row
            if cur_lease != lease or state not in LIVE:
                return None
            if box_seq <= last_box_seq:
                self.duplicates += 1  # sent again after a reconnect: it is stored already
                return None
            if box_seq > last_box_seq + 1:  # a hole before it: wait for it to fill
                db.execute("INSERT OR IGNORE INTO build_log_pending VALUES (?, ?, ?, ?, ?, ?)",
                           (build_id, box_seq, stream, bytes(data), *(gap or (None, None))))
                self.pending_builds.add(build_id)
                waiting = db.execute("SELECT count(*) FROM build_log_pending WHERE build_id = ?",
                                     (build_id,)).fetchone()[0]
                if waiting > PENDING_MAX_CHUNKS:  # too long: the hole is a gap
                    self._flush_pending(db, build_id, holes=True)
                return None
            seq = self._place(db, build_id, stream, data, gap)
            db.execute("UPDATE builds SET log_box_seq = ? WHERE id = ?", (box_seq, build_id))
            if build_id in self.pending_builds:
                self._flush_pending(db, build_id, holes=False)
            return seq

    def _place(self, db, build_id: str, stream: int, data: bytes, gap: tuple[str, int] | None) -> int | None:
        """The next chunk of the log (in order, no hole before it): stored, or cut at the cap."""
        nbytes, markers, truncated, next_seq = db.execute(
            "SELECT log_bytes, log_marker_bytes, log_truncated, log_next_seq FROM builds WHERE id = ?",
            (build_id,)).fetchone()
        output = nbytes - markers  # the cap is on the build's output; markers come on top
        if gap is not None:  # a marker from the box: always kept (it is what tells the reader)
            reason, lost = gap
            self.gaps[reason] += 1
            if lost > 0:
                self.cut_bytes[reason] += lost
            return self._write(db, build_id, next_seq, STREAM_MARKER, data, nbytes)
        if truncated:
            self.cut_bytes["log_max_bytes"] += len(data)
            db.execute("UPDATE builds SET log_cut_bytes = log_cut_bytes + ? WHERE id = ?", (len(data), build_id))
            return None
        if output + len(data) <= self.log_max_bytes:
            return self._write(db, build_id, next_seq, stream, data, nbytes)
        room = max(0, self.log_max_bytes - output)
        seq = None
        if room > 0:
            seq = self._write(db, build_id, next_seq, stream, data[:room], nbytes)
            next_seq, nbytes = next_seq + 1, nbytes + room
        cut = len(data) - room
        self.gaps["log_max_bytes"] += 1
        self.cut_bytes["log_max_bytes"] += cut
        marker = (f"\n[hived: log truncated at {self.log_max_bytes} bytes: the hive keeps that much output per "
                  "build (hive.log_max_bytes); the rest is cut, its size follows at the end]\n").encode()
        seq = self._write(db, build_id, next_seq, STREAM_MARKER, marker, nbytes)
        db.execute("UPDATE builds SET log_truncated = 1, log_cut_bytes = log_cut_bytes + ? WHERE id = ?",
                   (cut, build_id))
        return seq

    @staticmethod
    def _write(db, build_id: str, seq: int, stream: int, data: bytes, nbytes: int) -> int:
        db.execute("INSERT INTO build_logs VALUES (?, ?, ?, ?)", (build_id, seq, stream, bytes(data)))
        db.execute("UPDATE builds SET log_bytes = ?, log_next_seq = ?, log_marker_bytes = log_marker_bytes + ? "
                   "WHERE id = ?", (nbytes + len(data), seq + 1, len(data) if stream == STREAM_MARKER else 0,
                                    build_id))
        return seq

    def _flush_pending(self, db, build_id: str, *, holes: bool) -> None:
        """Move chunks that waited behind a hole into the log: those now in order; with `holes`
        (the build ended, or waited too long) all of them, each hole becoming a marker."""
        rows = db.execute("SELECT box_seq, stream, data, gap_reason, gap_bytes FROM build_log_pending "
                          "WHERE build_id = ? ORDER BY box_seq", (build_id,)).fetchall()
        last = db.execute("SELECT log_box_seq FROM builds WHERE id = ?", (build_id,)).fetchone()[0]
        for box_seq, stream, data, reason, lost in rows:
            if box_seq > last + 1:
                if not holes:
                    break
                missing = box_seq - last - 1
                self._place(db, build_id, STREAM_MARKER, _gap_marker(
                    f"{missing} chunk(s) of output never reached the control plane (box seq {last + 1}"
                    f"..{box_seq - 1}); what follows came after them"), ("sequence", -1))
            self._place(db, build_id, stream, data, (reason, lost) if reason else None)
            last = box_seq
            db.execute("DELETE FROM build_log_pending WHERE build_id = ? AND box_seq = ?", (build_id, box_seq))
        db.execute("UPDATE builds SET log_box_seq = ? WHERE id = ?", (last, build_id))
        if not db.execute("SELECT 1 FROM build_log_pending WHERE build_id = ? LIMIT 1", (build_id,)).fetchone():
            self.pending_builds.discard(build_id)

    def _close_log(self, db, build_id: str) -> None:
        """The build ended: chunks still waiting behind a hole go in (the hole as a marker), and a
        log cut at the cap says at its end how much was cut."""
        if build_id in self.pending_builds:
            self._flush_pending(db, build_id, holes=True)
        truncated, cut = db.execute("SELECT log_truncated, log_cut_bytes FROM builds WHERE id = ?",
                                    (build_id,)).fetchone()
        if truncated:
            self._place(db, build_id, STREAM_MARKER, _gap_marker(
                f"{cut} bytes of output were cut after the first {self.log_max_bytes} "
                "(hive.log_max_bytes)"), ("log_max_bytes", 0))
            self.gaps["log_max_bytes"] -= 1  # the same cut as the first marker, counted once

    def log_position(self, build_id: str) -> int:
        with self.lock:
            row = self.db.execute("SELECT log_box_seq FROM builds WHERE id = ?", (build_id,)).fetchone()
        return row[0] if row else -1

    def read_log(self, build_id: str, after: int = -1, limit: int = 256) -> list[LogChunk]:
        return [LogChunk(*r) for r in self._read(
            "SELECT seq, stream, data FROM build_logs WHERE build_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (build_id, after, limit))]

