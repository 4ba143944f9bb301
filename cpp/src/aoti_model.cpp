// The AOTInductor artifact format (docs/FORMATS.md): a PT2 archive (.pt2) with two programs
// compiled by AOTInductor, "forward" (the fused network, dynamic batch) and "preprocess"
// (the image preprocessing, dynamic batch and image size), extra/manifest.json and the
// self-check records extra/probe.pt.b64 and extra/digest.json. The manifest is the only source
// of the metadata: a compiled program has no methods to ask.
#include <c10/util/Exception.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/headeronly/version.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <unordered_map>

#include <fcntl.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/mman.h>
#endif

#include "integrity.hpp"
#include "manifest.hpp"
#include "messages.hpp"
#include "model.hpp"
#include "records.hpp"
#include "repmlp_rt/errors.hpp"
#include "repmlp_rt/runtime.hpp"

#ifdef REPMLP_RT_WITH_CUDA
#include <c10/core/impl/VirtualGuardImpl.h>
#endif

namespace repmlp_rt::detail {
namespace {

// Record names inside the archive.
const std::string kManifestPath = records::extra(records::kManifest);
const std::string kProbeBase64Path = records::extra(records::kProbeBase64);
using records::kForwardProgram;
using records::kPreprocessProgram;

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

// The directory programs are unpacked in: $TMPDIR when set, as for any temporary file.
std::string temp_base() {
  const char* base = std::getenv("TMPDIR");
  return base != nullptr && *base != '\0' ? base : "/tmp";
}

// A record name from the archive as a relative path inside the unpack directory: every part
// non-empty and not "." or "..", so that no record can be written outside it.
bool is_safe_relative(const std::string& name) {
  if (name.empty() || name.front() == '/' || name.find('\\') != std::string::npos) return false;
  std::istringstream parts(name);
  std::string part;
  while (std::getline(parts, part, '/'))
    if (part.empty() || part == "." || part == "..") return false;
  return name.back() != '/';
}

// One compiled program's files (data/aotinductor/<program>/...) unpacked from the package into
// a private directory that torch's package loader then opens as an unpacked package.
//
// Owning the directory (instead of letting the loader extract the whole archive under /tmp)
// means: it is removed on every failure (the loader's own directory stays behind when its
// constructor throws), and on CPU right after the load, so that a killed process leaves no
// model-sized copy behind; $TMPDIR chooses where it goes (a noexec /tmp cannot hold shared
// libraries); and the bytes are hashed as they are written, for the digest check.
class UnpackedProgram {
 public:
  UnpackedProgram(caffe2::serialize::PyTorchStreamReader& reader, const std::string& path,
                  const std::string& program, integrity::RecordHashes* hashes) {
    const std::string base = temp_base();
    std::string dir = base + "/repmlp_rt-XXXXXX";
    if (mkdtemp(dir.data()) == nullptr)
      throw ArtifactError("cannot unpack '" + path + "': cannot create a directory in '" + base +
                          "': " + std::strerror(errno) + "; set TMPDIR to a writable directory");
    // As /proc/self/maps will name the loaded libraries (TMPDIR may be a symbolic link).
    std::error_code ignored;
    const std::filesystem::path resolved = std::filesystem::canonical(dir, ignored);
    dir_ = resolved.empty() ? dir : resolved.string();
    try {
      unpack(reader, path, program, hashes);
    } catch (...) {
      remove();
      throw;
    }
  }
  ~UnpackedProgram() { remove(); }
  UnpackedProgram(const UnpackedProgram&) = delete;
  UnpackedProgram& operator=(const UnpackedProgram&) = delete;

  const std::string& dir() const noexcept { return dir_; }

  // Asks the kernel to drop this process's resident pages of the loaded library's data
  // segments. The loader has copied the weights out of the library into tensors, so its
  // mapped copy (about the weights' size, left resident by that copy) is never read again;
  // code segments are left alone. Advice only: pages not yet written back to disk stay (B224:
  // about half of them; forcing the write-back first measured ~170 ms more per load).
  void release_library_pages() const {
#if defined(__linux__) && defined(MADV_PAGEOUT)
    std::ifstream maps("/proc/self/maps");
    std::string line;
    const std::string prefix = dir_ + "/";
    while (std::getline(maps, line)) {
      // start-end perms offset dev inode path
      std::istringstream fields(line);
      std::string range, perms, offset, dev, inode, file;
      if (!(fields >> range >> perms >> offset >> dev >> inode)) continue;
      std::getline(fields >> std::ws, file);
      if (file.compare(0, prefix.size(), prefix) != 0 || perms.find('x') != std::string::npos)
        continue;
      const auto dash = range.find('-');
      if (dash == std::string::npos) continue;
      const uintptr_t start = std::strtoull(range.substr(0, dash).c_str(), nullptr, 16);
      const uintptr_t end = std::strtoull(range.substr(dash + 1).c_str(), nullptr, 16);
      if (end > start) madvise(reinterpret_cast<void*>(start), end - start, MADV_PAGEOUT);
    }
#endif
  }

  // The loaded library stays mapped; its file is not needed once a CPU program is loaded.
  void remove() noexcept {
    if (dir_.empty()) return;
    std::error_code ignored;
    std::filesystem::remove_all(dir_, ignored);
    dir_.clear();
  }

 private:
  void unpack(caffe2::serialize::PyTorchStreamReader& reader, const std::string& path,
              const std::string& program, integrity::RecordHashes* hashes) {
    const std::string prefix = records::kAotiFolder + program + "/";
    constexpr size_t kChunk = size_t{1} << 20;
    std::vector<char> buffer(kChunk);
    bool any = false;
    for (const std::string& name : reader.getAllRecords()) {
      if (name.compare(0, prefix.size(), prefix) != 0) continue;
      if (!is_safe_relative(name))
        throw ArtifactError("'" + path + "' has a record whose name is not a plain relative "
                            "path inside the archive: refused (corrupt or altered file)");
      const std::filesystem::path target = std::filesystem::path(dir_) / name;
      std::filesystem::create_directories(target.parent_path());
      std::optional<integrity::Sha256> hash;
      if (hashes != nullptr) hash.emplace();
      const int fd = ::open(target.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
      if (fd < 0 && errno == EEXIST)  // the directory is new and private: a duplicate name
        throw ArtifactError("'" + path + "' holds two records of the same name: refused "
                            "(corrupt or altered file)");
      if (fd < 0) write_failed(path, target, errno);
      integrity::for_each_chunk(reader, name, buffer, [&](const char* data, size_t size) {
        if (hash) hash->update(data, size);
        for (size_t written = 0; written < size;) {
          const ssize_t n = ::write(fd, data + written, size - written);
          if (n < 0 && errno == EINTR) continue;
          if (n <= 0) {
            const int why = n < 0 ? errno : ENOSPC;
            ::close(fd);
            write_failed(path, target, why);
          }
          written += static_cast<size_t>(n);
        }
      });
      if (::close(fd) != 0) write_failed(path, target, errno);
      if (hash) (*hashes)[name] = hash->hex_digest();
      any = true;
    }
    if (!any)
      throw ArtifactError("'" + path + "' has no compiled program '" + program +
                          "' (a RepMLP .pt2 holds 'forward' and 'preprocess')");
  }

  [[noreturn]] void write_failed(const std::string& path, const std::filesystem::path& target,
                                 int why) const {
    throw ArtifactError("cannot unpack '" + path + "' into '" + dir_ + "': writing " +
                        target.filename().string() + " failed: " + std::strerror(why) +
                        "; set TMPDIR to a writable directory with room for the model");
  }

  std::string dir_;
};

class AotiModel final : public Model {
 public:
  AotiModel(const std::string& path, c10::Device device, bool hash_records,
            const std::function<void(const integrity::RecordHashes&)>& before_loading_code)
      : path_(path) {
    read_records();
    if (metadata_.format_version != kFormatVersion) return;  // Runtime reports it
    integrity::RecordHashes hashes;
    unpack_programs(hash_records ? &hashes : nullptr);
    before_loading_code(hashes);
    check_compatible(device);
    const c10::DeviceIndex index = device.is_cuda() ? device.index() : -1;
    forward_ = load_program(kForwardProgram, *forward_files_, index);
    preprocess_ = load_program(kPreprocessProgram, *preprocess_files_, index);
    // A CUDA program may read its kernel binaries from the directory later; a CPU one does not.
    if (device.is_cpu()) {
      for (auto* files : {forward_files_.get(), preprocess_files_.get()}) {
        files->release_library_pages();
        files->remove();
      }
    }
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

  void unpack_programs(integrity::RecordHashes* hashes) {
    try {
      caffe2::serialize::PyTorchStreamReader reader(path_);
      forward_files_ = std::make_unique<UnpackedProgram>(reader, path_, kForwardProgram, hashes);
      preprocess_files_ = std::make_unique<UnpackedProgram>(reader, path_, kPreprocessProgram, hashes);
    } catch (const c10::Error& e) {
      throw ArtifactError("cannot unpack artifact '" + path_ + "': " + clean_message(e));
    } catch (const std::filesystem::filesystem_error& e) {
      throw ArtifactError("cannot unpack artifact '" + path_ + "': " + e.code().message() +
                          " (" + e.path1().string() + "); set TMPDIR to a writable directory");
    }
  }

  // The manifest and the probe (absent from packages built before self-verification).
  void read_records() {
    std::string text;
    try {
      caffe2::serialize::PyTorchStreamReader reader(path_);
      if (!reader.hasRecord(kManifestPath))
        throw ArtifactError("'" + path_ + "' is not a RepMLP artifact: an AOTInductor package "
                          "without " + kManifestPath);
      text = read_record(reader, kManifestPath);
      if (reader.hasRecord(kProbeBase64Path)) metadata_.probe = read_record(reader, kProbeBase64Path);
      metadata_.probe_base64 = true;
    } catch (const c10::Error& e) {
      throw ArtifactError("cannot load artifact '" + path_ + "': " + clean_message(e));
    }
    metadata_.manifest_json = text;
    metadata_.manifest = parse_manifest(text);
    if (!metadata_.manifest) throw invalid_manifest("it is not a JSON object");
    const Manifest& m = *metadata_.manifest;
    const auto& version = m.format_version;
    if (!version.present) throw invalid_manifest("it has no format_version");
    if (!version.value)
      throw error(kManifestPath + " has format_version " + version.text +
                  "; this runtime reads version " + std::to_string(kFormatVersion));
    metadata_.format_version = *version.value;
    if (metadata_.format_version != kFormatVersion) return;
    metadata_.input_shape = required(m.input_shape, "input.shape", "a list of integers");
    metadata_.compute_dtype = required(m.compute_dtype, "input.compute_dtype", "a string");
    metadata_.labels = required(m.labels, "output.labels", "a list of strings");
    torch_version_ = required(m.aoti_torch_version, "aoti.torch_version", "a string");
    device_type_ = required(m.aoti_device, "aoti.device", "a string");
  }

  ArtifactError invalid_manifest(const std::string& why) const {
    return error(kManifestPath + " is not a valid manifest: " + why);
  }

  // A field a PT2 archive's manifest must have, as there is no graph to ask.
  template <typename T>
  T required(const ManifestField<T>& field, const char* name, const char* expected) const {
    if (!field.present) throw invalid_manifest("it has no " + std::string(name));
    if (!field.value)
      throw invalid_manifest(std::string(name) + " must be " + expected + ", got " + field.text);
    return *field.value;
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

  // The loader opens the unpacked directory (it then neither extracts nor removes anything).
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> load_program(
      const char* name, const UnpackedProgram& files, c10::DeviceIndex index) const {
    const std::string where = " (unpacked in '" + files.dir() + "'; TMPDIR chooses where)";
    try {
      return std::make_unique<torch::inductor::AOTIModelPackageLoader>(
          files.dir(), name, /*run_single_threaded=*/false, /*num_runners=*/1, index);
    } catch (const c10::Error& e) {
      throw error(std::string("cannot load its program '") + name + "': " + clean_message(e) + where);
    } catch (const std::exception& e) {
      throw error(std::string("cannot load its program '") + name + "': " + clean_message(e.what()) + where);
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
  // Declared before the loaders, so destroyed after them.
  std::unique_ptr<UnpackedProgram> forward_files_;
  std::unique_ptr<UnpackedProgram> preprocess_files_;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> forward_;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> preprocess_;
};

}  // namespace

bool is_aoti_package(const std::string& path) {
  // A PT2 archive names its format in an archive_format record; a TorchScript file has none.
  try {
    caffe2::serialize::PyTorchStreamReader reader(path);
    return reader.hasRecord(records::kArchiveFormat) &&
           read_record(reader, records::kArchiveFormat) == "pt2";
  } catch (const c10::Error&) {
    return false;  // not a readable zip: the TorchScript loader reports why
  }
}

std::unique_ptr<Model> load_aoti_model(
    const std::string& path, c10::Device device, bool hash_records,
    const std::function<void(const std::map<std::string, std::string>&)>& before_loading_code) {
  return std::make_unique<AotiModel>(path, device, hash_records, before_loading_code);
}

}  // namespace repmlp_rt::detail
