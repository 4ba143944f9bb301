// Exceptions thrown by the repmlp_rt core library. Nothing in the library calls abort().
#pragma once

#include <stdexcept>
#include <string>

namespace repmlp_rt {
namespace detail {

// Messages quote paths and bytes read from files, which may be anything; their readers (Python
// strings, JSON, terminals) need text. Bytes that are not part of valid UTF-8 become "\xNN".
std::string utf8_text(const std::string& bytes);

}  // namespace detail

// The artifact file is missing, truncated, corrupt, not a RepMLP artifact, or has an
// unsupported format version / manifest.
class ArtifactError : public std::runtime_error {
 public:
  explicit ArtifactError(const std::string& message) : std::runtime_error(detail::utf8_text(message)) {}
};

// A caller mistake: wrong rank, channels, H, W, dtype, an empty batch, a bad option value,
// an unreadable image or .npy file. Messages name what was expected and what was given.
class InputError : public std::invalid_argument {
 public:
  explicit InputError(const std::string& message) : std::invalid_argument(detail::utf8_text(message)) {}
};

// The requested device cannot be used (no CUDA in this build, no such GPU).
class DeviceError : public std::runtime_error {
 public:
  explicit DeviceError(const std::string& message) : std::runtime_error(detail::utf8_text(message)) {}
};

}  // namespace repmlp_rt
