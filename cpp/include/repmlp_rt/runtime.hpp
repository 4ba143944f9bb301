// repmlp_rt::Runtime: load a RepMLPNet artifact, TorchScript (.pt, docs/ARTIFACT.md) or
// AOTInductor (.pt2, docs/FORMATS.md), and run it.
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

// Largest values RuntimeOptions accepts (Runtime checks them; the CLI and the binding forward).
inline constexpr int64_t kMaxThreads = 4096;
inline constexpr int64_t kMaxWarmup = int64_t{1} << 20;

struct RuntimeOptions {
  std::string device = "cpu";  // "cpu", "cuda" or "cuda:N"
  // Intra-op threads in [1, kMaxThreads]; unset leaves torch's default. torch's thread pool is
  // process-wide: this affects every runtime in the process.
  std::optional<int64_t> threads;
  // Calls of both entry points on a zero batch at load time, in [0, kMaxWarmup]. Unset: 1 on
  // CPU, where calls run with TorchScript's profiling executor switched off (the frozen graph
  // is already optimized) and one call pays the one-time costs (oneDNN primitives,
  // first-touch memory); 2 on CUDA, where the executor profiles the first call and fuses on
  // the second. 0 loads fastest when only one batch will run.
  std::optional<int64_t> warmup;
  int64_t warmup_batch = 1;  // batch size of that zero batch, in [1, kMaxWarmup]
  // Run torch::jit::optimize_for_inference on the loaded module (in memory only, never
  // saved). Off by default: see benchmarks/RESULTS.md for measurements.
  bool optimize = false;
  // Self-verification at load (docs/ARTIFACT.md), for both formats: every record of the file
  // must match the SHA-256 digest it carries (for a .pt2, checked before its compiled libraries
  // are loaded), and the stored probe, run as the first warm-up call, must give the build's
  // outputs within the manifest's tolerance for this device. A failure throws
  // ArtifactError ("self-check failed"). Turning it off loads corrupt files without a word:
  // only for those who must load fastest and trust their storage and hardware.
  bool verify = true;
  // With verify: the digest half of the check. Hashing every record costs about 30% of a
  // B224 load on one core (alongside the TorchScript loader; benchmarks/RESULTS.md), so it can be
  // turned off alone; the probe still runs. Without it, bytes the probe cannot see (labels,
  // the manifest, a weight bit below the tolerance) may change unnoticed.
  bool verify_digest = true;
  // How a TorchScript artifact's matrix products run on CPU, chosen once at load, before the
  // self-check: one of kGemmModes. "auto" lets the runtime choose; gemm_plan() says what it did.
  std::string gemm = "auto";
  // Keep memory that a call freed for the next call (glibc only: fixed malloc trim and mmap
  // thresholds) instead of returning it to the kernel and faulting it in again. Process-wide,
  // like threads: applied once, by the first runtime that asks, and not where the process was
  // started with MALLOC_TRIM_THRESHOLD_, MALLOC_MMAP_THRESHOLD_ or GLIBC_TUNABLES set. Its
  // cost: the process keeps its peak heap (docs/PERFORMANCE.md).
  bool keep_freed_memory = true;
};

// The values RuntimeOptions::gemm accepts.
inline constexpr const char* kGemmModes[] = {"auto", "aten", "onednn", "mkl-packed"};

// An artifact's outputs, named and in the order of Runtime::output_names().
using NamedOutputs = std::vector<std::pair<std::string, at::Tensor>>;

// Every check of options and inputs lives here: messages name what was expected and what was
// given, and are what the CLI and the Python binding show.
class Runtime {
 public:
  // Checks the options, loads `path` onto options.device, reads and checks what the artifact
  // says about itself (format version, input shape, labels, compute dtype), and warms up.
  // Throws InputError (bad options), DeviceError or ArtifactError.
  explicit Runtime(const std::string& path, const RuntimeOptions& options = {});
  ~Runtime();
  Runtime(Runtime&&) noexcept;
  Runtime& operator=(Runtime&&) noexcept;
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  // All inference methods are const and may be called from several threads at once. They
  // return float32 CPU tensors and throw InputError for a bad input, before the model runs.

  // The single-tensor calls return the artifact's one output: logits (N, num_classes), or an
  // embedding (N, C) for an embedding artifact. An artifact with several outputs (features at
  // several stages) throws InputError: use infer_outputs.

  // Either kind of input: uint8 NHWC images go through infer_images, anything else through
  // infer_normalized.
  at::Tensor infer(const at::Tensor& input) const;

  // A normalized float NCHW batch (float32 or the artifact's compute dtype, any device),
  // through the artifact's forward().
  at::Tensor infer_normalized(const at::Tensor& input) const;

  // uint8 NHWC RGB images (N, Hi, Wi, 3), any size, through the artifact's own preprocessing
  // (forward_images()).
  at::Tensor infer_images(const at::Tensor& images) const;

  // Every output, named as output_names() and in that order, for either kind of input (as
  // infer): the logits, the embedding, or one NCHW map per stage of a features artifact.
  NamedOutputs infer_outputs(const at::Tensor& input) const;

  // infer, then softmax_topk: (scores, int64 indices), both (N, topk); scores are softmax
  // probabilities over all classes of the top-k classes, descending. No topk means
  // default_topk(). An artifact without logits throws InputError.
  std::pair<at::Tensor, at::Tensor> classify(const at::Tensor& input,
                                             std::optional<int64_t> topk = std::nullopt) const;

  // Throws InputError unless the artifact outputs logits and 1 <= topk <= num_classes().
  void check_topk(int64_t topk) const;

  // min(5, num_classes): the number of classes reported when the caller does not say.
  int64_t default_topk() const noexcept;

  // What the artifact says about itself.
  const std::string& path() const noexcept;
  const std::string& device() const noexcept;       // canonical, e.g. "cpu", "cuda:0"
  const std::string& manifest_json() const noexcept;  // manifest.json, verbatim
  const std::vector<int64_t>& input_shape() const noexcept;  // [C, H, W]
  const std::vector<std::string>& labels() const noexcept;
  // "float32", "float16", "bfloat16" or "int8"
  const std::string& compute_dtype() const noexcept;
  int64_t format_version() const noexcept;
  int64_t num_classes() const noexcept;  // 0 without logits
  const std::string& output_kind() const noexcept;  // "logits", "features" or "embedding"
  const std::vector<std::string>& output_names() const noexcept;

  // The load-time self-check: whether it ran (RuntimeOptions::verify), the worst relative
  // error of the probe's entry points and the tolerance it was held to (NaN when not run).
  bool verified() const noexcept;
  double self_check_error() const noexcept;
  double self_check_tolerance() const noexcept;

  // What the load-time GEMM plan (RuntimeOptions::gemm) did to the graph, in one line; ""
  // when it changed nothing.
  const std::string& gemm_plan() const noexcept;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// softmax over dim 1 of (N, num_classes) logits, then top-k: (scores, int64 indices).
std::pair<at::Tensor, at::Tensor> softmax_topk(const at::Tensor& logits, int64_t topk);

}  // namespace repmlp_rt
