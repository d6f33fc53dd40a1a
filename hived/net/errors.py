"""Host networking errors: each message says what failed, why, and what to do."""

from __future__ import annotations


class NetworkError(Exception):
    """Cell networking failed; the message says what, why, and what to do."""


class MissingCapability(NetworkError):
    """The host lacks something cell networking needs (tun, ifb, veth, tc, nftables)."""
