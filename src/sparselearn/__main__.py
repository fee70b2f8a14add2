"""``python -m sparselearn``: the ``sparselearn`` command."""

import sys

from .experiments.cli import main

sys.exit(main())
