"""``python -m repmlp``: the same as ``repmlp-build``."""

import sys

from .cli import main

sys.exit(main())
