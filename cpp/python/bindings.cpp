// pybind11 binding of the repmlp_rt core: repmlp_rt._runtime. Binds and converts only; every
// check and the uint8-vs-float dispatch live in the core, whose InputError becomes ValueError.
// Inputs without a copy where the memory allows it: numpy arrays (contiguous, aligned, native
// byte order) are viewed with at::from_blob, anything else is copied to a fresh C-order array
// first; torch tensors arrive as DLPack capsules (x.__dlpack__()) and are viewed in place on
// their device, so no torch_python link is needed. numpy in gives numpy out, a DLPack capsule
// in gives a DLPack capsule out. The GIL is released while the model runs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <ATen/ATen.h>
#include <ATen/DLConvertor.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "repmlp_rt/errors.hpp"
#include "repmlp_rt/image.hpp"
#include "repmlp_rt/runtime.hpp"

namespace py = pybind11;
using namespace pybind11::literals;

namespace {

// The torch dtype of a numpy dtype of the same kind and size. Any numeric dtype goes
// through: the core says which ones it takes.
std::optional<at::ScalarType> scalar_type_of(const py::dtype& dtype) {
  struct Known {
    char kind;
    py::ssize_t size;
    at::ScalarType type;
  };
  static constexpr Known known[] = {
      {'f', 2, at::kHalf}, {'f', 4, at::kFloat}, {'f', 8, at::kDouble}, {'u', 1, at::kByte},
      {'i', 1, at::kChar}, {'i', 2, at::kShort}, {'i', 4, at::kInt},    {'i', 8, at::kLong},
      {'b', 1, at::kBool}};
  for (const Known& k : known)
    if (dtype.kind() == k.kind && dtype.itemsize() == k.size) return k.type;
  return std::nullopt;
}

// A CPU at::Tensor viewing a numpy array's memory. `holder` keeps the array (or the copy made
// here) alive for as long as the tensor is used.
at::Tensor tensor_view(const py::array& input, py::array& holder) {
  const auto type = scalar_type_of(input.dtype());
  if (!type)
    throw repmlp_rt::InputError(
        "expected a float32 NCHW array or a uint8 NHWC image array, got dtype " +
        py::str(input.dtype()).cast<std::string>());
  holder = input;
  const bool native_order = input.dtype().byteorder() != '>';
  const bool c_order = (input.flags() & py::array::c_style) != 0;
  const bool aligned = reinterpret_cast<std::uintptr_t>(input.data()) % input.itemsize() == 0;
  if (!native_order || !c_order || !aligned) {
    // numpy makes a fresh, aligned, C-order, native-order copy.
    holder = input.attr("astype")(input.dtype().attr("newbyteorder")("="), "order"_a = "C");
  }
  std::vector<int64_t> sizes(holder.shape(), holder.shape() + holder.ndim());
  // numpy's data pointer may be read-only; the runtime never writes to its inputs.
  void* data = const_cast<void*>(holder.data());
  return at::from_blob(data, sizes, at::TensorOptions().dtype(*type));
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

// The tensor a DLPack capsule ("dltensor", from x.__dlpack__()) describes, on its device,
// without a copy. The capsule is marked used, as the protocol asks: the tensor now owns it.
at::Tensor from_dlpack(py::capsule capsule) {
  if (std::string(capsule.name() ? capsule.name() : "") != "dltensor")
    throw repmlp_rt::InputError("expected an unused DLPack capsule named 'dltensor', got '" +
                                std::string(capsule.name() ? capsule.name() : "") + "'");
  auto* managed = capsule.get_pointer<DLManagedTensor>();
  at::Tensor tensor = at::fromDLPack(managed);
  capsule.set_name("used_dltensor");
  return tensor;
}

// A DLPack capsule owning `tensor` (torch.from_dlpack takes it without a copy).
py::capsule to_dlpack(const at::Tensor& tensor) {
  DLManagedTensor* managed = at::toDLPack(tensor);
  return py::capsule(managed, "dltensor", [](PyObject* object) {
    // Called when the capsule dies; a consumer that took it renamed it "used_dltensor".
    if (PyCapsule_IsValid(object, "dltensor")) {
      auto* unused = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(object, "dltensor"));
      if (unused->deleter) unused->deleter(unused);
    }
  });
}

// The input as a tensor, whichever way it came.
struct Input {
  at::Tensor tensor;
  py::array holder;  // a numpy input, or numpy's copy of it, kept alive during the call
  bool dlpack = false;
};

Input to_input(const py::object& x) {
  Input input;
  if (py::isinstance<py::capsule>(x)) {
    input.tensor = from_dlpack(py::reinterpret_borrow<py::capsule>(x));
    input.dlpack = true;
  } else if (py::isinstance<py::array>(x)) {
    input.tensor = tensor_view(py::reinterpret_borrow<py::array>(x), input.holder);
  } else {
    throw py::type_error("expected a numpy.ndarray or a DLPack capsule, got " +
                         py::str(py::type::of(x).attr("__name__")).cast<std::string>());
  }
  return input;
}

py::object to_output(const at::Tensor& result, const Input& input) {
  if (input.dlpack) return to_dlpack(result);
  return to_numpy(result);
}

// Runs one of Runtime's tensor -> logits methods without the GIL.
template <at::Tensor (repmlp_rt::Runtime::*Method)(const at::Tensor&) const>
py::object call_without_gil(const repmlp_rt::Runtime& runtime, const py::object& x) {
  Input input = to_input(x);
  at::Tensor logits;
  {
    py::gil_scoped_release release;
    logits = (runtime.*Method)(input.tensor);
  }
  return to_output(logits, input);
}

// Every output as (name, array) pairs in the artifact's order, each of the input's kind.
py::list infer_outputs(const repmlp_rt::Runtime& runtime, const py::object& x) {
  Input input = to_input(x);
  repmlp_rt::NamedOutputs outputs;
  {
    py::gil_scoped_release release;
    outputs = runtime.infer_outputs(input.tensor);
  }
  py::list named;
  for (const auto& [name, tensor] : outputs) named.append(py::make_tuple(name, to_output(tensor, input)));
  return named;
}

void PybindErrors(py::module_& m) {
  py::register_exception<repmlp_rt::ArtifactError>(m, "ArtifactError", PyExc_RuntimeError);
  py::register_exception<repmlp_rt::InputError>(m, "InputError", PyExc_ValueError);
  py::register_exception<repmlp_rt::DeviceError>(m, "DeviceError", PyExc_RuntimeError);
}

// A (H, W, 3) uint8 array sharing the decoded buffer; the capsule keeps the Image alive.
py::array_t<uint8_t> image_array(const std::shared_ptr<repmlp_rt::Image>& image) {
  auto* owner = new std::shared_ptr<repmlp_rt::Image>(image);
  py::capsule base(owner, [](void* p) { delete static_cast<std::shared_ptr<repmlp_rt::Image>*>(p); });
  return py::array_t<uint8_t>({image->height, image->width, int64_t{3}}, image->rgb.data(), base);
}

void PybindImage(py::module_& m) {
  m.def("has_image_decoding", &repmlp_rt::has_image_decoding,
        "True when this build can decode image files (stb_image).");
  m.def(
      "decode_image",
      [](const std::string& path, int64_t max_pixels) {
        auto image = std::make_shared<repmlp_rt::Image>();
        {
          py::gil_scoped_release release;
          *image = repmlp_rt::decode_image(path, max_pixels);
        }
        return image_array(image);
      },
      "path"_a, "max_pixels"_a = repmlp_rt::kDefaultMaxImagePixels,
      "Decodes an image file to a uint8 (H, W, 3) RGB array, as repmlp_infer does. Files whose\n"
      "header claims more than max_pixels pixels (0: no limit) raise InputError before decoding.");
  m.attr("DEFAULT_MAX_IMAGE_PIXELS") = repmlp_rt::kDefaultMaxImagePixels;
  m.def(
      "decode_image_bytes",
      [](const py::bytes& data, const std::string& name, int64_t max_pixels) {
        char* buffer = nullptr;
        Py_ssize_t size = 0;
        if (PyBytes_AsStringAndSize(data.ptr(), &buffer, &size) != 0) throw py::error_already_set();
        auto image = std::make_shared<repmlp_rt::Image>();
        {
          py::gil_scoped_release release;  // `data` stays referenced by the caller's argument
          *image = repmlp_rt::decode_image_data(reinterpret_cast<const uint8_t*>(buffer),
                                                static_cast<size_t>(size), name, max_pixels);
        }
        return image_array(image);
      },
      "data"_a, "name"_a = "<memory>", "max_pixels"_a = repmlp_rt::kDefaultMaxImagePixels,
      "Decodes an encoded image (PNG/JPEG/... bytes) to a uint8 (H, W, 3) RGB array with the same "
      "decoder and pixel limit as decode_image; `name` labels the error message.");
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
      .def(py::init([](const std::string& path, const std::string& device,
                       std::optional<int64_t> threads, std::optional<int64_t> warmup,
                       int64_t warmup_batch, bool optimize, bool verify, bool verify_digest,
                       const std::string& gemm, bool keep_freed_memory) {
             repmlp_rt::RuntimeOptions options;
             options.device = device;
             options.threads = threads;
             options.warmup = warmup;
             options.warmup_batch = warmup_batch;
             options.optimize = optimize;
             options.verify = verify;
             options.verify_digest = verify_digest;
             options.gemm = gemm;
             options.keep_freed_memory = keep_freed_memory;
             py::gil_scoped_release release;
             return std::make_unique<Runtime>(path, options);
           }),
           "path"_a, "device"_a = "cpu", "threads"_a = py::none(), "warmup"_a = py::none(),
           "warmup_batch"_a = 1, "optimize"_a = false, "verify"_a = true, "verify_digest"_a = true,
           "gemm"_a = "auto", "keep_freed_memory"_a = true)
      .def("infer", &call_without_gil<&Runtime::infer>, "x"_a,
           "uint8 NHWC images or a normalized float NCHW batch -> float32 logits.")
      .def("infer_normalized", &call_without_gil<&Runtime::infer_normalized>, "x"_a,
           "Normalized float NCHW batch -> float32 logits (N, num_classes).")
      .def("infer_outputs", &infer_outputs, "x"_a,
           "Either kind of input -> [(name, array), ...]: every output of the artifact, in order.")
      .def("infer_images", &call_without_gil<&Runtime::infer_images>, "images"_a,
           "uint8 NHWC RGB images -> float32 logits, via the artifact's preprocessing.")
      .def(
          "classify",
          [](const Runtime& runtime, const py::object& x, std::optional<int64_t> topk) {
            Input input = to_input(x);
            std::pair<at::Tensor, at::Tensor> result;
            {
              py::gil_scoped_release release;
              result = runtime.classify(input.tensor, topk);
            }
            return py::make_tuple(to_output(result.first, input), to_output(result.second, input));
          },
          "x"_a, "topk"_a = py::none(),
          "uint8 NHWC images or a float NCHW batch -> (softmax scores, int64 indices) of the\n"
          "top k (None: min(5, num_classes)).")
      .def_property_readonly("path", &Runtime::path)
      .def_property_readonly("device", &Runtime::device)
      .def_property_readonly("manifest_json", &Runtime::manifest_json)
      .def_property_readonly("input_shape", &Runtime::input_shape)
      .def_property_readonly("labels", &Runtime::labels)
      .def_property_readonly("compute_dtype", &Runtime::compute_dtype)
      .def_property_readonly("format_version", &Runtime::format_version)
      .def_property_readonly("num_classes", &Runtime::num_classes)
      .def_property_readonly("output_kind", &Runtime::output_kind)
      .def_property_readonly("output_names", &Runtime::output_names)
      .def_property_readonly("default_topk", &Runtime::default_topk)
      .def_property_readonly("verified", &Runtime::verified)
      .def_property_readonly("self_check_error", &Runtime::self_check_error)
      .def_property_readonly("self_check_tolerance", &Runtime::self_check_tolerance)
      .def_property_readonly("gemm_plan", &Runtime::gemm_plan);
}

}  // namespace

PYBIND11_MODULE(_runtime, m) {
  m.doc() = "Binding of the repmlp_rt C++ runtime (use the repmlp_rt package, not this module).";
  PybindErrors(m);
  PybindImage(m);
  PybindRuntime(m);
}
