"""``python -m tools.fuzz``: the reader fuzz run (see :mod:`tools.fuzz.cli`)."""

import sys

from tools.fuzz.cli import main

sys.exit(main())
