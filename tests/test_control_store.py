"""The control plane's stores, SQLite and PostgreSQL (a real server, see conftest): the same
tests against both: durability across reopen, lease fencing, bounded logs, idempotency;
then what is each one's own (WAL; schema migrations)."""


import pytest

from hived.control.store import (
    ASSIGNED,
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    STREAM_MARKER,
    SUCCEEDED,
    Build,
    SQLiteStore,
    StoreError,
)


def build(i=1, **kw):
    return Build(id=f"h_{i:04d}", customer="acme", shape="small", argv=["echo", str(i)],
                 submitted_at=100.0 + i, **kw)


@pytest.fixture
def store(opener):
    s = opener(log_max_bytes=100)
    yield s
    s.close()


def test_wal_mode(tmp_path):
    s = SQLiteStore(tmp_path / "h.db", "h")
    assert s.journal_mode() == "wal"
    s.close()


def test_one_hive_per_file_or_database(opener):
    opener().close()
    with pytest.raises(StoreError, match="holds hive 'h', not 'other'"):
        opener("other")


def test_builds_survive_reopen_from_another_connection(opener):
    s = opener()
    b, created = s.create_build(build(1, env={"A": "1"}, options={"retries": 1}))
    assert created
    # Another process opening the file sees the build at once: it was committed on return.
    assert opener.committed_state(b.id) == QUEUED
    s.close()
    s2 = opener()
    got = s2.get_build(b.id)
    assert (got.argv, got.env, got.options, got.state) == (["echo", "1"], {"A": "1"}, {"retries": 1}, QUEUED)
    assert [x.id for x in s2.live_builds()] == [b.id]
    s2.close()


def test_idempotency_key_returns_the_first_build(store):
    a, created_a = store.create_build(build(1, idem_key="k1"))
    b, created_b = store.create_build(build(2, idem_key="k1"))
    assert created_a and not created_b and b.id == a.id
    other = Build(id="h_x", customer="other", shape="small", argv=["x"], idem_key="k1")
    assert store.create_build(other)[1]  # keys are per customer


def test_lease_fences_every_transition(store):
    store.create_build(build(1))
    assert store.assign("h_0001", "box-a", 0, 1, 1.0)
    assert not store.assign("h_0001", "box-b", 0, 1, 1.0)  # not queued any more
    assert not store.mark_started("h_0001", 2, "c1", 2.0)    # wrong lease
    assert store.requeue("h_0001", 1, "box lost before start")
    assert store.get_build("h_0001").state == QUEUED
    assert not store.assign("h_0001", "box-b", 0, 1, 3.0)  # the old lease is used up
    assert store.assign("h_0001", "box-b", 1, 2, 3.0)
    assert not store.finish("h_0001", 1, SUCCEEDED, code=0, signal=0, reason="exited", message="", usage={},
                            now=4.0)  # the first box comes back late: refused
    assert store.mark_started("h_0001", 2, "c2", 4.0)
    assert store.get_build("h_0001").state == RUNNING
    assert store.finish("h_0001", 2, FAILED, code=3, signal=0, reason="exited", message="",
                        usage={"wall_s": 1}, now=5.0)
    b = store.get_build("h_0001")
    assert (b.state, b.exit_code, b.box, b.cell, b.attempts, b.usage) == (FAILED, 3, "box-b", "c2", 2,
                                                                          {"wall_s": 1})
    assert not store.finish("h_0001", None, CANCELLED, code=None, signal=None, reason="", message="",
                            usage=None, now=6.0)  # terminal stays terminal
    assert store.live_builds() == []


def test_cancel_requested_blocks_assignment(store):
    store.create_build(build(1))
    assert store.request_cancel("h_0001")
    assert not store.assign("h_0001", "box-a", 0, 1, 1.0)
    assert store.finish("h_0001", None, CANCELLED, code=None, signal=None, reason="cancelled", message="",
                        usage=None, now=2.0)
    assert not store.request_cancel("h_0001")


def test_logs_dedup_fence_and_truncate(store):
    store.create_build(build(1))
    store.assign("h_0001", "box-a", 0, 1, 1.0)
    assert store.append_log("h_0001", 1, 0, 1, b"a" * 40) == 0
    assert store.append_log("h_0001", 1, 0, 1, b"a" * 40) is None   # resent after a reconnect
    assert store.append_log("h_0001", 2, 1, 1, b"x") is None        # stale lease
    assert store.append_log("h_0001", 1, 1, 2, b"b" * 40) == 1
    assert store.append_log("h_0001", 1, 2, 1, b"c" * 40) == 3      # 20 bytes fit, then the marker
    assert store.append_log("h_0001", 1, 3, 1, b"d") is None         # past the cap: dropped
    chunks = store.read_log("h_0001")
    assert [(c.seq, c.stream) for c in chunks] == [(0, 1), (1, 2), (2, 1), (3, STREAM_MARKER)]
    assert chunks[2].data == b"c" * 20 and b"log truncated" in chunks[3].data
    b = store.get_build("h_0001")
    assert b.log_truncated and b.log_bytes == 100 + len(chunks[3].data)  # what a reader gets
    assert b.log_cut_bytes == 21 and store.cut_bytes["log_max_bytes"] == 21
    assert [c.seq for c in store.read_log("h_0001", after=1)] == [2, 3]
    # at the end, the reader is told how much was cut
    assert store.finish("h_0001", 1, SUCCEEDED, code=0, signal=None, reason="exited", message="", usage=None,
                        now=2.0)
    last = store.read_log("h_0001")[-1]
    assert last.stream == STREAM_MARKER and b"21 bytes of output were cut" in last.data
    assert store.get_build("h_0001").log_bytes == sum(len(c.data) for c in store.read_log("h_0001"))
    assert store.gaps["log_max_bytes"] == 1


def _log(store, build_id="h_0001"):
    return [(c.stream, c.data) for c in store.read_log(build_id, limit=10_000)]


def test_logs_out_of_order_box_seq_are_put_back_in_order(store):
    store.create_build(build(1))
    store.assign("h_0001", "box-a", 0, 1, 1.0)
    assert store.append_log("h_0001", 1, 0, 1, b"zero") == 0
    assert store.append_log("h_0001", 1, 2, 2, b"two") is None     # ahead of a hole: waits
    assert store.append_log("h_0001", 1, 3, 1, b"three") is None
    assert _log(store) == [(1, b"zero")] and store.log_position("h_0001") == 0
    assert store.append_log("h_0001", 1, 1, 1, b"one") == 1        # the hole fills: all in order
    assert _log(store) == [(1, b"zero"), (1, b"one"), (2, b"two"), (1, b"three")]
    assert store.log_position("h_0001") == 3 and store.pending_builds == set()
    assert store.append_log("h_0001", 1, 2, 2, b"two") is None     # a duplicate of a stored one
    assert store.append_log("h_0001", 1, 4, 1, b"four") == 4
    assert store.duplicates == 1 and sum(store.gaps.values()) == 0
    assert store.get_build("h_0001").log_bytes == len(b"zeroonetwothreefour")


def test_logs_a_hole_never_filled_is_a_visible_counted_gap(store):
    store.create_build(build(1))
    store.assign("h_0001", "box-a", 0, 1, 1.0)
    store.append_log("h_0001", 1, 0, 1, b"a")
    store.append_log("h_0001", 1, 3, 2, b"d")                     # 1 and 2 never come
    store.append_log("h_0001", 1, 3, 2, b"d")                     # (a duplicate while it waits)
    assert _log(store) == [(1, b"a")]
    assert store.finish("h_0001", 1, FAILED, code=1, signal=None, reason="exited", message="", usage=None,
                        now=2.0)
    log = _log(store)
    assert [s for s, _ in log] == [1, STREAM_MARKER, 2] and log[2][1] == b"d"
    assert b"2 chunk(s) of output never reached the control plane" in log[1][1]
    assert store.gaps["sequence"] == 1
    assert store.append_log("h_0001", 1, 1, 1, b"late") is None   # the build is over: refused
    b = store.get_build("h_0001")
    assert b.log_bytes == sum(len(d) for _, d in _log(store))


def test_logs_a_hole_held_too_long_is_declared_and_the_rest_flows(tmp_path):
    from hived.control.store import PENDING_MAX_CHUNKS

    store = SQLiteStore(tmp_path / "big.db", "h")
    store.create_build(build(1))
    store.assign("h_0001", "box-a", 0, 1, 1.0)
    for box_seq in range(1, PENDING_MAX_CHUNKS + 2):              # 0 never comes
        store.append_log("h_0001", 1, box_seq, 1, b"x")
    log = _log(store)
    assert log[0][0] == STREAM_MARKER and b"box seq 0..0" in log[0][1]
    assert log[1:] == [(1, b"x")] * (PENDING_MAX_CHUNKS + 1)
    assert store.append_log("h_0001", 1, PENDING_MAX_CHUNKS + 2, 1, b"y") is not None  # in order again
    assert store.append_log("h_0001", 1, 0, 1, b"late") is None   # too late: its place is the marker
    assert store.gaps["sequence"] == 1
    store.close()


def test_logs_gap_markers_from_the_box_take_their_place_and_are_counted(store):
    store.create_build(build(1))
    store.assign("h_0001", "box-a", 0, 1, 1.0)
    store.append_log("h_0001", 1, 0, 1, b"a" * 10)
    store.append_log("h_0001", 1, 2, 1, b"b")                      # after the marker
    store.append_log("h_0001", 1, 1, STREAM_MARKER, b"[cut 5000]", gap=("output_limit", 5000))
    assert _log(store) == [(1, b"a" * 10), (STREAM_MARKER, b"[cut 5000]"), (1, b"b")]
    assert store.gaps["output_limit"] == 1 and store.cut_bytes["output_limit"] == 5000


def test_schema_1_file_is_upgraded(tmp_path):
    import sqlite3

    s = SQLiteStore(tmp_path / "h.db", "h")
    s.create_build(build(1))
    s.close()
    db = sqlite3.connect(tmp_path / "h.db")
    db.execute("ALTER TABLE builds DROP COLUMN log_cut_bytes")
    db.execute("ALTER TABLE builds DROP COLUMN log_marker_bytes")
    db.execute("DROP TABLE build_log_pending")
    db.execute("UPDATE meta SET value = '1' WHERE key = 'schema'")
    db.commit()
    db.close()
    s = SQLiteStore(tmp_path / "h.db", "h")
    try:
        assert s.get_build("h_0001").log_cut_bytes == 0
        s.assign("h_0001", "box-a", 0, 1, 1.0)
        assert s.append_log("h_0001", 1, 1, 1, b"later") is None and s.pending_builds == {"h_0001"}
    finally:
        s.close()


def test_count_by_state_and_boxes(store):
    for i in range(3):
        store.create_build(build(i))
    store.assign("h_0000", "box-a", 0, 1, 1.0)
    assert store.count_by_state() == {QUEUED: 2, ASSIGNED: 1, RUNNING: 0, SUCCEEDED: 0, FAILED: 0,
                                      CANCELLED: 0}
    store.set_box_token("box-a", "f" * 64)
    store.box_seen("box-a", capacity=4, shapes=["small"], warm={"small": 2}, now=5.0, registered=True)
    store.box_seen("box-a", capacity=4, shapes=["small"], warm={"small": 1}, now=6.0)
    box = store.get_box("box-a")
    assert (box.token_hash, box.capacity, box.warm, box.last_heartbeat, box.registered_at) == \
        ("f" * 64, 4, {"small": 1}, 6.0, 5.0)


def test_a_reopened_store_goes_on_from_the_database(opener):
    """Leases, log order and the log cap carry over a restart (PostgreSQL keeps them in its copy
    of the live builds: it is reloaded from the database)."""
    s = opener(log_max_bytes=100)
    s.create_build(build(1))
    assert s.assign("h_0001", "box-a", 0, 1, 1.0)
    assert s.append_log("h_0001", 1, 0, 1, b"a" * 60) == 0
    s.close()
    s = opener(log_max_bytes=100)
    try:
        assert s.append_log("h_0001", 1, 0, 1, b"a" * 60) is None    # the box resends: a duplicate
        assert not s.mark_started("h_0001", 0, "c1", 2.0)           # the old lease is still refused
        assert s.mark_started("h_0001", 1, "c1", 2.0)
        assert s.append_log("h_0001", 1, 1, 1, b"b" * 60) == 2      # 40 bytes, then the marker
        assert [c.seq for c in s.read_log("h_0001")] == [0, 1, 2]
        assert s.get_build("h_0001").log_truncated
    finally:
        s.close()


# -- PostgreSQL's own ---------------------------------------------------------------------------
@pytest.fixture
def pg(pg_database):
    from hived.control.pgstore import PostgresStore

    stores = []

    def open_(hive="h", **kw):
        stores.append(PostgresStore(pg_database.url, hive, password=pg_database.password, **kw))
        return stores[-1]
    open_.db = pg_database
    yield open_
    for s in stores:
        s.close()


def test_postgres_schema_is_migrated_and_a_newer_one_refused(pg):
    from hived.control.pgstore import SCHEMA_VERSION

    s = pg()
    assert s.schema_version() == SCHEMA_VERSION >= 1
    s.close()
    pg.db.sql("UPDATE meta SET value = $1 WHERE key = 'schema'", str(SCHEMA_VERSION + 1))
    with pytest.raises(StoreError, match=f"has schema {SCHEMA_VERSION + 1}, newer than this hived "
                                         f"\\({SCHEMA_VERSION}\\): upgrade hived"):
        pg()


def test_postgres_wrong_password_is_one_clear_line_without_the_password(pg_database):
    from hived.control.pgstore import PostgresStore

    with pytest.raises(StoreError, match="cannot connect to the hive's database postgresql://") as err:
        PostgresStore(pg_database.url, "h", password="not-the-password")
    assert "password authentication failed" in str(err.value) and "not-the-password" not in str(err.value)
    assert pg_database.password not in str(err.value)


def test_postgres_a_row_changed_behind_its_back_fails_the_commit(pg):
    """The database stays the judge: a change by another writer makes the batch fail whole."""
    s = pg()
    s.create_build(build(1))
    s.create_build(build(2))
    pg.db.sql("UPDATE builds SET lease = 7 WHERE id = 'h_0001'")      # someone else
    s.begin()
    assert s.assign("h_0002", "box-a", 0, 1, 1.0)
    assert s.assign("h_0001", "box-a", 0, 1, 1.0)                       # the copy still says lease 0
    with pytest.raises(StoreError, match="changed in the database behind"):
        s.commit()
    assert s.get_build("h_0002").state == QUEUED                         # nothing of the batch was kept
    assert s.assign("h_0002", "box-a", 0, 1, 2.0)                        # and the store goes on
    assert s.get_build("h_0002").state == ASSIGNED


def test_config_selects_postgres_and_keeps_passwords_out_of_the_url(tmp_path, monkeypatch):
    from hived.control.config import ConfigError, parse

    base = {"shapes": {"small": {}}}
    with pytest.raises(ConfigError, match="hive.database: the URL holds a password"):
        parse({"hive": {"name": "h", "database": "postgresql://u:secret@db/h"}, **base})
    with pytest.raises(ConfigError, match="hive.database: expected \"postgresql://"):
        parse({"hive": {"name": "h", "database": "mysql://db/h"}, **base})
    (tmp_path / "pw").write_text("s3cret\n")
    cfg = parse({"hive": {"name": "h", "database": "postgresql://u@db/h", "database_password_file": "pw"},
                 **base}, base=tmp_path)
    assert cfg.database == "postgresql://u@db/h" and cfg.database_password() == "s3cret"
    monkeypatch.setenv("HIVED_DATABASE_PASSWORD", "from-env")
    assert parse({"hive": {"name": "h", "database": "postgresql://u@db/h"}, **base}).database_password() == \
        "from-env"


def test_postgres_two_writers_a_batch_lands_after_the_one_it_depends_on(pg):
    """With two writer connections, a batch sent while another is in flight lands after it
    when they share a build (created in one, assigned in the next), at once when they do not;
    a failed batch keeps every batch that depends on it from landing."""
    import concurrent.futures

    s = pg(writers=2)
    assert s.commits_in_flight == 2 and len(s.writer_pids()) == 2
    s.begin()
    s.create_build(build(1))
    first = s.commit_start()
    s.begin()
    assert s.assign("h_0001", "box-a", 0, 1, 1.0)                        # decided on the batch in flight
    s.create_build(build(2))
    second = s.commit_start()
    s.begin()
    s.create_build(build(3))                                             # shares nothing
    third = s.commit_start()
    concurrent.futures.wait([first, second, third], timeout=30)
    assert [f.exception() for f in (first, second, third)] == [None, None, None]
    assert s.get_build("h_0001").state == ASSIGNED and s.get_build("h_0003").state == QUEUED
    # a batch that fails (a row changed behind the store's back) takes its dependants with it
    pg.db.sql("UPDATE builds SET lease = 7 WHERE id = 'h_0002'")
    s.begin()
    assert s.assign("h_0002", "box-a", 0, 1, 2.0)
    failing = s.commit_start()
    s.begin()
    assert s.mark_started("h_0002", 1, "c1", 3.0)
    dependant = s.commit_start()
    concurrent.futures.wait([failing, dependant], timeout=30)
    assert "changed in the database behind" in str(failing.exception())
    assert dependant.exception() is not None
    assert s.get_build("h_0002").state == QUEUED


def test_postgres_commit_plan_is_index_lookups_on_an_empty_table_too(pg):
    """The commit statement is planned once per writer (a generic plan), the first time, often
    on an empty table: that plan must still find rows by primary key, not hash-join a scan of
    `builds` (such a plan made every later commit cost time in proportion to the builds ever
    stored)."""
    from hived.control import pgstore

    s = pg()
    nulls = ", ".join(["NULL"] * pgstore._P_NOTIFY)

    async def generic_plan():
        await s.w.execute(f"PREPARE hived_plan_check AS {pgstore._COMMIT_FENCED_SQL}")
        try:
            return "\n".join(r[0] for r in await s.w.fetch(f"EXPLAIN EXECUTE hived_plan_check({nulls})"))
        finally:
            await s.w.execute("DEALLOCATE hived_plan_check")
    plan = s._db.call(generic_plan())
    assert "Index Scan using builds_pkey on builds" in plan, plan
    assert "Seq Scan on builds" not in plan and "Hash Join" not in plan, plan
