"""Where the benchmarks find the installed ``repmlp_infer`` (no side effects on import)."""

import os
import shutil
import sys
from typing import Optional


def find_repmlp_infer() -> Optional[str]:
    """The binary next to this interpreter (the venv that built it), else on PATH; None if absent."""
    search = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    return shutil.which("repmlp_infer", path=search)
