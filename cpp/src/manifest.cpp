// Reads the JSON inputs of manifest.hpp with nlohmann-json: the one place that parses JSON.
#include "manifest.hpp"

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdio>
#include <stdexcept>

#include "records.hpp"
#include "repmlp_rt/errors.hpp"

namespace repmlp_rt::detail {
namespace {

using json = nlohmann::json;

// `text` as a JSON value; a discarded value when it is not JSON.
json parse_json(const std::string& text) {
  return json::parse(text, nullptr, /*allow_exceptions=*/false);
}

// A JSON value as a message quotes it: invalid UTF-8 replaced, integers beyond 64 bits (which
// nlohmann reads as doubles) written out, array items separated as Python writes them.
std::string json_text(const json& value) {
  if (value.is_number_float()) {
    const double number = value.get<double>();
    if (std::isfinite(number) && std::floor(number) == number) {
      char text[400];
      std::snprintf(text, sizeof text, "%.0f", number);
      return text;
    }
  }
  if (!value.is_array()) return value.dump(-1, ' ', false, json::error_handler_t::replace);
  std::string out = "[";
  for (size_t i = 0; i < value.size(); ++i)
    out += (i ? ", " : "") + value[i].dump(-1, ' ', false, json::error_handler_t::replace);
  return out + "]";
}

std::optional<int64_t> as_int(const json& value) {
  if (value.is_number_unsigned() && value.get<uint64_t>() > uint64_t{INT64_MAX}) return std::nullopt;
  if (value.is_number_integer()) return value.get<int64_t>();
  return std::nullopt;
}

std::optional<std::string> as_string(const json& value) {
  if (value.is_string()) return value.get<std::string>();
  return std::nullopt;
}

std::optional<double> as_number(const json& value) {
  if (value.is_number()) return value.get<double>();
  return std::nullopt;
}

template <typename T, typename Convert>
std::optional<std::vector<T>> as_list(const json& value, Convert convert) {
  if (!value.is_array()) return std::nullopt;
  std::vector<T> items;
  for (const json& item : value) {
    std::optional<T> converted = convert(item);
    if (!converted) return std::nullopt;
    items.push_back(std::move(*converted));
  }
  return items;
}

// The field at `pointer` ("/input/shape") of `root`, converted by `convert`.
template <typename T, typename Convert>
ManifestField<T> field(const json& root, const char* pointer, Convert convert) {
  ManifestField<T> out;
  const json::json_pointer where(pointer);
  // contains() on a pointer through a non-object is false, not an error
  if (!root.contains(where)) return out;
  const json& value = root.at(where);
  out.present = true;
  out.value = convert(value);
  out.text = json_text(value);
  return out;
}

}  // namespace

std::optional<Manifest> parse_manifest(const std::string& text) {
  const json root = parse_json(text);
  if (root.is_discarded() || !root.is_object()) return std::nullopt;
  Manifest m;
  m.format_version = field<int64_t>(root, "/format_version", as_int);
  m.input_shape = field<std::vector<int64_t>>(root, "/input/shape", [](const json& v) {
    return as_list<int64_t>(v, as_int);
  });
  m.compute_dtype = field<std::string>(root, "/input/compute_dtype", as_string);
  m.num_classes = field<int64_t>(root, "/output/num_classes", as_int);
  m.labels = field<std::vector<std::string>>(root, "/output/labels", [](const json& v) {
    return as_list<std::string>(v, as_string);
  });
  const json::json_pointer tolerances("/probe/tolerance");
  if (root.contains(tolerances) && root.at(tolerances).is_object())
    for (const auto& [device, value] : root.at(tolerances).items())
      m.probe_tolerance[device] = {true, as_number(value), json_text(value)};
  m.aoti_torch_version = field<std::string>(root, "/aoti/torch_version", as_string);
  m.aoti_device = field<std::string>(root, "/aoti/device", as_string);
  return m;
}

Digest parse_digest(const std::string& path, const std::string& text) {
  const std::string name = records::kDigest;
  const json root = parse_json(text);
  if (root.is_discarded())
    throw ArtifactError("'" + path + "': self-check failed: the digest record " + name +
                        " is not valid JSON (corrupt file)");
  if (!root.is_object() || root.value("algorithm", json()) != "sha256" ||
      !root.contains("records") || !root["records"].is_object())
    throw ArtifactError("'" + path + "': self-check failed: " + name +
                        " is not a sha256 record digest (corrupt file)");
  Digest digest;
  digest.algorithm = "sha256";
  for (const auto& [record, hash] : root["records"].items()) digest.records[record] = as_string(hash);
  return digest;
}

PlanCache parse_plan_cache(const std::string& text) {
  const json root = parse_json(text);
  if (root.is_discarded()) throw std::runtime_error("is not valid JSON");
  if (!root.is_object() || !root.contains("key") || !root.contains("plan") ||
      !root["plan"].is_object())
    throw std::runtime_error("is not a plan (expected an object with 'key' and 'plan')");
  PlanCache cache;
  cache.key = root["key"].dump();
  for (const auto& [group, entry] : root["plan"].items()) {
    const std::optional<std::string> path =
        entry.is_object() && entry.contains("path") ? as_string(entry["path"]) : std::nullopt;
    const std::optional<std::vector<int64_t>> rows =
        entry.is_object() && entry.contains("rows") ? as_list<int64_t>(entry["rows"], as_int)
                                                    : std::nullopt;
    if (!path || !rows)
      throw std::runtime_error("has an entry without a string 'path' and a list of integer 'rows'");
    cache.plan[group] = PlanCacheEntry{*path, *rows};
  }
  return cache;
}

}  // namespace repmlp_rt::detail
