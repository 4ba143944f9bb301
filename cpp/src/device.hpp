// Devices for repmlp_rt::Runtime (internal, not installed): parsing the option, and running a
// model's call on its device with the input and outputs moved there and back (on CUDA, on a
// stream of the calling thread's own).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <functional>
#include <string>
#include <vector>

namespace repmlp_rt::detail {

// "cpu", "cuda" or "cuda:N" -> the device; throws InputError for another text, DeviceError
// when this build or machine cannot use it.
c10::Device parse_device(const std::string& text);

// Waits for the work queued on `device` (loading writes the weights on its current stream).
// Nothing to do on CPU.
void synchronize(c10::Device device);

// One call of a model: takes the input already on the model's device, returns its outputs.
using DeviceCall = std::function<std::vector<at::Tensor>(const at::Tensor& input)>;

// Runs `call` on `device` for an input on any device: the input is moved there (and a float
// one cast to `compute_dtype` on a GPU); the outputs come back as contiguous float32 CPU
// tensors. Throws what `call` throws.
std::vector<at::Tensor> run_on_device(c10::Device device, c10::ScalarType compute_dtype,
                                      const at::Tensor& input, const DeviceCall& call);

}  // namespace repmlp_rt::detail
