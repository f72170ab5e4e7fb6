// pybind11 module fastgen._C. Each entry point is a launcher declared in common.h, bound by
// one bind() line at the end of this file: the launcher's parameter types say how each Python
// argument is converted (see Arg below), and the names given to bind() are the keyword names
// the entry point takes and the names its errors start with. Tensors arrive as plain tuples
// (data_ptr: int, dtype: str, sizes: 4 ints, strides: 4 ints in elements), so the module needs
// no torch headers and one binary serves every torch version; fastgen._cuda.launch builds the
// tuples from torch tensors and appends the stream.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "common.h"

#ifndef FASTGEN_CUDA_ARCHS_STR
#define FASTGEN_CUDA_ARCHS_STR "unknown"
#endif

namespace py = pybind11;
using fastgen::DType;
using fastgen::TensorView4d;

namespace {

std::string type_name(py::handle h) {
  return py::str(py::type::handle_of(h).attr("__name__"));
}

DType parse_dtype(py::handle h, const std::string& name) {
  if (py::isinstance<py::str>(h)) {
    const std::string s = h.cast<std::string>();
    if (s == "float32") return DType::Float32;
    if (s == "float16") return DType::Float16;
    if (s == "bfloat16") return DType::BFloat16;
    if (s == "uint8") return DType::UInt8;
    throw std::invalid_argument(name + ": unsupported dtype '" + s +
                                "' (expected 'float32', 'float16', 'bfloat16' or 'uint8')");
  }
  throw std::invalid_argument(name + ": dtype must be a str, got " + type_name(h));
}

int64_t parse_int(py::handle h, const std::string& what) {
  if (!py::isinstance<py::int_>(h))
    throw std::invalid_argument(what + " must be an int, got " + type_name(h));
  try {
    return h.cast<int64_t>();
  } catch (const py::cast_error&) {
    throw std::invalid_argument(what + " does not fit in int64");
  }
}

template <size_t N>
std::array<int64_t, N> parse_ints(py::handle h, const std::string& what) {
  if (!py::isinstance<py::sequence>(h) || py::isinstance<py::str>(h) || py::len(h) != N)
    throw std::invalid_argument(what + " must be a sequence of " + std::to_string(N) + " ints");
  auto seq = py::reinterpret_borrow<py::sequence>(h);
  std::array<int64_t, N> out;
  for (size_t d = 0; d < N; ++d) out[d] = parse_int(seq[d], what + "[" + std::to_string(d) + "]");
  return out;
}

void* parse_pointer(py::handle h, const std::string& name) {
  const int64_t ptr = parse_int(h, name + ": data_ptr");
  if (ptr < 0) throw std::invalid_argument(name + ": data_ptr must be non-negative");
  return reinterpret_cast<void*>(static_cast<uintptr_t>(ptr));
}

TensorView4d parse_tensor(py::handle obj, const std::string& name) {
  if (!py::isinstance<py::tuple>(obj) || py::len(obj) != 4)
    throw std::invalid_argument(name +
                                ": expected a tuple (data_ptr, dtype, sizes, strides), "
                                "as built by fastgen._cuda.tensor_arg");
  auto t = py::reinterpret_borrow<py::tuple>(obj);
  TensorView4d view;
  view.data = parse_pointer(t[0], name);
  view.dtype = parse_dtype(t[1], name);
  const auto sizes = parse_ints<4>(t[2], name + ": sizes");
  const auto strides = parse_ints<4>(t[3], name + ": strides");
  std::copy(sizes.begin(), sizes.end(), view.size);
  std::copy(strides.begin(), strides.end(), view.stride);
  return view;
}

// A Python scalar as T with pybind11's conversions; ValueError naming the argument otherwise.
template <typename T>
T parse_scalar(py::handle h, const std::string& name, const char* expected) {
  try {
    return h.cast<T>();
  } catch (const py::cast_error&) {
    throw std::invalid_argument(name + ": expected " + expected + ", got " + type_name(h));
  }
}

// Arg<P> converts the Python argument for a launcher parameter of type P: its constructor
// parses (and owns what get() points to), get() is what the launcher receives, and `kind` is
// what the entry point's docstring says it takes. A parameter type with no Arg does not compile.
template <typename P>
struct Arg;

template <>
struct Arg<const TensorView4d&> {
  static constexpr const char* kind = "tensor";
  TensorView4d view;
  Arg(py::handle h, const std::string& name) : view(parse_tensor(h, name)) {}
  const TensorView4d& get() const { return view; }
};

template <>
struct Arg<const TensorView4d*> {  // an optional tensor: None becomes a null pointer
  static constexpr const char* kind = "tensor | None";
  TensorView4d view;
  bool present;
  Arg(py::handle h, const std::string& name) : present(!h.is_none()) {
    if (present) view = parse_tensor(h, name);
  }
  const TensorView4d* get() const { return present ? &view : nullptr; }
};

// An int64 vector (indices, counts, a workspace) arrives as (data_ptr, size, stride), stride in
// elements: tensor tuples only carry float and byte dtypes.
template <>
struct Arg<const fastgen::Int64Vector&> {
  static constexpr const char* kind = "int64 vector";
  fastgen::Int64Vector v;
  Arg(py::handle h, const std::string& name) {
    if (!py::isinstance<py::tuple>(h) || py::len(h) != 3)
      throw std::invalid_argument(name + ": expected a tuple (data_ptr, size, stride) of an "
                                         "int64 vector");
    auto t = py::reinterpret_borrow<py::tuple>(h);
    v.data = static_cast<int64_t*>(parse_pointer(t[0], name));
    v.size = parse_int(t[1], name + ": size");
    v.stride = parse_int(t[2], name + ": stride");
  }
  const fastgen::Int64Vector& get() const { return v; }
};

template <size_t N>
struct Arg<const std::array<int64_t, N>&> {
  static constexpr const char* kind = "ints";
  std::array<int64_t, N> value;
  Arg(py::handle h, const std::string& name) : value(parse_ints<N>(h, name)) {}
  const std::array<int64_t, N>& get() const { return value; }
};

// Python floats are doubles; a float parameter gets the double rounded once.
template <>
struct Arg<float> {
  static constexpr const char* kind = "float";
  float value;
  Arg(py::handle h, const std::string& name)
      : value(static_cast<float>(parse_scalar<double>(h, name, "a float"))) {}
  float get() const { return value; }
};

template <>
struct Arg<const float*> {  // an optional float: None becomes a null pointer
  static constexpr const char* kind = "float | None";
  float value = 0.0f;
  bool present;
  Arg(py::handle h, const std::string& name) : present(!h.is_none()) {
    if (!present) return;
    if (!(py::isinstance<py::float_>(h) || py::isinstance<py::int_>(h)) ||
        py::isinstance<py::bool_>(h))
      throw std::invalid_argument(name + ": must be a float or None, got " + type_name(h));
    value = static_cast<float>(h.cast<double>());
  }
  const float* get() const { return present ? &value : nullptr; }
};

template <typename T>
struct ScalarArg {
  T value;
  ScalarArg(py::handle h, const std::string& name, const char* expected)
      : value(parse_scalar<T>(h, name, expected)) {}
  T get() const { return value; }
};

template <>
struct Arg<int64_t> : ScalarArg<int64_t> {
  static constexpr const char* kind = "int";
  Arg(py::handle h, const std::string& name) : ScalarArg(h, name, "an int") {}
};

template <>
struct Arg<int> : ScalarArg<int> {
  static constexpr const char* kind = "int";
  Arg(py::handle h, const std::string& name) : ScalarArg(h, name, "an int") {}
};

template <>
struct Arg<bool> : ScalarArg<bool> {
  static constexpr const char* kind = "bool";
  Arg(py::handle h, const std::string& name) : ScalarArg(h, name, "a bool") {}
};

template <>
struct Arg<const std::string&> {
  static constexpr const char* kind = "str";
  std::string value;
  Arg(py::handle h, const std::string& name) : value(parse_scalar<std::string>(h, name, "a str")) {}
  const std::string& get() const { return value; }
};

template <>
struct Arg<cudaStream_t> {  // the cudaStream_t as an int, as torch's Stream.cuda_stream gives it
  static constexpr const char* kind = "int";
  cudaStream_t stream;
  Arg(py::handle h, const std::string& name)
      : stream(reinterpret_cast<cudaStream_t>(parse_scalar<uintptr_t>(h, name, "an int"))) {}
  cudaStream_t get() const { return stream; }
};

// The arguments of a call in parameter order, positional first, then by keyword; TypeError,
// as for a Python function, for a missing, repeated or unknown one.
std::vector<py::object> gather(const std::string& entry_point,
                               const std::vector<std::string>& names, const py::args& args,
                               const py::kwargs& kwargs) {
  if (args.size() > names.size())
    throw py::type_error(entry_point + "() takes " + std::to_string(names.size()) +
                         " arguments, got " + std::to_string(args.size()));
  std::vector<py::object> values(names.size());
  size_t by_keyword = 0;
  for (size_t i = 0; i < names.size(); ++i) {
    const bool named = kwargs.contains(names[i]);
    by_keyword += named;
    if (i < args.size() && named)
      throw py::type_error(entry_point + "() got two values for argument '" + names[i] + "'");
    if (i < args.size())
      values[i] = args[i];
    else if (named)
      values[i] = kwargs[py::str(names[i])];
    else
      throw py::type_error(entry_point + "() missing argument '" + names[i] + "'");
  }
  if (by_keyword != kwargs.size()) {
    for (auto item : kwargs) {
      const std::string key = py::str(item.first);
      if (std::find(names.begin(), names.end(), key) == names.end())
        throw py::type_error(entry_point + "() got an unexpected argument '" + key + "'");
    }
  }
  return values;
}

template <typename R, typename... P, size_t... I>
py::object call(R (*launcher)(P...), const std::vector<py::object>& values,
                const std::vector<std::string>& names, std::index_sequence<I...>) {
  // Braced initialisation converts left to right: the first bad argument is the one named.
  const std::tuple<Arg<P>...> parsed{Arg<P>(values[I], names[I])...};
  // The conversions above need the GIL; validation and the launch do not, so other Python
  // threads run meanwhile.
  if constexpr (std::is_void_v<R>) {
    {
      py::gil_scoped_release no_gil;
      launcher(std::get<I>(parsed).get()...);
    }
    return py::none();
  } else {
    R result;
    {
      py::gil_scoped_release no_gil;
      result = launcher(std::get<I>(parsed).get()...);
    }
    return py::cast(result);
  }
}

// Exposes `launcher` as the entry point `name`, taking one Python argument per launcher
// parameter, positionally or by the keyword `names` gives it; a trailing cudaStream_t
// parameter is the argument `stream` and needs no name.
template <typename R, typename... P, size_t N>
void bind(py::module_& m, const char* name, R (*launcher)(P...), const char* const (&names)[N]) {
  constexpr bool takes_stream =
      std::is_same_v<std::tuple_element_t<sizeof...(P) - 1, std::tuple<P...>>, cudaStream_t>;
  static_assert(N + takes_stream == sizeof...(P), "one name per launcher parameter");
  std::vector<std::string> all_names(names, names + N);
  if (takes_stream) all_names.push_back("stream");
  const char* kinds[] = {Arg<P>::kind...};
  std::string doc = std::string(name) + "(";
  for (size_t i = 0; i < all_names.size(); ++i)
    doc += (i ? ", " : "") + all_names[i] + ": " + kinds[i];
  doc += std::string(") -> ") + (std::is_void_v<R> ? "None" : "result") +
         "; see the launcher's comment in csrc/common.h";
  py::options options;  // the doc above replaces pybind11's "(*args, **kwargs)" signature
  options.disable_function_signatures();
  m.def(
      name,
      [launcher, all_names, entry_point = std::string(name)](py::args args, py::kwargs kwargs) {
        return call(launcher, gather(entry_point, all_names, args, kwargs), all_names,
                    std::index_sequence_for<P...>{});
      },
      doc.c_str());
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
  using namespace fastgen;
  m.doc() =
      "fastgen's torch-free CUDA kernels, one entry point per launcher in csrc/common.h. Tensor "
      "arguments are tuples (data_ptr, dtype, sizes, strides) as built by "
      "fastgen._cuda.tensor_arg; bad arguments raise ValueError naming the argument, a missing "
      "device or a CUDA failure RuntimeError.";

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

  bind(m, "pixel_unshuffle_channel_avg", &pixel_unshuffle_channel_avg,
       {"x", "y", "residual", "factor", "scale"});
  bind(m, "channel_dup_pixel_shuffle", &channel_dup_pixel_shuffle,
       {"x", "y", "residual", "factor", "scale"});
  bind(m, "trms2d_forward", &trms2d_forward, {"x", "weight", "bias", "y", "eps"});
  bind(m, "trms2d_backward", &trms2d_backward, {"grad", "x", "weight", "dx", "partial", "eps"});
  bind(m, "trms2d_backward_blocks", &trms2d_backward_blocks, {"x"});
  bind(m, "bias_act_forward", &bias_act_forward,
       {"x", "b", "y", "dim", "act", "alpha", "gain", "clamp"});
  bind(m, "bias_act_db_splits", &bias_act_db_splits, {"dx", "dim"});
  bind(m, "bias_act_backward", &bias_act_backward,
       {"dy", "x", "y", "b", "dx", "db", "partial", "dim", "act", "alpha", "gain", "clamp"});
  bind(m, "ada_group_norm", &ada_group_norm,
       {"x", "y", "scale", "shift", "weight", "bias", "workspace", "num_groups", "num_chunks",
        "eps", "silu"});
  bind(m, "ada_group_norm_backward", &ada_group_norm_backward,
       {"dy", "x", "scale", "shift", "weight", "bias", "dx", "dscale", "dshift", "dweight",
        "dbias", "workspace", "num_groups", "num_chunks", "eps", "silu"});
  bind(m, "ada_group_norm_workspace", &ada_group_norm_workspace,
       {"x", "num_groups", "num_chunks", "backward"});
  bind(m, "ada_layer_norm", &ada_layer_norm, {"x", "y", "scale", "shift", "eps"});
  bind(m, "ada_layer_norm_backward", &ada_layer_norm_backward,
       {"dy", "x", "scale", "shift", "dx", "dscale", "dshift", "workspace", "eps"});
  bind(m, "ada_layer_norm_backward_workspace", &ada_layer_norm_backward_workspace, {"x"});
  bind(m, "vq_nearest", &vq_nearest,
       {"z", "codebook", "code_norms", "packed", "idx", "distance", "cosine", "exact"});
  bind(m, "vq_quantize", &vq_quantize,
       {"z", "codebook", "code_norms", "packed", "z_q", "idx", "row_errors", "counts", "exact"});
  bind(m, "filtered_lrelu_pass", &filtered_lrelu_pass,
       {"mode", "src", "bias", "dst", "codes", "tile_sums", "rows1", "cols1", "rows2", "cols2",
        "up", "down", "pads", "mid_shape", "gain", "slope", "clamp"});
  bind(m, "filtered_lrelu_tiles", &filtered_lrelu_tiles,
       {"mode", "src", "bias", "dst", "codes", "rows1", "cols1", "rows2", "cols2", "up", "down",
        "pads", "mid_shape", "gain", "slope", "clamp"});
  bind(m, "upfirdn2d", &upfirdn2d,
       {"x", "f", "separable", "y", "up_x", "up_y", "down_x", "down_y", "pad_x0", "pad_x1",
        "pad_y0", "pad_y1", "flip_filter", "gain"});
  bind(m, "linear_attention_forward", &linear_attention_forward,
       {"q", "k", "v", "out", "partials", "eps"});
  bind(m, "linear_attention_partials", &linear_attention_partials, {"k"});
  bind(m, "qk_norm_rope_forward", &qk_norm_rope_forward,
       {"x", "weight", "cos", "sin", "y", "interleaved", "eps"});
  bind(m, "qk_norm_rope_backward", &qk_norm_rope_backward,
       {"dy", "x", "weight", "cos", "sin", "dx", "partial", "interleaved", "eps"});
  bind(m, "qk_norm_rope_backward_rows", &qk_norm_rope_backward_rows, {"x"});
}
