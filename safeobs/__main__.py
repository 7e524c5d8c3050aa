"""``python -m safeobs``: the command line (see :mod:`safeobs.cli`)."""

import sys

from .cli import main

sys.exit(main())
