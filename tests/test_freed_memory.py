"""RuntimeOptions::keep_freed_memory: steady-state calls reuse the memory the previous call freed
(no page faults), the option can be turned off, and a malloc setting the process was started with
wins. Each case runs in a fresh interpreter: malloc's settings are process-wide."""

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc settings"
)

# The median of the minor page faults of ten calls of the digits model at batch 256, after three
# warm-up calls (the heap may still grow now and then, as a new plan's allocations leave it
# fragmented), and whether their answers equal the warm-up's.
PROBE = r"""
import resource, statistics, sys
import numpy as np
import repmlp_rt
keep = sys.argv[2] == "1"
runtime = repmlp_rt.Runtime(sys.argv[1], threads=1, keep_freed_memory=keep)
x = np.random.default_rng(0).random((256, *runtime.input_shape), dtype=np.float32)
for _ in range(3):
    expected = runtime.infer(x)
faults, outs = [], []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    outs.append(runtime.infer(x))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
for out in outs:  # compared afterwards: numpy's own temporaries fault pages in too
    np.testing.assert_array_equal(out, expected)
print(statistics.median(faults))
"""


def faults_per_call(artifact: str, keep: bool, env: dict | None = None) -> float:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    environment.update(env or {})
    done = subprocess.run([sys.executable, "-c", PROBE, artifact, "1" if keep else "0"],
                          capture_output=True, text=True, env=environment, timeout=300)
    assert done.returncode == 0, done.stderr
    return float(done.stdout.strip().splitlines()[-1])


def test_steady_calls_fault_no_pages_in(digits_artifact):
    """With the option (the default), a call's intermediates land on memory the previous call
    freed. Without it, glibc hands that memory back and the next call faults it in again."""
    kept = faults_per_call(digits_artifact, keep=True)
    returned = faults_per_call(digits_artifact, keep=False)
    assert kept < 10, kept
    assert returned > 50, returned  # what the option is for: default malloc faults here


def test_malloc_settings_of_the_environment_win(digits_artifact):
    """A process started with its own malloc trim threshold keeps it: the runtime leaves it."""
    assert faults_per_call(digits_artifact, keep=True, env={"MALLOC_TRIM_THRESHOLD_": "0"}) > 50
