// A strict .npy reader/writer for float32 C-order arrays (no third-party dependency).
#include "repmlp_rt/npy.hpp"

#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <regex>

namespace repmlp_rt {
namespace {

constexpr char kMagic[] = "\x93NUMPY";
constexpr size_t kMagicSize = 6;
// numpy's own default limit (np.load's max_header_size). It also bounds the work of the
// std::regex matching below, which recurses once per character in libstdc++.
constexpr size_t kMaxHeaderSize = 10000;

[[noreturn]] void fail(const std::string& path, const std::string& why) {
  throw InputError("cannot read .npy '" + path + "': " + why);
}

}  // namespace

NpyArray read_npy_f32(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) fail(path, "is a directory, expected a file");
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, "no such file or not readable");
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (bytes.size() < kMagicSize + 4 || bytes.compare(0, kMagicSize, kMagic, kMagicSize) != 0)
    fail(path, "not a .npy file (bad magic)");
  const auto major = static_cast<unsigned char>(bytes[6]);
  const auto minor = static_cast<unsigned char>(bytes[7]);
  size_t header_len = 0, offset = 0;
  if (major == 1 && minor == 0) {
    header_len = static_cast<unsigned char>(bytes[8]) | (static_cast<unsigned char>(bytes[9]) << 8);
    offset = 10;
  } else if ((major == 2 || major == 3) && minor == 0) {
    if (bytes.size() < 12) fail(path, "truncated header");
    header_len = 0;
    for (int i = 3; i >= 0; --i) header_len = (header_len << 8) | static_cast<unsigned char>(bytes[8 + i]);
    offset = 12;
  } else {
    fail(path, "unsupported .npy format version " + std::to_string(major) + "." +
                   std::to_string(minor) + " (expected 1.0, 2.0 or 3.0)");
  }
  if (header_len > kMaxHeaderSize)
    fail(path, "header of " + std::to_string(header_len) + " bytes exceeds the limit of " +
                   std::to_string(kMaxHeaderSize));
  if (bytes.size() < offset + header_len) fail(path, "truncated header");
  std::string header = bytes.substr(offset, header_len);
  const size_t data_offset = offset + header_len;

  // The header is a Python dict literal with exactly three keys.
  static const std::regex dict_re(
      R"re(^\s*\{\s*(?:'(descr|fortran_order|shape)'\s*:\s*('[^']*'|True|False|\([0-9,\s]*\))\s*,?\s*){3}\}\s*$)re");
  if (!std::regex_match(header, dict_re)) fail(path, "malformed header: " + header);
  std::smatch m;
  static const std::regex descr_re(R"re('descr'\s*:\s*'([^']*)')re");
  static const std::regex fortran_re(R"re('fortran_order'\s*:\s*(True|False))re");
  static const std::regex shape_re(R"re('shape'\s*:\s*\(([0-9,\s]*)\))re");
  if (!std::regex_search(header, m, descr_re)) fail(path, "header has no 'descr'");
  const std::string descr = m[1].str();
  if (descr != "<f4")
    fail(path, "expected dtype float32 ('<f4'), got '" + descr + "'");
  if (!std::regex_search(header, m, fortran_re)) fail(path, "header has no 'fortran_order'");
  if (m[1].str() != "False") fail(path, "expected C order (fortran_order False), got Fortran order");
  if (!std::regex_search(header, m, shape_re)) fail(path, "header has no 'shape'");

  NpyArray array;
  const std::string dims = m[1].str();
  static const std::regex int_re(R"(\d+)");
  size_t count = 1;
  for (auto it = std::sregex_iterator(dims.begin(), dims.end(), int_re); it != std::sregex_iterator(); ++it) {
    const std::string token = it->str();
    if (token.size() > 15) fail(path, "dimension too large: " + token);
    const int64_t dim = std::stoll(token);
    array.shape.push_back(dim);
    if (dim != 0 && count > (SIZE_MAX / 8) / static_cast<size_t>(dim)) fail(path, "shape too large");
    count *= static_cast<size_t>(dim);
  }
  const size_t expected = count * sizeof(float);
  const size_t actual = bytes.size() - data_offset;
  if (actual < expected)
    fail(path, "truncated: shape needs " + std::to_string(expected) + " data bytes, file has " +
                   std::to_string(actual));
  if (actual > expected)
    fail(path, "file has " + std::to_string(actual - expected) + " bytes after the data");
  array.data.resize(count);
  if (count) std::memcpy(array.data.data(), bytes.data() + data_offset, expected);
  return array;
}

void write_npy_f32(const std::string& path, const std::vector<int64_t>& shape, const float* data) {
  std::string dims;
  size_t count = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) dims += ", ";
    dims += std::to_string(shape[i]);
    count *= static_cast<size_t>(shape[i]);
  }
  if (shape.size() == 1) dims += ",";  // "(2,)" is a tuple, "(2)" is not
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + dims + "), }";
  // magic(6) + version(2) + len(2) + header + '\n' is padded to a multiple of 64.
  const size_t unpadded = 10 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header += '\n';

  namespace fs = std::filesystem;
  const fs::path target(path);
  const fs::path tmp = target.string() + ".tmp." + std::to_string(::getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out)
      throw std::runtime_error("cannot write '" + path + "': " + std::strerror(errno));
    out.write(kMagic, kMagicSize);
    const char version[2] = {1, 0};
    out.write(version, 2);
    const uint16_t len = static_cast<uint16_t>(header.size());
    const char len_bytes[2] = {static_cast<char>(len & 0xff), static_cast<char>(len >> 8)};
    out.write(len_bytes, 2);
    out.write(header.data(), static_cast<std::streamsize>(header.size()));
    out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(count * sizeof(float)));
    out.flush();
    if (!out) {
      std::error_code ec;
      fs::remove(tmp, ec);
      throw std::runtime_error("cannot write '" + path + "': write failed");
    }
  }
  std::error_code ec;
  fs::rename(tmp, target, ec);
  if (ec) {
    fs::remove(tmp, ec);
    throw std::runtime_error("cannot write '" + path + "': rename failed");
  }
}

}  // namespace repmlp_rt
