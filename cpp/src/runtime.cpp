// repmlp_rt::Runtime: the LibTorch side of the runtime. See runtime.hpp and docs/ARTIFACT.md.
#include "repmlp_rt/runtime.hpp"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/cpu/Utils.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>

#ifdef REPMLP_RT_WITH_CUDA
// Device-generic c10 stream API: no CUDA toolkit headers are needed to build the CUDA path,
// the CUDA implementations are registered by libtorch_cuda at load time.
#include <c10/core/DeviceGuard.h>
#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#endif

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <future>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "integrity.hpp"
#include "model.hpp"

namespace repmlp_rt {
namespace {

using detail::clean_message;
using detail::EntryPoint;

std::string shape_string(at::IntArrayRef shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(shape[i]);
  }
  return out + "]";
}

std::string dtype_name(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kDouble: return "float64";
    case at::kByte: return "uint8";
    case at::kChar: return "int8";
    case at::kShort: return "int16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kBool: return "bool";
    default: return c10::toString(type);
  }
}

// compute_dtype() name -> the dtype the input may also come in and is cast to. int8 artifacts
// take float32 and quantize their activations inside the graph.
std::optional<at::ScalarType> dtype_from_name(const std::string& name) {
  if (name == "float32" || name == "int8") return at::kFloat;
  if (name == "float16") return at::kHalf;
  if (name == "bfloat16") return at::kBFloat16;
  return std::nullopt;
}

c10::Device parse_device(const std::string& text) {
  std::optional<c10::Device> device;
  try {
    device.emplace(text);
  } catch (const c10::Error&) {
    throw InputError("invalid device '" + text + "': expected 'cpu', 'cuda' or 'cuda:N'");
  }
  if (device->is_cpu()) {
    if (device->has_index() && device->index() != 0)
      throw InputError("invalid device '" + text + "': expected 'cpu', 'cuda' or 'cuda:N'");
    return c10::Device(c10::kCPU);
  }
  if (!device->is_cuda())
    throw InputError("invalid device '" + text + "': expected 'cpu', 'cuda' or 'cuda:N'");
#ifdef REPMLP_RT_WITH_CUDA
  c10::DeviceIndex count = 0;
  try {
    count = c10::impl::VirtualGuardImpl(c10::kCUDA).deviceCount();
  } catch (const c10::Error& e) {
    throw DeviceError("device '" + text + "': CUDA is not available: " + clean_message(e));
  }
  if (count <= 0) throw DeviceError("device '" + text + "': CUDA is not available (no GPU found)");
  const c10::DeviceIndex index = device->has_index() ? device->index() : 0;
  if (index >= count)
    throw DeviceError("device '" + text + "' does not exist: " + std::to_string(count) +
                      " CUDA device(s) visible");
  return c10::Device(c10::kCUDA, index);
#else
  throw DeviceError("device '" + text +
                    "': this build of repmlp_rt has no CUDA support (built against a CPU-only "
                    "torch)");
#endif
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

// A JSON number as its text, for messages: nlohmann reads integers beyond 64 bits as doubles.
std::string number_text(const nlohmann::json& value) {
  if (value.is_number_float()) {
    const double number = value.get<double>();
    if (std::isfinite(number) && std::floor(number) == number) {
      char text[400];
      std::snprintf(text, sizeof text, "%.0f", number);
      return text;
    }
  }
  return value.dump();
}

}  // namespace

bool built_with_cuda() noexcept {
#ifdef REPMLP_RT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

CpuFeatures cpu_features() {
  CpuFeatures features;
  features.kernel_level = at::get_cpu_capability();
  const auto found = at::cpu::get_cpu_capabilities();
  for (const char* name : {"avx2", "fma3", "avx512_f", "avx512_vnni", "avx_vnni", "avx512_bf16",
                           "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8"}) {
    auto it = found.find(name);
    if (it != found.end() && it->second.isBool() && it->second.toBool())
      features.isa.emplace_back(name);
  }
  auto it = found.find("cpu_name");
  if (it != found.end() && it->second.isString()) features.name = it->second.toStringRef();
  return features;
}

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
#ifdef REPMLP_RT_WITH_CUDA
  std::vector<at::Tensor> run_cuda(EntryPoint entry_point, const at::Tensor& input) const;
  std::vector<at::Tensor> run_on_stream(EntryPoint entry_point, const at::Tensor& input,
                                        const c10::Stream& stream) const;
#endif
};

Runtime::Runtime(const std::string& path, const RuntimeOptions& options)
    : impl_(std::make_unique<Impl>()) {
  Impl& s = *impl_;
  s.path = path;
  check_options(options);
  s.device = parse_device(options.device);
  s.device_name = s.device.str();

  std::error_code ec;
  if (!std::filesystem::exists(path, ec))
    throw ArtifactError("cannot open artifact '" + path + "': no such file");
  if (std::filesystem::is_directory(path, ec))
    throw ArtifactError("cannot open artifact '" + path + "': it is a directory");
  if (options.threads) at::set_num_threads(static_cast<int>(*options.threads));

  s.load(options);
#ifdef REPMLP_RT_WITH_CUDA
  // Loading (and optimize_for_inference's folding) wrote the weights on the device's current
  // stream; calls run on other, non-blocking pool streams, so wait for that work once here.
  if (!s.device.is_cpu())
    c10::impl::VirtualGuardImpl(s.device.type()).synchronizeDevice(s.device.index());
#endif
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
            throw ArtifactError(integrity::missing_record_message(path, integrity::kDigestRecord));
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
  const nlohmann::json manifest = nlohmann::json::parse(m.manifest_json, nullptr, /*allow_exceptions=*/false);
  if (manifest.is_discarded() || !manifest.is_object())
    throw ArtifactError("'" + path + "': manifest.json is not a JSON object");
  const auto version = manifest.find("format_version");
  if (version != manifest.end() &&
      !(version->is_number_integer() && version->get<int64_t>() == m.format_version))
    throw ArtifactError("'" + path + "': manifest.json has format_version " +
                        number_text(*version) + "; this runtime reads version " +
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
  integrity::check_manifest_agrees(path, m.manifest_json, m.input_shape, m.labels, m.compute_dtype);
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
    throw ArtifactError(integrity::missing_record_message(path, integrity::kDigestRecord));
  const auto probe = integrity::read_probe(path, metadata().probe, metadata().probe_base64);
  self_check_tolerance =
      integrity::probe_tolerance(path, metadata().manifest_json, device.is_cpu() ? "cpu" : "cuda");
  double worst = 0;
  std::string worst_method;
  try {
    for (const auto& check : probe) {
      // Every output, each flattened per sample and joined, as the builder stored them
      // (the input's dtype picks the entry point: float -> forward, uint8 -> forward_images).
      std::vector<at::Tensor> parts;
      for (const auto& named : runtime.infer_outputs(check.input))
        parts.push_back(named.second.flatten(1));
      const at::Tensor out = at::cat(parts, 1);
      const double error = integrity::relative_error(out, check.output);
      if (!(error <= worst)) {
        worst = error;
        worst_method = check.method;
      }
    }
  } catch (const std::exception& e) {
    throw ArtifactError("'" + path + "': self-check failed: " + clean_message(e.what()));
  }
  self_check_error = worst;
  if (!(worst <= self_check_tolerance)) {
    char numbers[200];
    std::snprintf(numbers, sizeof numbers, "worst relative error %.3g in %s(), tolerance %.3g",
                  worst, worst_method.c_str(), self_check_tolerance);
    throw ArtifactError("'" + path + "': self-check failed: " + numbers + " (" +
                        metadata().compute_dtype + " on " + device_name +
                        "): the file is corrupt or this machine computes wrongly; "
                        "--no-verify / verify=False loads it anyway");
  }
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
#ifdef REPMLP_RT_WITH_CUDA
    if (device.is_cuda()) return run_cuda(entry_point, input);
#endif
    at::Tensor x = input.device().is_cpu() ? input : input.to(at::kCPU);
    std::vector<at::Tensor> outputs = run_model(entry_point, x);
    for (at::Tensor& out : outputs) {
      if (out.scalar_type() != at::kFloat) out = out.to(at::kFloat);
      out = out.contiguous();
    }
    return outputs;
  } catch (const c10::Error& e) {
    throw std::runtime_error("inference failed: " + clean_message(e));
  }
}

#ifdef REPMLP_RT_WITH_CUDA
// The stream this thread's calls on `device` run on: taken from torch's pool once per (thread,
// device) and then reused. Concurrent callers on different threads do not serialize on one
// stream, and one thread's calls keep reusing the same cached memory (the CUDA caching
// allocator reuses a freed block only on the stream it was allocated on; a fresh pool stream
// per call would cycle through all 32 of the pool's streams, each with its own blocks).
static c10::Stream thread_stream(const c10::impl::VirtualGuardImpl& guard_impl,
                                 c10::Device device) {
  thread_local std::vector<std::pair<c10::Device, c10::Stream>> streams;
  for (const auto& [owner, stream] : streams)
    if (owner == device) return stream;
  streams.emplace_back(device, guard_impl.getStreamFromGlobalPool(device, /*isHighPriority=*/false));
  return streams.back().second;
}

std::vector<at::Tensor> Runtime::Impl::run_cuda(EntryPoint entry_point,
                                                const at::Tensor& input) const {
  c10::DeviceGuard device_guard(device);
  c10::impl::VirtualGuardImpl guard_impl(device.type());
  c10::Stream stream = thread_stream(guard_impl, device);
  if (input.device().type() == device.type()) {
    // A device input may still be being written on the caller's current stream, which the
    // (non-blocking) pool stream does not wait for by itself.
    c10::Event ready(device.type());
    ready.record(guard_impl.getStream(input.device()));
    ready.block(stream);
  }
  c10::StreamGuard stream_guard(stream);
  try {
    return run_on_stream(entry_point, input, stream);
  } catch (...) {
    // Work already queued (e.g. a copy from the caller's pinned buffer) must not outlive the
    // call that failed.
    stream.synchronize();
    throw;
  }
}

std::vector<at::Tensor> Runtime::Impl::run_on_stream(EntryPoint entry_point,
                                                     const at::Tensor& input,
                                                     const c10::Stream& stream) const {
  at::Tensor on_device;
  if (input.device().is_cpu()) {
    // Pinned staging buffer (from torch's caching host allocator) for an async H2D copy.
    at::Tensor staging = input.contiguous();
    if (!staging.is_pinned()) {
      at::Tensor pinned = at::empty(staging.sizes(), staging.options().pinned_memory(true));
      pinned.copy_(staging);
      staging = pinned;
    }
    on_device = staging.to(staging.options().device(device), /*non_blocking=*/true);
  } else {
    on_device = input.to(input.options().device(device), /*non_blocking=*/true);
  }
  // float16/bfloat16 artifacts: cast on the GPU (the copy above moved the smaller of the two
  // only when the caller already passed the compute dtype).
  if (on_device.is_floating_point() && on_device.scalar_type() != compute_dtype)
    on_device = on_device.to(compute_dtype);

  std::vector<at::Tensor> outputs = run_model(entry_point, on_device);
  for (at::Tensor& out : outputs) {
    if (out.scalar_type() != at::kFloat) out = out.to(at::kFloat);
    at::Tensor host =
        at::empty(out.sizes(), out.options().device(c10::kCPU).pinned_memory(true));
    host.copy_(out, /*non_blocking=*/true);
    out = host;
  }
  stream.synchronize();  // the results must be complete before the CPU reads them
  return outputs;
}
#endif

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
