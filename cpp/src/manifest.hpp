// The runtime's JSON inputs, read once into types (internal, not installed): the artifact's
// manifest.json (docs/ARTIFACT.md) and digest record digest.json, and the runtime's own GEMM
// plan cache file (gemm_plan.cpp). Only manifest.cpp parses JSON.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace repmlp_rt::detail {

// One manifest field the runtime reads: whether it is there, its value when it has the
// expected type, and its JSON text for messages (a value of another type is quoted as written).
template <typename T>
struct ManifestField {
  bool present = false;
  std::optional<T> value;
  std::string text;
};

// What the runtime reads from manifest.json. Every field may be absent or of another type; the
// reader decides what that means (a TorchScript graph carries its own metadata, a PT2 archive
// has only the manifest).
struct Manifest {
  ManifestField<int64_t> format_version;
  // input
  ManifestField<std::vector<int64_t>> input_shape;
  ManifestField<std::string> compute_dtype;
  // output
  ManifestField<int64_t> num_classes;
  ManifestField<std::vector<std::string>> labels;
  // probe.tolerance: device type ("cpu", "cuda") -> the self-check's bound on that device
  std::map<std::string, ManifestField<double>> probe_tolerance;
  // aoti (PT2 archives): the torch release and device type the programs were compiled for
  ManifestField<std::string> aoti_torch_version;
  ManifestField<std::string> aoti_device;
};

// Parses manifest.json; nullopt when `text` is not a JSON object.
std::optional<Manifest> parse_manifest(const std::string& text);

// The digest record: the hash algorithm and, per record name, its hex digest (nullopt for an
// entry that is not a string).
struct Digest {
  std::string algorithm;
  std::map<std::string, std::optional<std::string>> records;
};

// Parses digest.json. Throws ArtifactError ("'<path>': self-check failed: ...") when it is not
// JSON or not a sha256 digest of records.
Digest parse_digest(const std::string& path, const std::string& text);

// A GEMM plan cache file: the key it was written for (compact JSON text, as
// nlohmann::json::dump() writes it) and, per GEMM group, the path and the row counts packed for.
struct PlanCacheEntry {
  std::string path;
  std::vector<int64_t> rows;
};
struct PlanCache {
  std::string key;
  std::map<std::string, PlanCacheEntry> plan;
};

// Parses a plan cache file. Throws std::runtime_error saying what is wrong with it (the caller
// warns and plans again).
PlanCache parse_plan_cache(const std::string& text);

}  // namespace repmlp_rt::detail
