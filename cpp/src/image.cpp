// Image decoding with stb_image. Built without it (no libstb-dev found), decode_image throws.
#include "repmlp_rt/image.hpp"

#include <climits>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <tuple>
#include <utility>

#if defined(REPMLP_RT_WITH_STB)
#if defined(REPMLP_RT_STB_HEADER_ONLY)
// Only the header was found (e.g. unpacked with cpp/scripts/unpack_header_deps.sh): compile
// the implementation here, with internal linkage.
#define STB_IMAGE_STATIC
#define STB_IMAGE_IMPLEMENTATION
#endif
#include <stb/stb_image.h>
#endif
#if defined(REPMLP_RT_WITH_ZLIB)
#include <zlib.h>
#endif

namespace repmlp_rt {
namespace {

#if defined(REPMLP_RT_WITH_STB) && defined(REPMLP_RT_WITH_ZLIB)
uint32_t big_endian_u32(const std::string& bytes, size_t at) {
  uint32_t value = 0;
  for (size_t i = 0; i < 4; ++i) value = (value << 8) | static_cast<unsigned char>(bytes[at + i]);
  return value;
}

// Every PNG chunk carries a CRC-32, which stb_image does not check: a flipped bit in the pixel
// data would decode to a silently different image. libpng and Pillow refuse such a file, and
// so does this: each chunk's CRC must hold, and the file must reach its IEND chunk.
// Returns the size its IHDR chunk claims (stb_image's own header check refuses sizes over 1 GiB
// of pixels with a misleading "unknown image type").
std::pair<int64_t, int64_t> check_png_chunks(const std::string& bytes, const std::string& path) {
  static const char kSignature[] = "\x89PNG\r\n\x1a\n";
  if (bytes.size() < 8 || bytes.compare(0, 8, kSignature, 8) != 0) return {-1, -1};  // not a PNG
  int64_t width = -1, height = -1;
  auto fail = [&path](const std::string& why) {
    return InputError("cannot decode image '" + path + "': " + why);
  };
  for (size_t at = 8; at + 12 <= bytes.size();) {
    const uint32_t length = big_endian_u32(bytes, at);
    if (length > bytes.size() - at - 12) throw fail("truncated PNG (a chunk runs past the end of the file)");
    const std::string type = bytes.substr(at + 4, 4);
    const auto* chunk = reinterpret_cast<const Bytef*>(bytes.data() + at + 4);
    const uint32_t crc = static_cast<uint32_t>(crc32(0L, chunk, length + 4));
    if (crc != big_endian_u32(bytes, at + 8 + length))
      throw fail("PNG chunk '" + type + "' at byte " + std::to_string(at) +
                 " fails its CRC check (corrupt file)");
    if (type == "IHDR" && length >= 8) {
      width = big_endian_u32(bytes, at + 8);
      height = big_endian_u32(bytes, at + 12);
    }
    if (type == "IEND") return {width, height};
    at += 12 + size_t{length};
  }
  throw fail("truncated PNG (no IEND chunk)");
}
#endif

}  // namespace

bool has_image_decoding() noexcept {
#if defined(REPMLP_RT_WITH_STB)
  return true;
#else
  return false;
#endif
}

Image decode_image(const std::string& path, int64_t max_pixels) {
  if (max_pixels < 0)
    throw InputError("max_pixels must be >= 0 (0: no limit), got " + std::to_string(max_pixels));
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec))
    throw InputError("cannot read image '" + path + "': is a directory, expected a file");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError("cannot read image '" + path + "': no such file or not readable");
#if defined(REPMLP_RT_WITH_STB)
  // One read into memory: the header check and the decoding see the same bytes.
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (bytes.size() > static_cast<size_t>(INT_MAX))
    throw InputError("cannot decode image '" + path + "': file of " + std::to_string(bytes.size()) +
                     " bytes is over stb_image's 2 GiB limit");
  const auto* data = reinterpret_cast<const stbi_uc*>(bytes.data());
  const int size = static_cast<int>(bytes.size());
  auto failure = [&path]() -> InputError {
    const char* reason = stbi_failure_reason();
    return InputError("cannot decode image '" + path + "': " + (reason ? reason : "unknown error"));
  };
  int64_t width = -1, height = -1;
#if defined(REPMLP_RT_WITH_ZLIB)
  std::tie(width, height) = check_png_chunks(bytes, path);
#endif
  if (width < 0) {
    int w = 0, h = 0, channels = 0;
    if (!stbi_info_from_memory(data, size, &w, &h, &channels)) throw failure();
    width = w;
    height = h;
  }
  const int64_t pixels = width * height;
  if (max_pixels > 0 && pixels > max_pixels)
    throw InputError("image '" + path + "' claims " + std::to_string(width) + " x " +
                     std::to_string(height) + " = " + std::to_string(pixels) +
                     " pixels, over the limit of " + std::to_string(max_pixels) +
                     " (raise it with --max-image-pixels / max_pixels if the file is trusted)");
  int w = 0, h = 0, channels = 0;
  stbi_uc* decoded = stbi_load_from_memory(data, size, &w, &h, &channels, 3);
  if (!decoded) throw failure();
  Image image;
  image.height = h;
  image.width = w;
  image.rgb.assign(decoded, decoded + static_cast<size_t>(w) * h * 3);
  stbi_image_free(decoded);
  return image;
#else
  (void)max_pixels;
  throw InputError("cannot decode image '" + path +
                   "': this build has no image decoding (libstb-dev was not found at build time)");
#endif
}

}  // namespace repmlp_rt
