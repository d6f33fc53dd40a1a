"""How a box or a connector reaches its hive's control plane: TCP (TLS when a CA is
configured), the hived hello, and the back-off between attempts. Shared by
hived/box/controllink.py and hived/secure/connector.py, which differ only in what they
register as and what they do once registered.
"""

from __future__ import annotations

import asyncio
import random
import ssl
from pathlib import Path

from hived.protocol.channel import Channel
from hived.protocol.session import Session

BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 10.0
REFUSED_BACKOFF_S = 30.0   # the control plane said no: it will not change its mind soon
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


def backoff(attempt: int) -> float:
    """Seconds before attempt `attempt` + 1 after a failure: doubling, capped, jittered."""
    return min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** attempt) * random.uniform(0.5, 1.0)
