// upfirdn2d (math in fastgen/ops/upfirdn2d.py), on strided NCHW views.
//
//   y[b, c, oy, ox] = gain * sum_{i<fh, j<fw} w[i, j] * p[oy*down_y + i, ox*down_x + j]
// where p is x with up-1 zeros inserted after every pixel, padded by (px0, px1, py0, py1)
// (negative: cropped), and w = f flipped in both axes (convolution) or f itself
// (flip_filter: correlation); a 1-D f of n taps is the separable n x n filter f[i] * f[j].
// The backward with respect to x is this op again (flipped filter, up and down swapped), so
// this one kernel serves every order of gradient.
//
// Decomposition: a block computes a tile_h x tile_w tile of outputs of one (b, c) plane.
// Because p is never formed, output row oy only touches input rows
// ry = (oy*down_y - py0 + i) / up_y for the taps i that make the division exact (polyphase):
// i = i0 + k*up_y with i0 = (py0 - oy*down_y) mod up_y. The rows a whole tile touches lie in
// a window of in_h = ((tile_h-1)*down_y + fh-1) / up_y + 2 rows starting at
// floor((oy0*down_y - py0) / up_y), and likewise for columns. The block stages that window
// (zeros where it falls outside x, in the padding) and the oriented 2-D filter in shared
// memory once, after which every tap is an on-chip read: each input element is read from
// global memory about once per tile instead of once per tap. Each thread then accumulates
// its outputs in fp32 over the at most ceil(fh/up_y) x ceil(fw/up_x) taps that land on pixels
// of x (taps stop at x's edges, never multiplying the padding's zeros) and rounds once at the
// store. A separable (1-D) filter takes two 1-D passes inside shared
// memory instead: every window row filtered along x at the tile's output columns, then those
// filtered along y: ceil(fw/up_x) * in_h/tile_h + ceil(fh/up_y) taps per output instead of
// their product (a 12-tap filter at down 2: 12 * 75/32 + 12, about 40, instead of 144), and
// the partial sums never leave the chip, unlike the Triton kernel's two launches.
//
// Blocks run in index order, so the order decides what shares L2: for NCHW the tiles of one
// plane are consecutive (their halos overlap); for channels_last the channels of one tile are,
// so the 32-byte sectors a block reads with stride C are the ones its neighbours read too.
//
// Tiles are up to 32 x 32 outputs (4 per thread), shrunk to the output plane so small
// layers do not idle most of a block, and halved while the staged window and filter exceed
// the 48 KiB of shared memory a block gets without opting in; a filter so large that even
// 1 x 1 tiles exceed the device's opt-in limit is rejected with a clear error.

#include <cmath>

#include "common.h"

namespace fastgen {
namespace kernels::upfirdn2d {
namespace {

constexpr int64_t kMaxTileSide = 32;
constexpr int64_t kDefaultSharedBytes = 48 * 1024;
// Bounds under which every coordinate product below fits in int64 with room to spare.
constexpr int64_t kMaxFactor = int64_t(1) << 15;
constexpr int64_t kMaxPad = int64_t(1) << 31;
constexpr int64_t kMaxTaps = int64_t(1) << 15;

struct Geometry {
  int64_t channels, height, width;  // of x
  int64_t out_h, out_w;
  int up_x, up_y, down_x, down_y;
  int64_t pad_x0, pad_y0;
  int fh, fw;
  int tile_h, tile_w;  // outputs per block
  int in_h, in_w;      // the staged input window
  int64_t tiles_x, tiles_y;
  bool channels_fastest;  // block order: see the header comment
  float gain;
};

// floor(a / b) for b > 0 and any a (C++ division truncates toward zero).
__host__ __device__ __forceinline__ int64_t floor_div(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return q * b > a ? q - 1 : q;
}

// The filter as the kernel reads it: taps[i * ty + j * tx] for a 2-D filter, or
// taps[i * tx] for separable taps; null for the 1 x 1 identity (a 2-D filter).
struct Filter {
  const float* taps;
  int64_t ty, tx;
  bool separable, flip;

  // w[i, j] of the header comment (2-D).
  __device__ __forceinline__ float weight(int i, int j, int fh, int fw) const {
    if (taps == nullptr) return 1.0f;
    return taps[(flip ? i : fh - 1 - i) * ty + (flip ? j : fw - 1 - j) * tx];
  }
  // Tap i of the oriented n-tap 1-D factor (separable).
  __device__ __forceinline__ float tap(int i, int n) const {
    return taps[(flip ? i : n - 1 - i) * tx];
  }
};

// Floats of shared memory a block uses: the oriented filter (fh * fw, or fh + fw taps when
// separable), the input window, and for a separable filter the window filtered along x at
// the tile's output columns (in_h x tile_w).
__host__ __device__ __forceinline__ int64_t shared_floats(const Geometry& g, bool separable) {
  const int64_t window = int64_t(g.in_h) * g.in_w;
  if (separable) return g.fh + g.fw + window + int64_t(g.in_h) * g.tile_w;
  return int64_t(g.fh) * g.fw + window;
}

// For output coordinate o along one axis of x's `size` pixels: the first tap on a pixel of x
// (neither an inserted zero nor padding), that pixel's index in the window, which starts at
// input index `first`, and the window index where x ends. v is where tap 0 lands in the
// upsampled, unpadded image; ceil(v / up) is the first input pixel at or after, and pixel 0
// the first inside x. Taps stop at `end` as well as at the filter's last tap, so no tap is
// multiplied by padding: a NaN or infinite tap reaches exactly the outputs that weight a pixel
// of x by it (the op's contract for non-finite taps).
struct Phase {
  int tap, index;
  int64_t end;
};

__device__ __forceinline__ Phase phase(int64_t o, int down, int64_t pad0, int up,
                                       int64_t first, int64_t size) {
  const int64_t v = o * down - pad0;
  const int64_t pixel = floor_div(v + up - 1, up);
  const int64_t real_pixel = pixel > 0 ? pixel : 0;
  const int64_t tap = real_pixel * up - v;  // past every filter when far into the padding
  return {int(tap < kMaxTaps ? tap : kMaxTaps), int(real_pixel - first), size - first};
}

template <typename T>
__global__ void __launch_bounds__(kThreadsPerBlock)
    upfirdn2d_kernel(Strided4d<const T> x, Filter filter, Strided4d<T> y, Geometry g) {
  extern __shared__ float shared[];
  // 2-D: w is fh x fw, row-major. Separable: w is the fh row taps, then the fw column taps.
  float* w = shared;
  float* window = w + (filter.separable ? g.fh + g.fw : g.fh * g.fw);  // in_h x in_w
  float* along_x = window + g.in_h * g.in_w;  // separable only: in_h x tile_w

  const int64_t tiles = g.tiles_x * g.tiles_y;
  int64_t b, c, tile;
  if (g.channels_fastest) {
    c = blockIdx.x % g.channels;
    const int64_t rest = blockIdx.x / g.channels;
    tile = rest % tiles;
    b = rest / tiles;
  } else {
    const int64_t plane = blockIdx.x / tiles;
    tile = blockIdx.x - plane * tiles;
    b = plane / g.channels;
    c = plane - b * g.channels;
  }
  const int64_t oy0 = (tile / g.tiles_x) * g.tile_h;
  const int64_t ox0 = (tile % g.tiles_x) * g.tile_w;
  // First input row / column of the window: that of tap 0 of the tile's first output.
  const int64_t ry0 = floor_div(oy0 * g.down_y - g.pad_y0, g.up_y);
  const int64_t rx0 = floor_div(ox0 * g.down_x - g.pad_x0, g.up_x);

  if (filter.separable) {
    for (int k = threadIdx.x; k < g.fh + g.fw; k += blockDim.x)
      w[k] = k < g.fh ? filter.tap(k, g.fh) : filter.tap(k - g.fh, g.fw);
  } else {
    for (int k = threadIdx.x; k < g.fh * g.fw; k += blockDim.x)
      w[k] = filter.weight(k / g.fw, k % g.fw, g.fh, g.fw);
  }
  for (int k = threadIdx.x; k < g.in_h * g.in_w; k += blockDim.x) {
    const int64_t ry = ry0 + k / g.in_w, rx = rx0 + k % g.in_w;
    const bool inside = ry >= 0 && ry < g.height && rx >= 0 && rx < g.width;
    window[k] = inside ? to_float(x.at(b, c, ry, rx)) : 0.0f;
  }
  __syncthreads();

  if (filter.separable) {
    // First 1-D pass: every window row along x, at the tile's output columns (columns past
    // out_w stay inside the window too, and are never read back). ceil(fw / up_x) taps each.
    const float* w_x = w + g.fh;
    for (int k = threadIdx.x; k < g.in_h * g.tile_w; k += blockDim.x) {
      const int tile_col = k % g.tile_w;
      const Phase px = phase(ox0 + tile_col, g.down_x, g.pad_x0, g.up_x, rx0, g.width);
      const float* in_row = window + (k / g.tile_w) * g.in_w;
      float acc = 0.0f;
      for (int j = px.tap, col = px.index; j < g.fw && col < px.end; j += g.up_x, ++col)
        acc += w_x[j] * in_row[col];
      along_x[k] = acc;
    }
    __syncthreads();  // uniform: `separable` is a kernel argument
  }

  for (int k = threadIdx.x; k < g.tile_h * g.tile_w; k += blockDim.x) {
    const int tile_row = k / g.tile_w, tile_col = k % g.tile_w;
    const int64_t oy = oy0 + tile_row, ox = ox0 + tile_col;
    if (oy >= g.out_h || ox >= g.out_w) continue;
    const Phase py = phase(oy, g.down_y, g.pad_y0, g.up_y, ry0, g.height);
    float acc = 0.0f;
    if (filter.separable) {
      // Second 1-D pass, along y over the first pass's rows: ceil(fh / up_y) taps.
      for (int i = py.tap, row = py.index; i < g.fh && row < py.end; i += g.up_y, ++row)
        acc += w[i] * along_x[row * g.tile_w + tile_col];
    } else {
      const Phase px = phase(ox, g.down_x, g.pad_x0, g.up_x, rx0, g.width);
      for (int i = py.tap, row = py.index; i < g.fh && row < py.end; i += g.up_y, ++row) {
        const float* w_row = w + i * g.fw;
        const float* in_row = window + row * g.in_w;
        for (int j = px.tap, col = px.index; j < g.fw && col < px.end; j += g.up_x, ++col)
          acc += w_row[j] * in_row[col];
      }
    }
    y.at(b, c, oy, ox) = from_float<T>(acc * g.gain);
  }
}

// ---------------------------------------------------------------------------------------
// Host side

void check_factor(int64_t v, const char* name) {
  require(v >= 1 && v <= kMaxFactor, std::string(name) + ": factors must be in [1, " +
                                         str(kMaxFactor) + "], got " + str(v));
}

int64_t window_extent(int64_t tile, int64_t down, int64_t taps, int64_t up) {
  return ((tile - 1) * down + taps - 1) / up + 2;
}

int64_t pow2_at_most(int64_t cap, int64_t v) {
  int64_t p = 1;
  while (p < v && p < cap) p *= 2;
  return p;
}

void set_tile(Geometry& g, int64_t tile_h, int64_t tile_w) {
  g.tile_h = int(tile_h);
  g.tile_w = int(tile_w);
  g.in_h = int(window_extent(tile_h, g.down_y, g.fh, g.up_y));
  g.in_w = int(window_extent(tile_w, g.down_x, g.fw, g.up_x));
}

// Tile sides and the window they need; halves the longer side while over `budget` bytes.
void choose_tile(Geometry& g, bool separable, int64_t budget) {
  set_tile(g, pow2_at_most(kMaxTileSide, g.out_h), pow2_at_most(kMaxTileSide, g.out_w));
  while (shared_floats(g, separable) * int64_t(sizeof(float)) > budget &&
         (g.tile_h > 1 || g.tile_w > 1)) {
    if (g.tile_h >= g.tile_w)
      set_tile(g, g.tile_h / 2, g.tile_w);
    else
      set_tile(g, g.tile_h, g.tile_w / 2);
  }
  g.tiles_x = (g.out_w + g.tile_w - 1) / g.tile_w;
  g.tiles_y = (g.out_h + g.tile_h - 1) / g.tile_h;
}

}  // namespace
}  // namespace kernels::upfirdn2d

using namespace kernels::upfirdn2d;

void upfirdn2d(const TensorView4d& x, const TensorView4d* f, bool separable,
               const TensorView4d& y, int64_t up_x, int64_t up_y, int64_t down_x,
               int64_t down_y, int64_t pad_x0, int64_t pad_x1, int64_t pad_y0, int64_t pad_y1,
               bool flip_filter, float gain, cudaStream_t stream) {
  require_valid_view(x, "x");
  require_valid_view(y, "y");
  require_same_dtype(y, "y", x, "x");
  require_no_broadcast(y, "y");
  check_factor(up_x, "up");
  check_factor(up_y, "up");
  check_factor(down_x, "down");
  check_factor(down_y, "down");
  for (int64_t pad : {pad_x0, pad_x1, pad_y0, pad_y1})
    require(pad > -kMaxPad && pad < kMaxPad,
            "padding: each amount must be within +-2^31, got " + str(pad));
  require(std::isfinite(gain), "gain: must be finite, got " + std::to_string(gain));

  int64_t fh = 1, fw = 1;
  if (f != nullptr) {
    require_valid_view(*f, "f");
    require(f->dtype == DType::Float32,
            std::string("f: dtype must be float32, got ") + dtype_name(f->dtype));
    require(f->size[0] == 1 && f->size[1] == 1 && (!separable || f->size[2] == 1),
            "f: expected a (1, 1, 1, n) view of separable taps or a (1, 1, fh, fw) filter, "
            "got " + shape_str(f->size));
    fh = separable ? f->size[3] : f->size[2];
    fw = f->size[3];
    require(fh >= 1 && fw >= 1 && fh <= kMaxTaps && fw <= kMaxTaps,
            "f: each side must have 1 to " + str(kMaxTaps) + " taps, got " + shape_str(f->size));
  } else {
    require(!separable, "f: None (the identity) cannot be separable");
  }

  const int64_t padded_h = x.size[2] * up_y + pad_y0 + pad_y1;
  const int64_t padded_w = x.size[3] * up_x + pad_x0 + pad_x1;
  require(padded_h >= fh && padded_w >= fw,
          "padding: leaves an empty output: the upsampled, padded image is " + str(padded_h) +
              " x " + str(padded_w) + ", smaller than the " + str(fh) + " x " + str(fw) +
              " filter");
  const int64_t out_h = (padded_h - fh) / down_y + 1, out_w = (padded_w - fw) / down_x + 1;
  const int64_t expected[4] = {x.size[0], x.size[1], out_h, out_w};
  require_shape(y, "y", expected, "(B, C, out_h, out_w) from x, f, up, down and padding");

  ensure_device();
  if (y.numel() == 0) return;
  Geometry g{};
  g.channels = x.size[1];
  g.height = x.size[2];
  g.width = x.size[3];
  g.out_h = out_h;
  g.out_w = out_w;
  g.up_x = int(up_x);
  g.up_y = int(up_y);
  g.down_x = int(down_x);
  g.down_y = int(down_y);
  g.pad_x0 = pad_x0;
  g.pad_y0 = pad_y0;
  g.fh = int(fh);
  g.fw = int(fw);
  g.gain = gain;
  g.channels_fastest = x.stride[1] < x.stride[2] && x.stride[1] < x.stride[3];
  choose_tile(g, separable, kDefaultSharedBytes);
  const int64_t bytes = shared_floats(g, separable) * int64_t(sizeof(float));
  if (bytes > kDefaultSharedBytes) {  // only 1 x 1 tiles are left: can the device opt in?
    const int optin = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
    require(bytes <= optin, "f: a " + str(fh) + " x " + str(fw) + " filter at up (" +
                                str(up_x) + ", " + str(up_y) + ") needs " + str(bytes) +
                                " bytes of shared memory per block even for one output, more "
                                "than this device's " + str(optin));
  }
  const int64_t blocks = x.size[0] * x.size[1] * g.tiles_x * g.tiles_y;
  require(blocks < (int64_t(1) << 31),
          "x: " + str(blocks) + " output tiles exceed the 2^31 - 1 blocks of one launch");

  const Filter filter{f != nullptr ? static_cast<const float*>(f->data) : nullptr,
                      f != nullptr ? f->stride[2] : 0, f != nullptr ? f->stride[3] : 0,
                      separable, flip_filter};
  dispatch_dtype(y.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto kernel = upfirdn2d_kernel<T>;
    if (bytes > kDefaultSharedBytes)
      FASTGEN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              int(bytes)));
    kernel<<<unsigned(blocks), kThreadsPerBlock, size_t(bytes), stream>>>(
        strided<const T>(x), filter, strided<T>(y), g);
    FASTGEN_LAUNCH_CHECK();
  });
}

}  // namespace fastgen
