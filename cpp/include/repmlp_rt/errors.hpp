// Exceptions thrown by the repmlp_rt core library. Nothing in the library calls abort().
#pragma once

#include <stdexcept>
#include <string>

namespace repmlp_rt {
namespace detail {

// Messages quote paths and bytes read from files, which may be anything; their readers (Python
// strings, JSON, terminals) need text. Bytes that are not part of valid UTF-8 become "\xNN".
inline std::string utf8_text(const std::string& bytes) {
  static const char digits[] = "0123456789abcdef";
  std::string out;
  out.reserve(bytes.size());
  const auto byte = [&](size_t i) { return static_cast<unsigned char>(bytes[i]); };
  for (size_t i = 0; i < bytes.size();) {
    const unsigned char lead = byte(i);
    size_t length = lead < 0x80 ? 1 : lead >= 0xC2 && lead <= 0xDF ? 2 : lead >= 0xE0 && lead <= 0xEF ? 3
                  : lead >= 0xF0 && lead <= 0xF4 ? 4 : 0;
    bool valid = length > 0 && i + length <= bytes.size();
    for (size_t k = 1; valid && k < length; ++k) valid = (byte(i + k) & 0xC0) == 0x80;
    if (valid && length > 2) {  // no overlong forms, surrogates or code points past U+10FFFF
      const unsigned char second = byte(i + 1);
      valid = !(lead == 0xE0 && second < 0xA0) && !(lead == 0xED && second > 0x9F) &&
              !(lead == 0xF0 && second < 0x90) && !(lead == 0xF4 && second > 0x8F);
    }
    if (valid) {
      out.append(bytes, i, length);
      i += length;
    } else {
      out += "\\x";
      out += digits[lead >> 4];
      out += digits[lead & 15];
      i += 1;
    }
  }
  return out;
}

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
