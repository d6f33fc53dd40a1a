"""tc sizing: token bucket filter parameters for a rate (the cells' bandwidth limits)."""

from __future__ import annotations

from hived.net.errors import NetworkError

# tbf sizing (see tbf_params)
MIN_BURST_BYTES = 8192       # > one full frame (1514 B) with room for a second
BURST_SECONDS = 0.004        # bucket = 4 ms of traffic at the rate
QUEUE_SECONDS = 0.050        # queue: 50 ms of traffic at the rate...
MIN_QUEUE_BYTES = 64 << 10   # ...but never less than 64 KiB
MIN_RATE_BITS_S = 8_000
MAX_RATE_BITS_S = ((1 << 32) - 1) * 8  # tbf's 32-bit bytes/s (no TCA_TBF_RATE64 here)
ETH_P_ALL = 0x0003
TC_INGRESS = 0xFFFF0000
TC_ROOT_TBF = 0x10000


def tbf_params(bits_s: int) -> dict:
    """tbf parameters for a rate: {"rate": "<n>bit", "burst": bytes, "limit": bytes}.

    The bucket (burst) must hold at least one full frame, or tbf drops it; beyond that it
    only lets a short burst through at line rate, so 4 ms of traffic keeps the long-run
    rate exact (the bucket is at most 4 ms ahead) while large rates still get buckets of
    many frames (tbf paces with a high-resolution timer, so no per-jiffy sizing is
    needed). Packets above the bucket size that are GSO (from a vnet-header tap) are
    segmented by tbf, not dropped. The queue (limit) is 50 ms of traffic, at least
    64 KiB: small enough to keep latency bounded, large enough that TCP keeps the
    bucket busy (a queue of a few frames makes TCP back off below the rate).
    """
    if not isinstance(bits_s, int) or not MIN_RATE_BITS_S <= bits_s <= MAX_RATE_BITS_S:
        raise NetworkError(f"rate {bits_s!r} bit/s is out of range: 0 (unlimited) or "
                           f"{MIN_RATE_BITS_S}..{MAX_RATE_BITS_S}")
    rate_bytes = bits_s / 8
    burst = max(MIN_BURST_BYTES, int(rate_bytes * BURST_SECONDS))
    limit = max(MIN_QUEUE_BYTES, int(rate_bytes * QUEUE_SECONDS)) + burst
    return {"rate": f"{bits_s}bit", "burst": burst, "limit": limit}
