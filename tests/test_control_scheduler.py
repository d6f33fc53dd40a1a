"""The scheduler alone: pure logic, the clock passed in, no sockets and no store."""

from hived.control.scheduler import Assign, CancelOnBox, DropBox, Finish, PoolTarget, Requeue, Scheduler
from hived.control.store import ASSIGNED, CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, Build


def b(i, shape="small", **kw):
    return Build(id=f"b{i}", customer="acme", shape=shape, argv=["true"], submitted_at=float(i), **kw)


def of(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


def box(s, name, warm=1, capacity=4, shapes=("small",), held=None, now=0.0, targets=None):
    return s.box_connected(name, shapes=list(shapes), capacity=capacity, warm={sh: warm for sh in shapes},
                           targets=targets or {sh: 1 for sh in shapes}, held=held or {}, now=now)


def test_places_on_a_warm_box_with_a_fresh_lease_and_records_latency():
    s = Scheduler()
    box(s, "a", warm=1)
    acts = s.submit(b(1), now=1.25)
    [a] = of(acts, Assign)
    assert (a.box_id, a.old_lease, a.lease, a.waited_s) == ("a", 0, 1, 0.25)
    assert s.builds["b1"].state == ASSIGNED


def test_spreads_load_least_loaded_then_most_warm():
    s = Scheduler()
    box(s, "a", warm=3)
    box(s, "b", warm=1)
    first = of(s.submit(b(1), 1), Assign)[0].box_id
    second = of(s.submit(b(2), 1), Assign)[0].box_id
    assert first == "a"      # equal load: the warmer box
    assert second == "b"     # then the less loaded one


def test_unseen_assignments_count_against_warm_cells():
    s = Scheduler()
    box(s, "a", warm=1)
    assert of(s.submit(b(1), 1), Assign)
    # The box's heartbeat was written before it read the assignment: still says 1 warm.
    acts = s.heartbeat("a", warm={"small": 1}, assigns_seen=0, now=2)
    assert not of(acts, Assign) and not of(s.submit(b(2), 2), Assign)
    assert s.queue_lengths() == {"small": 1}
    # Once it has read the assignment, a reported warm cell is a free one.
    acts = s.heartbeat("a", warm={"small": 1}, assigns_seen=1, now=3)
    assert [a.build.id for a in of(acts, Assign)] == ["b2"]


def test_queues_when_nothing_is_warm_and_grows_pools():
    s = Scheduler()
    box(s, "a", warm=0, capacity=4, targets={"small": 1})
    box(s, "b", warm=0, capacity=2, targets={"small": 1})
    acts = []
    for i in range(3):
        acts += s.submit(b(i), i)
    assert not of(acts, Assign)
    assert s.queue_lengths() == {"small": 3}
    targets = {}
    for p in of(acts, PoolTarget):
        targets[p.box_id] = p.targets["small"]
    assert targets == {"a": 3, "b": 2}  # 3 more cells, where there is room (a: 3 free, b: 1 free)
    # Cells boot: the queue drains in order and the targets go back to the boxes' own.
    acts = s.heartbeat("a", warm={"small": 2}, assigns_seen=0, now=10)
    acts += s.heartbeat("b", warm={"small": 1}, assigns_seen=0, now=10)
    assert [a.build.id for a in of(acts, Assign)] == ["b0", "b1", "b2"]
    acts += s.tick(10.2)  # targets are recomputed at most every targets_every_s, and on every tick
    assert {p.box_id: p.targets for p in of(acts, PoolTarget)}["a"] == {"small": 1}


def test_shapes_and_capacity_are_respected():
    s = Scheduler()
    box(s, "a", warm=5, capacity=1, shapes=("small",))
    box(s, "big", warm=1, shapes=("large",))
    assert of(s.submit(b(1, "large"), 1), Assign)[0].box_id == "big"
    assert of(s.submit(b(2), 1), Assign)[0].box_id == "a"
    assert not of(s.submit(b(3), 1), Assign)  # a is full
    acts = s.exited("a", "b2", 1, started=True, reason="exited", code=0, now=2)
    assert of(acts, Finish)[0].state == SUCCEEDED
    assert [a.build.id for a in of(acts, Assign)] == ["b3"]


def test_exit_states_and_stale_leases():
    s = Scheduler()
    box(s, "a", warm=3)
    for i in range(3):
        s.submit(b(i), 0)
    assert s.started("a", "b0", 1)
    assert not s.started("a", "b0", 7)           # not its lease
    assert not s.started("other", "b0", 1)       # not its box
    [f] = of(s.exited("a", "b0", 1, started=True, reason="exited", code=2, now=1), Finish)
    assert (f.state, f.code, f.lease) == (FAILED, 2, 1)
    assert s.exited("a", "b0", 1, started=True, reason="exited", code=0, now=1) == []  # resent: stale
    s.cancel("b1", 2)
    [f] = of(s.exited("a", "b1", 1, started=True, reason="cancelled", code=-1, now=3), Finish)
    assert f.state == CANCELLED


def test_a_box_that_could_not_start_a_build_gets_it_requeued_first_in_line():
    s = Scheduler()
    box(s, "a", warm=1)
    s.submit(b(1), 0)
    s.submit(b(2), 0)  # queued behind b1
    acts = s.exited("a", "b1", 1, started=False, reason="no_capacity", code=-1, now=1)
    assert of(acts, Requeue)
    assert list(s.queues["small"]) == ["b1", "b2"]
    acts = s.heartbeat("a", warm={"small": 1}, assigns_seen=1, now=2)
    [a] = of(acts, Assign)
    assert (a.build.id, a.old_lease, a.lease) == ("b1", 1, 2)


def test_lost_box_fails_its_builds_within_lost_s():
    s = Scheduler(lost_s=5)
    box(s, "a", warm=2, now=0)
    box(s, "b", warm=0, now=0)
    s.submit(b(1), 0)
    s.submit(b(2), 0)
    s.started("a", "b1", 1)
    s.heartbeat("b", warm={"small": 0}, assigns_seen=0, now=4)
    assert s.tick(4.9) == []
    s.heartbeat("b", warm={"small": 0}, assigns_seen=0, now=5)
    acts = s.tick(5.5)
    assert of(acts, DropBox) == [DropBox("a", "no heartbeat for 5.5 s")]
    fails = {f.build_id: f for f in of(acts, Finish)}
    assert set(fails) == {"b1", "b2"}  # b2 never started, but it has no retry policy
    assert all(f.state == FAILED and f.reason == "infrastructure" for f in fails.values())
    assert fails["b1"].message.startswith("infrastructure: box a lost (no heartbeat for 5.5 s)")
    assert s.boxes_connected() == 1
    assert s.tick(20) == [DropBox("b", "no heartbeat for 15.0 s")]  # b went quiet too; it held nothing
    assert s.boxes_connected() == 0


def test_lost_box_requeues_unstarted_builds_with_a_retry_policy():
    s = Scheduler(lost_s=5)
    box(s, "a", warm=2, now=0)
    s.submit(b(1, options={"retries": 1}), 0)
    s.submit(b(2, options={"retries": 1}), 0)
    s.started("a", "b2", 1)  # started: never run twice, so it fails
    box(s, "b", warm=0, now=5)
    acts = s.tick(6)
    assert [r.build_id for r in of(acts, Requeue)] == ["b1"]
    assert [f.build_id for f in of(acts, Finish)] == ["b2"]
    acts = s.heartbeat("b", warm={"small": 1}, assigns_seen=0, now=6)
    [a] = of(acts, Assign)
    assert (a.build.id, a.box_id, a.lease) == ("b1", "b", 2)
    # The lost box comes back holding b1 under its old lease: it must cancel it.
    acts = box(s, "a", warm=0, held={"b1": 1, "b2": 1}, now=7)
    assert {c.build_id for c in of(acts, CancelOnBox)} == {"b1", "b2"}
    assert s.exited("a", "b1", 1, started=True, reason="cancelled", code=-1, now=8) == []


def test_reconnect_keeps_held_builds_and_requeues_lost_assignments():
    s = Scheduler(lost_s=5)
    box(s, "a", warm=2, now=0)
    s.submit(b(1), 0)
    s.submit(b(2), 0)
    s.started("a", "b1", 1)
    s.box_disconnected("a", 1)
    # Back within lost_s: it still runs b1; b2's assignment never reached it.
    acts = box(s, "a", warm=0, held={"b1": 1}, now=2)
    assert [r.build_id for r in of(acts, Requeue)] == ["b2"]
    assert not of(acts, Finish) and s.builds["b1"].state == RUNNING
    assert s.tick(6) == []
    [f] = of(s.exited("a", "b1", 1, started=True, reason="exited", code=0, now=7), Finish)
    assert f.state == SUCCEEDED


def test_restart_restores_queue_and_gives_boxes_time_to_come_back():
    s = Scheduler(lost_s=5)
    queued = b(1)
    running = b(2, state=RUNNING, box="a", lease=3, attempts=1)
    s.load([queued, running], now=100)
    assert s.queue_lengths() == {"small": 1}
    assert s.tick(104) == []
    acts = box(s, "a", warm=1, held={"b2": 3}, now=104)
    assert [a.build.id for a in of(acts, Assign)] == ["b1"]
    [f] = of(s.exited("a", "b2", 3, started=True, reason="exited", code=0, now=105), Finish)
    assert f.state == SUCCEEDED
    # A box that never comes back after the restart: its builds fail after lost_s.
    s2 = Scheduler(lost_s=5)
    s2.load([b(3, state=ASSIGNED, box="gone", lease=1, attempts=1)], now=100)
    [f] = of(s2.tick(105.5), Finish)
    assert f.build_id == "b3" and "box gone lost" in f.message


def test_cancel_queued_and_running():
    s = Scheduler()
    box(s, "a", warm=1)
    s.submit(b(1), 0)
    s.submit(b(2), 0)
    [f] = of(s.cancel("b2", 1), Finish)
    assert (f.state, s.queue_lengths()) == (CANCELLED, {"small": 0})
    assert s.cancel("b1", 1) == [CancelOnBox("a", "b1", "cancelled by the API")]
    assert s.builds["b1"].state == ASSIGNED and s.builds["b1"].cancel_requested
    assert QUEUED not in {st.state for st in s.builds.values()}


def test_a_build_that_can_never_run_fails_once_with_its_reason():
    s = Scheduler()
    box(s, "a", warm=2)
    s.submit(b(1), 0)
    acts = s.exited("a", "b1", 1, started=False, reason="spawn_failed", code=-1, now=1, permanent=True,
                    message="repository git://x/proj at ffff: revision ffff does not exist")
    assert not of(acts, Requeue)
    [f] = of(acts, Finish)
    assert (f.state, f.reason, f.lease) == (FAILED, "spawn_failed", 1) and "does not exist" in f.message
    assert s.builds.get("b1") is None  # nothing keeps it for another attempt
