"""``python -m medtl.cli``: the ``medtl`` command."""

import sys

from medtl.cli import main

sys.exit(main())
