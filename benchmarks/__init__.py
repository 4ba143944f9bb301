"""RepMLPNet benchmarks: one harness (:mod:`benchmarks.harness`) and the scripts built on it.

Run each from the repository root as a module, e.g. ``python -m benchmarks.bench``.
"""
