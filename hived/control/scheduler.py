"""Placement, queueing, leases and lost boxes: pure logic, no I/O, the clock passed in.

Every entry point takes `now` and returns a list of actions for the caller (the control
plane server) to carry out in order: write the store first, then tell the box. The
scheduler's memory is the fast copy; the store is the truth, and its conditional updates
on (state, lease) fence anything the scheduler might get wrong.

    submit ──> queue[shape] ──dispatch──> Assign(box, lease+1) ──> build.started ──> exit
                   ^   (a box with a free warm cell:        |            |
                   |    least loaded, then most warm)       | box lost,  | box lost
                   '------ Requeue (never started, retry) --'            '--> Fail(infrastructure)

Warm counts: a box reports its free warm cells per shape and how many assignments it
has read (`assigns_seen`); assignments it has not read yet are subtracted, so two builds
are never sent to one warm cell between heartbeats.

Placement is O(log boxes) per build: each shape has a heap of (load, -warm, box id)
entries; every change to a box pushes a fresh entry, and stale or unusable ones are
dropped when they come up (a box that becomes usable again has changed, so it is pushed
again). The heap is rebuilt when stale entries outnumber the boxes several times over.
"""

import collections
import dataclasses
import heapq

from hived.control.store import ASSIGNED, CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED

MAX_ATTEMPTS = 5  # assignments a box refused before starting (no warm cell after all, ...)


# -- actions ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Assign:
    build: object        # the store's Build (its argv, env, ... go to the box)
    box_id: str
    old_lease: int
    lease: int
    waited_s: float      # submit -> assignment (the scheduling latency)


@dataclasses.dataclass(frozen=True)
class Requeue:
    build_id: str
    lease: int
    reason: str


@dataclasses.dataclass(frozen=True)
class Finish:
    build_id: str
    lease: int | None    # None: whatever the lease (the scheduler decides alone)
    state: str
    reason: str
    message: str
    code: int | None = None
    signal: int | None = None
    usage: dict | None = None


@dataclasses.dataclass(frozen=True)
class CancelOnBox:
    box_id: str
    build_id: str
    reason: str


@dataclasses.dataclass(frozen=True)
class PoolTarget:
    box_id: str
    targets: dict


@dataclasses.dataclass(frozen=True)
class DropBox:
    box_id: str
    reason: str


# -- state ------------------------------------------------------------------------------------
@dataclasses.dataclass
class BuildState:
    id: str
    shape: str
    submitted: float
    build: object = None        # payload handed back in Assign
    state: str = QUEUED
    box: str = ""
    lease: int = 0
    attempts: int = 0
    retries: int = 0            # extra attempts when a box is lost before the build started
    cancel_requested: bool = False


@dataclasses.dataclass
class BoxState:
    id: str
    shapes: frozenset = frozenset()
    capacity: int = 0
    reported_warm: dict = dataclasses.field(default_factory=dict)
    base_targets: dict = dataclasses.field(default_factory=dict)
    sent_targets: dict = dataclasses.field(default_factory=dict)
    builds: set = dataclasses.field(default_factory=set)
    connected: bool = False
    lost: bool = False
    last_seen: float = 0.0
    assigns_sent: int = 0
    unseen: collections.deque = dataclasses.field(default_factory=collections.deque)  # (n, shape)
    pending: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # shape -> unseen
    version: int = 0            # bumped at every change; heap entries of older versions are stale

    def warm(self, shape: str) -> int:
        return self.reported_warm.get(shape, 0) - self.pending[shape]

    def sent(self, shape: str) -> None:
        self.assigns_sent += 1
        self.unseen.append((self.assigns_sent, shape))
        self.pending[shape] += 1

    def seen_up_to(self, n: int) -> None:
        while self.unseen and self.unseen[0][0] <= n:
            _, shape = self.unseen.popleft()
            self.pending[shape] -= 1

    def new_link(self) -> None:
        self.assigns_sent, self.unseen, self.pending = 0, collections.deque(), collections.Counter()

    @property
    def usable(self) -> bool:
        return self.connected and not self.lost

    def load(self) -> float:
        return len(self.builds) / self.capacity if self.capacity else 1.0


class Scheduler:
    def __init__(self, *, lost_s: float = 10.0, max_attempts: int = MAX_ATTEMPTS,
                 targets_every_s: float = 0.05) -> None:
        self.lost_s = lost_s
        self.max_attempts = max_attempts
        self.targets_every_s = targets_every_s  # pool targets are recomputed at most this often
        self._targets_at = float("-inf")
        self.builds: dict[str, BuildState] = {}
        self.boxes: dict[str, BoxState] = {}
        self.queues: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self._heaps: dict[str, list] = collections.defaultdict(list)  # shape -> [(load, -warm, id, version)]

    # -- restore --------------------------------------------------------------------------
    def load(self, builds, now: float) -> None:
        """Rebuild memory from the store's live builds after a restart. Boxes holding builds
        get `lost_s` from now to reconnect and claim them."""
        for b in builds:
            st = BuildState(b.id, b.shape, b.submitted_at, b, b.state, b.box, b.lease, b.attempts,
                            _retries(b.options), b.cancel_requested)
            self.builds[b.id] = st
            if b.state == QUEUED:
                self.queues[b.shape].append(b.id)
            else:
                box = self.boxes.setdefault(b.box, BoxState(b.box, last_seen=now))
                box.builds.add(b.id)

    # -- builds -----------------------------------------------------------------------------
    def submit(self, build, now: float) -> list:
        st = BuildState(build.id, build.shape, build.submitted_at, build, retries=_retries(build.options))
        self.builds[build.id] = st
        self.queues[build.shape].append(build.id)
        return self.dispatch(now)

    def cancel(self, build_id: str, now: float) -> list:
        st = self.builds.get(build_id)
        if st is None:
            return []
        st.cancel_requested = True
        if st.state == QUEUED:
            self._unqueue(st)
            self._forget(st)
            return [Finish(st.id, None, CANCELLED, "cancelled", "cancelled before a box took it"),
                    *self.pool_targets(now)]
        box = self.boxes.get(st.box)
        if box and box.usable:
            return [CancelOnBox(box.id, st.id, "cancelled by the API")]
        return []  # sent when the box reconnects; if it never does, the build ends as cancelled

    def started(self, box_id: str, build_id: str, lease: int) -> bool:
        """The box started the build; False if that box no longer holds this lease."""
        st = self._held(box_id, build_id, lease)
        if st is None or st.state not in (ASSIGNED, RUNNING):
            return False
        st.state = RUNNING
        return True

    def holds(self, box_id: str, build_id: str, lease: int) -> bool:
        return self._held(box_id, build_id, lease) is not None

    def exited(self, box_id: str, build_id: str, lease: int, *, started: bool, reason: str, code: int,
               now: float, signal: int = 0, message: str = "", usage: dict | None = None,
               permanent: bool = False) -> list:
        """The box reports the end of a build. Returns the actions; [] when the lease is stale
        (the caller acknowledges it all the same, so the box forgets it)."""
        st = self._held(box_id, build_id, lease)
        if st is None:
            return []
        box = self.boxes[box_id]
        box.builds.discard(build_id)
        self._touch(box)
        # Never started: another attempt may work, unless the box says it never can (bad input).
        refused = not started and st.state == ASSIGNED and not st.cancel_requested and not permanent
        if refused and st.attempts < self.max_attempts:
            st.state, st.box = QUEUED, ""
            self.queues[st.shape].appendleft(st.id)  # it waited already: first in line
            return [Requeue(st.id, lease, f"box {box_id} could not start it ({reason})"), *self.dispatch(now)]
        if reason == "cancelled" and st.cancel_requested:
            state = CANCELLED
        elif reason == "exited" and code == 0:
            state = SUCCEEDED
        else:
            state = FAILED
        self._forget(st)
        return [Finish(st.id, lease, state, reason, message, code, signal, usage), *self.dispatch(now)]

    # -- boxes ------------------------------------------------------------------------------
    def box_connected(self, box_id: str, *, shapes, capacity: int, warm: dict, targets: dict,
                      held: dict, now: float) -> list:
        """A box registered (first time, or again after a reconnect or our restart). `held`:
        build id -> lease of what it still has. Ours it no longer has are failed; what it has
        that is no longer its (stale lease, unknown) it is told to cancel."""
        box = self.boxes.get(box_id) or BoxState(box_id)
        self.boxes[box_id] = box
        box.shapes, box.capacity = frozenset(shapes), capacity
        box.reported_warm, box.base_targets = dict(warm), dict(targets)
        box.sent_targets = dict(targets)
        box.connected, box.lost, box.last_seen = True, False, now
        box.new_link()
        self._targets_at = float("-inf")  # a new box: recompute pool targets now
        actions = []
        for build_id in sorted(box.builds):
            st = self.builds.get(build_id)
            if st is None:
                box.builds.discard(build_id)
                continue
            if held.get(build_id) == st.lease:
                if st.cancel_requested:
                    actions.append(CancelOnBox(box_id, st.id, "cancelled by the API"))
                continue
            box.builds.discard(build_id)
            if st.state == ASSIGNED and not st.cancel_requested:
                # The box never had it (the assignment was lost with the link, or the box
                # restarted before starting it): nothing ran, so it may run anywhere.
                st.state, st.box = QUEUED, ""
                self.queues[st.shape].appendleft(st.id)
                actions.append(Requeue(st.id, st.lease, f"box {box_id} reconnected without it"))
            else:
                self._forget(st)
                state = CANCELLED if st.cancel_requested else FAILED
                actions.append(Finish(st.id, st.lease, state, "infrastructure",
                                      f"infrastructure: box {box_id} came back without build {st.id} "
                                      "(the box restarted and lost it)"))
        for build_id in sorted(held):
            if build_id not in box.builds:
                actions.append(CancelOnBox(box_id, build_id, "this box no longer holds the build's lease"))
        self._touch(box)
        return actions + self.dispatch(now)

    def heartbeat(self, box_id: str, *, warm: dict, assigns_seen: int, now: float) -> list:
        box = self.boxes.get(box_id)
        if box is None or not box.connected:
            return []
        box.last_seen = now
        box.reported_warm = dict(warm)
        box.seen_up_to(assigns_seen)
        self._touch(box)
        return self.dispatch(now)

    def seen(self, box_id: str, now: float) -> None:
        box = self.boxes.get(box_id)
        if box is not None and box.connected:
            box.last_seen = now

    def box_disconnected(self, box_id: str, now: float) -> list:
        box = self.boxes.get(box_id)
        if box is None:
            return []
        box.connected = False
        return self.pool_targets(now, force=True)

    def tick(self, now: float) -> list:
        """Find boxes silent for more than lost_s: fail (or requeue) their builds."""
        actions = []
        for box in self.boxes.values():
            if box.lost or now - box.last_seen <= self.lost_s:
                continue
            box.lost = True
            silent = now - box.last_seen
            if box.connected:
                actions.append(DropBox(box.id, f"no heartbeat for {silent:.1f} s"))
                box.connected = False
            for build_id in sorted(box.builds):
                st = self.builds[build_id]
                why = f"infrastructure: box {box.id} lost (no heartbeat for {silent:.1f} s)"
                if st.state == ASSIGNED and not st.cancel_requested and st.attempts <= st.retries:
                    st.state, st.box = QUEUED, ""
                    self.queues[st.shape].appendleft(st.id)
                    actions.append(Requeue(st.id, st.lease, why + "; it never started: requeued"))
                    continue
                self._forget(st)
                if st.cancel_requested:
                    actions.append(Finish(st.id, None, CANCELLED, "cancelled", why))
                else:
                    actions.append(Finish(st.id, None, FAILED, "infrastructure", why))
            box.builds.clear()
        if actions:
            actions += self.dispatch(now)
        return actions + self.pool_targets(now, force=True)

    # -- placement ---------------------------------------------------------------------------
    def _touch(self, box: BoxState) -> None:
        """The box changed: its old heap entries are stale; push fresh ones if it can take a build."""
        box.version += 1
        if not box.usable or len(box.builds) >= box.capacity:
            return
        load = box.load()
        for shape in box.shapes:
            warm = box.warm(shape)
            if warm > 0:
                heap = self._heaps[shape]
                heapq.heappush(heap, (load, -warm, box.id, box.version))
                if len(heap) > 8 * len(self.boxes) + 64:
                    self._rebuild(shape)

    def _rebuild(self, shape: str) -> None:
        heap = [(b.load(), -b.warm(shape), b.id, b.version) for b in self.boxes.values()
                if b.usable and shape in b.shapes and len(b.builds) < b.capacity and b.warm(shape) > 0]
        heapq.heapify(heap)
        self._heaps[shape] = heap

    def pick_box(self, shape: str) -> BoxState | None:
        """The usable box with a free warm cell of `shape`: least loaded, then most warm, then by id."""
        heap = self._heaps.get(shape)
        while heap:
            _, _, box_id, version = heap[0]
            box = self.boxes.get(box_id)
            if box is not None and box.version == version and box.usable \
                    and len(box.builds) < box.capacity and box.warm(shape) > 0:
                return box
            heapq.heappop(heap)  # stale (the box changed since) or unusable (it will be pushed on change)
        return None

    def dispatch(self, now: float) -> list:
        actions = []
        for shape, queue in self.queues.items():
            while queue:
                box = self.pick_box(shape)
                if box is None:
                    break
                st = self.builds[queue.popleft()]
                old = st.lease
                st.lease, st.state, st.box = old + 1, ASSIGNED, box.id
                st.attempts += 1
                box.builds.add(st.id)
                box.sent(shape)
                self._touch(box)
                actions.append(Assign(st.build, box.id, old, st.lease, max(0.0, now - st.submitted)))
        return actions + self.pool_targets(now)

    def pool_targets(self, now: float, force: bool = False) -> list:
        """Grow warm pools for what is queued: each queued build asks for one more warm cell
        of its shape, spread over the boxes offering it, most free room first, as far as
        their capacity goes; back to each box's own targets when the queue is empty.
        Recomputed at most every targets_every_s (cells take seconds to boot anyway)."""
        if not force and now - self._targets_at < self.targets_every_s:
            return []
        self._targets_at = now
        usable = [b for b in self.boxes.values() if b.usable]
        wanted = {b.id: dict(b.base_targets) for b in usable}
        room = {b.id: b.capacity - len(b.builds) - sum(b.base_targets.values()) for b in usable}
        for shape, queue in self.queues.items():
            need = len(queue)
            offering = sorted((b for b in usable if shape in b.shapes and room[b.id] > 0),
                              key=lambda b: (-room[b.id], b.id))
            while need > 0 and offering:  # water-filling, one cell per box per round
                for box in offering:
                    if need == 0:
                        break
                    wanted[box.id][shape] = wanted[box.id].get(shape, 0) + 1
                    room[box.id] -= 1
                    need -= 1
                offering = [b for b in offering if room[b.id] > 0]
        actions = []
        for box_id, targets in wanted.items():
            box = self.boxes[box_id]
            if targets != box.sent_targets:
                box.sent_targets = dict(targets)
                actions.append(PoolTarget(box_id, dict(targets)))
        return actions

    # -- reporting ---------------------------------------------------------------------------
    def queue_lengths(self) -> dict[str, int]:
        return {shape: len(q) for shape, q in self.queues.items()}

    def boxes_connected(self) -> int:
        return sum(1 for b in self.boxes.values() if b.usable)

    def describe(self) -> dict:
        return {
            "queues": self.queue_lengths(),
            "boxes": {b.id: {"connected": b.connected, "lost": b.lost, "shapes": sorted(b.shapes),
                             "capacity": b.capacity, "builds": len(b.builds),
                             "warm": {s: b.warm(s) for s in sorted(b.shapes)}, "targets": b.sent_targets,
                             "last_seen": b.last_seen}
                      for b in self.boxes.values()},
        }

    # -- internals ---------------------------------------------------------------------------
    def _held(self, box_id: str, build_id: str, lease: int) -> BuildState | None:
        st = self.builds.get(build_id)
        if st is None or st.box != box_id or st.lease != lease or st.state not in (ASSIGNED, RUNNING):
            return None
        return st

    def _unqueue(self, st: BuildState) -> None:
        try:
            self.queues[st.shape].remove(st.id)
        except ValueError:
            pass

    def _forget(self, st: BuildState) -> None:
        self.builds.pop(st.id, None)
        box = self.boxes.get(st.box)
        if box and st.id in box.builds:
            box.builds.discard(st.id)
            self._touch(box)


def _retries(options: dict) -> int:
    value = (options or {}).get("retries", 0)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
