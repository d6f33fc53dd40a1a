"""Checkout tickets (box peers): the control plane vouches that one box may fetch one checkout
from another, and the holder checks it (pure; hived/control/server.py makes them,
hived/box/peers.py checks them).

A ticket is HMAC-SHA256(the holder's ticket key, "checkout" | fetcher | holder | repo_key |
commit | expires), NUL-separated. The key is fresh per control link (`peering.tickets`), known
to the control plane and that holder only: a fetcher cannot make one, nor reuse one for another
holder, repository, commit or box, nor after `expires` (unix seconds).
"""

from __future__ import annotations

import hashlib
import hmac
import time

TTL_S = 300  # a ticket's life: one build's fetch, with room for clock skew between boxes


def checkout_ticket(key: bytes, fetcher: str, holder: str, repo_key: str, commit: str, expires: int) -> bytes:
    msg = "\0".join(("checkout", fetcher, holder, repo_key, commit, str(int(expires)))).encode()
    return hmac.new(key, msg, hashlib.sha256).digest()


def check(key: bytes | None, ticket: bytes, fetcher: str, holder: str, repo_key: str, commit: str,
          expires: int, now: float | None = None) -> str:
    """"" when the ticket is good; else why not (for the refusal and the log)."""
    if not key:
        return "this box has no ticket key from its control plane yet"
    if (time.time() if now is None else now) > expires:
        return "the ticket has expired"
    if not hmac.compare_digest(checkout_ticket(key, fetcher, holder, repo_key, commit, expires), ticket):
        return "the ticket is not the control plane's for this fetcher, holder, repository and commit"
    return ""
