// A small, strict reader and writer for float32 .npy files (NumPy format 1.0/2.0/3.0).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "repmlp_rt/errors.hpp"

namespace repmlp_rt {

struct NpyArray {
  std::vector<int64_t> shape;
  std::vector<float> data;  // C order
};

// Reads a little-endian float32 ('<f4'), C-order .npy file. Anything else (another dtype,
// fortran_order, a truncated or oversized file, a malformed header) throws InputError.
NpyArray read_npy_f32(const std::string& path);

// Writes float32 C-order data as .npy (format 1.0) atomically: a temporary file in the same
// folder, then rename. Throws std::runtime_error on I/O failure.
void write_npy_f32(const std::string& path, const std::vector<int64_t>& shape, const float* data);

}  // namespace repmlp_rt
