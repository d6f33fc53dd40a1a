"""A warm pool per shape, or per (shape, build image): keeps `target` cells booted, boots more for waiting builds,
bounds concurrent boots (shared semaphore), and backs off after failed boots."""

import asyncio
import collections
import logging

log = logging.getLogger(__name__)

BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 60.0
REFILL_AFTER_TAKE_S = 0.3  # see take()


class BootFailed(Exception):
    pass


class NoRoom(Exception):
    """The box has no room for another cell of this shape now: not a failure, wait."""


class WarmPool:
    def __init__(self, shape, boot, metrics=None, *, key: str = "", image=None, target: int | None = None) -> None:
        self.shape = shape
        self.key = key or shape.name      # "shape", or "shape@<image digest>"
        self.image = image                # hived.oci.cache.CachedImage its cells have attached, or None
        self.target = shape.pool_target if target is None else target
        self._boot = boot                 # async fn(shape) -> runtime, raises BootFailed
        self.metrics = metrics
        self.warm: collections.deque = collections.deque()
        self.booting = 0
        self.failures = 0                 # consecutive
        self.last_error = ""
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._kick = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._boots: set[asyncio.Task] = set()
        self._stopping = False
        self.no_room = ""                  # why the last boot could not be admitted, until room frees
        self.ready = asyncio.Event()      # set once a cell has been warm (for READY=1)

    def start(self) -> None:
        if self.warm:  # cells adopted from a previous daemon (hived/box/adopt.py)
            self.ready.set()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"pool-{self.key}")
        self._publish()

    def kick(self) -> None:
        self._kick.set()

    def room_freed(self) -> None:
        self.no_room = ""
        self.kick()

    def _wanted(self) -> int:
        return self.target + len(self._waiters) - len(self.warm) - self.booting

    async def _run(self) -> None:
        while not self._stopping:
            while self._wanted() > 0 and not self._stopping and not self.no_room:
                if self.failures:
                    delay = min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** (self.failures - 1))
                    log.warning("pool %s: %d failed boot(s) in a row, next try in %.1f s: %s",
                                self.key, self.failures, delay, self.last_error)
                    try:
                        await asyncio.wait_for(self._kick.wait(), delay)
                    except TimeoutError:
                        pass
                    self._kick.clear()
                    if self._stopping or self._wanted() <= 0:
                        break
                self.booting += 1
                task = asyncio.get_running_loop().create_task(self._boot_one())
                self._boots.add(task)
                task.add_done_callback(self._boots.discard)
                if self.failures:
                    break  # one probe boot at a time while failing
            self._publish()
            if self._stopping:
                return
            await self._kick.wait()
            self._kick.clear()

    async def _boot_one(self) -> None:
        try:
            rt = await self._boot(self.shape)
        except NoRoom as exc:
            self.no_room = str(exc)  # the box calls room_freed() when a cell goes away
            return
        except BootFailed as exc:
            self.failures += 1
            self.last_error = str(exc)
            for waiter in list(self._waiters):
                if not waiter.done() and self.failures >= 3:
                    waiter.set_exception(BootFailed(f"cells of shape {self.key} fail to boot: {exc}"))
            return
        except asyncio.CancelledError:
            raise
        finally:
            self.booting -= 1
            self.kick()
        self.failures = 0
        self.last_error = ""
        self.put(rt)

    def put(self, rt) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(rt)
                self._publish()
                return
        self.warm.append(rt)
        self.ready.set()
        self._publish()

    def take(self):
        """A warm cell now, or None. Dead cells found on the way are handed back for cleanup."""
        while self.warm:
            # A cell whose build container is pre-made first (cell.ready); else the oldest.
            rt = next((c for c in self.warm if getattr(c, "premade", None)), self.warm[0])
            self.warm.remove(rt)
            # The replacement boots a moment later: the build that took this cell is at its most
            # latency-sensitive (tunnel, checkout, container start) and a boot right now would take
            # the CPU from it; a boot takes seconds, so the pool loses next to nothing.
            asyncio.get_running_loop().call_later(REFILL_AFTER_TAKE_S, self.kick)
            self._publish()
            return rt
        return None

    async def get(self, timeout: float):
        rt = self.take()
        if rt is not None:
            return rt
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self.kick()
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except (TimeoutError, asyncio.CancelledError):
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.put(waiter.result())  # a cell arrived as we gave up: keep it warm
            else:
                waiter.cancel()
            raise
        finally:
            try:
                self._waiters.remove(waiter)
            except ValueError:
                pass

    def _publish(self) -> None:
        if self.metrics:
            self.metrics.pool_size.labels(self.key).set(len(self.warm))
            self.metrics.pool_target.labels(self.key).set(self.target)

    async def stop(self) -> list:
        """Stop booting; returns the warm cells for the caller to destroy.

        The refill loop ends on `_stopping` + a kick rather than by cancellation:
        on 3.11, wait_for() drops a cancel that races with the event it waits for.
        """
        self._stopping = True
        self.kick()
        for task in self._boots:
            task.cancel()
        await asyncio.gather(*(t for t in [self._task, *self._boots] if t), return_exceptions=True)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(BootFailed("box is stopping"))
        warm, self.warm = list(self.warm), collections.deque()
        return warm

    def describe(self) -> dict:
        return {"shape": self.shape.name, "image": self.image.digest if self.image else "",
                "target": self.target, "warm": len(self.warm), "booting": self.booting,
                "waiting_builds": len(self._waiters), "consecutive_failures": self.failures,
                "waiting_for_room": self.no_room,
                "last_error": self.last_error}
