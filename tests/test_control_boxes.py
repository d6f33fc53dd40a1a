"""Boxes on the control plane: a real control plane (API, store, box link on real sockets)
with simulated boxes (hived.control.simbox) that speak the real msgpack protocol but run
no cells. These tests are about the control plane's logic only: registration and tokens,
queueing when builds outnumber warm cells, pool growth, leases, a box lost mid-build,
reconnects, log followers. Builds in real cells: test_control_e2e.py. Every test runs on
both stores: SQLite and PostgreSQL (a real server, see conftest)."""

import asyncio
import time

import aiohttp
import pytest
import test_control_api
from test_control_api import GOOD, TOKENS, Hive, run

from hived.control.simbox import SimBox
from hived.protocol.channel import Channel, ChannelClosed
from hived.protocol.session import Session

STORE: dict = {}  # [hive] keys that select the store under test


@pytest.fixture(autouse=True, params=["sqlite", "postgresql"])
def store_kind(request, monkeypatch):
    extra = {}
    if request.param == "postgresql":
        db = request.getfixturevalue("pg_database")
        monkeypatch.setenv("HIVED_DATABASE_PASSWORD", db.password)
        extra = {"database": db.url}
    monkeypatch.setattr(__import__(__name__), "STORE", extra)
    return request.param


def hive_config(tmp_path, **hive):
    return test_control_api.hive_config(tmp_path, **{**STORE, **hive})


def sim(h, name, **kw) -> SimBox:
    return SimBox("127.0.0.1", h.cp.box_port, name, f"{name}-token", **kw)


async def until(cond, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def wait_state(h, build_id, states, timeout=10.0):
    assert type(h.cp.store).__name__ == ("PostgresStore" if STORE else "SQLiteStore")
    await until(lambda: h.cp.store.get_build(build_id).state in states, timeout, f"{build_id} in {states}")
    return h.cp.store.get_build(build_id)


def test_box_tokens_are_checked(tmp_path):
    async def main():
        async with Hive(hive_config(tmp_path)) as h:
            for name, token, expect in (("box-a", "wrong", "wrong token for box 'box-a'"),
                                        ("box-z", "x", "unknown box 'box-z'")):
                loop = asyncio.get_running_loop()
                session = Session("box", name, {"control"})
                _, ch = await loop.create_connection(lambda s=session: Channel(s), "127.0.0.1", h.cp.box_port)
                await ch.handshake()
                await ch.send("box.register", box_id=name, token=token, shapes=["small"], capacity=1,
                              warm={"small": 1}, targets={"small": 1}, builds={}, agent="t")
                msg = await ch.recv()
                assert msg.name == "error" and msg["fatal"] and expect in msg["message"], msg
                try:
                    await asyncio.wait_for(ch.recv(), 5)
                    raise AssertionError("link should be closed")
                except ChannelClosed:
                    pass
            assert h.cp.scheduler.boxes_connected() == 0
            box = await sim(h, "box-a").connect()
            assert box.registered["hive"] == "t1" and h.cp.scheduler.boxes_connected() == 1
            await box.close()
    run(main)


def test_more_builds_than_warm_cells_queue_and_grow_pools(tmp_path):
    async def main():
        async with Hive(hive_config(tmp_path)) as h:
            a = await sim(h, "box-a", warm={"small": 1}, capacity=3, refill=False).connect()
            b = await sim(h, "box-b", warm={"small": 1}, capacity=3, refill=False).connect()
            ids = []
            for i in range(5):
                status, body = await h.call("POST", "/v1/builds", body={**GOOD, "argv": ["echo", str(i)]})
                assert status == 201
                ids.append(body["id"])
            # One build per warm cell: the two boxes have one each; three wait.
            first = {(await a.assigned.get()).build_id, (await b.assigned.get()).build_id}
            assert first == set(ids[:2])
            assert h.cp.scheduler.queue_lengths() == {"small": 3}
            # Each box is asked for one more warm cell: as many as fit (capacity 3 = 1 running,
            # its own target of 1 and one more), so 2 of the 3 queued builds get a cell coming.
            await until(lambda: a.pool_targets[-1:] == [{"small": 2}] == b.pool_targets[-1:],
                        what="pool.target")
            states = {i: h.cp.store.get_build(i).state for i in ids}
            assert list(states.values()).count("queued") == 3
            # Cells boot on the boxes: queued builds go out in submit order.
            done = []
            for box in (a, b):
                for bld in list(box.builds.values()):
                    await box.start(bld.build_id)
                    await box.finish(bld.build_id, 0)
                    done.append(bld.build_id)
            a.set_warm("small", 2)
            b.set_warm("small", 1)
            got = []
            for _ in range(3):
                got.append(await asyncio.wait_for(
                    asyncio.shield(_first(a.assigned, b.assigned)), 5))
            assert sorted(x.build_id for x in got) == sorted(ids[2:])
            for x in got:
                box = a if x.build_id in a.builds else b
                await box.start(x.build_id)
                await box.output(x.build_id, b"out\n")
                await box.finish(x.build_id, 0)
            for i in ids:
                assert (await wait_state(h, i, {"succeeded"})).attempts == 1
            assert h.cp.scheduler.queue_lengths() == {"small": 0}
            await until(lambda: a.pool_targets[-1] == {"small": 1} and b.pool_targets[-1] == {"small": 1},
                        what="targets back to the boxes' own")
            async with h.http.get(h.base + "/metrics") as r:
                text = await r.text()
            assert 'hived_control_builds{state="succeeded"} 5.0' in text
            assert "hived_control_boxes_connected 2.0" in text
            assert "hived_control_schedule_seconds_count 5.0" in text
            await a.close()
            await b.close()
    run(main)


async def _first(*queues):
    getters = [asyncio.ensure_future(q.get()) for q in queues]
    done, pending = await asyncio.wait(getters, return_when=asyncio.FIRST_COMPLETED)
    for p in pending:
        p.cancel()
    results = [d.result() for d in done]
    for q, g in zip(queues, getters, strict=True):  # put back any extra we took
        if g in done and g.result() is not results[0]:
            q.put_nowait(g.result())
    return results[0]


def test_box_killed_mid_build_fails_its_build_with_a_clear_reason_and_others_go_on(tmp_path):
    async def main():
        async with Hive(hive_config(tmp_path, box_lost_s=1.0, heartbeat_s=0.1)) as h:
            a = await sim(h, "box-a", warm={"small": 1}).connect()
            _, b1 = await h.call("POST", "/v1/builds", body=GOOD)
            assigned = await a.assigned.get()
            await a.start(assigned.build_id)
            await wait_state(h, b1["id"], {"running"})
            bb = await sim(h, "box-b", warm={"small": 1}).connect()
            _, b2 = await h.call("POST", "/v1/builds", body=GOOD)
            on_b = await bb.assigned.get()
            await bb.start(on_b.build_id)
            t0 = time.monotonic()
            a.kill()
            failed = await wait_state(h, b1["id"], {"failed"}, timeout=5)
            took = time.monotonic() - t0
            assert took < 1.0 + 1.0, took  # lost_s plus one tick, at most
            assert failed.reason == "infrastructure"
            assert failed.message.startswith("infrastructure: box box-a lost"), failed.message
            # The other box's build is untouched and finishes.
            assert h.cp.store.get_build(b2["id"]).state == "running"
            await bb.finish(on_b.build_id, 0)
            assert (await wait_state(h, b2["id"], {"succeeded"})).box == "box-b"
            # The lost box comes back still holding the build: told to cancel it; its late
            # exit is acknowledged (so it forgets it) and changes nothing.
            a.heartbeats = True
            await a.connect()
            build_id, reason = await asyncio.wait_for(a.cancels.get(), 5)
            assert build_id == b1["id"] and "no longer holds" in reason
            await a.finish(b1["id"], 0)
            await a.wait_acked(b1["id"])
            assert h.cp.store.get_build(b1["id"]).state == "failed"
            await a.close()
            await bb.close()
    run(main)


def test_unstarted_build_with_retry_policy_moves_to_another_box(tmp_path):
    async def main():
        async with Hive(hive_config(tmp_path, box_lost_s=0.5, heartbeat_s=0.1)) as h:
            a = await sim(h, "box-a", warm={"small": 1}).connect()
            _, b1 = await h.call("POST", "/v1/builds", body={**GOOD, "options": {"retries": 1}})
            await a.assigned.get()
            a.kill()  # before it started the build
            bb = await sim(h, "box-b", warm={"small": 1}).connect()
            moved = await asyncio.wait_for(bb.assigned.get(), 5)
            assert moved.build_id == b1["id"] and moved.lease == 2
            await bb.start(moved.build_id)
            await bb.finish(moved.build_id, 0)
            b = await wait_state(h, b1["id"], {"succeeded"})
            assert (b.box, b.attempts, b.lease) == ("box-b", 2, 2)
            await bb.close()
    run(main)


def test_cancel_a_running_build_reaches_the_box(tmp_path):
    async def main():
        async with Hive(hive_config(tmp_path)) as h:
            a = await sim(h, "box-a").connect()
            _, b1 = await h.call("POST", "/v1/builds", body=GOOD)
            await a.assigned.get()
            await a.start(b1["id"])
            status, body = await h.call("POST", f"/v1/builds/{b1['id']}/cancel")
            assert status == 202 and body["cancel_requested"]
            assert (await asyncio.wait_for(a.cancels.get(), 5))[0] == b1["id"]
            await a.finish(b1["id"], -1, reason="cancelled")
            assert (await wait_state(h, b1["id"], {"cancelled"})).reason == "cancelled"
            await a.close()
    run(main)


def test_two_clients_follow_one_builds_log(tmp_path):
    async def main():
        async with Hive(hive_config(tmp_path)) as h:
            a = await sim(h, "box-a").connect()
            _, b1 = await h.call("POST", "/v1/builds", body=GOOD)
            await a.assigned.get()
            await a.start(b1["id"])
            await a.output(b1["id"], b"line 1\n")
            auth = {"Authorization": f"Bearer {TOKENS['acme']}"}
            url = f"{h.base}/v1/builds/{b1['id']}/logs?follow=1"

            async def follow(fmt=""):
                async with aiohttp.ClientSession() as s, s.get(url + fmt, headers=auth) as r:
                    assert r.status == 200
                    return await r.read()

            f1 = asyncio.ensure_future(follow())
            f2 = asyncio.ensure_future(follow("&format=ndjson"))
            await asyncio.sleep(0.2)
            assert not f1.done() and not f2.done()
            await a.output(b1["id"], b"line 2\n", stream=2)
            await asyncio.sleep(0.1)
            await a.output(b1["id"], b"line 3\n")
            await a.finish(b1["id"], 0)
            raw, nd = await asyncio.wait_for(asyncio.gather(f1, f2), 10)
            assert raw == b"line 1\nline 2\nline 3\n"
            import base64
            import json
            lines = [json.loads(x) for x in nd.splitlines()]
            assert [(x["seq"], x["stream"], base64.b64decode(x["data_b64"])) for x in lines[:-1]] == \
                [(0, "stdout", b"line 1\n"), (1, "stderr", b"line 2\n"), (2, "stdout", b"line 3\n")]
            assert lines[-1]["end"] and lines[-1]["build"]["state"] == "succeeded"
            # Later, the log is still there; `after` skips what a reader has.
            status, text = await h.call("GET", f"/v1/builds/{b1['id']}/logs?after=0")
            assert status == 200 and text == "line 2\nline 3\n"
            await a.close()
    run(main)
