"""The distribution's version: one place, python/repmlp_rt/_version.py, read by setup.py."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("repmlp")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+source"
