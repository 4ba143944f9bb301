// The seam between repmlp_rt::Runtime and one artifact file format (internal, not installed).
// Runtime owns everything format-independent (option and input checks, device and stream
// handling, warm-up, metadata checks); a Model only loads a file and runs its entry points.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "gemm_plan.hpp"

namespace repmlp_rt::detail {

// The artifact's entry points (docs/ARTIFACT.md).
enum class EntryPoint {
  kForward,        // normalized NCHW batch in the compute dtype
  kForwardImages,  // uint8 NHWC images, preprocessed inside the artifact
};

const char* entry_point_name(EntryPoint entry_point) noexcept;

// What the artifact says about itself, as read from the file (Runtime checks it).
struct ModelMetadata {
  std::string manifest_json;  // manifest.json, verbatim ("" when the file has none)
  std::string probe;          // the self-check probe record, verbatim ("" when absent)
  bool probe_base64 = false;  // `probe` is probe.pt.b64 (a PT2 archive), not probe.pt
  int64_t format_version = 0;
  std::vector<int64_t> input_shape;
  std::vector<std::string> labels;
  std::string compute_dtype;
  // output_kind() and output_names(); artifacts older than those methods output logits.
  std::string output_kind = "logits";
  std::vector<std::string> output_names{"logits"};
};

class Model {
 public:
  virtual ~Model() = default;
  // Runs an entry point on an input already on the model's device and in the dtype that entry
  // point takes; returns its outputs in order (one tensor, or one per feature map). May be called
  // from several threads at once. Throws c10::Error / std::exception on failure.
  virtual std::vector<at::Tensor> run(EntryPoint entry_point, const at::Tensor& input) const = 0;
  virtual const ModelMetadata& metadata() const noexcept = 0;
  // The load-time GEMM plan (gemm_plan.hpp), for a CPU model; called once, before any run.
  // A format without matrix products to rewrite keeps its model and returns an empty plan.
  virtual GemmPlan plan_gemm(const GemmPlanRequest& request) {
    (void)request;
    return {};
  }
};

// Loads a TorchScript artifact onto `device`. Throws ArtifactError.
std::unique_ptr<Model> load_torchscript_model(const std::string& path, c10::Device device,
                                              bool optimize);

// True when `path` is a PT2 archive (by its content: an archive_format record saying "pt2").
bool is_aoti_package(const std::string& path);

// Loads an AOTInductor package (.pt2, docs/FORMATS.md) for `device`. Its programs are shared
// libraries, and loading one runs its code. Each program's files are unpacked into a private
// directory (under $TMPDIR, else /tmp) and loaded from there; `before_loading_code` runs once
// they are unpacked and the manifest says this format version, and receives the SHA-256 of
// every unpacked record when `hash_records` (Runtime checks the digest there, with those hashes
// standing for the bytes that will be loaded). The directories are removed on any failure and,
// on CPU, as soon as the programs are loaded. Throws ArtifactError, or whatever
// `before_loading_code` throws.
std::unique_ptr<Model> load_aoti_model(
    const std::string& path, c10::Device device, bool hash_records,
    const std::function<void(const std::map<std::string, std::string>&)>& before_loading_code);

// c10::Error and loader messages carry backtraces and long explanations: the first
// meaningful line.
std::string clean_message(const std::string& message);
std::string clean_message(const c10::Error& error);

}  // namespace repmlp_rt::detail
