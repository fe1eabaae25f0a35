"""``python -m morsock``: see :mod:`morsock.cli`."""

import sys

from .cli import main

sys.exit(main())
