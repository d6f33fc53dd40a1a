"""Token bucket, pure Python. Twin of _native/tokenbucket.pyx (same tests, same vectors).

Pure arithmetic with the clock passed in: callers own time, timers only refill.
"""


class TokenBucket:
    """`size` tokens at most, refilled at `size` per `refill_s` seconds, plus a one-time burst."""

    __slots__ = ("size", "refill_s", "_tokens", "_burst", "_last")

    def __init__(self, size: float, refill_s: float, now: float, one_time_burst: float = 0.0):
        if size <= 0 or refill_s <= 0:
            raise ValueError(f"token bucket needs size > 0 and refill_s > 0, got {size}, {refill_s}")
        self.size = float(size)
        self.refill_s = float(refill_s)
        self._tokens = self.size
        self._burst = float(one_time_burst)
        self._last = float(now)

    def _refill(self, now: float) -> None:
        if now > self._last:
            self._tokens = min(self.size, self._tokens + (now - self._last) * self.size / self.refill_s)
            self._last = now

    @property
    def tokens(self) -> float:
        return self._tokens + self._burst

    def consume(self, n: float, now: float) -> bool:
        """Take `n` tokens if they are all there; otherwise take nothing."""
        self._refill(now)
        if n <= self._burst:
            self._burst -= n
            return True
        if n <= self._burst + self._tokens:
            self._tokens -= n - self._burst
            self._burst = 0.0
            return True
        return False

    def wait_time(self, n: float, now: float) -> float:
        """Seconds until `n` tokens are there (0 if now). n larger than size waits for size."""
        self._refill(now)
        have = self._tokens + self._burst
        n = min(n, self.size + self._burst)
        if n <= have:
            return 0.0
        return (n - have) * self.refill_s / self.size
