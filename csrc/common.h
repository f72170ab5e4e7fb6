// Shared pieces of the torch-free CUDA extension fastgen._C: error checks, a strided 4-D
// tensor view, argument checks, dtype dispatch, grid sizing, and the declarations of the
// launchers that bindings.cpp exposes, whose parameter types say how it converts the Python
// arguments. bindings.cpp is compiled by the host compiler, so everything that needs nvcc
// sits behind __CUDACC__ (or the tests' CPU emulation of CUDA, tests/cuda_emulation, which
// compiles the kernels as host C++).
//
// Each csrc/<family>.cu defines its kernels in namespace fastgen::kernels::<family> (an anonymous one
// inside it keeps them private to the file): a profiler trace then names every kernel with its
// family, which is how `fastgen profile` attributes a kernel that runs outside its op.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

#if defined(__CUDACC__) || defined(FASTGEN_CUDA_EMULATION)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace fastgen {

// ---------------------------------------------------------------------------------------
// Errors

[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* expr, const char* file,
                                          int line) {
  throw std::runtime_error(std::string("fastgen._C: CUDA error at ") + file + ":" +
                           std::to_string(line) + " in `" + expr + "`: " +
                           cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

#define FASTGEN_CUDA_CHECK(expr)                                              \
  do {                                                                        \
    cudaError_t fastgen_err_ = (expr);                                        \
    if (fastgen_err_ != cudaSuccess)                                          \
      ::fastgen::throw_cuda_error(fastgen_err_, #expr, __FILE__, __LINE__);   \
  } while (0)

// A bad launch configuration is only reported through cudaGetLastError.
#define FASTGEN_LAUNCH_CHECK() FASTGEN_CUDA_CHECK(cudaGetLastError())

// Throws a clear error instead of letting the first launch fail obscurely on a machine with
// no driver or no device. Success is cached: the device count cannot change in a process.
inline void ensure_device() {
  static std::atomic<bool> ok{false};
  if (ok.load(std::memory_order_relaxed)) return;
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    // The error is not sticky, but would otherwise surface at the next launch check.
    cudaGetLastError();
    std::string reason = err != cudaSuccess ? cudaGetErrorString(err) : "0 devices";
    throw std::runtime_error("fastgen._C: no CUDA device available (cudaGetDeviceCount: " +
                             reason + "); use the triton or reference backend");
  }
  ok.store(true, std::memory_order_relaxed);
}

// ---------------------------------------------------------------------------------------
// Tensors

// UInt8 only describes byte tensors such as filtered_lrelu's packed codes; kernels dispatch
// on the float types.
enum class DType { Float32, Float16, BFloat16, UInt8 };

inline const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::Float32: return "float32";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
    case DType::UInt8: return "uint8";
  }
  return "unknown";
}

// A 4-D tensor as the launchers see it: sizes and strides in elements, any layout.
struct TensorView4d {
  void* data = nullptr;
  DType dtype = DType::Float32;
  int64_t size[4] = {0, 0, 0, 0};
  int64_t stride[4] = {0, 0, 0, 0};

  int64_t numel() const { return size[0] * size[1] * size[2] * size[3]; }
};

inline std::string str(int64_t v) { return std::to_string(v); }

inline std::string shape_str(const int64_t* s) {
  return "(" + std::to_string(s[0]) + ", " + std::to_string(s[1]) + ", " +
         std::to_string(s[2]) + ", " + std::to_string(s[3]) + ")";
}

// Argument checks throw std::invalid_argument, which pybind11 turns into ValueError.
// Messages start with the argument's name.
inline void require(bool cond, const std::string& message) {
  if (!cond) throw std::invalid_argument(message);
}

// Sizes non-negative, and data present unless the tensor is empty.
inline void require_valid_view(const TensorView4d& t, const char* name) {
  for (int d = 0; d < 4; ++d)
    require(t.size[d] >= 0, std::string(name) + ": negative size in shape " + shape_str(t.size));
  require(t.data != nullptr || t.numel() == 0, std::string(name) + ": null data pointer");
}

inline void require_float_dtype(const TensorView4d& t, const char* name) {
  require(t.dtype != DType::UInt8, std::string(name) + ": dtype " + dtype_name(t.dtype) +
                                       " is not one of float32, float16, bfloat16");
}

inline void require_same_dtype(const TensorView4d& t, const char* name, const TensorView4d& ref,
                               const char* ref_name) {
  require(t.dtype == ref.dtype, std::string(name) + ": dtype " + dtype_name(t.dtype) +
                                    " differs from " + ref_name + "'s " +
                                    dtype_name(ref.dtype));
}

inline void require_shape(const TensorView4d& t, const char* name, const int64_t* expected,
                          const std::string& why) {
  bool same = std::equal(t.size, t.size + 4, expected);
  require(same, std::string(name) + ": expected shape " + shape_str(expected) + " = " + why +
                    ", got " + shape_str(t.size));
}

// An operand with ref's shape and dtype (y, dy or dx beside x).
inline void require_like(const TensorView4d& t, const char* name, const TensorView4d& ref,
                         const char* ref_name) {
  require_valid_view(t, name);
  require_same_dtype(t, name, ref, ref_name);
  require_shape(t, name, ref.size, std::string(ref_name) + "'s shape");
}

// An output with a zero stride over a dimension of size > 1 would have several threads
// writing one element.
inline void require_no_broadcast(const TensorView4d& t, const char* name) {
  for (int d = 0; d < 4; ++d)
    require(t.stride[d] != 0 || t.size[d] <= 1,
            std::string(name) + ": stride 0 in dimension " + std::to_string(d) +
                " (an expanded view); an output must not overlap itself");
}

// ---------------------------------------------------------------------------------------
// Launch geometry

constexpr int kThreadsPerBlock = 256;

// An attribute of the current device: launchers run under the caller's device guard.
inline int device_attribute(cudaDeviceAttr attribute) {
  int device = 0, value = 0;
  FASTGEN_CUDA_CHECK(cudaGetDevice(&device));
  FASTGEN_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, device));
  return value;
}

inline int64_t device_sms() { return device_attribute(cudaDevAttrMultiProcessorCount); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Enough blocks for n elements, but no more than fill the device once: the kernels use
// grid-stride loops, so extra blocks would only add scheduling overhead.
inline unsigned int grid_size(int64_t n, int threads = kThreadsPerBlock) {
  const int threads_per_sm = device_attribute(cudaDevAttrMaxThreadsPerMultiProcessor);
  int64_t wanted = ceil_div(n, threads);
  int64_t cap = device_sms() * std::max(1, threads_per_sm / threads);
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(wanted, cap)));
}

#if defined(__CUDACC__) || defined(FASTGEN_CUDA_EMULATION)

// int64 throughout: tensors may hold more than 2^31 elements.
__device__ __forceinline__ int64_t grid_thread_index() {
  return int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_thread_count() {
  return int64_t(gridDim.x) * blockDim.x;
}

// The sum over a warp's 32 lanes, in every lane; all 32 must call it (full-mask shuffles).
// The butterfly order is fixed, so the result is the same run to run.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// ---------------------------------------------------------------------------------------
// Element types: loads widen to fp32, stores round once to the tensor's dtype.

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with T the C++ type of dtype.
template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: f(TypeTag<float>{}); return;
    case DType::Float16: f(TypeTag<__half>{}); return;
    case DType::BFloat16: f(TypeTag<__nv_bfloat16>{}); return;
    case DType::UInt8: break;
  }
  throw std::invalid_argument(std::string("fastgen._C: no kernel for dtype ") + dtype_name(dtype));
}

__host__ __device__ __forceinline__ float to_float(float v) { return v; }
__host__ __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__host__ __device__ __forceinline__ float to_float(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__host__ __device__ __forceinline__ T from_float(float v);
template <>
__host__ __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__host__ __device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__host__ __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// A typed pointer with its strides, small enough to pass to a kernel by value.
template <typename T>
struct Strided4d {
  T* data;
  int64_t s0, s1, s2, s3;

  __host__ __device__ __forceinline__ T& at(int64_t i0, int64_t i1, int64_t i2,
                                            int64_t i3) const {
    return data[i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3];
  }
};

template <typename T>
Strided4d<T> strided(const TensorView4d& t) {
  return {static_cast<T*>(t.data), t.stride[0], t.stride[1], t.stride[2], t.stride[3]};
}

// An absent optional tensor becomes a null data pointer, which kernels test for.
template <typename T>
Strided4d<const T> optional_strided(const TensorView4d* t) {
  return t != nullptr ? strided<const T>(*t) : Strided4d<const T>{nullptr, 0, 0, 0, 0};
}

#endif  // __CUDACC__

// ---------------------------------------------------------------------------------------
// Launchers (csrc/*.cu). Each validates its arguments (std::invalid_argument), then calls
// ensure_device(), then launches on `stream`. bindings.cpp exposes each as an entry point of
// the same name with one bind() line, which converts the Python arguments by these parameter
// types: const TensorView4d& a tensor tuple, const TensorView4d* a tensor tuple or None
// (null), const Int64Vector& an int64 vector tuple, const float* a float or None (null),
// cudaStream_t the stream; other parameters are plain scalars and strings. A parameter of any
// other type needs an Arg specialization there. `residual` may be null.

// shortcut.cu: y[b,o,h,w] = scale * sum_{t<g} x[b, c, h*f+i, w*f+j] (+ residual[b,o,h,w]),
// where o*g+t = c*f*f + i*f + j and g = C*f*f/O.
void pixel_unshuffle_channel_avg(const TensorView4d& x, const TensorView4d& y,
                                 const TensorView4d* residual, int64_t factor, float scale,
                                 cudaStream_t stream);

// shortcut.cu: y[b, o, h*f+i, w*f+j] = scale * x[b, (o*f*f + i*f + j) / r, h, w]
// (+ residual), where r = O*f*f/C.
void channel_dup_pixel_shuffle(const TensorView4d& x, const TensorView4d& y,
                               const TensorView4d* residual, int64_t factor, float scale,
                               cudaStream_t stream);

// rms_norm_2d.cu: y = x / sqrt(mean_c x^2 + eps) * weight + bias per pixel (trms2d); weight
// and bias are (1, C, 1, 1) views or null.
void trms2d_forward(const TensorView4d& x, const TensorView4d* weight, const TensorView4d* bias,
                    const TensorView4d& y, float eps, cudaStream_t stream);

// rms_norm_2d.cu: dx of trms2d, and per block b partial[b, 0, c, 0] = sum dy * x * r and
// partial[b, 1, c, 0] = sum dy over the block's pixels; one block per row of partial
// (blocks, 2, C, 1), float32 contiguous. dweight and dbias are the sums over the rows.
void trms2d_backward(const TensorView4d& grad, const TensorView4d& x, const TensorView4d* weight,
                     const TensorView4d& dx, const TensorView4d& partial, float eps,
                     cudaStream_t stream);

// rms_norm_2d.cu: the rows of partial (the blocks) trms2d_backward's plan uses for x.
int64_t trms2d_backward_blocks(const TensorView4d& x);

// ada_norm.cu: x, y (B, C, S, 1), G groups of C/G channels; per (b, g) over its C/G * S values
// y = act((x - mu) * rsqrt(var + eps) * w[c] * (1 + scale[b,c]) + b[c] * (1 + scale[b,c])
// + shift[b,c]), act identity or silu; scale, shift (B, C, 1, 1), weight, bias (1, C, 1, 1) or
// null. Each group's reduction is split over num_chunks blocks (0: as the launch plan picks);
// workspace is a float32 (1, 1, 1, n) view, n at least ada_group_norm_workspace (null if 0).
void ada_group_norm(const TensorView4d& x, const TensorView4d& y, const TensorView4d& scale,
                    const TensorView4d& shift, const TensorView4d* weight,
                    const TensorView4d* bias, const TensorView4d* workspace, int64_t num_groups,
                    int64_t num_chunks, float eps, bool silu, cudaStream_t stream);

// ada_norm.cu: the gradients of ada_group_norm for dy (like x): dx (like x), dscale, dshift
// (B, C, 1, 1), dweight, dbias (1, C, 1, 1) (what weight and bias get, as 1 and 0 when null);
// num_chunks as for ada_group_norm; workspace float32 (1, 1, 1, n), n at least
// ada_group_norm_workspace(backward=true).
void ada_group_norm_backward(const TensorView4d& dy, const TensorView4d& x,
                             const TensorView4d& scale, const TensorView4d& shift,
                             const TensorView4d* weight, const TensorView4d* bias,
                             const TensorView4d& dx, const TensorView4d& dscale,
                             const TensorView4d& dshift, const TensorView4d& dweight,
                             const TensorView4d& dbias, const TensorView4d* workspace,
                             int64_t num_groups, int64_t num_chunks, float eps, bool silu,
                             cudaStream_t stream);

// ada_norm.cu: the float32 workspace (in floats) ada_group_norm (backward false) or its
// backward needs for x at these num_groups and num_chunks.
int64_t ada_group_norm_workspace(const TensorView4d& x, int64_t num_groups, int64_t num_chunks,
                                 bool backward);

// ada_norm.cu: x, y (B, N, C, 1); per token y = (x - mu) * rsqrt(var + eps) * (1 + scale[b,c])
// + shift[b,c], mu and var over the token's C channels; scale, shift (B, C, 1, 1).
void ada_layer_norm(const TensorView4d& x, const TensorView4d& y, const TensorView4d& scale,
                    const TensorView4d& shift, float eps, cudaStream_t stream);

// ada_norm.cu: dx (like x), dscale, dshift (B, C, 1, 1) of ada_layer_norm for dy (like x);
// workspace float32 (1, 1, 1, n), n at least ada_layer_norm_backward_workspace(x).
void ada_layer_norm_backward(const TensorView4d& dy, const TensorView4d& x,
                             const TensorView4d& scale, const TensorView4d& shift,
                             const TensorView4d& dx, const TensorView4d& dscale,
                             const TensorView4d& dshift, const TensorView4d* workspace,
                             float eps, cudaStream_t stream);

int64_t ada_layer_norm_backward_workspace(const TensorView4d& x);

// vq.cu: the int64 vectors (indices, counts, a workspace), which TensorView4d's float dtypes
// cannot describe: size elements stride apart.
struct Int64Vector {
  int64_t* data = nullptr;
  int64_t size = 0;
  int64_t stride = 1;
};

// vq.cu: z (N, D, 1, 1), codebook (K, D, 1, 1), any strides, same dtype, 1 <= D <= 512:
// idx[n] = argmin_k ||e_k||^2 - 2 z_n.e_k (l2) or argmin_k -(z_n.e_k) / max(||e_k||, 1e-12)
// (cosine), ties to the lowest k; distance (N, 1, 1, 1) float32 = ||z_n||^2 + that score (l2)
// or the cosine similarity. exact: the float64 direct-form recheck of near-ties (fastgen/ops/
// vq.py). Workspaces: code_norms float32 (K + 1) contiguous, packed (N) contiguous.
void vq_nearest(const TensorView4d& z, const TensorView4d& codebook,
                const TensorView4d& code_norms, const Int64Vector& packed,
                const Int64Vector& idx, const TensorView4d& distance, bool cosine, bool exact,
                cudaStream_t stream);

// vq.cu: the l2 search above, then z_q[n] = codebook[idx[n]], row_errors[n] = sum_d (z[n,d] -
// z_q[n,d])^2 in float32 and counts[idx[n]] += 1 (counts zeroed by the caller).
void vq_quantize(const TensorView4d& z, const TensorView4d& codebook,
                 const TensorView4d& code_norms, const Int64Vector& packed,
                 const TensorView4d& z_q, const Int64Vector& idx,
                 const TensorView4d& row_errors, const Int64Vector& counts, bool exact,
                 cudaStream_t stream);

// bias_act.cu: y = clamp(gain * act(x + b), -clamp, clamp) elementwise, x and y of one shape
// (any strides), b null or x.size[dim] along dim and 1 elsewhere; act one of linear, relu,
// lrelu (negative slope alpha), tanh, sigmoid, elu, selu, softplus, swish; clamp null: none.
void bias_act_forward(const TensorView4d& x, const TensorView4d* b, const TensorView4d& y,
                      int64_t dim, const std::string& act, float alpha, float gain,
                      const float* clamp, cudaStream_t stream);

// bias_act.cu: the split count S of bias_act_backward's partial buffer (1, 1, S, C) for dx.
int64_t bias_act_db_splits(const TensorView4d& dx, int64_t dim);

// bias_act.cu: dx = dy * gain * act'(x + b) * m (x given), or dy * gain * [y*gain > 0 ? 1 :
// slope] * m (y given), or dy * gain (neither); m = [|gain*act(z)| <= clamp] or [|y| < clamp];
// with b: db[c] = sum of dx over all axes but dim, via partial (float32, contiguous).
void bias_act_backward(const TensorView4d& dy, const TensorView4d* x, const TensorView4d* y,
                       const TensorView4d* b, const TensorView4d& dx, const TensorView4d* db,
                       const TensorView4d* partial, int64_t dim, const std::string& act,
                       float alpha, float gain, const float* clamp, cudaStream_t stream);

// filtered_lrelu.cu: one fused pass src --[stage 1 FIR, up]--> mid --pointwise-->
// --[stage 2 FIR, down]--> dst per channel plane (fastgen.ops.filtered_lrelu.FusedPass):
// mode 0 the forward (lrelu, clamp), 1 the forward storing 2-bit codes, 2 the backward
// (multiplies by the codes' derivative; tile_sums, when given, receives each tile's float32
// sum of dst for db). bias (1, C, 1, 1) or null, forward modes only; codes uint8 (B, C, mid_h,
// ceil(mid_w / 4)), modes 1 and 2; tile_sums float32 (1, 1, 1, B * C * tiles), mode 2. Taps
// are float32 (1, 1, 1, n) rows and cols of a separable stage, or (1, 1, ny, nx) rows and null
// cols for a 2-D one. pads = (pad1_y, pad1_x, pad2_y, pad2_x); clamp null: none.
void filtered_lrelu_pass(int mode, const TensorView4d& src, const TensorView4d* bias,
                         const TensorView4d& dst, const TensorView4d* codes,
                         const TensorView4d* tile_sums, const TensorView4d& rows1,
                         const TensorView4d* cols1, const TensorView4d& rows2,
                         const TensorView4d* cols2, int64_t up, int64_t down,
                         const std::array<int64_t, 4>& pads,
                         const std::array<int64_t, 2>& mid_shape, float gain, float slope,
                         const float* clamp, cudaStream_t stream);

// filtered_lrelu.cu: (tiles along y, tiles along x) per plane that filtered_lrelu_pass uses
// for these arguments: its tile_sums takes B * C * their product entries.
std::pair<int64_t, int64_t> filtered_lrelu_tiles(
    int mode, const TensorView4d& src, const TensorView4d* bias, const TensorView4d& dst,
    const TensorView4d* codes, const TensorView4d& rows1, const TensorView4d* cols1,
    const TensorView4d& rows2, const TensorView4d* cols2, int64_t up, int64_t down,
    const std::array<int64_t, 4>& pads, const std::array<int64_t, 2>& mid_shape, float gain,
    float slope, const float* clamp);

// upfirdn2d.cu: y[b,c,oy,ox] = gain * sum_{i,j} w[i,j] * p[oy*down_y + i, ox*down_x + j], p = x
// zero-upsampled by up_x, up_y and padded (negative: cropped) along x (W) and y (H), w = f
// flipped (or f with flip_filter); f float32, a (1,1,fh,fw) filter, (1,1,1,n) separable taps
// (separable: f[i]*f[j]) or null for the identity.
void upfirdn2d(const TensorView4d& x, const TensorView4d* f, bool separable,
               const TensorView4d& y, int64_t up_x, int64_t up_y, int64_t down_x,
               int64_t down_y, int64_t pad_x0, int64_t pad_x1, int64_t pad_y0, int64_t pad_y1,
               bool flip_filter, float gain, cudaStream_t stream);

// linear_attention.cu: out_n = phi(q_n) S / (phi(q_n) . z + eps), S = sum phi(k)^T v and
// z = sum phi(k) per (batch, head), phi = ReLU; q, out (B, Nq, H, D), k, v (B, Nkv, H, D), any
// strides, D <= 128. partials: a float32 (1, 1, linear_attention_partials(k), D*D + D)
// workspace.
void linear_attention_forward(const TensorView4d& q, const TensorView4d& k, const TensorView4d& v,
                              const TensorView4d& out, const TensorView4d& partials, float eps,
                              cudaStream_t stream);

// linear_attention.cu: the partial states linear_attention_forward's plan keeps for k.
int64_t linear_attention_partials(const TensorView4d& k);

// qk_norm_rope.cu: y = RoPE(RMSNorm(x)) per row (b, l, h) of x (B, L, H, D), any strides;
// weight a float32 (D,) view or null (no norm); cos, sin float32 (L, D/2) views or both null
// (no rotation); pairs (2j, 2j + 1) when interleaved, else (j, j + D/2).
void qk_norm_rope_forward(const TensorView4d& x, const TensorView4d* weight, const TensorView4d* cos,
                          const TensorView4d* sin, const TensorView4d& y, bool interleaved, float eps,
                          cudaStream_t stream);

// qk_norm_rope.cu: dx of qk_norm_rope_forward for dy (like x), and with a weight the float32
// (qk_norm_rope_backward_rows(x), D) partial sums of dweight, one row per warp (summed by the
// caller).
void qk_norm_rope_backward(const TensorView4d& dy, const TensorView4d& x, const TensorView4d* weight,
                           const TensorView4d* cos, const TensorView4d* sin, const TensorView4d& dx,
                           const TensorView4d* partial, bool interleaved, float eps, cudaStream_t stream);

int64_t qk_norm_rope_backward_rows(const TensorView4d& x);

}  // namespace fastgen
