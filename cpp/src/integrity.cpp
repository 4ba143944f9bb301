// The digest and probe checks of cpp/src/integrity.hpp.
#include "integrity.hpp"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <nlohmann/json.hpp>
#include <openssl/evp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <set>

#include "repmlp_rt/errors.hpp"

namespace repmlp_rt::integrity {
namespace {

using json = nlohmann::json;

const std::string kDigestName = std::string("extra/") + kDigestRecord;
constexpr size_t kChunk = size_t{1} << 20;

[[noreturn]] void fail(const std::string& path, const std::string& why) {
  throw ArtifactError("'" + path + "': " + why);
}

std::string hex(const unsigned char* bytes, unsigned int size) {
  static const char digits[] = "0123456789abcdef";
  std::string out;
  for (unsigned int i = 0; i < size; ++i) {
    out += digits[bytes[i] >> 4];
    out += digits[bytes[i] & 15];
  }
  return out;
}

std::string sha256_of_record(caffe2::serialize::PyTorchStreamReader& reader,
                             const std::string& name, std::vector<char>& buffer) {
  Sha256 hash;
  for_each_chunk(reader, name, buffer, [&](const char* data, size_t size) { hash.update(data, size); });
  return hash.hex_digest();
}

// A record name as it may appear in a message: a corrupt file can name records with any bytes,
// and a message must stay printable ASCII (Python turns it into a str).
std::string printable(const std::string& name) {
  static const char digits[] = "0123456789abcdef";
  std::string out;
  for (unsigned char c : name) {
    if (c >= 0x20 && c < 0x7f && c != '\\') {
      out += static_cast<char>(c);
    } else {
      out += "\\x";
      out += digits[c >> 4];
      out += digits[c & 15];
    }
  }
  return out;
}

std::string first_line(const std::string& text) {
  const auto end = text.find('\n');
  return end == std::string::npos ? text : text.substr(0, end);
}

// Standard base64 with padding, as Python's base64.b64encode writes it; nullopt when `text` is
// not that.
std::optional<std::string> decode_base64(const std::string& text) {
  if (text.size() % 4 != 0 || text.size() > static_cast<size_t>(std::numeric_limits<int>::max()))
    return std::nullopt;
  std::string out(text.size() / 4 * 3, '\0');
  const int decoded = EVP_DecodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                                      reinterpret_cast<const unsigned char*>(text.data()),
                                      static_cast<int>(text.size()));
  if (decoded < 0 || static_cast<size_t>(decoded) != out.size()) return std::nullopt;
  // EVP_DecodeBlock decodes the padding as zero bytes.
  size_t padding = 0;
  while (padding < 2 && padding < text.size() && text[text.size() - 1 - padding] == '=') ++padding;
  out.resize(out.size() - padding);
  return out;
}

}  // namespace

void for_each_chunk(caffe2::serialize::PyTorchStreamReader& reader, const std::string& name,
                    std::vector<char>& buffer, const std::function<void(const char*, size_t)>& use) {
  const size_t size = reader.getRecordSize(name);
  if (size == 0) return;
  auto chunks = reader.createChunkReaderIter(name, size, buffer.size());
  for (size_t done = 0; done < size;) {
    const size_t got = chunks.next(buffer.data());
    if (got == 0) break;
    use(buffer.data(), got);
    done += got;
  }
}

struct Sha256::Context {
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> md{EVP_MD_CTX_new(), EVP_MD_CTX_free};
};

Sha256::Sha256() : context_(std::make_unique<Context>()) {
  if (!context_->md || EVP_DigestInit_ex(context_->md.get(), EVP_sha256(), nullptr) != 1)
    throw std::runtime_error("OpenSSL cannot compute SHA-256");
}

Sha256::~Sha256() = default;

void Sha256::update(const void* data, size_t size) {
  if (size > 0) EVP_DigestUpdate(context_->md.get(), data, size);
}

std::string Sha256::hex_digest() {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  EVP_DigestFinal_ex(context_->md.get(), digest, &length);
  return hex(digest, length);
}

std::string missing_record_message(const std::string& path, const std::string& record) {
  return "'" + path + "' has no " + record +
         " record, so it cannot be verified (built before self-verifying artifacts?): rebuild "
         "it, or load it with verification off (--no-verify, verify=False)";
}

std::string read_digest_record(const std::string& path) {
  try {
    caffe2::serialize::PyTorchStreamReader reader(path);
    if (!reader.hasRecord(kDigestName)) return "";
    auto [data, size] = reader.getRecord(kDigestName);
    return std::string(static_cast<const char*>(data.get()), size);
  } catch (const c10::Error&) {
    return "";  // not a readable archive: the loader says why
  }
}

void check_digest(const std::string& path, const std::string& digest_json,
                  const RecordHashes& used) {
  json stored;
  try {
    stored = json::parse(digest_json);
  } catch (const json::exception&) {
    fail(path, "self-check failed: the digest record " + std::string(kDigestRecord) +
                   " is not valid JSON (corrupt file)");
  }
  if (!stored.is_object() || stored.value("algorithm", json()) != "sha256" ||
      !stored.contains("records") || !stored["records"].is_object())
    fail(path, "self-check failed: " + std::string(kDigestRecord) +
                   " is not a sha256 record digest (corrupt file)");
  const json& expected = stored["records"];
  try {
    caffe2::serialize::PyTorchStreamReader reader(path);
    std::vector<char> buffer(kChunk);
    std::set<std::string> seen;
    for (const std::string& name : reader.getAllRecords()) {
      if (name == kDigestName) continue;
      seen.insert(name);
      auto it = expected.find(name);
      if (it == expected.end() || !it->is_string())
        fail(path, "self-check failed: record '" + printable(name) + "' is not covered by the digest (the file was altered)");
      const auto known = used.find(name);
      const std::string actual =
          known != used.end() ? known->second : sha256_of_record(reader, name, buffer);
      if (actual != it->get<std::string>())
        fail(path, "self-check failed: record '" + printable(name) + "' does not match its SHA-256 digest (corrupt file)");
    }
    for (const auto& item : expected.items())
      if (!seen.count(item.key()))
        fail(path, "self-check failed: record '" + printable(item.key()) + "' listed in the digest is missing (corrupt file)");
  } catch (const c10::Error& e) {
    fail(path, "self-check failed: cannot read the archive's records: " +
                   printable(first_line(e.what_without_backtrace())));
  }
}

std::vector<ProbeCase> read_probe(const std::string& path, const std::string& probe_record,
                                  bool base64) {
  if (probe_record.empty())
    throw ArtifactError(missing_record_message(path, base64 ? kProbeTextRecord : kProbeRecord));
  std::optional<std::string> decoded;
  if (base64) {
    decoded = decode_base64(probe_record);
    if (!decoded)
      fail(path, "self-check failed: the probe record " + std::string(kProbeTextRecord) +
                     " is not base64 (corrupt file)");
  }
  const std::string& probe_bytes = base64 ? *decoded : probe_record;
  c10::IValue value;
  try {
    value = torch::jit::pickle_load(std::vector<char>(probe_bytes.begin(), probe_bytes.end()));
  } catch (const std::exception& e) {
    fail(path, "self-check failed: the probe record cannot be read: " + first_line(e.what()));
  }
  if (!value.isGenericDict()) fail(path, "self-check failed: the probe record is not a dict");
  std::map<std::string, at::Tensor> tensors;
  for (const auto& item : value.toGenericDict()) {
    if (!item.key().isString() || !item.value().isTensor())
      fail(path, "self-check failed: the probe record holds something other than named tensors");
    tensors[item.key().toStringRef()] = item.value().toTensor();
  }
  std::vector<ProbeCase> cases;
  for (const char* method : {"forward", "forward_images"}) {
    auto input = tensors.find(std::string(method) + "/input");
    auto output = tensors.find(std::string(method) + "/output");
    if (input == tensors.end() || output == tensors.end())
      fail(path, "self-check failed: the probe record has no case for " + std::string(method) + "()");
    cases.push_back({method, input->second, output->second.to(at::kFloat)});
  }
  return cases;
}

double probe_tolerance(const std::string& path, const std::string& manifest_json,
                       const std::string& device_type) {
  json tolerance;
  try {
    tolerance = json::parse(manifest_json).at("probe").at("tolerance").at(device_type);
  } catch (const json::exception&) {
    fail(path, "manifest.json gives no probe tolerance for device type '" + device_type +
                   "' (probe.tolerance." + device_type + ")");
  }
  if (!tolerance.is_number() || !(tolerance.get<double>() > 0))
    fail(path, "manifest.json: probe.tolerance." + device_type + " must be a number > 0");
  return tolerance.get<double>();
}

void check_manifest_agrees(const std::string& path, const std::string& manifest_json,
                           const std::vector<int64_t>& input_shape,
                           const std::vector<std::string>& labels,
                           const std::string& compute_dtype) {
  json manifest;
  try {
    manifest = json::parse(manifest_json);
  } catch (const json::exception& e) {
    fail(path, std::string("manifest.json is not valid JSON: ") + e.what());
  }
  if (!manifest.is_object()) fail(path, "manifest.json is not a JSON object");
  auto text = [](const json& value) {
    if (!value.is_array()) return value.dump(-1, ' ', false, json::error_handler_t::replace);
    std::string out = "[";
    for (size_t i = 0; i < value.size(); ++i)
      out += (i ? ", " : "") + value[i].dump(-1, ' ', false, json::error_handler_t::replace);
    return out + "]";
  };
  const json shape = input_shape, names = labels;
  const json* input = manifest.contains("input") ? &manifest["input"] : nullptr;
  const json* output = manifest.contains("output") ? &manifest["output"] : nullptr;
  if (input && input->is_object()) {
    if (input->contains("shape") && (*input)["shape"] != shape)
      fail(path, "manifest.json says input shape " + text((*input)["shape"]) +
                     ", the graph's input_shape() is " + text(shape));
    if (input->contains("compute_dtype") && (*input)["compute_dtype"] != compute_dtype)
      fail(path, "manifest.json says compute dtype " +
                     ((*input)["compute_dtype"].is_string() ? (*input)["compute_dtype"].get<std::string>()
                                                             : text((*input)["compute_dtype"])) +
                     ", the graph's compute_dtype() is " + compute_dtype);
  }
  if (output && output->is_object()) {
    if (output->contains("num_classes") && (*output)["num_classes"] != json(labels.size()))
      fail(path, "manifest.json says " + text((*output)["num_classes"]) +
                     " classes, the graph's labels() has " + std::to_string(labels.size()));
    if (output->contains("labels") && (*output)["labels"] != names)
      fail(path, "manifest.json's labels differ from the graph's labels()");
  }
}

double relative_error(const at::Tensor& out, const at::Tensor& ref) {
  constexpr double kInf = std::numeric_limits<double>::infinity();
  if (!out.defined() || !ref.defined() || out.sizes() != ref.sizes() || ref.numel() == 0) return kInf;
  const at::Tensor a = out.to(at::kCPU, at::kDouble), b = ref.to(at::kCPU, at::kDouble);
  const double diff = (a - b).abs().max().item<double>();
  const double scale = std::max(b.abs().max().item<double>(), 1e-12);
  const double error = diff / scale;
  return std::isfinite(error) ? error : kInf;
}

}  // namespace repmlp_rt::integrity
