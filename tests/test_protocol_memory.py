"""A peer that sends bad bodies over and over must not grow the daemon's memory.

msgpack 1.1's C unpacker kept the half-built objects of every body it failed to decode
while building an object (a bad UTF-8 string, an int map key, an ext type): 0.1-2.5 KB each.
A hostile cell or peer can reconnect and repeat that without end, so the floor is a
msgpack that frees them. Measured in a child process so this test's own heap is not in it.
"""

import subprocess
import sys
import textwrap

# Four 200-byte strings, then an element the unpacker refuses while building it: 1.1 kept
# the array and its strings (~1.2 KB) on every such failure.
_STRINGS = b"".join(b"\xd9\xc8" + bytes([65 + i]) * 200 for i in range(4))
BAD_BODIES = [
    b"\x95" + _STRINGS + b"\xa2\xff\xfe",     # a str that is not UTF-8
    b"\x95" + _STRINGS + b"\x81\x01\x02",     # a map with an int key (strict_map_key)
    b"\x95" + _STRINGS + b"\xd4\x01\x02",     # an ext type (max_ext_len is 0)
    b"\x96" + _STRINGS + b"\xa5ab",          # cut short: "incomplete input"
]
ROUNDS = 25_000  # 100,000 failed decodes: ~90 MB with the leak


def test_failed_decodes_do_not_grow_memory():
    child = textwrap.dedent(f"""
        from hived.protocol import codec
        from hived.protocol.errors import ProtocolError

        def rss_kib():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4

        bodies = {BAD_BODIES!r}
        failed = 0
        for b in bodies * 100:  # warm every path (and the allocator) before the baseline
            try:
                codec.decode(b)
            except ProtocolError:
                pass
        before = rss_kib()
        for _ in range({ROUNDS}):
            for b in bodies:
                try:
                    codec.decode(b)
                except ProtocolError:
                    failed += 1
        print(failed, rss_kib() - before)
    """)
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    failed, grown_kib = int(out[0]), int(out[1])
    assert failed == ROUNDS * len(BAD_BODIES), "every bad body must be refused"
    assert grown_kib < 4 * 1024, f"{failed} failed decodes grew memory by {grown_kib} KiB"
