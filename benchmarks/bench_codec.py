#!/usr/bin/env python3
"""Frame encode/decode, compiled vs pure-Python framing: the same as `hived bench codec`.

    python benchmarks/bench_codec.py [--json] [--seconds S] [--rounds R]
"""

import os
import sys

try:
    from hived.bench import main
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from hived.bench import main

if __name__ == "__main__":
    sys.exit(main(["codec", *sys.argv[1:]]))
