// Image decoding with stb_image. Built with -DREPMLP_WITH_IMAGES=OFF, the decoders throw.
#include "repmlp_rt/image.hpp"

#include <filesystem>
#include <fstream>
#include <limits>

#if defined(REPMLP_RT_WITH_STB)
#if defined(REPMLP_RT_STB_HEADER_ONLY)
// Only the header was found (e.g. unpacked with cpp/scripts/unpack_header_deps.sh): compile
// the implementation here, with internal linkage.
#define STB_IMAGE_STATIC
#define STB_IMAGE_IMPLEMENTATION
#endif
#include <stb/stb_image.h>
#endif

namespace repmlp_rt {

#if defined(REPMLP_RT_WITH_STB)
namespace {

// Copies stb's pixels into an Image and frees them; a null result is a decoding failure.
Image take_pixels(stbi_uc* pixels, int width, int height, const std::string& name) {
  if (!pixels) {
    const char* reason = stbi_failure_reason();
    throw InputError("cannot decode image " + name + ": " + (reason ? reason : "unknown error"));
  }
  Image image;
  image.height = height;
  image.width = width;
  image.rgb.assign(pixels, pixels + static_cast<size_t>(width) * height * 3);
  stbi_image_free(pixels);
  return image;
}

}  // namespace
#endif

bool has_image_decoding() noexcept {
#if defined(REPMLP_RT_WITH_STB)
  return true;
#else
  return false;
#endif
}

Image decode_image(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec))
    throw InputError("cannot read image '" + path + "': is a directory, expected a file");
  {
    std::ifstream probe(path, std::ios::binary);
    if (!probe) throw InputError("cannot read image '" + path + "': no such file or not readable");
  }
#if defined(REPMLP_RT_WITH_STB)
  int width = 0, height = 0, channels = 0;
  stbi_uc* pixels = stbi_load(path.c_str(), &width, &height, &channels, 3);
  return take_pixels(pixels, width, height, "'" + path + "'");
#else
  throw InputError("cannot decode image '" + path +
                   "': this build has no image decoding (built with -DREPMLP_WITH_IMAGES=OFF)");
#endif
}

Image decode_image_data(const uint8_t* data, size_t size, const std::string& name) {
  if (size == 0) throw InputError("cannot decode image " + name + ": no data (0 bytes)");
  if (size > static_cast<size_t>(std::numeric_limits<int>::max()))
    throw InputError("cannot decode image " + name + ": " + std::to_string(size) + " bytes, more than stb_image reads");
#if defined(REPMLP_RT_WITH_STB)
  int width = 0, height = 0, channels = 0;
  stbi_uc* pixels = stbi_load_from_memory(data, static_cast<int>(size), &width, &height, &channels, 3);
  return take_pixels(pixels, width, height, name);
#else
  (void)data;
  throw InputError("cannot decode image " + name +
                   ": this build has no image decoding (built with -DREPMLP_WITH_IMAGES=OFF)");
#endif
}

}  // namespace repmlp_rt
