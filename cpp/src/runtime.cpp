// repmlp_rt::Runtime: the LibTorch side of the runtime. See runtime.hpp and docs/ARTIFACT.md.
#include "repmlp_rt/runtime.hpp"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <filesystem>
#include <future>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include "device.hpp"
#include "integrity.hpp"
#include "messages.hpp"
#include "model.hpp"
#include "records.hpp"

namespace repmlp_rt {
namespace {

using detail::clean_message;
using detail::dtype_name;
using detail::EntryPoint;
using detail::shape_string;

// compute_dtype() name -> the dtype the input may also come in and is cast to. int8 artifacts
// take float32 and quantize their activations inside the graph.
std::optional<at::ScalarType> dtype_from_name(const std::string& name) {
  if (name == "float32" || name == "int8") return at::kFloat;
  if (name == "float16") return at::kHalf;
  if (name == "bfloat16") return at::kBFloat16;
  return std::nullopt;
}

// Throws InputError "NAME must be in [LOW, HIGH]NOTE, got VALUE" unless low <= value <= high.
void check_range(const char* name, int64_t value, int64_t low, int64_t high,
                 const char* note = "") {
  if (value < low || value > high)
    throw InputError(std::string(name) + " must be in [" + std::to_string(low) + ", " +
                     std::to_string(high) + "]" + note + ", got " + std::to_string(value));
}

void check_options(const RuntimeOptions& options) {
  if (options.threads)
    check_range("threads", *options.threads, 1, kMaxThreads, " (unset: torch's default)");
  if (options.warmup)
    check_range("warmup", *options.warmup, 0, kMaxWarmup, " (unset: the device's default)");
  check_range("warmup_batch", options.warmup_batch, 1, kMaxWarmup);
  std::string valid;
  for (const char* mode : kGemmModes) {
    if (options.gemm == mode) return;
    valid += (valid.empty() ? "" : ", ") + std::string(mode);
  }
  throw InputError("gemm must be one of " + valid + ", got '" + options.gemm + "'");
}

// RuntimeOptions::keep_freed_memory. glibc returns a freed block at the top of its heap to the
// kernel once more than M_TRIM_THRESHOLD is free there, and serves large blocks by mmap; either
// way the next call's intermediates land on fresh pages, faulted in one at a time (B224 at
// batch 8: thousands of faults a call, docs/PERFORMANCE.md). Fixed thresholds keep the memory
// for reuse. Once per process, and never over settings the process was started with.
void keep_freed_memory() {
#if defined(__GLIBC__)
  static const bool applied = [] {
    for (const char* name : {"MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES"})
      if (std::getenv(name)) return false;
    // 32 MiB: glibc's upper bound for the mmap threshold on 64-bit hosts.
    mallopt(M_MMAP_THRESHOLD, 32 << 20);
    mallopt(M_TRIM_THRESHOLD, std::numeric_limits<int>::max());
    return true;
  }();
  (void)applied;
#endif
}

}  // namespace

struct Runtime::Impl {
  std::string path;
  std::string device_name;
  c10::Device device{c10::kCPU};
  std::unique_ptr<detail::Model> model;
  at::ScalarType compute_dtype = at::kFloat;
  bool digest_checked = false;
  bool verified = false;
  double self_check_error = std::numeric_limits<double>::quiet_NaN();
  double self_check_tolerance = std::numeric_limits<double>::quiet_NaN();
  std::string digest_record;  // the artifact's digest.json, when read
  std::string gemm_plan;

  const detail::ModelMetadata& metadata() const { return model->metadata(); }
  void load(const RuntimeOptions& options);
  void check_metadata();
  void plan_gemm(const RuntimeOptions& options);
  int64_t self_check(const RuntimeOptions& options, const Runtime& runtime);
  void warm_up(int64_t calls, int64_t batch, const Runtime& runtime) const;
  void check_nchw(const at::Tensor& x) const;
  void check_images(const at::Tensor& x) const;
  std::vector<at::Tensor> run(EntryPoint entry_point, const at::Tensor& input) const;
  std::vector<at::Tensor> run_model(EntryPoint entry_point, const at::Tensor& input) const;
  std::vector<at::Tensor> run_checked(const at::Tensor& input) const;
  void check_single_output() const;
  void check_logits() const;
};

Runtime::Runtime(const std::string& path, const RuntimeOptions& options)
    : impl_(std::make_unique<Impl>()) {
  Impl& s = *impl_;
  s.path = path;
  check_options(options);
  s.device = detail::parse_device(options.device);
  s.device_name = s.device.str();

  std::error_code ec;
  if (!std::filesystem::exists(path, ec))
    throw ArtifactError("cannot open artifact '" + path + "': no such file");
  if (std::filesystem::is_directory(path, ec))
    throw ArtifactError("cannot open artifact '" + path + "': it is a directory");
  if (options.threads) at::set_num_threads(static_cast<int>(*options.threads));
  if (options.keep_freed_memory) keep_freed_memory();

  s.load(options);
  // Loading (and optimize_for_inference's folding) wrote the weights on the device's current
  // stream; calls run on other, non-blocking pool streams, so wait for that work once here.
  detail::synchronize(s.device);
  s.check_metadata();
  if (s.device.is_cpu()) s.plan_gemm(options);
  const int64_t warmup_left = s.self_check(options, *this);
  s.warm_up(warmup_left, options.warmup_batch, *this);
}

// Loads the file; with verification, every record is checked against the artifact's digest
// (docs/ARTIFACT.md, "Self-verification").
//
// An AOTInductor package's programs are shared libraries: loading one runs its code, and a
// corrupt one can crash the process. Its digest is checked first, once the manifest has said
// it is an artifact of this format version, and a package without a digest is refused there.
// The programs' files are hashed as they are unpacked for loading, so the digest covers the
// very bytes that are loaded, not an earlier read of a file that could change in between.
//
// A TorchScript file is only parsed, so its digest is checked on a second thread while the
// loader reads it: hashing B224's 273 MB takes about a third of a load on one core
// (benchmarks/RESULTS.md). Its verdict is awaited before anything runs on the loaded graph,
// and it is the better explanation when the loader fails. A file without a digest is refused
// in self_check, once the loader and check_metadata have said whether it is an artifact at all.
void Runtime::Impl::load(const RuntimeOptions& options) {
  const bool check_digest = options.verify && options.verify_digest;
  // The format is told from the content: a .pt2 renamed .pt is still an AOTInductor package.
  if (detail::is_aoti_package(path)) {
    if (options.optimize)
      throw InputError("optimize applies to TorchScript artifacts; '" + path +
                       "' is an AOTInductor package, compiled already");
    model = detail::load_aoti_model(
        path, device, check_digest, [this, check_digest](const integrity::RecordHashes& unpacked) {
          if (!check_digest) return;
          const std::string digest = integrity::read_digest_record(path);
          if (digest.empty())
            throw ArtifactError(integrity::missing_record_message(path, records::kDigest));
          integrity::check_digest(path, digest, unpacked);
          digest_checked = true;
        });
    return;
  }
  std::future<void> digest_check;
  if (check_digest) {
    digest_record = integrity::read_digest_record(path);
    if (!digest_record.empty())
      digest_check = std::async(std::launch::async, [file = path, digest = digest_record] {
        integrity::check_digest(file, digest);
      });
  }
  try {
    model = detail::load_torchscript_model(path, device, options.optimize);
  } catch (...) {
    if (digest_check.valid()) digest_check.get();
    throw;
  }
  digest_checked = digest_check.valid();
  if (digest_checked) digest_check.get();
}

// What the artifact says about itself must be what this runtime can serve.
void Runtime::Impl::check_metadata() {
  const detail::ModelMetadata& m = metadata();
  if (m.format_version != kFormatVersion)
    throw ArtifactError("'" + path + "' has artifact format version " +
                        std::to_string(m.format_version) + "; this runtime reads version " +
                        std::to_string(kFormatVersion));
  // The manifest records the version too; it must agree with the graph's.
  if (!m.manifest)
    throw ArtifactError("'" + path + "': " + records::kManifest + " is not a JSON object");
  const auto& version = m.manifest->format_version;
  if (version.present && version.value != m.format_version)
    throw ArtifactError("'" + path + "': " + records::kManifest + " has format_version " +
                        version.text + "; this runtime reads version " +
                        std::to_string(kFormatVersion));

  const auto& shape = m.input_shape;
  if (shape.size() != 3 || shape[0] < 1 || shape[1] < 1 || shape[2] < 1)
    throw ArtifactError("'" + path + "': input_shape() must be [C, H, W], got " +
                        shape_string(shape));
  const bool logits = m.output_kind == "logits";
  if (!logits && m.output_kind != "features" && m.output_kind != "embedding")
    throw ArtifactError("'" + path + "': unknown output_kind() '" + m.output_kind +
                        "' (expected logits, features or embedding)");
  if (m.output_names.empty() || (m.output_kind != "features" && m.output_names.size() != 1))
    throw ArtifactError("'" + path + "': output_names() has " +
                        std::to_string(m.output_names.size()) + " names for a " +
                        m.output_kind + " artifact");
  if (logits && m.labels.empty()) throw ArtifactError("'" + path + "': labels() is empty");
  auto compute = dtype_from_name(m.compute_dtype);
  if (!compute)
    throw ArtifactError("'" + path + "': unknown compute_dtype() '" + m.compute_dtype +
                        "' (expected float32, float16, bfloat16 or int8)");
  compute_dtype = *compute;
  integrity::check_manifest_agrees(path, *m.manifest, m.input_shape, m.labels, m.compute_dtype);
}

// The GEMM plan (gemm_plan.hpp) for the loaded graph: after the digest check and the metadata
// checks, before the probe, so that the self-check and the warm-up run the planned graph.
void Runtime::Impl::plan_gemm(const RuntimeOptions& options) {
  detail::GemmPlanRequest request;
  request.mode = options.gemm;
  request.threads = at::get_num_threads();
  request.batch_sizes = {options.warmup_batch};
  if (digest_record.empty()) digest_record = integrity::read_digest_record(path);
  if (!digest_record.empty()) {
    integrity::Sha256 hash;
    hash.update(digest_record.data(), digest_record.size());
    request.artifact_digest = hash.hex_digest();
  }
  request.compute_dtype = compute_dtype;
  try {
    gemm_plan = model->plan_gemm(request).summary;
  } catch (const ArtifactError&) {
    throw;
  } catch (const c10::Error& e) {
    throw ArtifactError("'" + path + "': the GEMM plan failed: " + clean_message(e));
  } catch (const std::exception& e) {
    throw ArtifactError("'" + path + "': the GEMM plan failed: " + clean_message(e.what()));
  }
}

// Self-verification, second half: the stored probe through both entry points, as the first
// warm-up call; its worst relative error must be within the manifest's tolerance for this
// device type. Returns the warm-up calls still to make.
int64_t Runtime::Impl::self_check(const RuntimeOptions& options, const Runtime& runtime) {
  int64_t warmup = options.warmup.value_or(device.is_cpu() ? 1 : 2);
  if (!options.verify) return warmup;
  if (options.verify_digest && !digest_checked)
    throw ArtifactError(integrity::missing_record_message(path, records::kDigest));
  const auto probe = integrity::read_probe(path, metadata().probe, metadata().probe_base64);
  self_check_tolerance =
      integrity::probe_tolerance(path, *metadata().manifest, device.is_cpu() ? "cpu" : "cuda");
  // The input's dtype picks the entry point: float -> forward, uint8 -> forward_images.
  const auto outputs = [&runtime](const at::Tensor& input) {
    std::vector<at::Tensor> parts;
    for (const auto& named : runtime.infer_outputs(input)) parts.push_back(named.second.flatten(1));
    return at::cat(parts, 1);
  };
  self_check_error = integrity::check_probe(path, probe, self_check_tolerance, outputs,
                                            metadata().compute_dtype + " on " + device_name)
                         .worst_error;
  verified = true;
  // The probe was a warm-up call of its own batch size.
  if (warmup > 0 && probe.front().input.size(0) == options.warmup_batch) --warmup;
  return warmup;
}

// See RuntimeOptions::warmup: one call on CPU; on CUDA the profiling executor records shapes
// on the first call and builds fused kernels on the second.
void Runtime::Impl::warm_up(int64_t calls, int64_t batch, const Runtime& runtime) const {
  try {
    const auto& shape = metadata().input_shape;
    at::Tensor zeros = at::zeros({batch, shape[0], shape[1], shape[2]}, at::kFloat);
    at::Tensor images = at::zeros({batch, shape[1], shape[2], 3}, at::kByte);
    for (int64_t i = 0; i < calls; ++i) {
      runtime.infer_outputs(zeros);
      runtime.infer_outputs(images);
    }
  } catch (const InputError& e) {
    throw ArtifactError("'" + path + "': warm-up failed: " + std::string(e.what()));
  } catch (const std::exception& e) {
    throw ArtifactError("'" + path + "': warm-up failed: " + clean_message(e.what()));
  }
}

Runtime::~Runtime() = default;
Runtime::Runtime(Runtime&&) noexcept = default;
Runtime& Runtime::operator=(Runtime&&) noexcept = default;

void Runtime::Impl::check_nchw(const at::Tensor& x) const {
  const auto& input_shape = metadata().input_shape;
  const auto& [c, h, w] = std::tuple{input_shape[0], input_shape[1], input_shape[2]};
  const std::string expected = "a float32 NCHW array of shape (N, " + std::to_string(c) + ", " +
                               std::to_string(h) + ", " + std::to_string(w) + ")";
  if (!x.defined()) throw InputError("expected " + expected + ", got none");
  if (x.dim() != 4)
    throw InputError("expected " + expected + " (4-D), got " + shape_string(x.sizes()) + " (" +
                     std::to_string(x.dim()) + "-D)");
  const auto type = x.scalar_type();
  if (type != at::kFloat && type != compute_dtype) {
    std::string dtypes = "float32";
    if (compute_dtype != at::kFloat) dtypes += " or " + metadata().compute_dtype;
    std::string hint = type == at::kByte ? " (uint8 NHWC images go through infer/infer_images)" : "";
    throw InputError("expected dtype " + dtypes + ", got " + dtype_name(type) + hint);
  }
  if (x.size(0) < 1)
    throw InputError("expected batch size N >= 1, got N = " + std::to_string(x.size(0)) +
                     " (shape " + shape_string(x.sizes()) + ")");
  const char* names[] = {"channels", "height", "width"};
  for (int d = 0; d < 3; ++d)
    if (x.size(d + 1) != input_shape[d])
      throw InputError("expected " + expected + ", got " + shape_string(x.sizes()) +
                       ": " + names[d] + " " + std::to_string(x.size(d + 1)) + " != " +
                       std::to_string(input_shape[d]));
}

void Runtime::Impl::check_images(const at::Tensor& x) const {
  if (!x.defined()) throw InputError("expected a uint8 image tensor (N, H, W, 3), got none");
  if (x.dim() != 4)
    throw InputError("expected a 4-D uint8 NHWC image tensor (N, H, W, 3), got " +
                     std::to_string(x.dim()) + "-D shape " + shape_string(x.sizes()));
  if (x.scalar_type() != at::kByte)
    throw InputError("expected dtype uint8 for NHWC images, got " + dtype_name(x.scalar_type()));
  if (x.size(3) != 3)
    throw InputError("expected 3 (RGB) channels last in NHWC images (N, H, W, 3), got shape " +
                     shape_string(x.sizes()));
  if (x.size(0) < 1)
    throw InputError("expected batch size N >= 1, got N = " + std::to_string(x.size(0)) +
                     " (shape " + shape_string(x.sizes()) + ")");
  if (x.size(1) < 1 || x.size(2) < 1)
    throw InputError("expected image height and width >= 1, got shape " +
                     shape_string(x.sizes()));
}

// The model's outputs, as many as output_names() says.
std::vector<at::Tensor> Runtime::Impl::run_model(EntryPoint entry_point,
                                                 const at::Tensor& input) const {
  std::vector<at::Tensor> outputs = model->run(entry_point, input);
  if (outputs.size() != metadata().output_names.size())
    throw std::runtime_error("inference failed: the artifact returned " +
                             std::to_string(outputs.size()) + " outputs, its output_names() " +
                             std::to_string(metadata().output_names.size()));
  return outputs;
}

std::vector<at::Tensor> Runtime::Impl::run(EntryPoint entry_point,
                                           const at::Tensor& input) const {
  c10::InferenceMode inference_mode;
  try {
    return detail::run_on_device(device, compute_dtype, input, [&](const at::Tensor& x) {
      return run_model(entry_point, x);
    });
  } catch (const c10::Error& e) {
    throw std::runtime_error("inference failed: " + clean_message(e));
  }
}

// "features (stage0, stage3)": what an artifact outputs, for messages.
static std::string outputs_text(const detail::ModelMetadata& m) {
  std::string names;
  for (const std::string& name : m.output_names) names += (names.empty() ? "" : ", ") + name;
  return m.output_kind + " (" + names + ")";
}

void Runtime::Impl::check_single_output() const {
  const auto& names = metadata().output_names;
  if (names.size() != 1)
    throw InputError("'" + path + "' has " + std::to_string(names.size()) + " outputs, " +
                     outputs_text(metadata()) + ": use infer_outputs, which returns them all");
}

void Runtime::Impl::check_logits() const {
  if (metadata().output_kind != "logits")
    throw InputError("classify needs an artifact with class logits; '" + path + "' outputs " +
                     outputs_text(metadata()));
}

std::vector<at::Tensor> Runtime::Impl::run_checked(const at::Tensor& input) const {
  if (input.defined() && input.scalar_type() == at::kByte) {
    check_images(input);
    return run(EntryPoint::kForwardImages, input);
  }
  check_nchw(input);
  return run(EntryPoint::kForward, input);
}

at::Tensor Runtime::infer(const at::Tensor& input) const {
  impl_->check_single_output();
  return impl_->run_checked(input).at(0);
}

at::Tensor Runtime::infer_normalized(const at::Tensor& input) const {
  impl_->check_single_output();
  impl_->check_nchw(input);
  return impl_->run(EntryPoint::kForward, input).at(0);
}

at::Tensor Runtime::infer_images(const at::Tensor& images) const {
  impl_->check_single_output();
  impl_->check_images(images);
  return impl_->run(EntryPoint::kForwardImages, images).at(0);
}

NamedOutputs Runtime::infer_outputs(const at::Tensor& input) const {
  std::vector<at::Tensor> outputs = impl_->run_checked(input);
  NamedOutputs named;
  const auto& names = impl_->metadata().output_names;
  for (size_t i = 0; i < outputs.size(); ++i) named.emplace_back(names[i], std::move(outputs[i]));
  return named;
}

void Runtime::check_topk(int64_t topk) const {
  impl_->check_logits();
  check_range("topk", topk, 1, num_classes());
}

std::pair<at::Tensor, at::Tensor> Runtime::classify(const at::Tensor& input,
                                                    std::optional<int64_t> topk) const {
  const int64_t k = topk.value_or(default_topk());
  check_topk(k);  // before the model runs, not after
  return softmax_topk(infer(input), k);
}

int64_t Runtime::default_topk() const noexcept { return std::min<int64_t>(5, num_classes()); }

std::pair<at::Tensor, at::Tensor> softmax_topk(const at::Tensor& logits, int64_t topk) {
  if (!logits.defined() || logits.dim() != 2)
    throw InputError("expected 2-D logits (N, num_classes), got " +
                     (logits.defined() ? shape_string(logits.sizes()) : std::string("none")));
  check_range("topk", topk, 1, logits.size(1));
  c10::InferenceMode inference_mode;
  at::Tensor probs = at::softmax(logits.to(at::kFloat), 1);
  auto [scores, indices] = probs.topk(topk, 1, /*largest=*/true, /*sorted=*/true);
  return {scores.contiguous(), indices.contiguous()};
}

const std::string& Runtime::path() const noexcept { return impl_->path; }
const std::string& Runtime::device() const noexcept { return impl_->device_name; }
const std::string& Runtime::manifest_json() const noexcept {
  return impl_->metadata().manifest_json;
}
const std::vector<int64_t>& Runtime::input_shape() const noexcept {
  return impl_->metadata().input_shape;
}
const std::vector<std::string>& Runtime::labels() const noexcept {
  return impl_->metadata().labels;
}
const std::string& Runtime::compute_dtype() const noexcept {
  return impl_->metadata().compute_dtype;
}
int64_t Runtime::format_version() const noexcept { return impl_->metadata().format_version; }
bool Runtime::verified() const noexcept { return impl_->verified; }
double Runtime::self_check_error() const noexcept { return impl_->self_check_error; }
double Runtime::self_check_tolerance() const noexcept { return impl_->self_check_tolerance; }
const std::string& Runtime::gemm_plan() const noexcept { return impl_->gemm_plan; }
int64_t Runtime::num_classes() const noexcept {
  return static_cast<int64_t>(impl_->metadata().labels.size());
}
const std::string& Runtime::output_kind() const noexcept { return impl_->metadata().output_kind; }
const std::vector<std::string>& Runtime::output_names() const noexcept {
  return impl_->metadata().output_names;
}

}  // namespace repmlp_rt
