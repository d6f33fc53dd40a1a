#!/usr/bin/env python3
"""Cold boot vs bare QEMU, and warm start: the same as `hived bench boot` (root, built image).

    python benchmarks/bench_boot.py [--json] [--cells N] [--image DIR]
"""

import os
import sys

try:
    from hived.bench import main
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from hived.bench import main

if __name__ == "__main__":
    sys.exit(main(["boot", *sys.argv[1:]]))
