// Channel RMSNorm of NCHW maps, trms2d (math in fastgen/ops/rms_norm_2d.py):
//
//   r[b, p]    = 1 / sqrt(mean_c x[b, c, p]^2 + eps)                    p = h*W + w
//   y[b, c, p] = x[b, c, p] * r[b, p] * weight[c] + bias[c]
//   backward, g = dy * weight:  dx = r * g - x * r^3 * mean_c(g * x)
//                               dweight[c] = sum_{b,p} dy * x * r,  dbias[c] = sum_{b,p} dy
//
// Decomposition. A block owns tiles of kTilePixels consecutive pixels of one image and all C
// channels: lane l of every warp holds pixels l, l+32, l+64, l+96 of the tile, and warp w
// walks channels w, w+kWarps, ... So on NCHW maps (the DC-AE layout, pixel stride 1) each
// warp-wide load reads 32 consecutive pixels of one channel, and the per-pixel reduction over
// channels is a per-thread sum followed by one kWarps-way combine through shared memory, in a
// fixed order. The tile is read twice, statistics then apply; the second read of its
// C x 128 elements (at most 512 KiB for C = 1024 in fp32, 128 KiB per warp's share) is
// served mostly from L1/L2. channels_last maps are read through the same path: a warp's 32
// pixels then sit C elements apart, and the other warps' neighbouring channels of the same
// pixels hit in L1; whether a channel-across-lanes variant pays for itself is for the GPU
// benchmark to say.
//
// The backward writes dx and reduces dweight/dbias without atomics: each channel's
// contributions in a tile are summed across the warp's lanes by shuffles, and lane 0 of the
// channel's warp adds them into the block's own row of a (blocks, 2, C) float32 buffer, which
// only it ever touches; torch sums the rows. Results are therefore identical run to run.
// Offsets are int64 (decoder maps at 2048 px exceed 2^31 elements); arithmetic is fp32.

#include "common.h"

namespace fastgen {
namespace kernels::rms_norm_2d {
namespace {

constexpr int kWarps = 8;
constexpr int kPixelsPerLane = 4;
constexpr int kTilePixels = 32 * kPixelsPerLane;
constexpr int kRmsThreads = 32 * kWarps;

// Where the tile's pixels sit: pixel s of image b is at h = s / W, w = s % W.
struct PixelGeometry {
  int64_t channels, pixels, width, tiles_per_image;
};

struct TilePixels {
  int64_t image;
  bool valid[kPixelsPerLane];
  int64_t pixel[kPixelsPerLane];
};

__device__ __forceinline__ TilePixels tile_pixels(int64_t tile, const PixelGeometry& geo) {
  TilePixels t;
  t.image = tile / geo.tiles_per_image;
  const int64_t first = (tile % geo.tiles_per_image) * kTilePixels + (threadIdx.x & 31);
#pragma unroll
  for (int j = 0; j < kPixelsPerLane; ++j) {
    t.pixel[j] = first + 32 * j;
    t.valid[j] = t.pixel[j] < geo.pixels;
  }
  return t;
}

// Offset of (image, 0, pixel) in a tensor with strides s; channels add c * s.s1.
template <typename T>
__device__ __forceinline__ int64_t pixel_offset(const Strided4d<T>& s, int64_t image,
                                                int64_t pixel, int64_t width) {
  return image * s.s0 + (pixel / width) * s.s2 + (pixel % width) * s.s3;
}

// Each thread's per-pixel partial sums, combined over the block's warps in warp order.
// Ends with a barrier so the caller may overwrite `partials` for the next tile only after
// every thread has read it.
__device__ __forceinline__ void combine_over_warps(float (&values)[kPixelsPerLane],
                                                   float (*partials)[kTilePixels]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int j = 0; j < kPixelsPerLane; ++j) partials[warp][lane + 32 * j] = values[j];
  __syncthreads();
#pragma unroll
  for (int j = 0; j < kPixelsPerLane; ++j) {
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += partials[w][lane + 32 * j];
    values[j] = total;
  }
  __syncthreads();
}

template <typename T>
__global__ void __launch_bounds__(kRmsThreads)
    trms2d_forward_kernel(PixelGeometry geo, int64_t num_tiles, float eps, Strided4d<const T> x,
                          Strided4d<const T> weight, Strided4d<const T> bias, Strided4d<T> y) {
  __shared__ float partials[kWarps][kTilePixels];
  const int warp = threadIdx.x >> 5;
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const TilePixels t = tile_pixels(tile, geo);
    int64_t x_at[kPixelsPerLane], y_at[kPixelsPerLane];
    float rstd[kPixelsPerLane];
#pragma unroll
    for (int j = 0; j < kPixelsPerLane; ++j) {
      x_at[j] = pixel_offset(x, t.image, t.pixel[j], geo.width);
      y_at[j] = pixel_offset(y, t.image, t.pixel[j], geo.width);
      rstd[j] = 0.0f;
    }
    for (int64_t c = warp; c < geo.channels; c += kWarps) {
#pragma unroll
      for (int j = 0; j < kPixelsPerLane; ++j) {
        if (!t.valid[j]) continue;
        const float v = to_float(x.data[x_at[j] + c * x.s1]);
        rstd[j] += v * v;
      }
    }
    combine_over_warps(rstd, partials);
#pragma unroll
    for (int j = 0; j < kPixelsPerLane; ++j)
      rstd[j] = rsqrtf(rstd[j] / static_cast<float>(geo.channels) + eps);
    for (int64_t c = warp; c < geo.channels; c += kWarps) {
      const float w = weight.data != nullptr ? to_float(weight.data[c * weight.s1]) : 1.0f;
      const float b = bias.data != nullptr ? to_float(bias.data[c * bias.s1]) : 0.0f;
#pragma unroll
      for (int j = 0; j < kPixelsPerLane; ++j) {
        if (!t.valid[j]) continue;
        const float v = to_float(x.data[x_at[j] + c * x.s1]);
        y.data[y_at[j] + c * y.s1] = from_float<T>(v * rstd[j] * w + b);
      }
    }
  }
}

// partial: (gridDim.x, 2, C) float32, contiguous; row blockIdx.x belongs to this block.
template <typename T>
__global__ void __launch_bounds__(kRmsThreads)
    trms2d_backward_kernel(PixelGeometry geo, int64_t num_tiles, float eps,
                           Strided4d<const T> grad, Strided4d<const T> x,
                           Strided4d<const T> weight, Strided4d<T> dx, float* partial) {
  __shared__ float partials[kWarps][kTilePixels];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float* sum_dy_xhat = partial + int64_t(blockIdx.x) * 2 * geo.channels;
  float* sum_dy = sum_dy_xhat + geo.channels;
  // Channel c's entries are only ever touched by lane 0 of warp c % kWarps.
  if (lane == 0) {
    for (int64_t c = warp; c < geo.channels; c += kWarps) {
      sum_dy_xhat[c] = 0.0f;
      sum_dy[c] = 0.0f;
    }
  }
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const TilePixels t = tile_pixels(tile, geo);
    int64_t g_at[kPixelsPerLane], x_at[kPixelsPerLane], dx_at[kPixelsPerLane];
    float sum_x2[kPixelsPerLane], sum_gx[kPixelsPerLane];
#pragma unroll
    for (int j = 0; j < kPixelsPerLane; ++j) {
      g_at[j] = pixel_offset(grad, t.image, t.pixel[j], geo.width);
      x_at[j] = pixel_offset(x, t.image, t.pixel[j], geo.width);
      dx_at[j] = pixel_offset(dx, t.image, t.pixel[j], geo.width);
      sum_x2[j] = 0.0f;
      sum_gx[j] = 0.0f;
    }
    for (int64_t c = warp; c < geo.channels; c += kWarps) {
      const float w = weight.data != nullptr ? to_float(weight.data[c * weight.s1]) : 1.0f;
#pragma unroll
      for (int j = 0; j < kPixelsPerLane; ++j) {
        if (!t.valid[j]) continue;
        const float v = to_float(x.data[x_at[j] + c * x.s1]);
        sum_x2[j] += v * v;
        sum_gx[j] += to_float(grad.data[g_at[j] + c * grad.s1]) * w * v;
      }
    }
    combine_over_warps(sum_x2, partials);
    combine_over_warps(sum_gx, partials);
    float rstd[kPixelsPerLane], x_coefficient[kPixelsPerLane];
    const float inv_channels = 1.0f / static_cast<float>(geo.channels);
#pragma unroll
    for (int j = 0; j < kPixelsPerLane; ++j) {
      rstd[j] = rsqrtf(sum_x2[j] * inv_channels + eps);
      x_coefficient[j] = rstd[j] * rstd[j] * rstd[j] * sum_gx[j] * inv_channels;
    }
    // Warp-uniform trip count: every lane reaches the shuffles in warp_sum.
    for (int64_t c = warp; c < geo.channels; c += kWarps) {
      const float w = weight.data != nullptr ? to_float(weight.data[c * weight.s1]) : 1.0f;
      float dy_xhat = 0.0f, dy_total = 0.0f;
#pragma unroll
      for (int j = 0; j < kPixelsPerLane; ++j) {
        if (!t.valid[j]) continue;
        const float v = to_float(x.data[x_at[j] + c * x.s1]);
        const float dy = to_float(grad.data[g_at[j] + c * grad.s1]);
        dx.data[dx_at[j] + c * dx.s1] = from_float<T>(rstd[j] * dy * w - v * x_coefficient[j]);
        dy_xhat += dy * v * rstd[j];
        dy_total += dy;
      }
      dy_xhat = warp_sum(dy_xhat);
      dy_total = warp_sum(dy_total);
      if (lane == 0) {
        sum_dy_xhat[c] += dy_xhat;
        sum_dy[c] += dy_total;
      }
    }
  }
}

// The per-channel vectors arrive as (1, C, 1, 1) views.
void check_channel_vector(const TensorView4d* t, const char* name, const TensorView4d& x) {
  if (t == nullptr) return;
  const int64_t expected[4] = {1, x.size[1], 1, 1};
  require_shape(*t, name, expected, "(1, C, 1, 1), a view of a (C,) vector");
  require_same_dtype(*t, name, x, "x");
  require(t->data != nullptr, std::string(name) + ": null data pointer");
}

// Checks shared by forward and backward; returns the pixel geometry.
PixelGeometry check_inputs(const TensorView4d& x, const TensorView4d* weight,
                           const TensorView4d* bias, float eps) {
  require_valid_view(x, "x");
  require(x.size[1] >= 1, "x: must have at least one channel, got shape " + shape_str(x.size));
  require_float_dtype(x, "x");
  check_channel_vector(weight, "weight", x);
  check_channel_vector(bias, "bias", x);
  require(eps > 0.0f && eps < INFINITY, "eps: must be a finite number > 0");
  const int64_t pixels = x.size[2] * x.size[3];
  return {x.size[1], pixels, std::max<int64_t>(x.size[3], 1),
          (pixels + kTilePixels - 1) / kTilePixels};
}

// Backward blocks, one row of partial sums each: two blocks per SM fill its registers (the
// kernel needs ~127 per thread) while the rows summed afterwards stay few.
int64_t backward_blocks(const TensorView4d& x) {
  const int64_t tiles = x.size[0] * ceil_div(x.size[2] * x.size[3], kTilePixels);
  return std::max<int64_t>(1, std::min(tiles, 2 * device_sms()));
}

}  // namespace
}  // namespace kernels::rms_norm_2d

using namespace kernels::rms_norm_2d;

void trms2d_forward(const TensorView4d& x, const TensorView4d* weight, const TensorView4d* bias,
                    const TensorView4d& y, float eps, cudaStream_t stream) {
  const PixelGeometry geo = check_inputs(x, weight, bias, eps);
  require_like(y, "y", x, "x");
  require_no_broadcast(y, "y");

  ensure_device();
  const int64_t num_tiles = x.size[0] * geo.tiles_per_image;
  if (num_tiles == 0) return;
  dispatch_dtype(x.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    trms2d_forward_kernel<T><<<grid_size(num_tiles, kRmsThreads), kRmsThreads, 0, stream>>>(
        geo, num_tiles, eps, strided<const T>(x), optional_strided<T>(weight),
        optional_strided<T>(bias), strided<T>(y));
    FASTGEN_LAUNCH_CHECK();
  });
}

int64_t trms2d_backward_blocks(const TensorView4d& x) {
  check_inputs(x, nullptr, nullptr, 1.0f);
  ensure_device();
  return backward_blocks(x);
}

void trms2d_backward(const TensorView4d& grad, const TensorView4d& x, const TensorView4d* weight,
                     const TensorView4d& dx, const TensorView4d& partial, float eps,
                     cudaStream_t stream) {
  const PixelGeometry geo = check_inputs(x, weight, nullptr, eps);
  require_like(grad, "grad", x, "x");
  require_like(dx, "dx", x, "x");
  require_no_broadcast(dx, "dx");
  const int64_t rows = partial.size[0];
  require(partial.dtype == DType::Float32,
          std::string("partial: dtype must be float32, got ") + dtype_name(partial.dtype));
  require(rows >= 1 && rows <= (int64_t(1) << 31) - 1,
          "partial: needs between 1 and 2^31-1 rows (one per block), got " + str(rows));
  const int64_t expected[4] = {rows, 2, geo.channels, 1};
  require_shape(partial, "partial", expected, "(blocks, 2, C, 1)");
  require(partial.stride[2] == 1 && partial.stride[1] == geo.channels &&
              partial.stride[0] == 2 * geo.channels,
          "partial: must be contiguous");
  require(partial.data != nullptr, "partial: null data pointer");

  ensure_device();
  // Every block runs, even without a tile, so that each row of partial is written.
  const int64_t num_tiles = x.size[0] * geo.tiles_per_image;
  dispatch_dtype(x.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    trms2d_backward_kernel<T><<<static_cast<unsigned int>(rows), kRmsThreads, 0, stream>>>(
        geo, num_tiles, eps, strided<const T>(grad), strided<const T>(x),
        optional_strided<T>(weight), strided<T>(dx), static_cast<float*>(partial.data));
    FASTGEN_LAUNCH_CHECK();
  });
}

}  // namespace fastgen
