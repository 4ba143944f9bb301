#!/usr/bin/env python3
"""Build a verified RepMLPNet artifact, TorchScript or AOTInductor (a thin entry point; see repmlp.cli)."""

import os
import sys

try:
    from repmlp.cli import main
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "python"))
    from repmlp.cli import main

if __name__ == "__main__":
    sys.exit(main())
