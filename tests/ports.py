"""Loopback ports for test harnesses."""

import random
import socket
from pathlib import Path


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range.

    A harness often binds the port it picked seconds later (after a box has started). A port
    from the ephemeral range (what bind(0) gives) can meanwhile become the local end of any
    outgoing connection on the machine, and the bind then fails with EADDRINUSE; below that
    range the kernel never hands a port out by itself.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randrange(10000, max(10001, low))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free loopback port between 10000 and {low}")
