// The digest and probe checks of cpp/src/integrity.hpp.
#include "integrity.hpp"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <openssl/evp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <set>

#include "messages.hpp"
#include "records.hpp"
#include "repmlp_rt/errors.hpp"

namespace repmlp_rt::integrity {
namespace {

using detail::first_line;
using detail::printable_ascii;

const std::string kDigestName = records::extra(records::kDigest);
constexpr size_t kChunk = size_t{1} << 20;

[[noreturn]] void fail(const std::string& path, const std::string& why) {
  throw ArtifactError("'" + path + "': " + why);
}

std::string sha256_of_record(caffe2::serialize::PyTorchStreamReader& reader,
                             const std::string& name, std::vector<char>& buffer) {
  Sha256 hash;
  for_each_chunk(reader, name, buffer, [&](const char* data, size_t size) { hash.update(data, size); });
  return hash.hex_digest();
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
  std::string hex;
  for (unsigned int i = 0; i < length; ++i) detail::append_hex(hex, digest[i]);
  return hex;
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
  const detail::Digest digest = detail::parse_digest(path, digest_json);
  const auto& expected = digest.records;
  try {
    caffe2::serialize::PyTorchStreamReader reader(path);
    std::vector<char> buffer(kChunk);
    std::set<std::string> seen;
    for (const std::string& name : reader.getAllRecords()) {
      if (name == kDigestName) continue;
      seen.insert(name);
      auto it = expected.find(name);
      if (it == expected.end() || !it->second)
        fail(path, "self-check failed: record '" + printable_ascii(name) + "' is not covered by the digest (the file was altered)");
      const auto known = used.find(name);
      const std::string actual =
          known != used.end() ? known->second : sha256_of_record(reader, name, buffer);
      if (actual != *it->second)
        fail(path, "self-check failed: record '" + printable_ascii(name) + "' does not match its SHA-256 digest (corrupt file)");
    }
    for (const auto& item : expected)
      if (!seen.count(item.first))
        fail(path, "self-check failed: record '" + printable_ascii(item.first) + "' listed in the digest is missing (corrupt file)");
  } catch (const c10::Error& e) {
    fail(path, "self-check failed: cannot read the archive's records: " +
                   printable_ascii(first_line(e.what_without_backtrace())));
  }
}

std::vector<ProbeCase> read_probe(const std::string& path, const std::string& probe_record,
                                  bool base64) {
  if (probe_record.empty())
    throw ArtifactError(missing_record_message(path, base64 ? records::kProbeBase64 : records::kProbe));
  std::optional<std::string> decoded;
  if (base64) {
    decoded = decode_base64(probe_record);
    if (!decoded)
      fail(path, "self-check failed: the probe record " + std::string(records::kProbeBase64) +
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

double probe_tolerance(const std::string& path, const detail::Manifest& manifest,
                       const std::string& device_type) {
  const auto found = manifest.probe_tolerance.find(device_type);
  if (found == manifest.probe_tolerance.end())
    fail(path, "manifest.json gives no probe tolerance for device type '" + device_type +
                   "' (probe.tolerance." + device_type + ")");
  const std::optional<double>& tolerance = found->second.value;
  if (!tolerance || !(*tolerance > 0))
    fail(path, "manifest.json: probe.tolerance." + device_type + " must be a number > 0");
  return *tolerance;
}

void check_manifest_agrees(const std::string& path, const detail::Manifest& manifest,
                           const std::vector<int64_t>& input_shape,
                           const std::vector<std::string>& labels,
                           const std::string& compute_dtype) {
  const auto& shape = manifest.input_shape;
  if (shape.present && shape.value != input_shape)
    fail(path, "manifest.json says input shape " + shape.text + ", the graph's input_shape() is " +
                   detail::shape_string(input_shape));
  const auto& dtype = manifest.compute_dtype;
  if (dtype.present && dtype.value != compute_dtype)
    fail(path, "manifest.json says compute dtype " + dtype.value.value_or(dtype.text) +
                   ", the graph's compute_dtype() is " + compute_dtype);
  const auto& classes = manifest.num_classes;
  if (classes.present && classes.value != static_cast<int64_t>(labels.size()))
    fail(path, "manifest.json says " + classes.text + " classes, the graph's labels() has " +
                   std::to_string(labels.size()));
  if (manifest.labels.present && manifest.labels.value != labels)
    fail(path, "manifest.json's labels differ from the graph's labels()");
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

ProbeResult check_probe(const std::string& path, const std::vector<ProbeCase>& probe,
                        double tolerance, const ProbeRunner& run, const std::string& what) {
  ProbeResult result;
  try {
    for (const auto& check : probe) {
      const double error = relative_error(run(check.input), check.output);
      if (!(error <= result.worst_error)) {
        result.worst_error = error;
        result.worst_method = check.method;
      }
    }
  } catch (const std::exception& e) {
    fail(path, "self-check failed: " + detail::clean_message(e.what()));
  }
  if (!(result.worst_error <= tolerance)) {
    char numbers[200];
    std::snprintf(numbers, sizeof numbers, "worst relative error %.3g in %s(), tolerance %.3g",
                  result.worst_error, result.worst_method.c_str(), tolerance);
    fail(path, "self-check failed: " + std::string(numbers) + " (" + what +
                   "): the file is corrupt or this machine computes wrongly; "
                   "--no-verify / verify=False loads it anyway");
  }
  return result;
}

}  // namespace repmlp_rt::integrity
