"""The cell channel's resynchronisation marker (protocol v4; SPEC.md "The cell channel").

A cell outlives its box daemon: a new daemon connects to the same virtio-serial port, and
both directions may still hold the tail of a frame the old connection cut in half (QEMU
flushes a half-written buffer to whoever connects next; the guest may still have unread
bytes from the old daemon). So every connection on the cell channel starts with a marker,
and each side ignores everything before it:

    box  -> cell   MARKER + nonce (16 random bytes, new for every connection), then hello
    cell -> box    MARKER + the same nonce, then hello

The box waits for its own nonce, which nothing written before the connection can hold; the
cell takes the first marker it sees (the bytes before it come from a daemon that is gone).
Pure: no I/O, fed bytes, tested by itself.
"""

MARKER = b"\x00\xffhived-sync\x00\xff"
NONCE_BYTES = 16
KEEP_MAX = 1 << 20  # bytes scanned before giving up: a peer that never sends the marker is broken


class ResyncError(Exception):
    pass


class MarkerScanner:
    """Finds MARKER + nonce in a byte stream; `expect`: the one nonce accepted (None: any)."""

    def __init__(self, expect: bytes | None = None) -> None:
        if expect is not None and len(expect) != NONCE_BYTES:
            raise ValueError(f"a nonce is {NONCE_BYTES} bytes")
        self.expect = expect
        self.nonce: bytes | None = None
        self.skipped = 0
        self._tail = b""

    def feed(self, data: bytes) -> bytes | None:
        """None while the marker has not been seen; then the bytes after it (maybe b"")."""
        buf = self._tail + data
        start = 0
        while True:
            i = buf.find(MARKER, start)
            if i < 0 or len(buf) - i - len(MARKER) < NONCE_BYTES:
                break
            nonce = buf[i + len(MARKER): i + len(MARKER) + NONCE_BYTES]
            if self.expect is None or nonce == self.expect:
                self.nonce = nonce
                self.skipped += i
                self._tail = b""
                return buf[i + len(MARKER) + NONCE_BYTES:]
            start = i + 1
        # Keep what may be the start of a marker (and its nonce) cut at the end of `data`.
        keep = len(MARKER) + NONCE_BYTES - 1
        i = buf.find(MARKER, start)
        cut = i if i >= 0 else max(0, len(buf) - keep)
        self.skipped += cut
        self._tail = buf[cut:]
        if self.skipped > KEEP_MAX:
            raise ResyncError(f"no resynchronisation marker in the first {self.skipped} bytes of the cell channel")
        return None

    @property
    def found(self) -> bool:
        return self.nonce is not None


def marker(nonce: bytes) -> bytes:
    return MARKER + nonce
