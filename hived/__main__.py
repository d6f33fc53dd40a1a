import sys

from hived.cli import main

sys.exit(main())
