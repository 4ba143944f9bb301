// The message helpers of messages.hpp, and the UTF-8 escaping of errors.hpp.
#include "messages.hpp"

#include <c10/util/Exception.h>

#include <sstream>

#include "repmlp_rt/errors.hpp"

namespace repmlp_rt::detail {

void append_hex(std::string& out, unsigned char byte) {
  static const char digits[] = "0123456789abcdef";
  out += digits[byte >> 4];
  out += digits[byte & 15];
}

std::string utf8_text(const std::string& bytes) {
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
      append_hex(out, lead);
      i += 1;
    }
  }
  return out;
}

std::string printable_ascii(const std::string& name) {
  std::string out;
  for (unsigned char c : name) {
    if (c >= 0x20 && c < 0x7f && c != '\\') {
      out += static_cast<char>(c);
    } else {
      out += "\\x";
      append_hex(out, c);
    }
  }
  return out;
}

std::string first_line(const std::string& text) {
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line))
    if (line.find_first_not_of(" \t\r") != std::string::npos) return line;
  return text;
}

std::string clean_message(const std::string& message) {
  std::istringstream lines(message);
  std::string line;
  while (std::getline(lines, line)) {
    const auto begin = line.find_first_not_of(" \t\r");
    if (begin == std::string::npos) continue;
    line = line.substr(begin);
    if (line.rfind("Exception raised from", 0) == 0 || line.rfind("frame #", 0) == 0) continue;
    // The zip reader appends a long explanation; the first sentence says what happened.
    const auto noise = line.find(" This is an internal miniz error");
    if (noise != std::string::npos) line = line.substr(0, noise) + " (corrupt or truncated file?)";
    return line;
  }
  return "unknown error";
}

std::string clean_message(const c10::Error& error) {
  return clean_message(error.what_without_backtrace());
}

std::string shape_string(c10::IntArrayRef shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

std::string dtype_name(c10::ScalarType type) {
  switch (type) {
    case c10::kFloat: return "float32";
    case c10::kHalf: return "float16";
    case c10::kBFloat16: return "bfloat16";
    case c10::kDouble: return "float64";
    case c10::kByte: return "uint8";
    case c10::kChar: return "int8";
    case c10::kShort: return "int16";
    case c10::kInt: return "int32";
    case c10::kLong: return "int64";
    case c10::kBool: return "bool";
    default: return c10::toString(type);
  }
}

}  // namespace repmlp_rt::detail
