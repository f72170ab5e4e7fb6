// DC-AE residual shortcuts (math in fastgen/ops/shortcut.py), on strided NCHW tensors of any layout.
//
//   pixel_unshuffle_channel_avg: y (B, O, H/f, W/f) from x (B, C, H, W), g = C*f*f/O
//     y[b,o,h,w] = scale * sum_{t<g} u[b, o*g+t, h, w]  (+ residual[b,o,h,w])
//     u[b, c*f*f + i*f + j, h, w] = x[b, c, h*f+i, w*f+j]
//   channel_dup_pixel_shuffle: y (B, O, H*f, W*f) from x (B, C, H, W), r = O*f*f/C
//     y[b, o, h*f+i, w*f+j] = scale * x[b, (o*f*f + i*f + j) / r, h, w]  (+ residual)
//
// scale = 1/g gives the spec's mean; the backward of each op is the other with scale = 1
// (or 1/g). Sums are fp32 whatever the dtype (past 16 terms, fp32 partials of 16 add up in
// fp64), and y is rounded once.
//
// One thread per output element in a grid-stride loop, the elements taken in y's memory order
// (NCHW or channels_last, whichever y is) so consecutive lanes write consecutive addresses;
// in the NCHW order a channels_last y would be written C elements apart per lane. The
// per-element functions are __host__ __device__ so the index arithmetic can be checked on a
// CPU.

#include "common.h"

namespace fastgen {
namespace kernels::shortcut {
namespace {

// Bounds under which every index product below fits in int64.
constexpr int64_t kMaxFactor = int64_t(1) << 15;
constexpr int64_t kMaxChannels = int64_t(1) << 31;
// Terms per partial sum of the channel averaging (as the Triton kernel's 16-wide tiles).
constexpr int64_t kSumBlock = 16;

struct Geometry {
  int64_t channels, height, width;  // of y; the batch is whatever remains of the index
  int64_t factor;
  int64_t group;  // g for the unshuffle, r for the duplication
  bool channels_last;  // of y: element order (b, h, w, o) instead of (b, o, h, w)
};

// The index along a dimension of `extent` that idx's innermost remaining digit gives; idx
// keeps the outer digits.
__host__ __device__ __forceinline__ int64_t take_digit(int64_t& idx, int64_t extent) {
  const int64_t digit = idx % extent;
  idx /= extent;
  return digit;
}

// (b, o, h, w) of element idx in y's memory order; the order does not matter for
// correctness, only for coalescing.
__host__ __device__ __forceinline__ void unravel(int64_t idx, const Geometry& geo, int64_t& b,
                                                 int64_t& o, int64_t& h, int64_t& w) {
  if (geo.channels_last) o = take_digit(idx, geo.channels);
  w = take_digit(idx, geo.width);
  h = take_digit(idx, geo.height);
  if (!geo.channels_last) o = take_digit(idx, geo.channels);
  b = idx;
}

// y is walked channel-innermost when its channel stride is 1 (channels_last).
bool walks_channels_last(const TensorView4d& y) {
  return y.size[1] > 1 && y.stride[1] == 1 && y.stride[3] != 1;
}

template <typename T>
__host__ __device__ __forceinline__ void unshuffle_avg_element(int64_t idx, const Geometry& geo,
                                                               Strided4d<const T> x,
                                                               Strided4d<T> y,
                                                               Strided4d<const T> residual,
                                                               float scale) {
  int64_t b, o, h, w;
  unravel(idx, geo, b, o, h, w);
  const int64_t f = geo.factor, ff = f * f;
  // The group's unshuffled channels o*g .. o*g+g-1 are consecutive, so split the first into
  // (c, i, j) once and then step j, i, c like an odometer instead of dividing per term.
  const int64_t first = o * geo.group;
  int64_t c = first / ff, i = (first % ff) / f, j = first % f;
  // Terms go into float32 partial sums of kSumBlock terms, and the partials into a float64
  // total: a long sum (the backward of a 63-channel duplication at factor 4 sums 1008 terms) is
  // then off by about kSumBlock roundings, not one per term, and a group of up to kSumBlock
  // terms, the usual case, stays one float32 sum.
  double total = 0.0;
  float partial = 0.0f;
  for (int64_t t = 0; t < geo.group; ++t) {
    partial += to_float(x.at(b, c, h * f + i, w * f + j));
    if ((t + 1) % kSumBlock == 0) {
      total += partial;
      partial = 0.0f;
    }
    if (++j == f) {
      j = 0;
      if (++i == f) {
        i = 0;
        ++c;
      }
    }
  }
  float v = float(total + partial) * scale;
  if (residual.data != nullptr) v += to_float(residual.at(b, o, h, w));
  y.at(b, o, h, w) = from_float<T>(v);
}

template <typename T>
__host__ __device__ __forceinline__ void dup_shuffle_element(int64_t idx, const Geometry& geo,
                                                             Strided4d<const T> x,
                                                             Strided4d<T> y,
                                                             Strided4d<const T> residual,
                                                             float scale) {
  int64_t b, o, hy, wy;
  unravel(idx, geo, b, o, hy, wy);
  const int64_t f = geo.factor;
  const int64_t h = hy / f, i = hy - h * f;
  const int64_t w = wy / f, j = wy - w * f;
  const int64_t c = (o * f * f + i * f + j) / geo.group;
  float v = to_float(x.at(b, c, h, w)) * scale;
  if (residual.data != nullptr) v += to_float(residual.at(b, o, hy, wy));
  y.at(b, o, hy, wy) = from_float<T>(v);
}

template <typename T>
__global__ void __launch_bounds__(kThreadsPerBlock)
    unshuffle_avg_kernel(int64_t n, Geometry geo, Strided4d<const T> x, Strided4d<T> y,
                         Strided4d<const T> residual, float scale) {
  for (int64_t idx = grid_thread_index(); idx < n; idx += grid_thread_count())
    unshuffle_avg_element<T>(idx, geo, x, y, residual, scale);
}

template <typename T>
__global__ void __launch_bounds__(kThreadsPerBlock)
    dup_shuffle_kernel(int64_t n, Geometry geo, Strided4d<const T> x, Strided4d<T> y,
                       Strided4d<const T> residual, float scale) {
  for (int64_t idx = grid_thread_index(); idx < n; idx += grid_thread_count())
    dup_shuffle_element<T>(idx, geo, x, y, residual, scale);
}

// The checks both ops share; shape relations are checked by each op.
void check_common(const TensorView4d& x, const TensorView4d& y, const TensorView4d* residual,
                  int64_t factor) {
  require(factor >= 1 && factor <= kMaxFactor,
          "factor: must be in [1, " + str(kMaxFactor) + "], got " + str(factor));
  const std::pair<const TensorView4d*, const char*> tensors[] = {
      {&x, "x"}, {&y, "y"}, {residual, "residual"}};
  for (const auto& [t, name] : tensors)
    if (t != nullptr) require_valid_view(*t, name);
  require(x.size[1] >= 1 && x.size[1] <= kMaxChannels,
          "x: channels must be in [1, 2^31], got " + str(x.size[1]));
  require(y.size[1] >= 1 && y.size[1] <= kMaxChannels,
          "y: channels (out_channels) must be in [1, 2^31], got " + str(y.size[1]));
  require_float_dtype(x, "x");
  require_same_dtype(y, "y", x, "x");
  require_no_broadcast(y, "y");
  if (residual != nullptr) require_same_dtype(*residual, "residual", x, "x");
}

}  // namespace
}  // namespace kernels::shortcut

using namespace kernels::shortcut;

void pixel_unshuffle_channel_avg(const TensorView4d& x, const TensorView4d& y,
                                 const TensorView4d* residual, int64_t factor, float scale,
                                 cudaStream_t stream) {
  check_common(x, y, residual, factor);
  const int64_t f = factor, C = x.size[1], H = x.size[2], W = x.size[3], O = y.size[1];
  require(H % f == 0 && W % f == 0, "x: height " + str(H) + " and width " + str(W) +
                                        " must be divisible by factor=" + str(f));
  require((C * f * f) % O == 0, "y: out_channels=" + str(O) + " must divide C*factor^2 = " +
                                    str(C * f * f) + " (x has C=" + str(C) + ")");
  const int64_t expected[4] = {x.size[0], O, H / f, W / f};
  require_shape(y, "y", expected, "(B, out_channels, H/factor, W/factor) from x and factor");
  if (residual != nullptr) require_shape(*residual, "residual", y.size, "y's shape");

  ensure_device();
  const int64_t n = y.numel();
  if (n == 0) return;
  const Geometry geo{O, H / f, W / f, f, C * f * f / O, walks_channels_last(y)};
  dispatch_dtype(y.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    unshuffle_avg_kernel<T><<<grid_size(n), kThreadsPerBlock, 0, stream>>>(
        n, geo, strided<const T>(x), strided<T>(y), optional_strided<T>(residual), scale);
    FASTGEN_LAUNCH_CHECK();
  });
}

void channel_dup_pixel_shuffle(const TensorView4d& x, const TensorView4d& y,
                               const TensorView4d* residual, int64_t factor, float scale,
                               cudaStream_t stream) {
  check_common(x, y, residual, factor);
  const int64_t f = factor, C = x.size[1], H = x.size[2], W = x.size[3], O = y.size[1];
  require((O * f * f) % C == 0, "y: out_channels*factor^2 = " + str(O * f * f) +
                                    " must be a multiple of x's channels C=" + str(C));
  const int64_t expected[4] = {x.size[0], O, H * f, W * f};
  require_shape(y, "y", expected, "(B, out_channels, H*factor, W*factor) from x and factor");
  if (residual != nullptr) require_shape(*residual, "residual", y.size, "y's shape");

  ensure_device();
  const int64_t n = y.numel();
  if (n == 0) return;
  const Geometry geo{O, H * f, W * f, f, O * f * f / C, walks_channels_last(y)};
  dispatch_dtype(y.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dup_shuffle_kernel<T><<<grid_size(n), kThreadsPerBlock, 0, stream>>>(
        n, geo, strided<const T>(x), strided<T>(y), optional_strided<T>(residual), scale);
    FASTGEN_LAUNCH_CHECK();
  });
}

}  // namespace fastgen
