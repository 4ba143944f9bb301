#!/usr/bin/env bash
# Everything that needs a GPU, in one go, for a machine that has a CUDA torch, pybind11, cmake
# and pytest but no apt: build, CUDA tests, the CLI on CUDA, the fp16
# benchmark. Each step's log lands in $OUT (default ./gpu-out); a failing step does not stop
# the next ones, and the exit code says whether any failed.
#
# Prepare on a machine with apt: cpp/scripts/unpack_header_deps.sh third_party_prefix
# The binding needs numpy; if the GPU machine lacks it, carry a wheel for its Python in a folder
# (pip download numpy --only-binary :all: --python-version 3.X -d wheels) and set WHEELS=wheels.
# Then, from the repository root on the GPU machine:
#   REPMLP_THIRD_PARTY_PREFIX=$PWD/third_party_prefix OUT=/somewhere bash benchmarks/gpu_session.sh
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
py=${PYTHON:-python}
failed=()

step() {  # step NAME COMMAND...: run, log to $out/NAME.log, remember failures
  local name=$1
  shift
  echo "== $name: $*"
  local start=$SECONDS
  if "$@" >"$out/$name.log" 2>&1; then
    echo "   ok ($((SECONDS - start)) s)"
  else
    echo "   FAILED ($((SECONDS - start)) s); last lines of $out/$name.log:"
    tail -n 15 "$out/$name.log" | sed 's/^/   | /'
    failed+=("$name")
  fi
}

step machine sh -c "nvidia-smi; $py -c 'import sys, torch; print(sys.version); print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))'"
if ! "$py" -c "import numpy" 2>/dev/null; then
  if [ -n "${WHEELS:-}" ]; then
    step numpy "$py" -m pip install --no-index --find-links "$WHEELS" numpy
  else
    echo "== numpy is missing and WHEELS is not set: the binding, its tests and bench_gpu.py will fail"
  fi
fi
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
step build "$py" -m pip install --no-build-isolation --no-deps -e .
step built-with-cuda "$py" -c "import repmlp_rt, sys; print(repmlp_rt.built_with_cuda()); sys.exit(0 if repmlp_rt.built_with_cuda() else 1)"
bin_dir=$(dirname "$(command -v "$py")")
export PATH="$bin_dir:$PATH"
step pytest-cuda "$py" -m pytest -q -rs -m cuda tests
step artifact-fp16 repmlp-build --out "$out/digits-fp16.pt" --dtype float16 --device cuda --force
if repmlp_infer "$out/digits-fp16.pt" --info --json 2>/dev/null | grep -q '"image_decoding":true'; then
  step cli-cuda repmlp_infer "$out/digits-fp16.pt" examples/digits/images/0_0078.png examples/digits/images/1_0021.png --device cuda --topk 3
else  # built without stb: a .npy batch instead of PNGs (written without numpy)
  "$py" -c "import struct, sys; h=\"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3, 32, 32), }\".ljust(117) + '\n'; open(sys.argv[1], 'wb').write(b'\x93NUMPY\x01\x00' + struct.pack('<H', len(h)) + h.encode() + bytes(4 * 2 * 3 * 32 * 32))" "$out/zeros.npy"
  step cli-cuda repmlp_infer "$out/digits-fp16.pt" "$out/zeros.npy" --device cuda --topk 3
fi
step cli-cuda-bench repmlp_infer "$out/digits-fp16.pt" --bench --device cuda --batch 64 --iters 20
step bench-gpu "$py" -m benchmarks.bench_gpu --device cuda --dtype float16 --batches 1 64 --out "$out/RESULTS-gpu.md"

if ((${#failed[@]})); then
  echo "failed steps: ${failed[*]}"
  exit 1
fi
echo "all steps passed; logs in $out"
