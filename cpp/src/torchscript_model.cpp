// The TorchScript artifact format (docs/ARTIFACT.md): a frozen torch.jit module with
// manifest.json as an extra file and its metadata as methods of the graph.
#include <c10/util/Exception.h>
#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/runtime/graph_executor.h>
#include <torch/csrc/jit/serialization/import.h>

#include <optional>
#include <sstream>

#include "integrity.hpp"
#include "model.hpp"
#include "repmlp_rt/errors.hpp"
#include "repmlp_rt/runtime.hpp"

namespace repmlp_rt::detail {

const char* entry_point_name(EntryPoint entry_point) noexcept {
  return entry_point == EntryPoint::kForward ? "forward" : "forward_images";
}

std::string clean_message(const std::string& message) {
  std::istringstream lines(message);
  std::string line;
  while (std::getline(lines, line)) {
    const auto begin = line.find_first_not_of(" \t\r");
    if (begin == std::string::npos) continue;
    line = line.substr(begin);
    if (line.rfind("Exception raised from", 0) == 0 || line.rfind("frame #", 0) == 0) continue;
    // The zip reader appends a long explanation; the first sentence says what happened.
    const auto noise = line.find(" This is an internal miniz error");
    if (noise != std::string::npos) line = line.substr(0, noise) + " (corrupt or truncated file?)";
    return line;
  }
  return "unknown error";
}

std::string clean_message(const c10::Error& error) {
  return clean_message(error.what_without_backtrace());
}

namespace {

class TorchScriptModel final : public Model {
 public:
  TorchScriptModel(const std::string& path, c10::Device device, bool optimize) : path_(path) {
    load(device);
    read_metadata();
    // Another version may have other entry points: Runtime reports the version instead.
    if (metadata_.format_version != kFormatVersion) return;
    for (EntryPoint entry_point : {EntryPoint::kForward, EntryPoint::kForwardImages})
      if (!module_.find_method(entry_point_name(entry_point)))
        throw not_an_artifact("method '" + std::string(entry_point_name(entry_point)) + "()'");
    if (optimize) {
      try {
        module_ = torch::jit::optimize_for_inference(module_, {"forward_images"});
      } catch (const c10::Error& e) {
        throw ArtifactError("'" + path_ + "': optimize_for_inference failed: " + clean_message(e));
      }
    }
    find_entry_points();
  }

  std::vector<at::Tensor> run(EntryPoint entry_point, const at::Tensor& input) const override {
    // The artifact is frozen, and there is no CPU fuser for the profiling executor to feed:
    // its profiling and re-optimizing calls (2-2.6x a steady call each, measured in
    // benchmarks/RESULTS.md) buy nothing on CPU. The switch is thread-local and restored on
    // return, so other TorchScript code in the process is unaffected. On CUDA the executor
    // profiles, then fuses.
    std::optional<torch::jit::GraphOptimizerEnabledGuard> plain_interpreter;
    if (input.device().is_cpu()) plain_interpreter.emplace(false);
    const torch::jit::Method& method =
        entry_point == EntryPoint::kForward ? *forward_ : *forward_images_;
    torch::jit::IValue output = method({input});
    if (output.isTensor()) return {output.toTensor()};
    if (output.isTensorList()) return output.toTensorVector();  // a features artifact
    std::vector<at::Tensor> outputs;
    for (const auto& element : output.toTupleRef().elements()) outputs.push_back(element.toTensor());
    return outputs;
  }

  const ModelMetadata& metadata() const noexcept override { return metadata_; }

  GemmPlan plan_gemm(const GemmPlanRequest& request) override {
    GemmPlan plan = apply_gemm_plan(module_, request);
    find_entry_points();  // the rewrite may have replaced the methods
    return plan;
  }

 private:
  void find_entry_points() {
    forward_.emplace(module_.get_method("forward"));
    forward_images_.emplace(module_.get_method("forward_images"));
  }

  ArtifactError not_an_artifact(const std::string& missing) const {
    return ArtifactError("'" + path_ + "' is not a RepMLP artifact: it has no " + missing);
  }

  void load(c10::Device device) {
    torch::jit::ExtraFilesMap extra_files{{"manifest.json", ""}, {integrity::kProbeRecord, ""}};
    try {
      module_ = torch::jit::load(path_, device, extra_files);
    } catch (const c10::Error& e) {
      std::string why = clean_message(e);
      // A torch.save() zip (a checkpoint) has data.pkl but none of TorchScript's constants.pkl.
      if (why.find("constants.pkl") != std::string::npos)
        why = "it is a torch.save() file (a checkpoint?), not a TorchScript artifact; convert it "
              "with repmlp-build --checkpoint";
      throw ArtifactError("cannot load artifact '" + path_ + "': " + why);
    } catch (const std::exception& e) {
      throw ArtifactError("cannot load artifact '" + path_ + "': " + clean_message(e.what()));
    }
    metadata_.manifest_json = extra_files["manifest.json"];
    metadata_.probe = extra_files[integrity::kProbeRecord];
    if (metadata_.manifest_json.empty()) throw not_an_artifact("manifest.json");
  }

  torch::jit::IValue call_metadata(const std::string& name) {
    auto method = module_.find_method(name);
    if (!method) throw not_an_artifact("method '" + name + "()'");
    try {
      return (*method)({});
    } catch (const c10::Error& e) {
      throw ArtifactError("'" + path_ + "': " + name + "() failed: " + clean_message(e));
    }
  }

  // The graph's own methods say what it is; the version comes first, as later versions may
  // change the other methods.
  void read_metadata() {
    const torch::jit::IValue version = call_metadata("format_version");
    if (!version.isInt())
      throw ArtifactError("'" + path_ + "': format_version() did not return an int");
    metadata_.format_version = version.toInt();
    if (metadata_.format_version != kFormatVersion) return;
    try {
      metadata_.input_shape = call_metadata("input_shape").toIntVector();
      for (const auto& label : call_metadata("labels").toListRef())
        metadata_.labels.push_back(label.toStringRef());
      metadata_.compute_dtype = call_metadata("compute_dtype").toStringRef();
      if (module_.find_method("output_kind")) {
        metadata_.output_kind = call_metadata("output_kind").toStringRef();
        metadata_.output_names.clear();
        for (const auto& name : call_metadata("output_names").toListRef())
          metadata_.output_names.push_back(name.toStringRef());
      }
    } catch (const c10::Error& e) {
      throw ArtifactError("'" + path_ + "': unexpected metadata types: " + clean_message(e));
    }
  }

  std::string path_;
  torch::jit::Module module_;
  std::optional<torch::jit::Method> forward_;
  std::optional<torch::jit::Method> forward_images_;
  ModelMetadata metadata_;
};

}  // namespace

std::unique_ptr<Model> load_torchscript_model(const std::string& path, c10::Device device,
                                              bool optimize) {
  return std::make_unique<TorchScriptModel>(path, device, optimize);
}

}  // namespace repmlp_rt::detail
