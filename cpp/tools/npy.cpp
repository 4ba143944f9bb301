// A strict .npy reader/writer for float32 C-order arrays, and an .npz writer (numpy.savez's
// uncompressed zip of .npy members), with no third-party dependency.
#include "npy.hpp"

#include <unistd.h>

#include <array>
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

namespace {

// The .npy bytes before the data: magic, version 1.0, header length, padded header dict.
std::string npy_header(const std::vector<int64_t>& shape, size_t& count) {
  std::string dims;
  count = 1;
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
  std::string out(kMagic, kMagicSize);
  out += '\x01';
  out += '\x00';
  const uint16_t len = static_cast<uint16_t>(header.size());
  out += static_cast<char>(len & 0xff);
  out += static_cast<char>(len >> 8);
  return out + header;
}

// Writes through `fill` to a temporary file next to `path`, then renames it into place; on any
// failure the temporary file is removed and `path` is left as it was.
template <typename Fill>
void write_atomically(const std::string& path, Fill fill) {
  namespace fs = std::filesystem;
  const fs::path target(path);
  const fs::path tmp = target.string() + ".tmp." + std::to_string(::getpid());
  std::error_code ec;
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw std::runtime_error("cannot write '" + path + "': " + std::strerror(errno));
    try {
      fill(out);
    } catch (...) {
      out.close();
      fs::remove(tmp, ec);
      throw;
    }
    out.flush();
    if (!out) {
      out.close();
      fs::remove(tmp, ec);
      throw std::runtime_error("cannot write '" + path + "': write failed");
    }
  }
  fs::rename(tmp, target, ec);
  if (ec) {
    fs::remove(tmp, ec);
    throw std::runtime_error("cannot write '" + path + "': rename failed");
  }
}

// CRC-32 (IEEE 802.3, as zip uses it), continued from `crc`.
uint32_t crc32(uint32_t crc, const void* data, size_t size) {
  static const auto table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t n = 0; n < 256; ++n) {
      uint32_t c = n;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[n] = c;
    }
    return t;
  }();
  const auto* bytes = static_cast<const unsigned char*>(data);
  crc = ~crc;
  for (size_t i = 0; i < size; ++i) crc = table[(crc ^ bytes[i]) & 0xff] ^ (crc >> 8);
  return ~crc;
}

void put16(std::string& out, uint32_t v) {
  out += static_cast<char>(v & 0xff);
  out += static_cast<char>((v >> 8) & 0xff);
}

void put32(std::string& out, uint32_t v) {
  put16(out, v & 0xffff);
  put16(out, v >> 16);
}

}  // namespace

void write_npy_f32(const std::string& path, const std::vector<int64_t>& shape, const float* data) {
  size_t count = 0;
  const std::string header = npy_header(shape, count);
  write_atomically(path, [&](std::ofstream& out) {
    out.write(header.data(), static_cast<std::streamsize>(header.size()));
    out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(count * sizeof(float)));
  });
}

void write_npz_f32(const std::string& path, const std::vector<NpzEntry>& entries) {
  // Validate everything before the file is created.
  struct Member {
    std::string file_name, npy_header;
    size_t data_bytes = 0;
    uint32_t crc = 0, size = 0, offset = 0;
  };
  std::vector<Member> members;
  uint64_t offset = 0;
  for (const NpzEntry& entry : entries) {
    if (entry.name.empty() || entry.name.find('/') != std::string::npos)
      throw InputError("npz array name must be non-empty and without '/', got '" + entry.name + "'");
    for (const Member& m : members)
      if (m.file_name == entry.name + ".npy")
        throw InputError("npz array name '" + entry.name + "' is used twice");
    Member m;
    m.file_name = entry.name + ".npy";
    size_t count = 0;
    m.npy_header = npy_header(entry.shape, count);
    m.data_bytes = count * sizeof(float);
    const uint64_t size = m.npy_header.size() + static_cast<uint64_t>(m.data_bytes);
    const uint64_t local_end = offset + 30 + m.file_name.size() + size;
    if (size >= 0xffffffffu || local_end >= 0xffffffffu)
      throw InputError("npz array '" + entry.name + "' (" + std::to_string(size) +
                       " bytes) does not fit a zip without ZIP64 (4 GiB)");
    m.size = static_cast<uint32_t>(size);
    m.offset = static_cast<uint32_t>(offset);
    m.crc = crc32(crc32(0, m.npy_header.data(), m.npy_header.size()), entry.data, m.data_bytes);
    offset = local_end;
    members.push_back(std::move(m));
  }
  constexpr uint32_t kDosDate = (0 << 9) | (1 << 5) | 1;  // 1980-01-01, the zip epoch
  auto common = [&](std::string& out, const Member& m) {
    put16(out, 20);  // version needed: 2.0
    put16(out, 0);   // flags
    put16(out, 0);   // method: stored
    put16(out, 0);   // time
    put16(out, kDosDate);
    put32(out, m.crc);
    put32(out, m.size);  // compressed size
    put32(out, m.size);  // uncompressed size
    put16(out, static_cast<uint32_t>(m.file_name.size()));
    put16(out, 0);  // extra field length
  };
  write_atomically(path, [&](std::ofstream& out) {
    for (size_t i = 0; i < members.size(); ++i) {
      const Member& m = members[i];
      std::string local;
      put32(local, 0x04034b50);
      common(local, m);
      local += m.file_name + m.npy_header;
      out.write(local.data(), static_cast<std::streamsize>(local.size()));
      out.write(reinterpret_cast<const char*>(entries[i].data),
                static_cast<std::streamsize>(m.data_bytes));
    }
    std::string central;
    for (const Member& m : members) {
      put32(central, 0x02014b50);
      put16(central, 20);  // version made by
      common(central, m);
      put16(central, 0);  // comment length
      put16(central, 0);  // disk number
      put16(central, 0);  // internal attributes
      put32(central, 0);  // external attributes
      put32(central, m.offset);
      central += m.file_name;
    }
    if (offset + central.size() >= 0xffffffffu)
      throw InputError("npz file '" + path + "' does not fit a zip without ZIP64 (4 GiB)");
    std::string end;
    put32(end, 0x06054b50);
    put16(end, 0);
    put16(end, 0);
    put16(end, static_cast<uint32_t>(members.size()));
    put16(end, static_cast<uint32_t>(members.size()));
    put32(end, static_cast<uint32_t>(central.size()));
    put32(end, static_cast<uint32_t>(offset));
    put16(end, 0);  // comment length
    out.write(central.data(), static_cast<std::streamsize>(central.size()));
    out.write(end.data(), static_cast<std::streamsize>(end.size()));
  });
}

}  // namespace repmlp_rt
