// The AOTInductor artifact format (docs/FORMATS.md): a PT2 archive (.pt2) with two programs
// compiled by AOTInductor, "forward" (the fused network, dynamic batch) and "preprocess"
// (the image preprocessing, dynamic batch and image size), extra/manifest.json and the
// self-check records extra/probe.pt.b64 and extra/digest.json. The manifest is the only source
// of the metadata: a compiled program has no methods to ask.
#include <c10/util/Exception.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/headeronly/version.h>

#include <nlohmann/json.hpp>

#include <sstream>
#include <unordered_map>

#include "integrity.hpp"
#include "model.hpp"
#include "repmlp_rt/errors.hpp"
#include "repmlp_rt/runtime.hpp"

#ifdef REPMLP_RT_WITH_CUDA
#include <c10/core/impl/VirtualGuardImpl.h>
#endif

namespace repmlp_rt::detail {
namespace {

constexpr const char* kManifestRecord = "extra/manifest.json";
const std::string kProbeRecord = std::string("extra/") + integrity::kProbeTextRecord;
constexpr const char* kForwardProgram = "forward";
constexpr const char* kPreprocessProgram = "preprocess";

std::string runtime_torch_version() {
  return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
         std::to_string(TORCH_VERSION_PATCH);
}

// "2.13.0+cpu" -> "2.13.0": the local build tag does not change the C++ ABI of the release.
std::string release_of(const std::string& version) { return version.substr(0, version.find('+')); }

std::string read_record(caffe2::serialize::PyTorchStreamReader& reader, const std::string& name) {
  auto [data, size] = reader.getRecord(name);
  return std::string(static_cast<const char*>(data.get()), size);
}

// What the CPU must support for kernels compiled for `isa` (AOTI_CPU_ISA, Inductor's names),
// or "" when it does. Unknown names are not second-guessed.
std::string missing_cpu_features(const std::string& isa) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  std::istringstream words(isa);
  std::string word, missing;
  auto need = [&](bool present, const char* feature) {
    if (!present) missing += std::string(missing.empty() ? "" : ", ") + feature;
  };
  while (words >> word) {
    if (word == "AVX2") {
      need(__builtin_cpu_supports("avx2"), "avx2");
      need(__builtin_cpu_supports("fma"), "fma");
    } else if (word == "AVX512") {
      need(__builtin_cpu_supports("avx512f"), "avx512f");
      need(__builtin_cpu_supports("avx512dq"), "avx512dq");
      need(__builtin_cpu_supports("avx512vl"), "avx512vl");
      need(__builtin_cpu_supports("avx512bw"), "avx512bw");
    } else if (word == "AVX512_VNNI") {
      need(__builtin_cpu_supports("avx512vnni"), "avx512vnni");
    } else if (word == "AMX_TILE") {
      need(__builtin_cpu_supports("amx-tile"), "amx-tile");
    }
  }
  return missing;
#else
  (void)isa;
  return "";
#endif
}

class AotiModel final : public Model {
 public:
  AotiModel(const std::string& path, c10::Device device,
            const std::function<void()>& before_loading_code)
      : path_(path) {
    read_records();
    if (metadata_.format_version != kFormatVersion) return;  // Runtime reports it
    before_loading_code();
    check_compatible(device);
    const c10::DeviceIndex index = device.is_cuda() ? device.index() : -1;
    forward_ = load_program(kForwardProgram, index);
    preprocess_ = load_program(kPreprocessProgram, index);
  }

  std::vector<at::Tensor> run(EntryPoint entry_point, const at::Tensor& input) const override {
    void* stream = current_stream(input);
    // Compiled kernels index their inputs as contiguous tensors, whatever the strides given.
    at::Tensor x = input;
    if (entry_point == EntryPoint::kForwardImages)
      x = preprocess_->run({input.contiguous()}, stream).at(0);
    // "forward" takes float32 and casts to the compute dtype inside, as the TorchScript graph.
    return forward_->run({x.to(at::kFloat).contiguous()}, stream);
  }

  const ModelMetadata& metadata() const noexcept override { return metadata_; }

 private:
  ArtifactError error(const std::string& why) const {
    return ArtifactError("'" + path_ + "': " + why);
  }

  // The manifest and the probe (absent from packages built before self-verification).
  void read_records() {
    std::string text;
    try {
      caffe2::serialize::PyTorchStreamReader reader(path_);
      if (!reader.hasRecord(kManifestRecord))
        throw ArtifactError("'" + path_ + "' is not a RepMLP artifact: an AOTInductor package "
                            "without " + kManifestRecord);
      text = read_record(reader, kManifestRecord);
      if (reader.hasRecord(kProbeRecord)) metadata_.probe = read_record(reader, kProbeRecord);
      metadata_.probe_base64 = true;
    } catch (const c10::Error& e) {
      throw ArtifactError("cannot load artifact '" + path_ + "': " + clean_message(e));
    }
    metadata_.manifest_json = text;
    try {
      const auto manifest = nlohmann::json::parse(text);
      metadata_.format_version = manifest.at("format_version").get<int64_t>();
      if (metadata_.format_version != kFormatVersion) return;
      metadata_.input_shape = manifest.at("input").at("shape").get<std::vector<int64_t>>();
      metadata_.compute_dtype = manifest.at("input").at("compute_dtype").get<std::string>();
      metadata_.labels = manifest.at("output").at("labels").get<std::vector<std::string>>();
      const auto& aoti = manifest.at("aoti");
      torch_version_ = aoti.at("torch_version").get<std::string>();
      device_type_ = aoti.at("device").get<std::string>();
    } catch (const nlohmann::json::exception& e) {
      throw error(std::string(kManifestRecord) + " is not a valid manifest: " + e.what());
    }
  }

  // An AOTInductor program is machine code for one torch release's C++ ABI, one device type
  // and (on CPU) one instruction set: anything else is refused before it is loaded.
  void check_compatible(c10::Device device) const {
    const std::string ours = runtime_torch_version();
    if (release_of(torch_version_) != ours)
      throw error("compiled by torch " + torch_version_ + ", but this runtime runs torch " + ours +
                  "; an AOTInductor package loads only into the torch release that compiled it: "
                  "rebuild it with repmlp-build --format aoti under torch " + ours +
                  ", or use the TorchScript artifact");
    std::unordered_map<std::string, std::string> compiled;
    try {
      compiled = torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(
          path_, kForwardProgram);
    } catch (const c10::Error& e) {
      throw error("cannot read the compiled program's metadata: " + clean_message(e));
    } catch (const std::exception& e) {  // its JSON parser's errors, with verification off
      throw error("cannot read the compiled program's metadata: " + clean_message(e.what()));
    }
    const std::string compiled_for = compiled.count("AOTI_DEVICE_KEY") ? compiled["AOTI_DEVICE_KEY"] : device_type_;
    const std::string wanted = device.is_cuda() ? "cuda" : "cpu";
    if (compiled_for != wanted)
      throw error("compiled for device type '" + compiled_for + "', asked to run on '" +
                  device.str() + "'; rebuild it with repmlp-build --format aoti --device " + wanted);
    if (device.is_cpu() && compiled.count("AOTI_CPU_ISA")) {
      const std::string missing = missing_cpu_features(compiled["AOTI_CPU_ISA"]);
      if (!missing.empty())
        throw error("compiled for CPU instruction set '" + compiled["AOTI_CPU_ISA"] +
                    "', and this CPU lacks " + missing + "; rebuild it on this machine");
    }
  }

  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> load_program(const char* name,
                                                                         c10::DeviceIndex index) const {
    try {
      return std::make_unique<torch::inductor::AOTIModelPackageLoader>(
          path_, name, /*run_single_threaded=*/false, /*num_runners=*/1, index);
    } catch (const c10::Error& e) {
      throw error(std::string("cannot load its program '") + name + "': " + clean_message(e));
    } catch (const std::exception& e) {
      throw error(std::string("cannot load its program '") + name + "': " + clean_message(e.what()));
    }
  }

  static void* current_stream(const at::Tensor& input) {
#ifdef REPMLP_RT_WITH_CUDA
    if (input.is_cuda())
      return c10::impl::VirtualGuardImpl(c10::kCUDA).getStream(input.device()).native_handle();
#endif
    (void)input;
    return nullptr;
  }

  std::string path_;
  std::string torch_version_;
  std::string device_type_;
  ModelMetadata metadata_;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> forward_;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> preprocess_;
};

}  // namespace

bool is_aoti_package(const std::string& path) {
  // A PT2 archive names its format in an archive_format record; a TorchScript file has none.
  try {
    caffe2::serialize::PyTorchStreamReader reader(path);
    return reader.hasRecord("archive_format") && read_record(reader, "archive_format") == "pt2";
  } catch (const c10::Error&) {
    return false;  // not a readable zip: the TorchScript loader reports why
  }
}

std::unique_ptr<Model> load_aoti_model(const std::string& path, c10::Device device,
                                       const std::function<void()>& before_loading_code) {
  return std::make_unique<AotiModel>(path, device, before_loading_code);
}

}  // namespace repmlp_rt::detail
