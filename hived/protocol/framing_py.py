"""Length-prefixed frames, pure Python. Twin of _native/framing.pyx (same tests, same vectors).

A frame is a 4-byte big-endian body length followed by the body. The length is
checked against the limit before a single byte of the body is buffered.
"""

import struct

from hived.protocol.errors import ProtocolError

_LEN = struct.Struct(">I")
HEADER_SIZE = 4


def pack_frame(body: bytes, max_frame: int) -> bytes:
    """Prefix `body` with its length; refuse bodies over `max_frame`."""
    n = len(body)
    if n == 0 or n > max_frame:
        raise ProtocolError("too_large" if n else "bad_frame",
                            f"frame body of {n} bytes is outside 1..{max_frame}")
    return _LEN.pack(n) + body


class FrameDecoder:
    """Split a byte stream into frame bodies.

    feed() takes any chunk and returns the list of complete bodies; a partial frame
    stays buffered. After an error the decoder is poisoned: the stream has lost sync.
    """

    __slots__ = ("_buf", "_max_frame", "_need", "_broken")

    def __init__(self, max_frame: int) -> None:
        self._buf = bytearray()
        self._max_frame = max_frame
        self._need = 0  # body length of the frame being read, 0 while reading a header
        self._broken = False

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def set_max_frame(self, max_frame: int) -> None:
        self._max_frame = max_frame

    def feed(self, data: bytes) -> list[bytes]:
        if self._broken:
            raise ProtocolError("bad_frame", "stream already out of sync")
        buf = self._buf
        buf += data
        out = []
        pos = 0
        end = len(buf)
        while True:
            if self._need == 0:
                if end - pos < HEADER_SIZE:
                    break
                (n,) = _LEN.unpack_from(buf, pos)
                if n == 0:
                    self._broken = True
                    raise ProtocolError("bad_frame", "frame with an empty body")
                if n > self._max_frame:
                    self._broken = True
                    raise ProtocolError(
                        "too_large", f"frame of {n} bytes is over the limit of {self._max_frame}"
                    )
                pos += HEADER_SIZE
                self._need = n
            if end - pos < self._need:
                break
            out.append(bytes(buf[pos : pos + self._need]))
            pos += self._need
            self._need = 0
        if pos:
            del buf[:pos]
        return out
