"""``python -m sparselearn``: the ``sparselearn`` command."""

import sys

from .cli import main

sys.exit(main())
