// pybind11 module fastgen._C. Tensors arrive as plain tuples
// (data_ptr: int, dtype: str, sizes: 4 ints, strides: 4 ints in elements), so the module
// needs no torch headers and one binary serves every torch version; fastgen/_cuda.py builds
// the tuples from torch tensors.

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "common.h"

#ifndef FASTGEN_CUDA_ARCHS_STR
#define FASTGEN_CUDA_ARCHS_STR "unknown"
#endif

namespace py = pybind11;
using fastgen::DType;
using fastgen::TensorView4d;

namespace {

DType parse_dtype(py::handle h, const std::string& name) {
  if (py::isinstance<py::str>(h)) {
    const std::string s = h.cast<std::string>();
    if (s == "float32") return DType::Float32;
    if (s == "float16") return DType::Float16;
    if (s == "bfloat16") return DType::BFloat16;
    throw std::invalid_argument(name + ": unsupported dtype '" + s +
                                "' (expected 'float32', 'float16' or 'bfloat16')");
  }
  throw std::invalid_argument(name + ": dtype must be a str, got " +
                              std::string(py::str(py::type::handle_of(h).attr("__name__"))));
}

int64_t parse_int(py::handle h, const std::string& what) {
  if (!py::isinstance<py::int_>(h))
    throw std::invalid_argument(what + " must be an int, got " +
                                std::string(py::str(py::type::handle_of(h).attr("__name__"))));
  try {
    return h.cast<int64_t>();
  } catch (const py::cast_error&) {
    throw std::invalid_argument(what + " does not fit in int64");
  }
}

void parse_quad(py::handle h, int64_t out[4], const std::string& what) {
  if (!py::isinstance<py::sequence>(h) || py::isinstance<py::str>(h) || py::len(h) != 4)
    throw std::invalid_argument(what + " must be a sequence of 4 ints");
  auto seq = py::reinterpret_borrow<py::sequence>(h);
  for (size_t d = 0; d < 4; ++d) out[d] = parse_int(seq[d], what + "[" + std::to_string(d) + "]");
}

TensorView4d parse_tensor(py::handle obj, const std::string& name) {
  if (!py::isinstance<py::tuple>(obj) || py::len(obj) != 4)
    throw std::invalid_argument(name +
                                ": expected a tuple (data_ptr, dtype, sizes, strides), "
                                "as built by fastgen._cuda.tensor_arg");
  auto t = py::reinterpret_borrow<py::tuple>(obj);
  TensorView4d view;
  const int64_t ptr = parse_int(t[0], name + ": data_ptr");
  if (ptr < 0) throw std::invalid_argument(name + ": data_ptr must be non-negative");
  view.data = reinterpret_cast<void*>(static_cast<uintptr_t>(ptr));
  view.dtype = parse_dtype(t[1], name);
  parse_quad(t[2], view.size, name + ": sizes");
  parse_quad(t[3], view.stride, name + ": strides");
  return view;
}

using Launcher = void (*)(const TensorView4d&, const TensorView4d&, const TensorView4d*, int64_t,
                          float, cudaStream_t);

void call(Launcher launch, py::handle x, py::handle y, py::handle residual, int64_t factor,
          double scale, uintptr_t stream) {
  const TensorView4d xv = parse_tensor(x, "x");
  const TensorView4d yv = parse_tensor(y, "y");
  TensorView4d rv;
  const bool has_residual = !residual.is_none();
  if (has_residual) rv = parse_tensor(residual, "residual");
  // Validation and the launch need no Python objects; let other threads run meanwhile.
  py::gil_scoped_release no_gil;
  launch(xv, yv, has_residual ? &rv : nullptr, factor, static_cast<float>(scale),
         reinterpret_cast<cudaStream_t>(stream));
}

int cuda_device_count() noexcept {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // keep the failure from surfacing at a later check
    return 0;
  }
  return count;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "fastgen's torch-free CUDA kernels. Tensor arguments are tuples "
      "(data_ptr, dtype, sizes, strides) as built by fastgen._cuda.tensor_arg; bad arguments "
      "raise ValueError, a missing device or a CUDA failure RuntimeError.";

  m.def("cuda_device_count", &cuda_device_count,
        "Number of CUDA devices visible to this module; 0 when there is no driver or device.");

  m.def(
      "build_info",
      [] {
        py::dict info;
        info["cuda_runtime_version"] = int(CUDART_VERSION);
        info["archs"] = std::string(FASTGEN_CUDA_ARCHS_STR);
        return info;
      },
      "How the module was built: cuda_runtime_version (CUDART_VERSION, e.g. 13000) and archs "
      "(the SASS and PTX targets compiled, e.g. 'sm_80,sm_86,sm_89,sm_90a,compute_90').");

  m.def(
      "pixel_unshuffle_channel_avg",
      [](py::handle x, py::handle y, py::handle residual, int64_t factor, double scale,
         uintptr_t stream) {
        call(&fastgen::pixel_unshuffle_channel_avg, x, y, residual, factor, scale, stream);
      },
      py::arg("x"), py::arg("y"), py::arg("residual").none(true), py::arg("factor"),
      py::arg("scale"), py::arg("stream"),
      "y[b,o,h,w] = scale * sum_{t<g} pixel_unshuffle(x, factor)[b, o*g+t, h, w] "
      "(+ residual[b,o,h,w]), g = C*factor^2/O; x (B,C,H,W), y and residual (B,O,H/f,W/f). "
      "Enqueued on `stream` (a cudaStream_t as int).");

  m.def(
      "channel_dup_pixel_shuffle",
      [](py::handle x, py::handle y, py::handle residual, int64_t factor, double scale,
         uintptr_t stream) {
        call(&fastgen::channel_dup_pixel_shuffle, x, y, residual, factor, scale, stream);
      },
      py::arg("x"), py::arg("y"), py::arg("residual").none(true), py::arg("factor"),
      py::arg("scale"), py::arg("stream"),
      "y[b, o, h*f+i, w*f+j] = scale * x[b, (o*f*f + i*f + j) // r, h, w] (+ residual), "
      "r = O*f*f/C; x (B,C,H,W), y and residual (B,O,H*f,W*f). "
      "Enqueued on `stream` (a cudaStream_t as int).");
}
