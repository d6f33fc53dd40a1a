"""The control plane's SQLite store: WAL, durability across reopen, lease fencing, bounded logs."""

import sqlite3

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
def store(tmp_path):
    s = SQLiteStore(tmp_path / "h.db", "h", log_max_bytes=100)
    yield s
    s.close()


def test_wal_mode_and_one_hive_per_file(tmp_path):
    s = SQLiteStore(tmp_path / "h.db", "h")
    assert s.journal_mode() == "wal"
    s.close()
    with pytest.raises(StoreError, match="holds hive 'h', not 'other'"):
        SQLiteStore(tmp_path / "h.db", "other")


def test_builds_survive_reopen_from_another_connection(tmp_path):
    s = SQLiteStore(tmp_path / "h.db", "h")
    b, created = s.create_build(build(1, env={"A": "1"}, options={"retries": 1}))
    assert created
    # Another process opening the file sees the build at once: it was committed on return.
    raw = sqlite3.connect(tmp_path / "h.db")
    assert raw.execute("SELECT state FROM builds WHERE id = ?", (b.id,)).fetchone() == (QUEUED,)
    raw.close()
    s.close()
    s2 = SQLiteStore(tmp_path / "h.db", "h")
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
    assert b.log_truncated and b.log_bytes == 100
    assert [c.seq for c in store.read_log("h_0001", after=1)] == [2, 3]


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
