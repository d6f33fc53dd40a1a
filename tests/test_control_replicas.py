"""Several control planes on one PostgreSQL database (a real server, see conftest): one leads,
the others stand by and serve the API; boxes may dial any of them; when the leader dies
(SIGKILL) another takes over and nothing acknowledged is lost, nothing runs twice.

The boxes are simulated (hived.control.simbox: the real protocol over real sockets, no
cells): these tests are about the control planes. Real boxes: test_multibox.py."""

import asyncio
import contextlib
import re
import signal
import subprocess
import sys
import time

import aiohttp
import pytest
from test_control_api import GOOD, TOKENS, Hive, hive_config, run, sha
from test_control_restart import ControlProcess as Replica

from hived.control.simbox import SimBox


async def until(cond, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not await cond() if asyncio.iscoroutinefunction(cond) else not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


@pytest.fixture
def db_config(pg_database, monkeypatch):
    monkeypatch.setenv("HIVED_DATABASE_PASSWORD", pg_database.password)
    return {"database": pg_database.url}


def test_standby_serves_the_api_and_forwards_boxes_to_the_leader(tmp_path, db_config):
    async def main():
        async with Hive(hive_config(tmp_path / "a", **db_config)) as a, \
                Hive(hive_config(tmp_path / "b", **db_config)) as b:
            assert a.cp.leading and not b.cp.leading
            _, ma = await a.call("GET", "/metrics", token=None)
            _, mb = await b.call("GET", "/metrics", token=None)
            assert metric(ma, "hived_control_is_leader") == 1 and metric(mb, "hived_control_is_leader") == 0
            assert metric(ma, "hived_control_leader_changes_total") == 1
            assert metric(mb, "hived_control_leader_changes_total") == 0
            # a box dialing the standby is linked to the leader (forwarded)
            box = await SimBox("127.0.0.1", b.cp.box_port, "box-a", "box-a-token", warm={"small": 1}).connect()
            await until(lambda: a.cp.scheduler.boxes_connected() == 1, what="box registered on the leader")
            assert b.cp.scheduler.boxes_connected() == 0
            # submitted on the standby, scheduled by the leader, followed on the standby
            status, build = await b.call("POST", "/v1/builds", body=GOOD)
            assert status == 201 and build["state"] == "queued"
            follow = asyncio.ensure_future(b.call("GET", f"/v1/builds/{build['id']}/logs?follow=1"))
            got = await asyncio.wait_for(box.assigned.get(), 10)
            assert got.build_id == build["id"]
            await box.start(got.build_id)
            await box.output(got.build_id, b"hello from the box\n")
            await asyncio.sleep(0.3)
            await box.finish(got.build_id, 0)
            status, text = await asyncio.wait_for(follow, 10)
            assert status == 200 and text == "hello from the box\n"
            status, done = await b.call("GET", f"/v1/builds/{build['id']}")
            assert done["state"] == "succeeded" and done["attempts"] == 1
            # an idempotency key is one build whichever replica gets it
            s1, x = await b.call("POST", "/v1/builds", body=GOOD, headers={"Idempotency-Key": "once"})
            s2, y = await a.call("POST", "/v1/builds", body=GOOD, headers={"Idempotency-Key": "once"})
            assert (s1, s2, x["id"]) == (201, 200, y["id"])
            # a cancel taken by the standby is carried out by the leader (the box has no warm
            # cell left: the build waits in the leader's queue)
            await until(lambda: x["id"] in a.cp.scheduler.builds, what="the leader to adopt the build")
            status, _ = await b.call("POST", f"/v1/builds/{x['id']}/cancel")
            assert status == 202
            await until(lambda: a.cp.store.get_build(x["id"]).state == "cancelled", what="cancelled")
            assert a.cp.store.pending_cancels() == []
            await box.close()
    run(main)


def test_a_leader_fenced_off_by_a_newer_epoch_writes_nothing_and_stops(tmp_path, db_config, pg_database):
    """The lock says who may try to lead; the epoch is what keeps a stale leader harmless."""
    async def main():
        async with Hive(hive_config(tmp_path, **db_config)) as a:
            assert a.cp.leading
            status, first = await a.call("POST", "/v1/builds", body=GOOD)
            assert status == 201
            await asyncio.to_thread(pg_database.sql, "UPDATE leader SET epoch = epoch + 1")  # another leads
            status, body = await a.call("POST", "/v1/builds", body=dict(GOOD, argv=["echo", "late"]))
            assert status == 500 and body["error"]["code"] == "internal"
            assert a.cp.failed.done() and "no longer leads" in str(a.cp.failed.exception())
            rows = await asyncio.to_thread(pg_database.sql, "SELECT id, argv FROM builds")
            assert [r["id"] for r in rows] == [first["id"]]            # the fenced batch left nothing
    run(main)


def test_the_peer_token_is_the_hives_not_a_replicas(tmp_path, db_config, pg_database):
    """Boxes peer with the hive's peer token (box peers, issue 17): replicas with state dirs of
    their own hand out the one in the database; the first keeps an earlier single control
    plane's peer.token, so that its boxes go on peering."""
    (tmp_path / "a" / "t1").mkdir(parents=True)                 # hive_config's state_dir
    (tmp_path / "a" / "t1" / "peer.token").write_text("token-of-the-single-control-plane-before\n")

    async def main():
        async with Hive(hive_config(tmp_path / "a", **db_config)) as a, \
                Hive(hive_config(tmp_path / "b", **db_config)) as b:
            assert a.cp.peer_token == b.cp.peer_token == "token-of-the-single-control-plane-before"
            assert not (tmp_path / "b" / "t1" / "peer.token").exists()       # not made per replica
            box = await SimBox("127.0.0.1", b.cp.box_port, "box-a", "box-a-token").connect()
            await until(lambda: box.peer_tokens, what="peering.config")
            assert box.peer_tokens == ["token-of-the-single-control-plane-before"]
            await box.close()
        rows = await asyncio.to_thread(pg_database.sql, "SELECT value FROM meta WHERE key = 'peer_token'")
        assert [r["value"] for r in rows] == ["token-of-the-single-control-plane-before"]
        # a replica that starts later with a peer.token of its own still takes the hive's
        (tmp_path / "c" / "t1").mkdir(parents=True)
        (tmp_path / "c" / "t1" / "peer.token").write_text("a-stray-token\n")
        async with Hive(hive_config(tmp_path / "c", **db_config)) as c:
            assert c.cp.peer_token == "token-of-the-single-control-plane-before"
    run(main)


# -- processes --------------------------------------------------------------------------------
def write_config(tmp_path, name: str, db_url: str, pw_file) -> str:
    path = tmp_path / f"{name}.toml"
    path.write_text(f"""
[hive]
name = "r1"
state_dir = "{tmp_path / name}"
api_listen = "127.0.0.1:0"
box_listen = "127.0.0.1:0"
heartbeat_s = 0.2
box_lost_s = 10.0
database = "{db_url}"
database_password_file = "{pw_file}"

[shapes.small]

[customers.acme]
api_tokens_sha256 = ["{sha(TOKENS['acme'])}"]

[boxes.box-a]
token_sha256 = "{sha('box-a-token')}"
""")
    return str(path)


def test_leader_sigkilled_mid_build_a_standby_takes_over_and_nothing_is_lost_or_run_twice(tmp_path, pg_database):
    pw = tmp_path / "db.password"
    pw.write_text(pg_database.password)
    a = Replica(write_config(tmp_path, "a", pg_database.url, pw), tmp_path / "a.log")
    b = Replica(write_config(tmp_path, "b", pg_database.url, pw), tmp_path / "b.log")
    auth = {"Authorization": f"Bearer {TOKENS['acme']}"}

    async def main():
        async with aiohttp.ClientSession(headers=auth) as http:
            async def health(r):
                async with http.get(f"{r.api}/healthz") as resp:
                    return await resp.json()
            assert (await health(a))["leader"] and not (await health(b))["leader"]
            # the box dials the standby (forwarded to the leader, a)
            box = await SimBox("127.0.0.1", b.box_port, "box-a", "box-a-token", warm={"small": 2}).connect()
            async with http.post(f"{b.api}/v1/builds", json=GOOD) as r:
                assert r.status == 201
                running = await r.json()
            got = await asyncio.wait_for(box.assigned.get(), 10)
            await box.start(got.build_id)
            await box.output(got.build_id, b"before the kill\n")
            await asyncio.sleep(0.5)
            a.kill()                                    # the leader dies mid-build
            t_kill = time.monotonic()
            # a submit right after the kill, on the standby: acknowledged, so it must run
            async with http.post(f"{b.api}/v1/builds", json=dict(GOOD, argv=["echo", "after"])) as r:
                assert r.status == 201
                after = await r.json()
            await until(lambda: box.channel.closed_reason is not None, what="the forwarded link to drop")
            await until(health_is_leader(health, b), what="b to lead")
            failover_s = time.monotonic() - t_kill
            await box.connect()                         # the box reconnects (to b, now the leader)
            await box.output(got.build_id, b"after the takeover\n")
            await box.finish(got.build_id, 0)
            second = await asyncio.wait_for(box.assigned.get(), 15)
            assert second.build_id == after["id"]
            await box.start(second.build_id)
            await box.finish(second.build_id, 0)
            for build_id in (running["id"], after["id"]):
                async def done(i=build_id):
                    async with http.get(f"{b.api}/v1/builds/{i}") as r:
                        return (await r.json())["state"] == "succeeded"
                await until(done, what=f"{build_id} succeeded")
            async with http.get(f"{b.api}/v1/builds/{running['id']}") as r:
                first = await r.json()
            assert first["attempts"] == 1                # it ran once: the box kept it across the failover
            async with http.get(f"{b.api}/v1/builds/{running['id']}/logs") as r:
                log = await r.text()
            assert "before the kill\n" in log and "after the takeover\n" in log
            async with http.get(f"{b.api}/metrics") as r:
                m = await r.text()
            assert metric(m, "hived_control_is_leader") == 1 and metric(m, "hived_control_leader_changes_total") == 1
            assert failover_s < 10
            # the hive's peer token is the database's: the box was handed the same one by both leaders
            token = (await asyncio.to_thread(pg_database.sql, "SELECT value FROM meta WHERE key = 'peer_token'"))
            assert len(box.peer_tokens) == 2 and set(box.peer_tokens) == {token[0]["value"]}
            await box.close()

    try:
        run(main, timeout=120)
    finally:
        a.kill()
        b.kill(signal.SIGTERM)


def health_is_leader(health, r):
    async def check():
        try:
            return (await health(r))["leader"]
        except aiohttp.ClientError:
            return False
    return check


def test_a_box_config_may_list_several_replicas():
    from hived.box.controllink import LinkConfig, LinkConfigError

    one = LinkConfig.from_table({"address": "10.0.0.1:7070", "token": "t"}, box_name="b")
    assert one.addresses == (("10.0.0.1", 7070),)
    many = LinkConfig.from_table({"address": ["10.0.0.1:7070", "[::1]:7071"], "token": "t"}, box_name="b")
    assert many.addresses == (("10.0.0.1", 7070), ("::1", 7071)) and (many.host, many.port) == ("10.0.0.1", 7070)
    with pytest.raises(LinkConfigError, match=r"\[control\]\.address: expected \"HOST:PORT\""):
        LinkConfig.from_table({"address": ["10.0.0.1:7070", "nope"], "token": "t"}, box_name="b")


def test_a_hung_leader_is_ended_after_its_lease_and_stops_when_it_wakes(tmp_path, pg_database):
    """SIGSTOP keeps the leader's connections (and its lock) open: the standby waits out the
    lease, ends the leader's session and leads; the old leader, continued, finds itself fenced
    off and stops (exit 1), writing nothing."""
    pw = tmp_path / "db.password"
    pw.write_text(pg_database.password)
    a = Replica(write_config(tmp_path, "a", pg_database.url, pw), tmp_path / "a.log")
    b = Replica(write_config(tmp_path, "b", pg_database.url, pw), tmp_path / "b.log")
    auth = {"Authorization": f"Bearer {TOKENS['acme']}"}

    async def main():
        async with aiohttp.ClientSession(headers=auth) as http:
            async def health(r):
                async with http.get(f"{r.api}/healthz") as resp:
                    return await resp.json()
            assert (await health(a))["leader"]
            a.proc.send_signal(signal.SIGSTOP)
            t0 = time.monotonic()
            await until(health_is_leader(health, b), timeout=30, what="b to lead")
            took = time.monotonic() - t0
            assert 4.0 <= took <= 20.0, took                 # the lease (5 s), not at once, not never
            async with http.post(f"{b.api}/v1/builds", json=GOOD) as r:
                assert r.status == 201
                queued = await r.json()
            assert queued["state"] == "queued"
            a.proc.send_signal(signal.SIGCONT)
            deadline = time.monotonic() + 20
            while a.proc.poll() is None:
                assert time.monotonic() < deadline, "the old leader went on after waking"
                await asyncio.sleep(0.1)
            assert a.proc.returncode == 1
            assert "no longer leads" in (tmp_path / "a.log").read_text()
            assert (await health(b))["leader"]

    try:
        run(main, timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            a.proc.send_signal(signal.SIGCONT)
        a.kill()
        b.kill(signal.SIGTERM)


def test_hived_run_follows_a_build_across_a_leader_kill(tmp_path, pg_database):
    """A real `hived run` given every replica's API (--api, repeated) submits and follows from
    the first, the leader; SIGKILL it mid-build: the follower moves to the next replica and
    the output arrives whole, once, with the build's exit code."""
    pw = tmp_path / "db.password"
    pw.write_text(pg_database.password)
    a = Replica(write_config(tmp_path, "a", pg_database.url, pw), tmp_path / "a.log")
    b = Replica(write_config(tmp_path, "b", pg_database.url, pw), tmp_path / "b.log")
    token_file = tmp_path / "acme.token"
    token_file.write_text(TOKENS["acme"] + "\n")
    run_proc = None

    async def main():
        nonlocal run_proc
        box = await SimBox("127.0.0.1", b.box_port, "box-a", "box-a-token", warm={"small": 1}).connect()
        run_proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hived", "-v", "run", "--api", a.api, "--api", b.api, "--token-file", str(token_file),
            "--customer", "acme", "--", "make", "test",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            got = await asyncio.wait_for(box.assigned.get(), 15)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                run_proc.kill()
            raise AssertionError(f"hived run: {(await run_proc.communicate())[1].decode()[-2000:]}") from None
        assert got.argv == ["make", "test"]
        await box.start(got.build_id)
        await box.output(got.build_id, b"before the kill\n")
        line = await asyncio.wait_for(run_proc.stdout.readline(), 15)
        assert line == b"before the kill\n"                        # followed live, from the leader
        a.kill()
        await until(lambda: box.channel.closed_reason is not None, what="the forwarded link to drop")
        async with aiohttp.ClientSession() as http:
            async def health(r):
                async with http.get(f"{r.api}/healthz") as resp:
                    return await resp.json()
            await until(health_is_leader(health, b), what="b to lead")
        await box.connect()
        await box.output(got.build_id, b"after the takeover\n")
        await box.output(got.build_id, b"to stderr\n", stream=2)
        await box.finish(got.build_id, 3)
        out, err = await asyncio.wait_for(run_proc.communicate(), 30)
        assert run_proc.returncode == 3, err.decode()
        assert out == b"after the takeover\n"                     # the rest, nothing twice
        assert b"to stderr\n" in err
        assert f"trying {b.api}".encode() in err                  # it moved to the next replica
        await box.close()

    try:
        run(main, timeout=120)
    finally:
        if run_proc is not None and run_proc.returncode is None:
            run_proc.kill()
        a.kill()
        b.kill(signal.SIGTERM)
