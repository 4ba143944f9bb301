"""Pieces shared by the commands of repmlp_rt (serve, classify, eval, triton-repo): Ray start-up,
argparse types, the umask. Nothing here imports Ray at module level."""

from __future__ import annotations

import argparse
import os

from .contract import GEMM_MODES

# File names the runtime's image decoder reads (what a folder of images is scanned for).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tga", ".pnm", ".ppm", ".pgm", ".psd", ".hdr")


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Connects to a cluster (``address``: ``auto`` or ``HOST:PORT``) or starts a local one,
    without usage statistics. Ray itself is imported here, never by ``import repmlp_rt``."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        ray.init(address=address, logging_level="WARNING")
    else:
        ray.init(num_cpus=num_cpus, logging_level="WARNING", include_dashboard=False)


def add_ray_arguments(parser: argparse.ArgumentParser, *, worker: str, threads: int) -> None:
    """The options of the Ray commands (serve, classify): where Ray runs, and the intra-op
    threads and device of each ``worker`` (a Serve replica, a Ray Data actor), which reserves
    that many CPUs or one GPU. ``init_ray(args.address, args.num_cpus)`` starts Ray from them."""
    parser.add_argument("--address", help="Ray cluster to join (e.g. auto or HOST:6379); default: start a local Ray")
    parser.add_argument("--num-cpus", type=positive_int, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--threads", type=positive_int, default=threads,
                        help=f"intra-op threads (and reserved CPUs) per {worker} (default %(default)s)")
    parser.add_argument("--device", default="cpu", help=f"cpu or cuda (each {worker} then reserves one GPU)")
    parser.add_argument("--gemm", choices=GEMM_MODES, default="auto",
                        help=f"how each {worker}'s runtime runs the matrix products on CPU: planned at load by "
                             "timing on that node (auto), or pinned (default %(default)s)")


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
