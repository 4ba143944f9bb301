// Self-verification of an artifact at load (docs/ARTIFACT.md, "Self-verification"): the
// SHA-256 digest of every record, the stored probe that the runtime runs as its first warm-up
// call, and the manifest's agreement with the graph. Internal to the core library.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "manifest.hpp"

namespace caffe2::serialize {
class PyTorchStreamReader;
}  // namespace caffe2::serialize

namespace repmlp_rt::integrity {

// The message for an artifact without one of the self-check records (built before
// self-verifying artifacts), naming the opt-out.
std::string missing_record_message(const std::string& path, const std::string& record);

// Reads the archive's digest record (records::kDigest). Returns "" when the file is not a readable zip
// archive or has no such record (the caller decides what that means).
std::string read_digest_record(const std::string& path);

// SHA-256 computed piece by piece, for records hashed while they are copied elsewhere.
class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;
  void update(const void* data, size_t size);
  std::string hex_digest();  // once, at the end

 private:
  struct Context;
  std::unique_ptr<Context> context_;
};

// Reads record `name` of `reader` in pieces of buffer.size() bytes, handing each to `use`.
void for_each_chunk(caffe2::serialize::PyTorchStreamReader& reader, const std::string& name,
                    std::vector<char>& buffer, const std::function<void(const char*, size_t)>& use);

// Record name -> hex SHA-256 of the bytes a caller read from the archive and used (an
// AOTInductor program's files, hashed as they are unpacked for loading).
using RecordHashes = std::map<std::string, std::string>;

// Recomputes the SHA-256 of every record of the archive at `path` except the digest record and
// compares them with `digest_json` (that record's text); for a record in `used`, its hash there stands for it (the
// bytes actually used, not a second read of the file). Throws ArtifactError naming the first
// record that differs, is missing or is not listed.
void check_digest(const std::string& path, const std::string& digest_json,
                  const RecordHashes& used = {});

struct ProbeCase {
  std::string method;  // "forward" or "forward_images"
  at::Tensor input;
  at::Tensor output;  // float32, what the eager model gave at build time
};

// The probe record (torch.save of a dict of tensors; `base64`: records::kProbeBase64, those
// bytes in base64), one case per entry point, in a fixed order. Throws ArtifactError when it is
// absent, unreadable or incomplete.
std::vector<ProbeCase> read_probe(const std::string& path, const std::string& probe_record,
                                  bool base64 = false);

// The tolerance the manifest's probe section gives for `device_type` ("cpu", "cuda").
// Throws ArtifactError when the manifest has none.
double probe_tolerance(const std::string& path, const detail::Manifest& manifest,
                       const std::string& device_type);

// What manifest.json says about the input shape, the classes and the compute dtype must be what
// the graph's own methods say (each is checked where the manifest has it). Throws ArtifactError.
void check_manifest_agrees(const std::string& path, const detail::Manifest& manifest,
                           const std::vector<int64_t>& input_shape,
                           const std::vector<std::string>& labels,
                           const std::string& compute_dtype);

// max |out - ref| / max |ref| (the manifest's metric); +inf for NaN, a shape mismatch, etc.
double relative_error(const at::Tensor& out, const at::Tensor& ref);

// Every output of the model for one input, each flattened per sample and joined along
// dim 1, as the builder stored the probe's outputs.
using ProbeRunner = std::function<at::Tensor(const at::Tensor& input)>;

struct ProbeResult {
  double worst_error = 0;   // the worst relative error over the probe's cases
  std::string worst_method;  // the entry point it came from
};

// The probe's cases through `run`; throws ArtifactError ("'<path>': self-check failed: ...")
// when a case fails to run or the worst error is above `tolerance`. `what` names the artifact's
// compute dtype and the device in that message.
ProbeResult check_probe(const std::string& path, const std::vector<ProbeCase>& probe,
                        double tolerance, const ProbeRunner& run, const std::string& what);

}  // namespace repmlp_rt::integrity
