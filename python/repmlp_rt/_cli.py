"""Pieces shared by the commands of repmlp_rt (serve, classify, triton-repo): Ray start-up,
argparse types, the umask. Nothing here imports Ray at module level."""

from __future__ import annotations

import argparse
import os


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Connects to a cluster (``address``: ``auto`` or ``HOST:PORT``) or starts a local one,
    without usage statistics. Ray itself is imported here, never by ``import repmlp_rt``."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        ray.init(address=address, logging_level="WARNING")
    else:
        ray.init(num_cpus=num_cpus, logging_level="WARNING", include_dashboard=False)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def current_umask() -> int:
    """The process umask (read by setting it and restoring it), for files made with mkstemp."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
