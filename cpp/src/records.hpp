// The names of an artifact's records (docs/ARTIFACT.md, docs/FORMATS.md), for both formats
// (internal, not installed). Record names as PyTorchStreamReader lists them: relative to the
// archive's top folder.
#pragma once

#include <string>

namespace repmlp_rt::records {

// Both formats keep their extra files under extra/.
inline constexpr const char* kExtraFolder = "extra/";
inline constexpr const char* kManifest = "manifest.json";
// The self-check probe: torch.save bytes in a TorchScript file; the same bytes in base64 in a
// PT2 archive (torch's PT2 loader reads extra files as text).
inline constexpr const char* kProbe = "probe.pt";
inline constexpr const char* kProbeBase64 = "probe.pt.b64";
inline constexpr const char* kDigest = "digest.json";

// A PT2 archive names its format in this record ("pt2"); a TorchScript file has none.
inline constexpr const char* kArchiveFormat = "archive_format";
// An AOTInductor package's compiled programs: data/aotinductor/<program>/...
inline constexpr const char* kAotiFolder = "data/aotinductor/";
inline constexpr const char* kForwardProgram = "forward";
inline constexpr const char* kPreprocessProgram = "preprocess";

// "extra/<name>": an extra file's record name inside the archive.
inline std::string extra(const char* name) { return std::string(kExtraFolder) + name; }

}  // namespace repmlp_rt::records
