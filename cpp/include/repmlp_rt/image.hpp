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

// True when the build found stb_image (libstb-dev).
bool has_image_decoding() noexcept;

// Decodes a PNG/JPEG/BMP/... file to RGB. Throws InputError when the file cannot be read or
// decoded, or when this build has no image decoding.
Image decode_image(const std::string& path);

// Decodes an encoded image held in memory (e.g. an HTTP request body); `name` only labels
// the error message. Throws InputError as decode_image does.
Image decode_image_data(const uint8_t* data, size_t size, const std::string& name = "<memory>");

}  // namespace repmlp_rt
