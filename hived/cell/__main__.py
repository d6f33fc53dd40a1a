"""The cell daemon's entry point in the guest: `python3 -S -m hived.cell` (hived/guest/init.sh).

Each thing a cold boot imports is run, and first translated, under TCG, so the guest starts
Python without what the agent never uses:
  -S      no `site` (sys.path is set by init.sh's PYTHONPATH, Debian's dist-packages included)
  ssl     asyncio imports it when it can, which loads libssl and libcrypto; the agent speaks
          no TLS. Blocked only here, in the guest's own process, never where hived.cell is
          imported on a host.
"""

import sys

sys.modules["ssl"] = None  # `import ssl` raises ImportError; asyncio then runs without TLS support

from hived.cell import agent  # noqa: E402 - after the block above, by design

agent.main()
