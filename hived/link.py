"""How a box or a connector reaches its hive's control plane: TCP (TLS when a CA is
configured), the hived hello, and the back-off between attempts. Shared by
hived/box/controllink.py and hived/connector/daemon.py, which differ only in what they
register as and what they do once registered.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import ssl
from pathlib import Path

from hived.protocol.channel import Channel, ChannelClosed
from hived.protocol.errors import ProtocolError
from hived.protocol.session import Session

log = logging.getLogger(__name__)

BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 10.0
REFUSED_BACKOFF_S = 30.0   # the control plane said no: it will not change its mind soon
NEXT_ADDRESS_S = 0.05     # another replica of the control plane may lead (or forward to the leader)
REGISTER_TIMEOUT_S = 10.0


def tls_context(ca_file: Path | None, cert_file: Path | None = None,
                key_file: Path | None = None) -> ssl.SSLContext | None:
    """Verify the control plane against the hive CA; show our certificate if we have one.
    None (plain TCP) without a CA."""
    if ca_file is None:
        return None
    ctx = ssl.create_default_context(cafile=str(ca_file))
    if cert_file is not None:
        ctx.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    return ctx


async def dial(role: str, name: str, host: str, port: int, ctx: ssl.SSLContext | None,
               server_name: str = "") -> Channel:
    """A channel to the control plane, speaking as `role` named `name` (hello not yet done)."""
    loop = asyncio.get_running_loop()
    session = Session(role, name, {"control"})
    _, channel = await asyncio.wait_for(loop.create_connection(
        lambda: Channel(session, hello_timeout=REGISTER_TIMEOUT_S), host, port, ssl=ctx,
        server_hostname=(server_name or host) if ctx else None), REGISTER_TIMEOUT_S)
    return channel


def peer_address(channel: Channel) -> str:
    """"host:port" of the other end of a channel, for log lines ("?" when the transport is gone)."""
    try:
        peer = channel.transport.get_extra_info("peername")
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
    except Exception:
        return "?"


def backoff(attempt: int) -> float:
    """Seconds before attempt `attempt` + 1 after a failure: doubling, capped, jittered."""
    return min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** attempt) * random.uniform(0.5, 1.0)


class ReconnectLoop:
    """Connect, register, serve until the link drops, back off, and again, until stopped.

    A subclass says what it is (`link_kind` for logs, `peer_name()`), how it connects
    (`_connect`), registers (`_register`, raising one of `refused_errors` when the control
    plane says no: then it waits REFUSED_BACKOFF_S, and setting `lost_s`), what it sends
    while linked (`_heartbeat`) and does with each message (`_on_message`), and what a lost
    link undoes (`_disconnected`, plain or async). It owns `_stopping`, `_wake` (set it to
    retry at once) and `last_error`."""

    link_kind = "link"
    refused_errors: tuple[type[BaseException], ...] = ()
    retry_errors: tuple[type[BaseException], ...] = (OSError, ChannelClosed, TimeoutError, ProtocolError,
                                                     ssl.SSLError)
    _stopping: bool
    _wake: asyncio.Event
    last_error: str
    lost_s: float

    def peer_name(self) -> str:
        raise NotImplementedError

    async def _connect(self) -> Channel:
        raise NotImplementedError

    async def _register(self, channel: Channel) -> None:
        raise NotImplementedError

    async def _heartbeat(self, channel: Channel) -> None:
        raise NotImplementedError

    def _on_message(self, channel: Channel, msg):
        """One message from the control plane (plain or async)."""
        raise NotImplementedError

    async def _serve(self, channel: Channel) -> None:
        """Heartbeats out, messages in, until the link drops or the control plane is silent
        for `lost_s` (its heartbeats stopped)."""
        beat = asyncio.get_running_loop().create_task(self._heartbeat(channel))
        try:
            while True:
                async with asyncio.timeout(self.lost_s):  # not wait_for: it can swallow a racing cancel (3.11)
                    msg = await channel.recv()
                handled = self._on_message(channel, msg)
                if inspect.isawaitable(handled):
                    await handled
        except TimeoutError:
            raise TimeoutError(f"control plane silent for {self.lost_s:g} s") from None
        finally:
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)

    def _disconnected(self, channel: Channel):
        raise NotImplementedError

    def _rotate(self) -> bool:
        """After a failure or a lost link: move to the next address, if the subclass has several
        (control plane replicas); True to try it at once rather than back off."""
        return False

    async def _run(self) -> None:
        attempt = 0
        while not self._stopping:
            delay = None
            try:
                channel = await self._connect()
                try:
                    await self._register(channel)
                    attempt = 0
                    self.last_error = ""
                    await self._serve(channel)
                finally:
                    undone = self._disconnected(channel)
                    if inspect.isawaitable(undone):
                        await undone
            except self.refused_errors as exc:
                self.last_error = str(exc)
                log.error("%s refused: %s", self.peer_name(), exc)
                delay = REFUSED_BACKOFF_S
            except self.retry_errors as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("%s to %s: %s", self.link_kind, self.peer_name(), self.last_error)
            if self._stopping:
                return
            if self._rotate() and delay is None:
                delay = NEXT_ADDRESS_S
            if delay is None:
                delay = backoff(attempt)
                attempt += 1
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
