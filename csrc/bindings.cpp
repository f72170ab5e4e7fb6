// pybind11 module fastgen._C. Tensors arrive as plain tuples
// (data_ptr: int, dtype: str, sizes: 4 ints, strides: 4 ints in elements), so the module
// needs no torch headers and one binary serves every torch version; fastgen/_cuda.py builds
// the tuples from torch tensors.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
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
    if (s == "uint8") return DType::UInt8;
    throw std::invalid_argument(name + ": unsupported dtype '" + s +
                                "' (expected 'float32', 'float16', 'bfloat16' or 'uint8')");
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

// A tensor argument that may be None: launchers take a pointer, null for None.
struct OptionalTensor {
  TensorView4d view;
  bool present = false;

  OptionalTensor(py::handle obj, const std::string& name) : present(!obj.is_none()) {
    if (present) view = parse_tensor(obj, name);
  }
  const TensorView4d* get() const { return present ? &view : nullptr; }
};

cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

using ShortcutLauncher = void (*)(const TensorView4d&, const TensorView4d&, const TensorView4d*,
                                  int64_t, float, cudaStream_t);

void call(ShortcutLauncher launch, py::handle x, py::handle y, py::handle residual,
          int64_t factor, double scale, uintptr_t stream) {
  const TensorView4d xv = parse_tensor(x, "x");
  const TensorView4d yv = parse_tensor(y, "y");
  const OptionalTensor rv(residual, "residual");
  // Validation and the launch need no Python objects; let other threads run meanwhile.
  py::gil_scoped_release no_gil;
  launch(xv, yv, rv.get(), factor, static_cast<float>(scale), as_stream(stream));
}

int cuda_device_count() noexcept {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // keep the failure from surfacing at a later check
    return 0;
  }
  return count;
}

// A float argument that may be None: launchers take a pointer, null for None.
struct OptionalFloat {
  float value = 0.0f;
  bool present = false;

  OptionalFloat(py::handle obj, const std::string& name) : present(!obj.is_none()) {
    if (!present) return;
    if (!(py::isinstance<py::float_>(obj) || py::isinstance<py::int_>(obj)) ||
        py::isinstance<py::bool_>(obj))
      throw std::invalid_argument(name + ": must be a float or None, got " +
                                  std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
    value = static_cast<float>(obj.cast<double>());
  }
  const float* get() const { return present ? &value : nullptr; }
};

// An int64 vector (indices, counts, a workspace) arrives as (data_ptr, size, stride), stride in
// elements: tensor tuples only carry float dtypes.
fastgen::Int64Vector parse_int64_vector(py::handle obj, const std::string& name) {
  if (!py::isinstance<py::tuple>(obj) || py::len(obj) != 3)
    throw std::invalid_argument(name + ": expected a tuple (data_ptr, size, stride) of an "
                                       "int64 vector");
  auto t = py::reinterpret_borrow<py::tuple>(obj);
  const int64_t ptr = parse_int(t[0], name + ": data_ptr");
  if (ptr < 0) throw std::invalid_argument(name + ": data_ptr must be non-negative");
  fastgen::Int64Vector v;
  v.data = reinterpret_cast<int64_t*>(static_cast<uintptr_t>(ptr));
  v.size = parse_int(t[1], name + ": size");
  v.stride = parse_int(t[2], name + ": stride");
  return v;
}

// filtered_lrelu's arguments, parsed; owns the views the pass points to.
struct ParsedFilteredLreluPass {
  TensorView4d src, dst, rows1, rows2;
  OptionalTensor bias, codes, tile_sums, cols1, cols2;
  fastgen::FilteredLreluPass pass;  // points into this object: never copied

  ParsedFilteredLreluPass(const ParsedFilteredLreluPass&) = delete;
  ParsedFilteredLreluPass& operator=(const ParsedFilteredLreluPass&) = delete;
  ParsedFilteredLreluPass(int mode, py::handle src_, py::handle bias_, py::handle dst_,
                          py::handle codes_, py::handle tile_sums_, py::handle rows1_,
                          py::handle cols1_, py::handle rows2_, py::handle cols2_, int64_t up,
                          int64_t down, const std::array<int64_t, 4>& pads,
                          const std::array<int64_t, 2>& mid_shape, double gain, double slope,
                          const OptionalFloat& clamp)
      : src(parse_tensor(src_, "src")),
        dst(parse_tensor(dst_, "dst")),
        rows1(parse_tensor(rows1_, "rows1")),
        rows2(parse_tensor(rows2_, "rows2")),
        bias(bias_, "bias"),
        codes(codes_, "codes"),
        tile_sums(tile_sums_, "tile_sums"),
        cols1(cols1_, "cols1"),
        cols2(cols2_, "cols2") {
    pass.mode = mode;
    pass.src = &src;
    pass.bias = bias.get();
    pass.dst = &dst;
    pass.codes = codes.get();
    pass.tile_sums = tile_sums.get();
    pass.rows1 = &rows1;
    pass.cols1 = cols1.get();
    pass.rows2 = &rows2;
    pass.cols2 = cols2.get();
    pass.up = up;
    pass.down = down;
    std::copy(pads.begin(), pads.end(), pass.pads);
    std::copy(mid_shape.begin(), mid_shape.end(), pass.mid_shape);
    pass.gain = static_cast<float>(gain);
    pass.slope = static_cast<float>(slope);
    pass.has_clamp = clamp.present;
    pass.clamp = clamp.value;
  }
};

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
  m.def(
      "trms2d_forward",
      [](py::handle x, py::handle weight, py::handle bias, py::handle y, double eps,
         uintptr_t stream) {
        const TensorView4d xv = parse_tensor(x, "x"), yv = parse_tensor(y, "y");
        const OptionalTensor wv(weight, "weight"), bv(bias, "bias");
        py::gil_scoped_release no_gil;
        fastgen::trms2d_forward(xv, wv.get(), bv.get(), yv, static_cast<float>(eps),
                                as_stream(stream));
      },
      py::arg("x"), py::arg("weight").none(true), py::arg("bias").none(true), py::arg("y"),
      py::arg("eps"), py::arg("stream"),
      "y = x / sqrt(mean_c x^2 + eps) * weight + bias per pixel; x and y (B,C,H,W), weight and "
      "bias (1,C,1,1) views or None. Enqueued on `stream` (a cudaStream_t as int).");

  m.def(
      "trms2d_backward",
      [](py::handle grad, py::handle x, py::handle weight, py::handle dx, py::handle partial,
         double eps, uintptr_t stream) {
        const TensorView4d gv = parse_tensor(grad, "grad"), xv = parse_tensor(x, "x");
        const TensorView4d dxv = parse_tensor(dx, "dx"), pv = parse_tensor(partial, "partial");
        const OptionalTensor wv(weight, "weight");
        py::gil_scoped_release no_gil;
        fastgen::trms2d_backward(gv, xv, wv.get(), dxv, pv, static_cast<float>(eps),
                                 as_stream(stream));
      },
      py::arg("grad"), py::arg("x"), py::arg("weight").none(true), py::arg("dx"),
      py::arg("partial"), py::arg("eps"), py::arg("stream"),
      "dx of trms2d for the output gradient `grad`, and per-block partial sums "
      "partial[b, 0, c] = sum dy*x*r, partial[b, 1, c] = sum dy in a (blocks, 2, C, 1) float32 "
      "buffer, one block per row; dweight and dbias are partial.sum(0). Enqueued on `stream`.");

  m.def(
      "bias_act_forward",
      [](py::handle x, py::handle b, py::handle y, int64_t dim, const std::string& act,
         double alpha, double gain, py::handle clamp, uintptr_t stream) {
        const TensorView4d xv = parse_tensor(x, "x"), yv = parse_tensor(y, "y");
        const OptionalTensor bv(b, "b");
        const OptionalFloat cv(clamp, "clamp");
        py::gil_scoped_release no_gil;
        fastgen::bias_act_forward(xv, bv.get(), yv, dim, act, static_cast<float>(alpha),
                                  static_cast<float>(gain), cv.get(), as_stream(stream));
      },
      py::arg("x"), py::arg("b").none(true), py::arg("y"), py::arg("dim"), py::arg("act"),
      py::arg("alpha"), py::arg("gain"), py::arg("clamp").none(true), py::arg("stream"),
      "y = clamp(gain * act(x + b), -clamp, clamp); x and y 4-D of one shape, b None or a view "
      "of x.shape[dim] entries along dim (1 elsewhere); act a name (linear, relu, lrelu, tanh, "
      "sigmoid, elu, selu, softplus, swish), alpha lrelu's slope, clamp None for none. "
      "Enqueued on `stream` (a cudaStream_t as int).");

  m.def(
      "bias_act_db_splits",
      [](py::handle dx, int64_t dim) {
        return fastgen::bias_act_db_splits(parse_tensor(dx, "dx"), dim);
      },
      py::arg("dx"), py::arg("dim"),
      "S of the (1, 1, S, C) float32 partial buffer bias_act_backward needs with a bias; "
      "depends on dx's shape and strides only.");

  m.def(
      "bias_act_backward",
      [](py::handle dy, py::handle x, py::handle y, py::handle b, py::handle dx, py::handle db,
         py::handle partial, int64_t dim, const std::string& act, double alpha, double gain,
         py::handle clamp, uintptr_t stream) {
        const TensorView4d dyv = parse_tensor(dy, "dy"), dxv = parse_tensor(dx, "dx");
        const OptionalTensor xv(x, "x"), yv(y, "y"), bv(b, "b"), dbv(db, "db");
        const OptionalTensor pv(partial, "partial");
        const OptionalFloat cv(clamp, "clamp");
        py::gil_scoped_release no_gil;
        fastgen::bias_act_backward(dyv, xv.get(), yv.get(), bv.get(), dxv, dbv.get(), pv.get(),
                                   dim, act, static_cast<float>(alpha),
                                   static_cast<float>(gain), cv.get(), as_stream(stream));
      },
      py::arg("dy"), py::arg("x").none(true), py::arg("y").none(true), py::arg("b").none(true),
      py::arg("dx"), py::arg("db").none(true), py::arg("partial").none(true), py::arg("dim"),
      py::arg("act"), py::arg("alpha"), py::arg("gain"), py::arg("clamp").none(true),
      py::arg("stream"),
      "dx = dy * gain * act'(z) * clamp mask, read from x (+ b) or from y (the piecewise linear "
      "acts), at most one of them; with b, db[c] = sum of dx over all axes but dim, through "
      "partial, (1, 1, bias_act_db_splits(dx, dim), C) float32 contiguous. Enqueued on `stream`.");

  m.def(
      "ada_group_norm",
      [](py::handle x, py::handle y, py::handle scale, py::handle shift, py::handle weight,
         py::handle bias, py::handle workspace, int64_t num_groups, int64_t num_chunks,
         double eps, bool silu, uintptr_t stream) {
        const TensorView4d xv = parse_tensor(x, "x"), yv = parse_tensor(y, "y");
        const TensorView4d sv = parse_tensor(scale, "scale"), tv = parse_tensor(shift, "shift");
        const OptionalTensor wv(weight, "weight"), bv(bias, "bias");
        const OptionalTensor ws(workspace, "workspace");
        py::gil_scoped_release no_gil;
        fastgen::ada_group_norm(xv, yv, sv, tv, wv.get(), bv.get(), ws.get(), num_groups,
                                num_chunks, static_cast<float>(eps), silu, as_stream(stream));
      },
      py::arg("x"), py::arg("y"), py::arg("scale"), py::arg("shift"), py::arg("weight").none(true),
      py::arg("bias").none(true), py::arg("workspace").none(true), py::arg("num_groups"),
      py::arg("num_chunks"), py::arg("eps"), py::arg("silu"), py::arg("stream"),
      "y = act((GroupNorm(x) * weight + bias) * (1 + scale) + shift), statistics per (b, group) "
      "over C/G channels and S positions; x, y (B, C, S, 1), scale, shift (B, C, 1, 1), weight, "
      "bias (1, C, 1, 1) or None, act silu or identity. num_chunks > 1 splits each group's "
      "reduction over that many blocks through workspace, a float32 (1, 1, 1, n) view with "
      "n >= 3 * B * num_groups * num_chunks. Enqueued on `stream`.");

  m.def(
      "ada_layer_norm",
      [](py::handle x, py::handle y, py::handle scale, py::handle shift, double eps,
         uintptr_t stream) {
        const TensorView4d xv = parse_tensor(x, "x"), yv = parse_tensor(y, "y");
        const TensorView4d sv = parse_tensor(scale, "scale"), tv = parse_tensor(shift, "shift");
        py::gil_scoped_release no_gil;
        fastgen::ada_layer_norm(xv, yv, sv, tv, static_cast<float>(eps), as_stream(stream));
      },
      py::arg("x"), py::arg("y"), py::arg("scale"), py::arg("shift"), py::arg("eps"),
      py::arg("stream"),
      "y[b, n, c] = LayerNorm(x[b, n, :])[c] * (1 + scale[b, c]) + shift[b, c], no affine; "
      "x, y (B, N, C, 1), scale, shift (B, C, 1, 1). Enqueued on `stream`.");

  m.def(
      "vq_nearest",
      [](py::handle z, py::handle codebook, py::handle code_norms, py::handle packed,
         py::handle idx, py::handle distance, bool cosine, bool exact, uintptr_t stream) {
        const TensorView4d zv = parse_tensor(z, "z"), cv = parse_tensor(codebook, "codebook");
        const TensorView4d nv = parse_tensor(code_norms, "code_norms");
        const TensorView4d dv = parse_tensor(distance, "distance");
        const fastgen::Int64Vector pv = parse_int64_vector(packed, "packed");
        const fastgen::Int64Vector iv = parse_int64_vector(idx, "idx");
        py::gil_scoped_release no_gil;
        fastgen::vq_nearest(zv, cv, nv, pv, iv, dv, cosine, exact, as_stream(stream));
      },
      py::arg("z"), py::arg("codebook"), py::arg("code_norms"), py::arg("packed"), py::arg("idx"),
      py::arg("distance"), py::arg("cosine"), py::arg("exact"), py::arg("stream"),
      "idx[n] = nearest code of z[n] (l2, or cosine when `cosine`), ties to the lowest index, "
      "and distance[n] its l2 distance or cosine similarity; `exact` rechecks near-ties in "
      "float64. z (N, D, 1, 1), codebook (K, D, 1, 1), distance (N, 1, 1, 1) float32; "
      "workspaces code_norms float32 (K + 1, 1, 1, 1) and packed (N int64); idx and packed "
      "are int64 vectors (data_ptr, size, stride). Enqueued on `stream`.");

  m.def(
      "vq_quantize",
      [](py::handle z, py::handle codebook, py::handle code_norms, py::handle packed,
         py::handle z_q, py::handle idx, py::handle row_errors, py::handle counts, bool exact,
         uintptr_t stream) {
        const TensorView4d zv = parse_tensor(z, "z"), cv = parse_tensor(codebook, "codebook");
        const TensorView4d nv = parse_tensor(code_norms, "code_norms");
        const TensorView4d qv = parse_tensor(z_q, "z_q");
        const TensorView4d ev = parse_tensor(row_errors, "row_errors");
        const fastgen::Int64Vector pv = parse_int64_vector(packed, "packed");
        const fastgen::Int64Vector iv = parse_int64_vector(idx, "idx");
        const fastgen::Int64Vector kv = parse_int64_vector(counts, "counts");
        py::gil_scoped_release no_gil;
        fastgen::vq_quantize(zv, cv, nv, pv, qv, iv, ev, kv, exact, as_stream(stream));
      },
      py::arg("z"), py::arg("codebook"), py::arg("code_norms"), py::arg("packed"), py::arg("z_q"),
      py::arg("idx"), py::arg("row_errors"), py::arg("counts"), py::arg("exact"),
      py::arg("stream"),
      "The l2 search of vq_nearest, then z_q[n] = codebook[idx[n]], row_errors[n] = "
      "sum_d (z[n, d] - z_q[n, d])^2 (float32, (N, 1, 1, 1)) and counts[idx[n]] += 1 (counts: "
      "an int64 vector of K, zeroed by the caller). Enqueued on `stream`.");
  m.def(
      "filtered_lrelu_pass",
      [](int mode, py::handle src, py::handle bias, py::handle dst, py::handle codes,
         py::handle tile_sums, py::handle rows1, py::handle cols1, py::handle rows2,
         py::handle cols2, int64_t up, int64_t down, const std::array<int64_t, 4>& pads,
         const std::array<int64_t, 2>& mid_shape, double gain, double slope, py::handle clamp,
         uintptr_t stream) {
        const ParsedFilteredLreluPass parsed(mode, src, bias, dst, codes, tile_sums, rows1,
                                             cols1, rows2, cols2, up, down, pads, mid_shape,
                                             gain, slope, OptionalFloat(clamp, "clamp"));
        py::gil_scoped_release no_gil;
        fastgen::filtered_lrelu_pass(parsed.pass, as_stream(stream));
      },
      py::arg("mode"), py::arg("src"), py::arg("bias").none(true), py::arg("dst"),
      py::arg("codes").none(true), py::arg("tile_sums").none(true), py::arg("rows1"),
      py::arg("cols1").none(true), py::arg("rows2"), py::arg("cols2").none(true), py::arg("up"),
      py::arg("down"), py::arg("pads"), py::arg("mid_shape"), py::arg("gain"), py::arg("slope"),
      py::arg("clamp").none(true), py::arg("stream"),
      "One fused filtered_lrelu pass per channel plane: src --[stage 1 FIR, up]--> mid "
      "--pointwise--> --[stage 2 FIR, down]--> dst. mode 0: forward, 1: forward storing the "
      "2-bit codes (uint8 (B, C, mid_h, ceil(mid_w/4))), 2: backward from the codes, with "
      "optional per-tile float32 sums of dst in tile_sums (1, 1, 1, B*C*tiles). Taps: float32 "
      "(1,1,1,n) rows/cols of a separable stage or (1,1,ny,nx) rows and cols None. pads = "
      "(pad1_y, pad1_x, pad2_y, pad2_x). Enqueued on `stream`.");

  m.def(
      "filtered_lrelu_tiles",
      [](int mode, py::handle src, py::handle bias, py::handle dst, py::handle codes,
         py::handle rows1, py::handle cols1, py::handle rows2, py::handle cols2, int64_t up,
         int64_t down, const std::array<int64_t, 4>& pads, const std::array<int64_t, 2>& mid_shape,
         double gain, double slope, py::handle clamp) {
        const ParsedFilteredLreluPass parsed(mode, src, bias, dst, codes, py::none(), rows1,
                                             cols1, rows2, cols2, up, down, pads, mid_shape,
                                             gain, slope, OptionalFloat(clamp, "clamp"));
        return fastgen::filtered_lrelu_tiles(parsed.pass);
      },
      py::arg("mode"), py::arg("src"), py::arg("bias").none(true), py::arg("dst"),
      py::arg("codes").none(true), py::arg("rows1"), py::arg("cols1").none(true),
      py::arg("rows2"), py::arg("cols2").none(true), py::arg("up"), py::arg("down"),
      py::arg("pads"), py::arg("mid_shape"), py::arg("gain"), py::arg("slope"),
      py::arg("clamp").none(true),
      "(tiles along y, tiles along x) per plane that filtered_lrelu_pass uses for these "
      "arguments: its tile_sums takes B * C * their product entries. Needs a device (the tile "
      "depends on its shared memory).");

  m.def(
      "upfirdn2d",
      [](py::handle x, py::handle f, bool separable, py::handle y, int64_t up_x, int64_t up_y,
         int64_t down_x, int64_t down_y, int64_t pad_x0, int64_t pad_x1, int64_t pad_y0,
         int64_t pad_y1, bool flip_filter, double gain, uintptr_t stream) {
        const TensorView4d xv = parse_tensor(x, "x"), yv = parse_tensor(y, "y");
        const OptionalTensor fv(f, "f");
        const fastgen::Resampling r{up_x, up_y, down_x, down_y, pad_x0, pad_x1, pad_y0, pad_y1};
        py::gil_scoped_release no_gil;
        fastgen::upfirdn2d(xv, fv.get(), separable, yv, r, flip_filter, static_cast<float>(gain),
                           as_stream(stream));
      },
      py::arg("x"), py::arg("f").none(true), py::arg("separable"), py::arg("y"), py::arg("up_x"),
      py::arg("up_y"), py::arg("down_x"), py::arg("down_y"), py::arg("pad_x0"), py::arg("pad_x1"),
      py::arg("pad_y0"), py::arg("pad_y1"), py::arg("flip_filter"), py::arg("gain"),
      py::arg("stream"),
      "y = gain * (x zero-upsampled by up, padded (negative: cropped), filtered by f, every "
      "down-th pixel kept); x (B,C,H,W), y (B,C,out_h,out_w); f float32, a (1,1,fh,fw) filter, "
      "(1,1,1,n) separable taps with separable=True, or None for the identity; convolution, or "
      "correlation with flip_filter. Enqueued on `stream` (a cudaStream_t as int).");

  m.def(
      "ada_group_norm_backward",
      [](py::handle dy, py::handle x, py::handle scale, py::handle shift, py::handle weight,
         py::handle bias, py::handle dx, py::handle dscale, py::handle dshift,
         py::handle dweight, py::handle dbias, py::handle workspace, int64_t num_groups,
         int64_t num_chunks, int64_t position_splits, double eps, bool silu,
         uintptr_t stream) {
        const TensorView4d dyv = parse_tensor(dy, "dy"), xv = parse_tensor(x, "x");
        const TensorView4d sv = parse_tensor(scale, "scale"), tv = parse_tensor(shift, "shift");
        const OptionalTensor wv(weight, "weight"), bv(bias, "bias");
        const TensorView4d dxv = parse_tensor(dx, "dx");
        const TensorView4d dsv = parse_tensor(dscale, "dscale");
        const TensorView4d dtv = parse_tensor(dshift, "dshift");
        const TensorView4d dwv = parse_tensor(dweight, "dweight");
        const TensorView4d dbv = parse_tensor(dbias, "dbias");
        const OptionalTensor ws(workspace, "workspace");
        py::gil_scoped_release no_gil;
        fastgen::ada_group_norm_backward(dyv, xv, sv, tv, wv.get(), bv.get(), dxv, dsv, dtv, dwv,
                                         dbv, ws.get(), num_groups, num_chunks, position_splits,
                                         static_cast<float>(eps), silu, as_stream(stream));
      },
      py::arg("dy"), py::arg("x"), py::arg("scale"), py::arg("shift"),
      py::arg("weight").none(true), py::arg("bias").none(true), py::arg("dx"), py::arg("dscale"),
      py::arg("dshift"), py::arg("dweight"), py::arg("dbias"), py::arg("workspace").none(true),
      py::arg("num_groups"), py::arg("num_chunks"), py::arg("position_splits"), py::arg("eps"),
      py::arg("silu"), py::arg("stream"),
      "Gradients of ada_group_norm for dy: dx, dscale, dshift and dweight, dbias (what weight "
      "and bias would get, as 1 and 0 when None); shapes as ada_group_norm's; the per-channel "
      "sums over positions in position_splits ranges; workspace a float32 (1, 1, 1, n) view, "
      "n >= 3 * B * G + 2 * position_splits * B * C (+ 5 * B * G * num_chunks when "
      "num_chunks > 1). Enqueued on `stream`.");

  m.def(
      "ada_layer_norm_backward",
      [](py::handle dy, py::handle x, py::handle scale, py::handle shift, py::handle dx,
         py::handle dscale, py::handle dshift, py::handle workspace, int64_t position_splits,
         double eps, uintptr_t stream) {
        const TensorView4d dyv = parse_tensor(dy, "dy"), xv = parse_tensor(x, "x");
        const TensorView4d sv = parse_tensor(scale, "scale"), tv = parse_tensor(shift, "shift");
        const TensorView4d dxv = parse_tensor(dx, "dx");
        const TensorView4d dsv = parse_tensor(dscale, "dscale");
        const TensorView4d dtv = parse_tensor(dshift, "dshift");
        const OptionalTensor ws(workspace, "workspace");
        py::gil_scoped_release no_gil;
        fastgen::ada_layer_norm_backward(dyv, xv, sv, tv, dxv, dsv, dtv, ws.get(),
                                         position_splits, static_cast<float>(eps),
                                         as_stream(stream));
      },
      py::arg("dy"), py::arg("x"), py::arg("scale"), py::arg("shift"), py::arg("dx"),
      py::arg("dscale"), py::arg("dshift"), py::arg("workspace").none(true),
      py::arg("position_splits"), py::arg("eps"), py::arg("stream"),
      "Gradients dx, dscale, dshift of ada_layer_norm for dy; shapes as ada_layer_norm's; the "
      "sums over tokens in position_splits ranges; workspace a float32 (1, 1, 1, n) view, "
      "n >= 3 * B * N + 2 * position_splits * B * C. Enqueued on `stream`.");
  m.def(
      "linear_attention_forward",
      [](py::handle q, py::handle k, py::handle v, py::handle out, py::handle partials,
         int64_t kv_rows_per_chunk, int64_t q_rows_per_chunk, double eps, uintptr_t stream) {
        const TensorView4d qv = parse_tensor(q, "q"), kv = parse_tensor(k, "k");
        const TensorView4d vv = parse_tensor(v, "v"), ov = parse_tensor(out, "out");
        const TensorView4d pv = parse_tensor(partials, "partials");
        py::gil_scoped_release no_gil;
        fastgen::linear_attention_forward(qv, kv, vv, ov, pv, kv_rows_per_chunk, q_rows_per_chunk,
                                          static_cast<float>(eps), as_stream(stream));
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("partials"),
      py::arg("kv_rows_per_chunk"), py::arg("q_rows_per_chunk"), py::arg("eps"),
      py::arg("stream"),
      "ReLU linear attention forward: out = relu(q) S / (relu(q) . z + eps) per (batch, head), "
      "S and z summed over relu(k), v; q/out (B,Nq,H,D), k/v (B,Nkv,H,D), D <= 128; partials a "
      "float32 (1, 1, B*H*ceil(Nkv/kv_rows_per_chunk), D*D+D) workspace. Enqueued on `stream`.");
}
