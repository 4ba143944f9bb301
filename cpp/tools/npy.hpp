// A small, strict reader and writer for float32 .npy files (NumPy format 1.0/2.0/3.0), and an
// .npz writer: repmlp_infer's own (not part of the installed library).
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

// One named array of an .npz file; `data` (C order, float32) must outlive the write.
struct NpzEntry {
  std::string name;  // the key numpy.load gives it (stored as "<name>.npy")
  std::vector<int64_t> shape;
  const float* data = nullptr;
};

// Writes arrays as numpy.savez does (a zip of .npy members, stored uncompressed), atomically
// as write_npy_f32. Names must be unique, non-empty and free of '/'; a member over 4 GiB (no
// ZIP64 here) throws InputError. Throws std::runtime_error on I/O failure.
void write_npz_f32(const std::string& path, const std::vector<NpzEntry>& entries);

}  // namespace repmlp_rt
