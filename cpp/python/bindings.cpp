// pybind11 binding of the repmlp_rt core: repmlp_rt._runtime. Binds only; the logic lives in
// the core library. Takes numpy arrays (no torch_python dependency): contiguous, aligned,
// native-order arrays are wrapped with at::from_blob without a copy; anything else is copied
// to a fresh C-contiguous array first. The GIL is released while the model runs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <ATen/ATen.h>

#include <memory>
#include <string>

#include "repmlp_rt/errors.hpp"
#include "repmlp_rt/image.hpp"
#include "repmlp_rt/runtime.hpp"

namespace py = pybind11;
using namespace pybind11::literals;

namespace {

// A CPU at::Tensor viewing a numpy array's memory. `holder` keeps the array (or the copy made
// here) alive for as long as the tensor is used.
at::Tensor tensor_view(const py::array& input, py::array& holder) {
  holder = input;
  const py::dtype dtype = input.dtype();
  at::ScalarType type;
  if (dtype.kind() == 'f' && dtype.itemsize() == 4) {
    type = at::kFloat;
  } else if (dtype.kind() == 'f' && dtype.itemsize() == 2) {
    type = at::kHalf;
  } else if (dtype.kind() == 'u' && dtype.itemsize() == 1) {
    type = at::kByte;
  } else {
    throw repmlp_rt::InputError(
        "expected a float32 NCHW array or a uint8 NHWC image array, got dtype " +
        py::str(dtype).cast<std::string>());
  }
  const auto flags = input.flags();
  const bool native_order = dtype.byteorder() != '>';
  const bool usable = native_order && (flags & py::array::c_style) &&
                      (flags & py::detail::npy_api::NPY_ARRAY_ALIGNED_);
  if (!usable) {
    // A fresh, aligned, C-contiguous, native-order copy.
    py::object numpy = py::module_::import("numpy");
    py::object native = dtype.attr("newbyteorder")("=");
    holder = numpy.attr("array")(input, "dtype"_a = native, "order"_a = "C", "copy"_a = true);
  }
  std::vector<int64_t> sizes(holder.shape(), holder.shape() + holder.ndim());
  // numpy's data pointer may be read-only; the runtime never writes to its inputs.
  void* data = const_cast<void*>(holder.data());
  return at::from_blob(data, sizes, at::TensorOptions().dtype(type));
}

// Wraps a CPU tensor as a numpy array that owns a reference to it (no copy).
py::array to_numpy(const at::Tensor& result) {
  at::Tensor tensor = result.contiguous();
  py::dtype dtype;
  if (tensor.scalar_type() == at::kFloat) {
    dtype = py::dtype::of<float>();
  } else if (tensor.scalar_type() == at::kLong) {
    dtype = py::dtype::of<int64_t>();
  } else {
    tensor = tensor.to(at::kFloat);
    dtype = py::dtype::of<float>();
  }
  auto* owner = new at::Tensor(tensor);
  py::capsule base(owner, [](void* p) { delete static_cast<at::Tensor*>(p); });
  std::vector<py::ssize_t> shape(tensor.sizes().begin(), tensor.sizes().end());
  std::vector<py::ssize_t> strides;
  for (int64_t stride : tensor.strides()) strides.push_back(stride * tensor.element_size());
  return py::array(dtype, shape, strides, tensor.data_ptr(), base);
}

// Runs one of Runtime's array -> logits methods on a numpy array, without the GIL.
template <at::Tensor (repmlp_rt::Runtime::*Method)(const at::Tensor&) const>
py::array call_without_gil(const repmlp_rt::Runtime& runtime, const py::array& input) {
  py::array holder;
  at::Tensor x = tensor_view(input, holder);
  at::Tensor logits;
  {
    py::gil_scoped_release release;
    logits = (runtime.*Method)(x);
  }
  return to_numpy(logits);
}

void PybindErrors(py::module_& m) {
  py::register_exception<repmlp_rt::ArtifactError>(m, "ArtifactError", PyExc_RuntimeError);
  py::register_exception<repmlp_rt::InputError>(m, "InputError", PyExc_ValueError);
  py::register_exception<repmlp_rt::DeviceError>(m, "DeviceError", PyExc_RuntimeError);
}

void PybindImage(py::module_& m) {
  m.def("has_image_decoding", &repmlp_rt::has_image_decoding,
        "True when this build can decode image files (stb_image).");
  m.def(
      "decode_image",
      [](const std::string& path) {
        auto image = std::make_shared<repmlp_rt::Image>();
        {
          py::gil_scoped_release release;
          *image = repmlp_rt::decode_image(path);
        }
        // The array shares the decoded buffer; the capsule keeps the Image alive.
        auto* owner = new std::shared_ptr<repmlp_rt::Image>(image);
        py::capsule base(owner, [](void* p) { delete static_cast<std::shared_ptr<repmlp_rt::Image>*>(p); });
        return py::array_t<uint8_t>({image->height, image->width, int64_t{3}}, image->rgb.data(), base);
      },
      "path"_a, "Decodes an image file to a uint8 (H, W, 3) RGB array, as repmlp_infer does.");
}

void PybindRuntime(py::module_& m) {
  using repmlp_rt::Runtime;
  m.attr("FORMAT_VERSION") = repmlp_rt::kFormatVersion;
  m.def("built_with_cuda", &repmlp_rt::built_with_cuda,
        "True when this build was compiled against a CUDA-enabled torch.");
  m.def(
      "cpu_features",
      [] {
        const repmlp_rt::CpuFeatures cpu = repmlp_rt::cpu_features();
        py::dict out;
        out["name"] = cpu.name;
        out["kernel_level"] = cpu.kernel_level;
        out["isa"] = cpu.isa;
        return out;
      },
      "The CPU as torch's kernels see it: name, dispatch level and the ISA flags that decide "
      "which artifact dtype runs fastest (docs/PERFORMANCE.md).");

  py::class_<Runtime>(m, "Runtime")
      .def(py::init([](const std::string& path, const std::string& device, int threads,
                       std::optional<int> warmup, int warmup_batch, bool optimize) {
             repmlp_rt::RuntimeOptions options;
             options.device = device;
             options.threads = threads;
             options.warmup = warmup;
             options.warmup_batch = warmup_batch;
             options.optimize = optimize;
             py::gil_scoped_release release;
             return std::make_unique<Runtime>(path, options);
           }),
           "path"_a, "device"_a = "cpu", "threads"_a = 0, "warmup"_a = py::none(), "warmup_batch"_a = 1,
           "optimize"_a = false)
      .def("infer", &call_without_gil<&Runtime::infer>, "x"_a,
           "Normalized float32 NCHW array -> float32 logits (N, num_classes).")
      .def("infer_images", &call_without_gil<&Runtime::infer_images>, "images"_a,
           "uint8 NHWC RGB images -> float32 logits, via the artifact's preprocessing.")
      .def(
          "classify",
          [](const Runtime& runtime, const py::array& input, std::optional<int64_t> topk) {
            py::array holder;
            at::Tensor x = tensor_view(input, holder);
            std::pair<at::Tensor, at::Tensor> result;
            {
              py::gil_scoped_release release;
              result = runtime.classify(x, topk);
            }
            return py::make_tuple(to_numpy(result.first), to_numpy(result.second));
          },
          "x"_a, "topk"_a = py::none(),
          "uint8 NHWC images (or float32 NCHW) -> (softmax scores, int64 indices) of the top k\n"
          "(None: min(5, num_classes)).")
      .def_property_readonly("path", &Runtime::path)
      .def_property_readonly("device", &Runtime::device)
      .def_property_readonly("manifest_json", &Runtime::manifest_json)
      .def_property_readonly("input_shape", &Runtime::input_shape)
      .def_property_readonly("labels", &Runtime::labels)
      .def_property_readonly("compute_dtype", &Runtime::compute_dtype)
      .def_property_readonly("format_version", &Runtime::format_version)
      .def_property_readonly("num_classes", &Runtime::num_classes)
      .def_property_readonly("default_topk", &Runtime::default_topk);
}

}  // namespace

PYBIND11_MODULE(_runtime, m) {
  m.doc() = "Binding of the repmlp_rt C++ runtime (use the repmlp_rt package, not this module).";
  PybindErrors(m);
  PybindImage(m);
  PybindRuntime(m);
}
