"""``python -m mailroom``: the same command as the ``mailroom`` entry point."""

import sys

from mailroom.cli import main

sys.exit(main())
