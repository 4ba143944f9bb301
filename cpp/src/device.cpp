// Device handling of device.hpp, and the build and CPU facts of runtime.hpp.
#include "device.hpp"

#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <ATen/cpu/Utils.h>
#include <c10/util/Exception.h>

#ifdef REPMLP_RT_WITH_CUDA
// Device-generic c10 stream API: no CUDA toolkit headers are needed to build the CUDA path,
// the CUDA implementations are registered by libtorch_cuda at load time.
#include <c10/core/DeviceGuard.h>
#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#endif

#include <optional>
#include <utility>

#include "messages.hpp"
#include "repmlp_rt/errors.hpp"
#include "repmlp_rt/runtime.hpp"

namespace repmlp_rt {

bool built_with_cuda() noexcept {
#ifdef REPMLP_RT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

CpuFeatures cpu_features() {
  CpuFeatures features;
  features.kernel_level = at::get_cpu_capability();
  const auto found = at::cpu::get_cpu_capabilities();
  for (const char* name : {"avx2", "fma3", "avx512_f", "avx512_vnni", "avx_vnni", "avx512_bf16",
                           "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8"}) {
    auto it = found.find(name);
    if (it != found.end() && it->second.isBool() && it->second.toBool())
      features.isa.emplace_back(name);
  }
  auto it = found.find("cpu_name");
  if (it != found.end() && it->second.isString()) features.name = it->second.toStringRef();
  return features;
}

namespace detail {

c10::Device parse_device(const std::string& text) {
  const std::string invalid = "invalid device '" + text + "': expected 'cpu', 'cuda' or 'cuda:N'";
  std::optional<c10::Device> device;
  try {
    device.emplace(text);
  } catch (const c10::Error&) {
    throw InputError(invalid);
  }
  if (device->is_cpu()) {
    if (device->has_index() && device->index() != 0) throw InputError(invalid);
    return c10::Device(c10::kCPU);
  }
  if (!device->is_cuda()) throw InputError(invalid);
#ifdef REPMLP_RT_WITH_CUDA
  c10::DeviceIndex count = 0;
  try {
    count = c10::impl::VirtualGuardImpl(c10::kCUDA).deviceCount();
  } catch (const c10::Error& e) {
    throw DeviceError("device '" + text + "': CUDA is not available: " + clean_message(e));
  }
  if (count <= 0) throw DeviceError("device '" + text + "': CUDA is not available (no GPU found)");
  const c10::DeviceIndex index = device->has_index() ? device->index() : 0;
  if (index >= count)
    throw DeviceError("device '" + text + "' does not exist: " + std::to_string(count) +
                      " CUDA device(s) visible");
  return c10::Device(c10::kCUDA, index);
#else
  throw DeviceError("device '" + text +
                    "': this build of repmlp_rt has no CUDA support (built against a CPU-only "
                    "torch)");
#endif
}

void synchronize(c10::Device device) {
#ifdef REPMLP_RT_WITH_CUDA
  if (!device.is_cpu()) c10::impl::VirtualGuardImpl(device.type()).synchronizeDevice(device.index());
#else
  (void)device;
#endif
}

namespace {

std::vector<at::Tensor> run_on_cpu(const at::Tensor& input, const DeviceCall& call) {
  std::vector<at::Tensor> outputs = call(input.device().is_cpu() ? input : input.to(at::kCPU));
  for (at::Tensor& out : outputs) {
    if (out.scalar_type() != at::kFloat) out = out.to(at::kFloat);
    out = out.contiguous();
  }
  return outputs;
}

#ifdef REPMLP_RT_WITH_CUDA
// The stream this thread's calls on `device` run on: taken from torch's pool once per (thread,
// device) and then reused. Concurrent callers on different threads do not serialize on one
// stream, and one thread's calls keep reusing the same cached memory (the CUDA caching
// allocator reuses a freed block only on the stream it was allocated on; a fresh pool stream
// per call would cycle through all 32 of the pool's streams, each with its own blocks).
c10::Stream thread_stream(const c10::impl::VirtualGuardImpl& guard_impl, c10::Device device) {
  thread_local std::vector<std::pair<c10::Device, c10::Stream>> streams;
  for (const auto& [owner, stream] : streams)
    if (owner == device) return stream;
  streams.emplace_back(device, guard_impl.getStreamFromGlobalPool(device, /*isHighPriority=*/false));
  return streams.back().second;
}

std::vector<at::Tensor> run_on_stream(c10::Device device, c10::ScalarType compute_dtype,
                                      const at::Tensor& input, const DeviceCall& call,
                                      const c10::Stream& stream) {
  at::Tensor on_device;
  if (input.device().is_cpu()) {
    // Pinned staging buffer (from torch's caching host allocator) for an async H2D copy.
    at::Tensor staging = input.contiguous();
    if (!staging.is_pinned()) {
      at::Tensor pinned = at::empty(staging.sizes(), staging.options().pinned_memory(true));
      pinned.copy_(staging);
      staging = pinned;
    }
    on_device = staging.to(staging.options().device(device), /*non_blocking=*/true);
  } else {
    on_device = input.to(input.options().device(device), /*non_blocking=*/true);
  }
  // float16/bfloat16 artifacts: cast on the GPU (the copy above moved the smaller of the two
  // only when the caller already passed the compute dtype).
  if (on_device.is_floating_point() && on_device.scalar_type() != compute_dtype)
    on_device = on_device.to(compute_dtype);

  std::vector<at::Tensor> outputs = call(on_device);
  for (at::Tensor& out : outputs) {
    if (out.scalar_type() != at::kFloat) out = out.to(at::kFloat);
    at::Tensor host =
        at::empty(out.sizes(), out.options().device(c10::kCPU).pinned_memory(true));
    host.copy_(out, /*non_blocking=*/true);
    out = host;
  }
  stream.synchronize();  // the results must be complete before the CPU reads them
  return outputs;
}

std::vector<at::Tensor> run_on_cuda(c10::Device device, c10::ScalarType compute_dtype,
                                    const at::Tensor& input, const DeviceCall& call) {
  c10::DeviceGuard device_guard(device);
  c10::impl::VirtualGuardImpl guard_impl(device.type());
  c10::Stream stream = thread_stream(guard_impl, device);
  if (input.device().type() == device.type()) {
    // A device input may still be being written on the caller's current stream, which the
    // (non-blocking) pool stream does not wait for by itself.
    c10::Event ready(device.type());
    ready.record(guard_impl.getStream(input.device()));
    ready.block(stream);
  }
  c10::StreamGuard stream_guard(stream);
  try {
    return run_on_stream(device, compute_dtype, input, call, stream);
  } catch (...) {
    // Work already queued (e.g. a copy from the caller's pinned buffer) must not outlive the
    // call that failed.
    stream.synchronize();
    throw;
  }
}
#endif

}  // namespace

std::vector<at::Tensor> run_on_device(c10::Device device, c10::ScalarType compute_dtype,
                                      const at::Tensor& input, const DeviceCall& call) {
#ifdef REPMLP_RT_WITH_CUDA
  if (device.is_cuda()) return run_on_cuda(device, compute_dtype, input, call);
#endif
  (void)device;
  (void)compute_dtype;
  return run_on_cpu(input, call);
}

}  // namespace detail
}  // namespace repmlp_rt
