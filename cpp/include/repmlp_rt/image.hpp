// Image decoding (stb_image; only -DREPMLP_WITH_IMAGES=OFF builds go without) into RGB uint8 HWC pixels.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "repmlp_rt/errors.hpp"

namespace repmlp_rt {

struct Image {
  int64_t height = 0;
  int64_t width = 0;
  std::vector<uint8_t> rgb;  // height * width * 3 bytes, row-major HWC
};

// Largest width x height that decode_image accepts unless told otherwise: 2^26 (about 67
// megapixels, 192 MiB of RGB), above any camera photo (a 48 MP phone image is 8000 x 6000).
// The header's claimed size is checked before any pixel memory is allocated, so a small file
// claiming a huge image (a decompression bomb) costs nothing.
inline constexpr int64_t kDefaultMaxImagePixels = int64_t{1} << 26;

// True when the build found stb_image (libstb-dev).
bool has_image_decoding() noexcept;

// Decodes a PNG/JPEG/BMP/... file to RGB. Throws InputError when the file cannot be read or
// decoded, when its header claims more than max_pixels pixels (0: no limit of ours; stb_image
// still refuses sides above 2^24), or when this build has no image decoding.
Image decode_image(const std::string& path, int64_t max_pixels = kDefaultMaxImagePixels);

// Decodes an encoded image held in memory (e.g. an HTTP request body); `name` only labels
// the error message. Throws InputError as decode_image does, with the same pixel limit.
Image decode_image_data(const uint8_t* data, size_t size, const std::string& name = "<memory>",
                        int64_t max_pixels = kDefaultMaxImagePixels);

}  // namespace repmlp_rt
