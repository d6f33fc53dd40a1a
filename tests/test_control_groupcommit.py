"""Group commit: everything one turn of the control plane's loop writes is one store
transaction (SQLite and PostgreSQL), and nothing is said to anyone (submitter, box, log follower) before it is
committed. A failed commit stops the control plane; a failed write poisons its batch."""

import asyncio
import sqlite3

import pytest
from test_control_api import GOOD, Hive, hive_config, run

from hived.control.server import StoreFailed
from hived.control.simbox import SimBox
from hived.control.store import Build, SQLiteStore, StoreError


def build(i, **kw):
    return Build(id=f"h_{i:04d}", customer="acme", shape="small", argv=["echo", str(i)], submitted_at=1.0 + i,
                 **kw)


# -- the store's batches ----------------------------------------------------------------------
def test_a_batch_is_invisible_to_readers_until_committed(opener):
    s = opener()
    try:
        s.begin()
        s.create_build(build(1))
        assert s.assign("h_0001", "box-a", 0, 1, 2.0)          # the writer sees its own batch ...
        assert s.get_build("h_0001") is None                   # ... readers only what is committed
        s.commit()
        b = s.get_build("h_0001")
        assert (b.state, b.box, b.lease) == ("assigned", "box-a", 1)
        # the same idempotency key twice in one batch: one build
        s.begin()
        a, created_a = s.create_build(build(2, idem_key="k"))
        b, created_b = s.create_build(build(3, idem_key="k"))
        s.commit()
        assert (created_a, created_b, b.id) == (True, False, "h_0002")
    finally:
        s.close()


def test_a_failed_write_poisons_the_whole_batch(opener):
    s = opener()
    try:
        s.begin()
        s.create_build(build(1))
        with pytest.raises(sqlite3.IntegrityError if opener.kind == "sqlite" else StoreError):
            s.create_build(build(1))                           # same id
        with pytest.raises(StoreError, match="rolled back"):
            s.commit()
        assert s.get_build("h_0001") is None                   # nothing half-done was kept
        s.create_build(build(1))                               # and the store goes on
        assert s.get_build("h_0001").state == "queued"
    finally:
        s.close()


def test_checkpoint_runs_beside_the_writer(tmp_path):
    s = SQLiteStore(tmp_path / "h.db", "h", background_checkpoint=True)
    try:
        for i in range(50):
            s.create_build(build(i))
        frames, done = s.checkpoint()
        assert frames >= done >= 1
        assert s.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 16384
    finally:
        s.close()


# -- the control plane ------------------------------------------------------------------------
def test_one_commit_per_turn_and_answers_only_after_it(tmp_path):
    async def main():
        async with Hive(hive_config(tmp_path)) as h:
            cp = h.cp
            seen = []
            commit = cp.store.commit

            def spying_commit():
                seen.append([f.done() for f in futures])
                commit()
            cp.store.commit = spying_commit
            before = cp.commits
            futures = [cp.submit_nowait(build(i)) for i in range(20)]
            results = await asyncio.gather(*futures)
            assert cp.commits == before + 1 and seen == [[False] * 20]
            assert all(created for _, created in results)
            assert cp.store.get_build("h_0019").state == "queued"
    run(main)


def test_build_assign_leaves_only_after_the_commit(tmp_path):
    async def main():
        async with Hive(hive_config(tmp_path)) as h:
            box = await SimBox("127.0.0.1", h.cp.box_port, "box-a", "box-a-token", warm={"small": 1}).connect()
            await asyncio.sleep(0.1)
            queued_at_commit = []
            commit = h.cp.store.commit

            def spying_commit():
                link = h.cp.links["box-a"]
                queued_at_commit.append((len(link.out), box.assigned.qsize()))
                commit()
            h.cp.store.commit = spying_commit
            status, b = await h.call("POST", "/v1/builds", body=GOOD)
            assert status == 201
            got = await asyncio.wait_for(box.assigned.get(), 5)
            assert got.build_id == b["id"]
            # build.assign was queued for the box, not sent, when the batch holding the build and
            # its assignment was committed
            assert queued_at_commit[0][0] >= 1 and queued_at_commit[0][1] == 0
            await box.close()
    run(main)


def test_a_follower_that_reads_before_the_commit_is_still_woken(tmp_path):
    async def main():
        async with Hive(hive_config(tmp_path)) as h:
            cp = h.cp
            box = await SimBox("127.0.0.1", cp.box_port, "box-a", "box-a-token", warm={"small": 1}).connect()
            _, b = await h.call("POST", "/v1/builds", body=GOOD)
            a = await asyncio.wait_for(box.assigned.get(), 5)
            await box.start(a.build_id)
            await asyncio.sleep(0.2)
            link = cp.links["box-a"]
            msg = type("M", (), {"name": "build.output", "fields": {
                "build_id": a.build_id, "lease": a.lease, "stream": 1, "seq": 0, "data": b"late\n"}})()
            cp._on_box_message(link, msg)                       # written in this turn's open batch
            event = cp.log_event(b["id"])                       # a follower starts now ...
            assert cp.store.read_log(b["id"]) == []             # ... and reads nothing yet
            await asyncio.wait_for(event.wait(), 2)             # woken by the commit all the same
            assert [c.data for c in cp.store.read_log(b["id"])] == [b"late\n"]
            await box.close()
    run(main)


def test_a_failed_commit_stops_the_control_plane(tmp_path):
    async def main():
        async with Hive(hive_config(tmp_path)) as h:
            cp = h.cp
            box = await SimBox("127.0.0.1", cp.box_port, "box-a", "box-a-token").connect()
            await asyncio.sleep(0.1)
            real = cp.store.commit

            def failing_commit():
                cp.store.rollback()
                raise sqlite3.OperationalError("disk I/O error")
            cp.store.commit = failing_commit
            with pytest.raises(StoreFailed, match="disk I/O error"):
                await cp.submit(build(1))
            assert cp.failed.done() and "disk I/O error" in str(cp.failed.exception())
            with pytest.raises(StoreFailed):
                await cp.submit(build(2))                       # nothing more is taken
            status, body = await h.call("POST", "/v1/builds", body=GOOD)
            assert status == 500 and body["error"]["code"] == "internal"
            await asyncio.wait_for(box.channel.wait_closed(), 5)  # boxes are let go
            cp.store.commit = real
            assert cp.store.get_build("h_0001") is None
            await box.close()
    run(main)


def test_turns_are_said_in_commit_order_with_two_commits_in_flight(tmp_path):
    """The pipelined path's ordering (a store with two writers, PostgreSQL's shape): the next
    turn's batch is sent while one commits; a later batch that lands first waits to be said;
    a turn that wrote nothing is said after those in flight. Pure ordering logic, with a stand-in
    store whose commits land when the test says (the real store: test_control_store's two-writer
    test, and every PostgreSQL test of the control plane)."""
    import concurrent.futures

    from hived.control.server import ControlPlane

    class PipelinedStore:
        commits_in_flight = 2

        def __init__(self):
            self.in_batch = False
            self.sent: list[concurrent.futures.Future] = []

        def begin(self):
            self.in_batch = True

        def commit_start(self):
            self.in_batch = False
            self.sent.append(concurrent.futures.Future())
            return self.sent[-1]

    async def main():
        store = PipelinedStore()
        cp = ControlPlane(hive_config(tmp_path), store=store)
        cp._loop = asyncio.get_running_loop()
        cp.failed = cp._loop.create_future()
        cp._pipelined = store.commits_in_flight
        said = []

        def turn(result, write=True):
            if write:
                cp._begin()
            cp._durable(result).add_done_callback(lambda f: said.append(f.result()))
        turn("first")
        await asyncio.sleep(0)
        turn("no write", write=False)                        # said after the commit in flight
        await asyncio.sleep(0.01)
        assert said == [] and len(store.sent) == 1
        turn("second")
        await asyncio.sleep(0)
        assert len(store.sent) == 2                          # sent while the first commits
        turn("third")                                        # a third batch waits for a writer
        await asyncio.sleep(0.01)
        assert len(store.sent) == 2
        store.sent[1].set_result(None)                       # the second lands first ...
        await asyncio.sleep(0.01)
        assert said == []                                    # ... and waits for the first
        store.sent[0].set_result(None)
        await asyncio.sleep(0.01)
        assert said == ["first", "no write", "second"] and len(store.sent) == 3   # the third goes out now
        store.sent[2].set_result(None)
        await asyncio.sleep(0.01)
        assert said == ["first", "no write", "second", "third"]
    run(main)
