# cython: language_level=3
"""Token bucket, compiled. Twin of hived/ratelimit_py.py (same tests, same vectors).

Pure arithmetic with the clock passed in: callers own time, timers only refill.
"""


cdef class TokenBucket:
    """`size` tokens at most, refilled at `size` per `refill_s` seconds, plus a one-time burst."""

    cdef readonly double size
    cdef readonly double refill_s
    cdef double _tokens
    cdef double _burst
    cdef double _last

    def __init__(self, double size, double refill_s, double now, double one_time_burst=0.0):
        if size <= 0 or refill_s <= 0:
            raise ValueError(f"token bucket needs size > 0 and refill_s > 0, got {size}, {refill_s}")
        self.size = size
        self.refill_s = refill_s
        self._tokens = size
        self._burst = one_time_burst
        self._last = now

    cdef void _refill(self, double now):
        if now > self._last:
            self._tokens += (now - self._last) * self.size / self.refill_s
            if self._tokens > self.size:
                self._tokens = self.size
            self._last = now

    @property
    def tokens(self):
        return self._tokens + self._burst

    cpdef bint consume(self, double n, double now):
        """Take `n` tokens if they are all there; otherwise take nothing."""
        self._refill(now)
        if n <= self._burst:
            self._burst -= n
            return True
        if n <= self._burst + self._tokens:
            self._tokens -= n - self._burst
            self._burst = 0
            return True
        return False

    cpdef double wait_time(self, double n, double now):
        """Seconds until `n` tokens are there (0 if now). n larger than size waits for size."""
        self._refill(now)
        cdef double have = self._tokens + self._burst
        if n > self.size + self._burst:
            n = self.size + self._burst
        if n <= have:
            return 0.0
        return (n - have) * self.refill_s / self.size
