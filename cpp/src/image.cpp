// Image decoding with stb_image. Built with -DREPMLP_WITH_IMAGES=OFF, the decoders throw.
#include "repmlp_rt/image.hpp"

#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <tuple>
#include <utility>

#if defined(REPMLP_RT_WITH_STB)
#include <cstdlib>
#include <cstring>

namespace {
// stb_image reads memory it never wrote when some corrupt JPEGs still decode (valgrind:
// "conditional jump depends on uninitialised value" inside its JPEG decoder), so the same
// file gave different pixels from one call to the next. Every buffer it allocates or grows
// starts zeroed: a corrupt file that decodes always decodes to the same image.
void* stb_zeroed_realloc(void* old, size_t old_size, size_t new_size) {
  void* grown = std::realloc(old, new_size);
  if (grown && new_size > old_size)
    std::memset(static_cast<char*>(grown) + old_size, 0, new_size - old_size);
  return grown;
}
}  // namespace

// The implementation is compiled here, with internal linkage, rather than taken from a shared
// libstb, so that these allocators apply.
#define STBI_MALLOC(size) std::calloc(1, size)
#define STBI_REALLOC(pointer, size) std::realloc(pointer, size)
#define STBI_REALLOC_SIZED(pointer, old_size, new_size) stb_zeroed_realloc(pointer, old_size, new_size)
#define STBI_FREE(pointer) std::free(pointer)
#define STB_IMAGE_STATIC
#define STB_IMAGE_IMPLEMENTATION
#include <stb/stb_image.h>
#endif
#if defined(REPMLP_RT_WITH_ZLIB)
#include <zlib.h>
#endif

namespace repmlp_rt {
namespace {

#if defined(REPMLP_RT_WITH_STB) && defined(REPMLP_RT_WITH_ZLIB)
uint32_t big_endian_u32(const uint8_t* bytes) {
  return (uint32_t{bytes[0]} << 24) | (uint32_t{bytes[1]} << 16) | (uint32_t{bytes[2]} << 8) |
         uint32_t{bytes[3]};
}

// Every PNG chunk carries a CRC-32, which stb_image does not check: a flipped bit in the pixel
// data would decode to a silently different image. libpng and Pillow refuse such a file, and
// so does this: each chunk's CRC must hold, and the data must reach its IEND chunk. Returns the
// size the IHDR chunk claims ({-1, -1} when the data is not a PNG): stb_image's own header
// check refuses sizes over 1 GiB of pixels with a misleading "unknown image type".
std::pair<int64_t, int64_t> check_png_chunks(const uint8_t* data, size_t size,
                                             const std::string& name) {
  static const uint8_t kSignature[] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  if (size < 8 || !std::equal(kSignature, kSignature + 8, data)) return {-1, -1};
  auto fail = [&name](const std::string& why) {
    return InputError("cannot decode image " + name + ": " + why);
  };
  int64_t width = -1, height = -1;
  for (size_t at = 8; at + 12 <= size;) {
    const uint32_t length = big_endian_u32(data + at);
    if (length > size - at - 12) throw fail("truncated PNG (a chunk runs past the end of the data)");
    const std::string type(reinterpret_cast<const char*>(data + at + 4), 4);
    const auto crc = static_cast<uint32_t>(crc32(0L, data + at + 4, length + 4));
    if (crc != big_endian_u32(data + at + 8 + length))
      throw fail("PNG chunk '" + type + "' at byte " + std::to_string(at) +
                 " fails its CRC check (corrupt file)");
    if (type == "IHDR" && length >= 8) {
      width = big_endian_u32(data + at + 8);
      height = big_endian_u32(data + at + 12);
    }
    if (type == "IEND") return {width, height};
    at += 12 + size_t{length};
  }
  throw fail("truncated PNG (no IEND chunk)");
}
#endif

// The one decoder behind decode_image and decode_image_data: PNG chunk checks, the pixel limit
// from the header's claimed size (before any pixel memory is allocated), then stb_image.
Image decode(const uint8_t* data, size_t size, const std::string& name, int64_t max_pixels) {
  if (max_pixels < 0)
    throw InputError("max_pixels must be >= 0 (0: no limit), got " + std::to_string(max_pixels));
  if (size == 0) throw InputError("cannot decode image " + name + ": no data (0 bytes)");
  if (size > static_cast<size_t>(std::numeric_limits<int>::max()))
    throw InputError("cannot decode image " + name + ": " + std::to_string(size) +
                     " bytes, more than stb_image reads");
#if defined(REPMLP_RT_WITH_STB)
  const int length = static_cast<int>(size);
  auto failure = [&name]() {
    const char* reason = stbi_failure_reason();
    return InputError("cannot decode image " + name + ": " + (reason ? reason : "unknown error"));
  };
  int64_t width = -1, height = -1;
#if defined(REPMLP_RT_WITH_ZLIB)
  std::tie(width, height) = check_png_chunks(data, size, name);
#endif
  if (width < 0) {
    int w = 0, h = 0, channels = 0;
    if (!stbi_info_from_memory(data, length, &w, &h, &channels)) throw failure();
    width = w;
    height = h;
  }
  if (max_pixels > 0 && width * height > max_pixels)
    throw InputError("image " + name + " claims " + std::to_string(width) + " x " +
                     std::to_string(height) + " = " + std::to_string(width * height) +
                     " pixels, over the limit of " + std::to_string(max_pixels) +
                     " (raise it with --max-image-pixels / max_pixels if the file is trusted)");
  int w = 0, h = 0, channels = 0;
  stbi_uc* pixels = stbi_load_from_memory(data, length, &w, &h, &channels, 3);
  if (!pixels) throw failure();
  Image image;
  image.height = h;
  image.width = w;
  image.rgb.assign(pixels, pixels + static_cast<size_t>(w) * h * 3);
  stbi_image_free(pixels);
  return image;
#else
  (void)data;
  throw InputError("cannot decode image " + name +
                   ": this build has no image decoding (built with -DREPMLP_WITH_IMAGES=OFF)");
#endif
}

}  // namespace

bool has_image_decoding() noexcept {
#if defined(REPMLP_RT_WITH_STB)
  return true;
#else
  return false;
#endif
}

Image decode_image(const std::string& path, int64_t max_pixels) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec))
    throw InputError("cannot read image '" + path + "': is a directory, expected a file");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError("cannot read image '" + path + "': no such file or not readable");
  // One read into memory: the header checks and the decoding see the same bytes.
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return decode(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "'" + path + "'",
                max_pixels);
}

Image decode_image_data(const uint8_t* data, size_t size, const std::string& name,
                        int64_t max_pixels) {
  return decode(data, size, name, max_pixels);
}

}  // namespace repmlp_rt
