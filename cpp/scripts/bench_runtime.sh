#!/usr/bin/env bash
# Benchmarks repmlp_infer on one artifact: optimize_for_inference off/on x 1/2 threads.
# usage: cpp/scripts/bench_runtime.sh ARTIFACT [BATCH] [ITERS]
set -euo pipefail
artifact=${1:?usage: bench_runtime.sh ARTIFACT [BATCH] [ITERS]}
batch=${2:-8}
iters=${3:-30}
bin=$(command -v repmlp_infer || echo build/cmake/bin/repmlp_infer)
for threads in 1 2; do
  for optimize in "" "--optimize"; do
    "$bin" "$artifact" --bench --batch "$batch" --iters "$iters" --warmup 3 --threads "$threads" $optimize --json
  done
done
