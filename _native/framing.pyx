# cython: language_level=3
"""Length-prefixed frames, compiled. Twin of hived/protocol/framing_py.py.

Same contract, same tests, same golden vectors: a 4-byte big-endian body length, then
the body; the length is checked against the limit before the body is buffered.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy, memmove

from hived.protocol.errors import ProtocolError

cdef enum:
    HEADER_SIZE = 4


def pack_frame(bytes body, Py_ssize_t max_frame):
    """Prefix `body` with its length; refuse bodies over `max_frame`."""
    cdef Py_ssize_t n = len(body)
    if n == 0 or n > max_frame:
        raise ProtocolError("too_large" if n else "bad_frame",
                            f"frame body of {n} bytes is outside 1..{max_frame}")
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n + HEADER_SIZE)
    # Safe: `out` was just allocated with n + 4 bytes and is not shared yet.
    cdef unsigned char *p = <unsigned char *><char *>out
    p[0] = (n >> 24) & 0xFF
    p[1] = (n >> 16) & 0xFF
    p[2] = (n >> 8) & 0xFF
    p[3] = n & 0xFF
    memcpy(p + HEADER_SIZE, <char *>body, n)
    return out


cdef class FrameDecoder:
    """Split a byte stream into frame bodies (see framing_py.FrameDecoder)."""

    cdef char *_buf
    cdef Py_ssize_t _cap      # allocated bytes
    cdef Py_ssize_t _len      # bytes held, starting at _buf[0]
    cdef Py_ssize_t _need     # body length of the frame being read, 0 while reading a header
    cdef Py_ssize_t _max_frame
    cdef bint _broken

    def __cinit__(self, Py_ssize_t max_frame):
        self._buf = NULL
        self._cap = 0
        self._len = 0
        self._need = 0
        self._max_frame = max_frame
        self._broken = False

    def __dealloc__(self):
        free(self._buf)

    @property
    def buffered(self):
        return self._len

    def set_max_frame(self, Py_ssize_t max_frame):
        self._max_frame = max_frame

    cdef int _reserve(self, Py_ssize_t extra) except -1:
        cdef Py_ssize_t want = self._len + extra
        cdef Py_ssize_t cap
        cdef char *grown
        if want <= self._cap:
            return 0
        cap = self._cap * 2 if self._cap else 4096
        while cap < want:
            cap *= 2
        grown = <char *>realloc(self._buf, cap)
        if grown == NULL:
            raise MemoryError()
        self._buf = grown
        self._cap = cap
        return 0

    def feed(self, data):
        cdef const unsigned char[::1] view
        cdef Py_ssize_t n, pos = 0
        cdef const unsigned char *h
        cdef list out = []
        if self._broken:
            raise ProtocolError("bad_frame", "stream already out of sync")
        view = data
        n = view.shape[0]
        if n:
            self._reserve(n)
            # Safe: _reserve guaranteed _len + n <= _cap and `view` is C-contiguous.
            memcpy(self._buf + self._len, &view[0], n)
            self._len += n
        while True:
            if self._need == 0:
                if self._len - pos < HEADER_SIZE:
                    break
                # Safe: at least HEADER_SIZE bytes are held from `pos`.
                h = <const unsigned char *>(self._buf + pos)
                n = (<Py_ssize_t>h[0] << 24) | (h[1] << 16) | (h[2] << 8) | h[3]
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
            if self._len - pos < self._need:
                break
            out.append(PyBytes_FromStringAndSize(self._buf + pos, self._need))
            pos += self._need
            self._need = 0
        if pos:
            # Safe: pos <= _len, so the moved range stays inside the buffer.
            memmove(self._buf, self._buf + pos, self._len - pos)
            self._len -= pos
        return out
