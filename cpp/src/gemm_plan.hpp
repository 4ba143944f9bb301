// A load-time rewrite of a TorchScript CPU graph's matrix products (internal, not installed).
// Runtime calls apply_gemm_plan once per load, after the module is loaded (and, with
// RuntimeOptions::optimize, optimized) and before the self-check probe runs, so the probe and
// the warm-up run the rewritten graph. docs/PERFORMANCE.md ("GEMM plan") describes the design.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>
#include <vector>

namespace torch::jit {
struct Module;
}  // namespace torch::jit

namespace repmlp_rt::detail {

// What the rewrite may adapt to.
struct GemmPlanRequest {
  std::string mode = "auto";  // RuntimeOptions::gemm: "auto", "aten", "onednn" or "mkl-packed"
  int64_t threads = 1;        // intra-op threads the calls will run with
  // Batch sizes expected (the warm-up batch); the plan always covers 1 and 8 as well.
  std::vector<int64_t> batch_sizes;
  std::string artifact_digest;       // SHA-256 of the artifact's digest record ("" when none)
  c10::ScalarType compute_dtype = c10::ScalarType::Float;
};

// What was done; `summary` is printed by repmlp_infer --info ("" when nothing was changed).
// It reads "<mode>: <path> <count>, ... of <n> GEMMs; <where the plan came from>", where the
// part before ';' depends only on the plan.
struct GemmPlan {
  std::string summary;
};

// Rewrites `module` in place for `request`; returns what it did. Throws ArtifactError.
// Must run before any of the module's methods that compute is first called (their executors
// copy the graph at the first call).
GemmPlan apply_gemm_plan(torch::jit::Module& module, const GemmPlanRequest& request);

}  // namespace repmlp_rt::detail
