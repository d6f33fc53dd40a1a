"""asyncio glue: a Session and a FrameDecoder on a transport (host side; uvloop or asyncio).

Flow control both ways: incoming messages wait in a bounded queue (reading pauses when
it is full, so a fast peer is slowed by TCP/virtio back-pressure, not by our memory);
`send` waits while the transport's write buffer is over its high-water mark.
"""

import asyncio
import collections
import logging
import os
import socket

from hived.protocol.errors import ProtocolError
from hived.protocol.framing import FrameDecoder
from hived.protocol.resync import NONCE_BYTES, MarkerScanner, ResyncError, marker
from hived.protocol.session import LinkState, Session

log = logging.getLogger(__name__)


class ChannelClosed(Exception):
    """The link is gone; `reason` says why (peer closed, protocol error, timeout)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Channel(asyncio.Protocol):
    def __init__(self, session: Session, *, hello_timeout: float | None = 10.0, queue_max: int = 64):
        self.session = session
        self.decoder = FrameDecoder(4096)  # only a hello fits until the hello is read
        self.hello_timeout = hello_timeout
        self.queue_max = queue_max
        self.transport: asyncio.Transport | None = None
        self.closed_reason: str | None = None
        self.peer_hello = None
        self._queue: collections.deque = collections.deque()
        self._waiter: asyncio.Future | None = None
        # Channels are made inside a running loop (protocol factories, coroutines).
        self._hello: asyncio.Future = asyncio.get_running_loop().create_future()
        self._hello_timer: asyncio.TimerHandle | None = None
        self._paused_reading = False
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._closed = asyncio.Event()

    # -- asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport) -> None:
        loop = asyncio.get_running_loop()
        self.transport = transport
        transport.write(self.session.hello_frame())
        if self.hello_timeout is not None:
            self._hello_timer = loop.call_later(self.hello_timeout, self._hello_timed_out)

    def data_received(self, data: bytes) -> None:
        if self.closed_reason is not None:
            return
        try:
            bodies = self.decoder.feed(data)
        except ProtocolError as exc:
            self._protocol_failed(exc)
            return
        for body in bodies:
            try:
                msg = self.session.receive(body)
            except ProtocolError as exc:
                if exc.fatal:
                    self._protocol_failed(exc)
                    return
                log.warning("%s: %s", self.describe(), exc)
                self.transport.write(self.session.error_frame(exc))
                continue
            if msg.name == "hello":
                self.peer_hello = msg
                self.decoder.set_max_frame(self.session.max_frame)
                if self._hello_timer:
                    self._hello_timer.cancel()
                if not self._hello.done():
                    self._hello.set_result(msg)
                continue
            self._queue.append(msg)
            self._wake()
        if len(self._queue) >= self.queue_max and not self._paused_reading:
            self._paused_reading = True
            self.transport.pause_reading()

    def eof_received(self):
        return False  # close our side too

    def connection_lost(self, exc) -> None:
        if self.closed_reason is None:
            self.closed_reason = f"connection lost: {exc}" if exc else "peer closed the connection"
        self.session.close()
        if self._hello_timer:
            self._hello_timer.cancel()
        if not self._hello.done():
            self._hello.set_exception(ChannelClosed(self.closed_reason))
            self._hello.exception()  # mark retrieved: nobody may be waiting for it
        self._can_write.set()
        self._closed.set()
        self._wake()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # -- internals ---------------------------------------------------------------------
    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _hello_timed_out(self) -> None:
        self._protocol_failed(
            ProtocolError("no_hello", f"peer sent no hello within {self.hello_timeout:g} s")
        )

    def _protocol_failed(self, exc: ProtocolError) -> None:
        log.warning("%s: closing: %s", self.describe(), exc)
        self.closed_reason = str(exc)
        try:
            self.transport.write(self.session.error_frame(exc))
        except Exception:  # the transport may already be gone
            pass
        self.session.close()
        self.transport.close()

    # -- API ---------------------------------------------------------------------------
    def describe(self) -> str:
        return f"{self.session.role}<-{self.session.peer_role or '?'}:{self.session.peer_name or '?'}"

    async def handshake(self):
        """Wait for the peer's hello; returns it."""
        return await self._hello

    async def recv(self):
        """Next message; raises ChannelClosed once the link is gone and the queue is empty."""
        while not self._queue:
            if self.closed_reason is not None:
                raise ChannelClosed(self.closed_reason)
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        msg = self._queue.popleft()
        if self._paused_reading and len(self._queue) <= self.queue_max // 2:
            self._paused_reading = False
            if self.transport and self.closed_reason is None:
                self.transport.resume_reading()
        return msg

    async def send(self, name: str, **fields) -> None:
        frame = self.session.frame(name, **fields)
        await self._can_write.wait()
        if self.closed_reason is not None:
            raise ChannelClosed(self.closed_reason)
        if self.transport is None:  # a cell channel waiting for its peer's resync marker
            raise ChannelClosed("not connected yet")
        self.transport.write(frame)

    def send_nowait(self, name: str, **fields) -> None:
        if self.closed_reason is None:
            self.transport.write(self.session.frame(name, **fields))

    def close(self, reason: str = "closed by us") -> None:
        if self.closed_reason is None:
            self.closed_reason = reason
        if self.transport is not None:
            self.transport.close()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    @property
    def is_open(self) -> bool:
        return self.closed_reason is None and self.session.state is LinkState.OPEN


class ResyncChannel(Channel):
    """The cell channel's box side (hived/protocol/resync.py): every connection starts with the
    resync marker and a fresh nonce, sent again every MARKER_REPEAT_S until the cell echoes it;
    only then does our hello go. What arrives before the echo is a cut frame or a stale marker
    of an earlier connection, ignored; the repeats let a cell that answered a stale marker
    first find ours (it only ever skips them before the hello)."""

    MARKER_REPEAT_S = 0.1

    def __init__(self, session: Session, **kw) -> None:
        super().__init__(session, **kw)
        self.nonce = os.urandom(NONCE_BYTES)
        self._scanner: MarkerScanner | None = MarkerScanner(self.nonce)
        self._repeat: asyncio.TimerHandle | None = None
        self._raw = None

    def connection_made(self, transport) -> None:
        self._raw = transport
        self._send_marker()

    def _send_marker(self) -> None:
        if self._scanner is None or self.closed_reason is not None or self._raw.is_closing():
            return
        self._raw.write(marker(self.nonce))
        self._repeat = asyncio.get_running_loop().call_later(self.MARKER_REPEAT_S, self._send_marker)

    def data_received(self, data: bytes) -> None:
        if self._scanner is not None:
            try:
                rest = self._scanner.feed(data)
            except ResyncError as exc:
                self.transport = self._raw
                self._protocol_failed(ProtocolError("bad_frame", str(exc)))
                return
            if rest is None:
                return
            if self._scanner.skipped:
                log.info("cell channel: skipped %d byte(s) of an earlier connection", self._scanner.skipped)
            self._scanner = None
            if self._repeat is not None:
                self._repeat.cancel()
            super().connection_made(self._raw)  # our hello, after the cell echoed our nonce
            if not rest:
                return
            data = rest
        super().data_received(data)

    def connection_lost(self, exc) -> None:
        if self._repeat is not None:
            self._repeat.cancel()
        super().connection_lost(exc)

    def close(self, reason: str = "closed by us") -> None:
        if self.transport is None and self._raw is not None:
            self.transport = self._raw
        super().close(reason)


async def connect_unix(path: str, session: Session, **kw) -> Channel:
    loop = asyncio.get_running_loop()
    _, channel = await loop.create_unix_connection(lambda: Channel(session, **kw), path)
    await channel.handshake()
    return channel


async def connect_sock(sock: socket.socket, session: Session, **kw) -> Channel:
    loop = asyncio.get_running_loop()
    _, channel = await loop.create_unix_connection(lambda: Channel(session, **kw), sock=sock)
    return channel


def unlink_socket(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
