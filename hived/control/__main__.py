"""`python -m hived.control ...` is `hived control ...` (see hived/control/cli.py)."""

import logging
import os
import sys

from hived.cli import _guard
from hived.control.cli import main

logging.basicConfig(level=os.environ.get("HIVED_LOG", "WARNING"),
                    format="%(asctime)s %(levelname)s %(name)s: %(message)s")
sys.exit(_guard(lambda: main(sys.argv[1:])))
