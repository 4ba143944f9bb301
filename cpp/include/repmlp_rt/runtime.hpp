// repmlp_rt::Runtime: load a RepMLPNet TorchScript artifact (docs/ARTIFACT.md) and run it.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "repmlp_rt/errors.hpp"

namespace repmlp_rt {

// The only artifact format version this runtime reads (docs/ARTIFACT.md).
inline constexpr int64_t kFormatVersion = 1;

// True when this build was compiled against a CUDA-enabled torch.
bool built_with_cuda() noexcept;

// The CPU as torch's kernels see it (cpuinfo): which artifact dtype runs fastest depends on
// these (docs/PERFORMANCE.md).
struct CpuFeatures {
  std::string name;              // e.g. "Intel Xeon"
  std::string kernel_level;      // torch's CPU dispatch level: "AVX512", "AVX2", "DEFAULT", ...
  std::vector<std::string> isa;  // present among avx2, fma3, avx512_f, avx512_vnni, avx_vnni,
                                 // avx512_bf16, avx512_fp16, amx_tile, amx_bf16, amx_int8
};
CpuFeatures cpu_features();

struct RuntimeOptions {
  std::string device = "cpu";  // "cpu", "cuda" or "cuda:N"
  int threads = 0;             // intra-op threads; 0 leaves torch's default (process-wide)
  // Calls of both entry points on a zero batch at load time. Unset: 1 on CPU, where calls
  // run with TorchScript's profiling executor switched off (the frozen graph is already
  // optimized) and one call pays the one-time costs (oneDNN primitives, first-touch memory);
  // 2 on CUDA, where the executor profiles the first call and fuses on the second. 0 loads
  // fastest when only one batch will run.
  std::optional<int> warmup;
  int warmup_batch = 1;  // batch size of that zero batch (use the batch size you serve)
  // Run torch::jit::optimize_for_inference on the loaded module (in memory only, never
  // saved). Off by default: see the README for measurements.
  bool optimize = false;
};

class Runtime {
 public:
  // Loads `path` onto options.device, validates manifest.json and the format version, and
  // warms up. Throws ArtifactError, DeviceError or InputError (bad options).
  explicit Runtime(const std::string& path, const RuntimeOptions& options = {});
  ~Runtime();
  Runtime(Runtime&&) noexcept;
  Runtime& operator=(Runtime&&) noexcept;
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  // Normalized float NCHW batch (float32 or the artifact's compute dtype, any device)
  // -> float32 CPU logits (N, num_classes).
  at::Tensor infer(const at::Tensor& input) const;

  // uint8 NHWC RGB images (N, Hi, Wi, 3), any size -> float32 CPU logits, through the
  // artifact's own preprocessing (forward_images).
  at::Tensor infer_images(const at::Tensor& images) const;

  // uint8 NHWC images (through infer_images) or a normalized float NCHW batch (through
  // infer), then softmax_topk: returns (scores, indices), both (N, topk); scores are softmax
  // probabilities over all classes of the top-k classes, descending. A bad topk throws
  // InputError before the model runs; no topk means default_topk().
  std::pair<at::Tensor, at::Tensor> classify(const at::Tensor& input,
                                             std::optional<int64_t> topk = std::nullopt) const;

  // min(5, num_classes): the number of classes reported when the caller does not say.
  int64_t default_topk() const noexcept;

  // What the artifact says about itself.
  const std::string& path() const noexcept;
  const std::string& device() const noexcept;       // canonical, e.g. "cpu", "cuda:0"
  const std::string& manifest_json() const noexcept;  // manifest.json, verbatim
  const std::vector<int64_t>& input_shape() const noexcept;  // [C, H, W]
  const std::vector<std::string>& labels() const noexcept;
  const std::string& compute_dtype() const noexcept;  // "float32", "float16", "bfloat16"
  int64_t format_version() const noexcept;
  int64_t num_classes() const noexcept;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// softmax over dim 1 of (N, num_classes) logits, then top-k: (scores, int64 indices).
std::pair<at::Tensor, at::Tensor> softmax_topk(const at::Tensor& logits, int64_t topk);

}  // namespace repmlp_rt
