// Exceptions thrown by the repmlp_rt core library. Nothing in the library calls abort().
#pragma once

#include <stdexcept>
#include <string>

namespace repmlp_rt {

// The artifact file is missing, truncated, corrupt, not a RepMLP artifact, or has an
// unsupported format version / manifest.
class ArtifactError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A caller mistake: wrong rank, channels, H, W, dtype, an empty batch, a bad option value,
// an unreadable image or .npy file. Messages name what was expected and what was given.
class InputError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// The requested device cannot be used (no CUDA in this build, no such GPU).
class DeviceError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace repmlp_rt
