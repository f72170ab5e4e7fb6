// filtered_lrelu (math in fastgen/ops/filtered_lrelu.py): one fused pass
//
//   src --[stage 1 FIR, up]--> mid --pointwise--> --[stage 2 FIR, down]--> dst
//
// which is the forward (x + b -> z -> lrelu/clamp, 2-bit codes out -> y) and, with the
// stages' roles swapped and the filters reversed, the backward (dy -> da -> times the
// derivative the codes stand for -> dx, plus per-tile sums of dx for db). The host
// (fastgen.ops.filtered_lrelu.FusedPass) supplies the filters as correlation taps with the
// gain folded in: per stage either a separable pair (rows along y, cols along x) or one 2-D
// table. Index maps per axis: mid sample m reads src sample q through stage-1 tap
// q*up + pad1 - m, dst sample o reads mid sample m through stage-2 tap m + pad2 - o*down.
//
// Decomposition. A block owns a tile of TY x TX dst samples of one channel plane and keeps
// everything between the read of src and the write of dst in shared memory: the src tile with
// its halo, the mid tile (up^2 times larger than the src tile; it never reaches global
// memory) and, for separable filters, the half-filtered rows. Every stage is a direct
// polyphase loop over the taps that are not zero (a mid sample meets only the taps of its
// phase, k1 / up of them per axis), with fp32 FMAs in a fixed order, so results do not depend
// on the tiling. A tap multiplies only samples of the signal it filters (the op's contract on
// non-finite values): stage 1 skips the src samples outside src (padding; in the backward the
// zeros of the downsampling's adjoint around dy) and stage 2 the mid samples outside mid's
// extent (in the backward the zeros of the crop's and the padding's adjoints), so a NaN or
// infinite tap never meets a structural zero. Threads stride over each stage's outputs, so any
// tile shape and filter length works; the host picks the largest tile whose shared memory fits
// (see choose_tile).
//
// Codes (forward with codes): 2 bits per mid sample, four consecutive columns a byte. A tile
// owns the mid rows [m0, m0 + TY*down) and columns [m0, m0 + TX*down) it starts (the last
// tile of an axis: to the end), TX is a multiple of 4 and the forward's pad2 is 0, so the
// owned columns start on a byte boundary and every byte is written exactly once, whole.

#include "common.h"

namespace fastgen {
namespace kernels::filtered_lrelu {
namespace {

constexpr int kFlThreads = 256;
constexpr int kCodesPerByte = 4;

enum PassMode : int { kForward = 0, kForwardWithCodes = 1, kBackward = 2 };

// One spatial axis of a pass, and of the block's tile along it.
struct PassAxis {
  int64_t src, mid, dst;  // extents
  int64_t pad1, pad2;
  int taps1, taps2;
  int tile;      // dst samples per tile
  int mid_tile;  // mid samples per tile
  int src_tile;  // src samples per tile, halo included
  int64_t tiles;
};

struct PassGeometry {
  PassAxis y, x;
  int up, down;
  int mid_pitch;  // row pitch of the mid tile in shared memory: x.mid_tile rounded up to 4
  int64_t channels, planes;
  float gain, slope, clamp;
  bool has_clamp;
  int mode;
};

// The four tap tables; cols are null for a 2-D (non-separable) stage.
struct PassTaps {
  const float* rows1;
  const float* cols1;
  const float* rows2;
  const float* cols2;
};

__host__ __device__ __forceinline__ int64_t floor_div(int64_t a, int64_t b) {
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) {
  return floor_div(a + b - 1, b);
}

// The polyphase start of mid sample m: the first src sample it reads, relative to the tile's
// first src sample q0, and the tap that sample meets (in [0, up)).
struct Phase {
  int src_offset;
  int tap;
};

__device__ __forceinline__ Phase phase_of(int64_t m, int64_t q0, int64_t pad1, int up) {
  const int64_t q = ceil_div(m - pad1, up);
  return {static_cast<int>(q - q0), static_cast<int>(q * up + pad1 - m)};
}

// The tile offsets [first, end) of the samples that exist along one axis of a signal of
// `extent` samples whose tile starts at sample `origin`, `tile` samples long.
struct Span {
  int first, end;
};

__device__ __forceinline__ Span real_span(int64_t origin, int64_t extent, int tile) {
  const int64_t first = origin < 0 ? -origin : 0;
  const int64_t end = extent - origin;
  return {static_cast<int>(first < tile ? first : tile),
          static_cast<int>(end < 0 ? 0 : end < tile ? end : tile)};
}

// The first of the taps k0, k0 + step, ... that reads a sample at or after span.first, when
// tap k0 reads offset `offset` and each next tap the next sample.
__device__ __forceinline__ int first_real_tap(int k0, int offset, int step, Span span) {
  return offset < span.first ? k0 + (span.first - offset) * step : k0;
}

// sum over the phase's taps k = tap, tap + up, ... of taps[k] * src[(offset + j) * stride],
// for the src offsets offset + j inside `real` only.
__device__ __forceinline__ float upsampling_fir(const float* src, int stride, const float* taps,
                                                int num_taps, Phase p, int up, Span real) {
  float acc = 0.0f;
  int q = p.src_offset > real.first ? p.src_offset : real.first;
  const float* s = src + static_cast<int64_t>(q) * stride;
  for (int k = first_real_tap(p.tap, p.src_offset, up, real); k < num_taps && q < real.end;
       k += up, ++q, s += stride)
    acc = fmaf(taps[k], *s, acc);
  return acc;
}

// Shared memory, in floats: the taps, then region A (src tile, then the row-filtered src for a
// separable stage 1; later the row-filtered mid tile for a separable stage 2), then the mid
// tile. Host and device both lay it out with this.
struct SharedLayout {
  int taps1, taps2, region_a, mid;

  __host__ __device__ int total() const { return taps1 + taps2 + region_a + mid; }
};

__host__ __device__ inline SharedLayout shared_layout(const PassGeometry& g, bool separable1,
                                                      bool separable2) {
  SharedLayout l;
  l.taps1 = separable1 ? g.y.taps1 + g.x.taps1 : g.y.taps1 * g.x.taps1;
  l.taps2 = separable2 ? g.y.taps2 + g.x.taps2 : g.y.taps2 * g.x.taps2;
  const int src_tile = g.y.src_tile * g.x.src_tile;
  const int stage1 = src_tile + (separable1 ? g.y.src_tile * g.mid_pitch : 0);
  const int stage2 = separable2 ? g.y.mid_tile * g.x.tile : 0;
  l.region_a = stage1 > stage2 ? stage1 : stage2;
  l.mid = g.y.mid_tile * g.mid_pitch;
  return l;
}

__device__ __forceinline__ void copy_taps(float* dst, const float* src, int n) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
}

template <typename T, bool kSeparable1, bool kSeparable2>
__global__ void __launch_bounds__(kFlThreads)
    filtered_lrelu_kernel(PassGeometry g, PassTaps taps, Strided4d<const T> src,
                          Strided4d<const T> bias, Strided4d<T> dst, Strided4d<uint8_t> codes,
                          float* tile_sums) {
  extern __shared__ float shared[];
  __shared__ float warp_totals[kFlThreads / 32];
  const SharedLayout layout = shared_layout(g, kSeparable1, kSeparable2);
  float* taps1 = shared;
  float* taps2 = taps1 + layout.taps1;
  float* region_a = taps2 + layout.taps2;
  float* mid = region_a + layout.region_a;
  const PassAxis &ay = g.y, &ax = g.x;

  if (kSeparable1) {
    copy_taps(taps1, taps.rows1, ay.taps1);
    copy_taps(taps1 + ay.taps1, taps.cols1, ax.taps1);
  } else {
    copy_taps(taps1, taps.rows1, ay.taps1 * ax.taps1);
  }
  if (kSeparable2) {
    copy_taps(taps2, taps.rows2, ay.taps2);
    copy_taps(taps2 + ay.taps2, taps.cols2, ax.taps2);
  } else {
    copy_taps(taps2, taps.rows2, ay.taps2 * ax.taps2);
  }
  // The first tile's loop syncs before any tap is read.

  const int64_t num_tiles = g.planes * ay.tiles * ax.tiles;
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const int64_t tile_x = tile % ax.tiles;
    const int64_t tile_y = (tile / ax.tiles) % ay.tiles;
    const int64_t plane = tile / (ax.tiles * ay.tiles);
    const int64_t b = plane / g.channels, c = plane % g.channels;
    const int64_t o0y = tile_y * ay.tile, o0x = tile_x * ax.tile;
    const int64_t m0y = o0y * g.down - ay.pad2, m0x = o0x * g.down - ax.pad2;
    const int64_t q0y = ceil_div(m0y - ay.pad1, g.up), q0x = ceil_div(m0x - ax.pad1, g.up);

    // 1. The src tile with its halo; zeros outside src (padding, cropping) and the bias on
    // real samples only.
    {
      const float plane_bias = bias.data != nullptr ? to_float(bias.data[c * bias.s1]) : 0.0f;
      const int count = ay.src_tile * ax.src_tile;
      for (int i = threadIdx.x; i < count; i += blockDim.x) {
        const int64_t qy = q0y + i / ax.src_tile, qx = q0x + i % ax.src_tile;
        float v = 0.0f;
        if (qy >= 0 && qy < ay.src && qx >= 0 && qx < ax.src)
          v = to_float(src.at(b, c, qy, qx)) + plane_bias;
        region_a[i] = v;
      }
    }
    __syncthreads();

    // 2. Stage 1 into the mid tile.
    const Span src_y = real_span(q0y, ay.src, ay.src_tile);
    const Span src_x = real_span(q0x, ax.src, ax.src_tile);
    if (kSeparable1) {
      float* rows_done = region_a + ay.src_tile * ax.src_tile;  // (src_tile y) x mid_pitch
      const int count = ay.src_tile * ax.mid_tile;
      for (int i = threadIdx.x; i < count; i += blockDim.x) {
        const int sy = i / ax.mid_tile, tx = i % ax.mid_tile;
        const Phase px = phase_of(m0x + tx, q0x, ax.pad1, g.up);
        rows_done[sy * g.mid_pitch + tx] = upsampling_fir(
            region_a + sy * ax.src_tile, 1, taps1 + ay.taps1, ax.taps1, px, g.up, src_x);
      }
      __syncthreads();
      const int mid_count = ay.mid_tile * ax.mid_tile;
      for (int i = threadIdx.x; i < mid_count; i += blockDim.x) {
        const int ty = i / ax.mid_tile, tx = i % ax.mid_tile;
        const Phase py = phase_of(m0y + ty, q0y, ay.pad1, g.up);
        mid[ty * g.mid_pitch + tx] =
            upsampling_fir(rows_done + tx, g.mid_pitch, taps1, ay.taps1, py, g.up, src_y);
      }
    } else {
      const int mid_count = ay.mid_tile * ax.mid_tile;
      for (int i = threadIdx.x; i < mid_count; i += blockDim.x) {
        const int ty = i / ax.mid_tile, tx = i % ax.mid_tile;
        const Phase py = phase_of(m0y + ty, q0y, ay.pad1, g.up);
        const Phase px = phase_of(m0x + tx, q0x, ax.pad1, g.up);
        float acc = 0.0f;
        int sy = py.src_offset > src_y.first ? py.src_offset : src_y.first;
        for (int ky = first_real_tap(py.tap, py.src_offset, g.up, src_y);
             ky < ay.taps1 && sy < src_y.end; ky += g.up, ++sy)
          acc += upsampling_fir(region_a + sy * ax.src_tile, 1, taps1 + ky * ax.taps1, ax.taps1,
                                px, g.up, src_x);
        mid[ty * g.mid_pitch + tx] = acc;
      }
    }
    __syncthreads();

    // 3. The pointwise step, four consecutive columns (one byte of codes) per thread. Samples
    // outside mid's extent are left as they are: stage 2 reads none of them.
    {
      const int quads = g.mid_pitch / kCodesPerByte;
      const int count = ay.mid_tile * quads;
      const bool last_y = tile_y == ay.tiles - 1, last_x = tile_x == ax.tiles - 1;
      for (int i = threadIdx.x; i < count; i += blockDim.x) {
        const int ty = i / quads, quad = i % quads;
        const int64_t my = m0y + ty;
        const bool row_inside = my >= 0 && my < ay.mid;
        unsigned packed = 0;
        if (g.mode == kBackward && row_inside) {
          const int64_t first = m0x + quad * kCodesPerByte;  // may straddle bytes: read per sample
          for (int e = 0; e < kCodesPerByte; ++e) {
            const int64_t mx = first + e;
            if (mx >= 0 && mx < ax.mid)
              packed |= ((codes.at(b, c, my, mx >> 2) >> ((mx & 3) * 2)) & 3u) << (2 * e);
          }
        }
#pragma unroll
        for (int e = 0; e < kCodesPerByte; ++e) {
          const int tx = quad * kCodesPerByte + e;
          const int64_t mx = m0x + tx;
          const bool inside = row_inside && tx < ax.mid_tile && mx >= 0 && mx < ax.mid;
          float& value = mid[ty * g.mid_pitch + tx];
          if (!inside) continue;
          if (g.mode == kBackward) {
            const unsigned code = (packed >> (2 * e)) & 3u;
            // A select for clamped samples: their gradient is 0 even where dz is NaN or inf.
            value = code == 2 ? 0.0f : value * (code == 1 ? g.gain : g.gain * g.slope);
            continue;
          }
          const float v = value * g.gain;
          float a = v > 0.0f ? v : v * g.slope;
          unsigned code = v > 0.0f ? 1u : 0u;
          if (g.has_clamp) {
            if (!(fabsf(a) <= g.clamp)) code = 2u;  // a NaN too, as torch.clamp's gradient mask
            // fminf / fmaxf would turn a NaN into a bound; torch.clamp keeps it NaN.
            if (!isnan(a)) a = fminf(fmaxf(a, -g.clamp), g.clamp);
          }
          value = a;
          packed |= code << (2 * e);
        }
        if (g.mode == kForwardWithCodes && row_inside) {
          const bool owned = (last_y || ty < ay.tile * g.down) &&
                             (last_x || quad * kCodesPerByte < ax.tile * g.down);
          const int64_t first = m0x + quad * kCodesPerByte;
          if (owned && first < ax.mid && quad * kCodesPerByte < ax.mid_tile)
            codes.at(b, c, my, first / kCodesPerByte) = static_cast<uint8_t>(packed);
        }
      }
    }
    __syncthreads();

    // 4. Stage 2 and the store; the backward also sums its stored values (before rounding).
    float stored_sum = 0.0f;
    {
      auto store = [&](int oy, int ox, float v) {
        const int64_t out_y = o0y + oy, out_x = o0x + ox;
        if (out_y < ay.dst && out_x < ax.dst) {
          dst.at(b, c, out_y, out_x) = from_float<T>(v);
          stored_sum += v;
        }
      };
      const int count = ay.tile * ax.tile;
      const Span mid_y = real_span(m0y, ay.mid, ay.mid_tile);
      const Span mid_x = real_span(m0x, ax.mid, ax.mid_tile);
      // Stage-2 taps [k_first, k_end) of dst sample o (tile offset) read mid samples inside.
      auto real_taps = [&](int o, int num_taps, Span mid) -> Span {
        const int m = o * g.down;
        return {m < mid.first ? mid.first - m : 0, mid.end - m < num_taps ? mid.end - m : num_taps};
      };
      if (kSeparable2) {
        float* rows_done = region_a;  // mid_tile y x tile x; stage 1 no longer needs region A
        const int row_count = ay.mid_tile * ax.tile;
        for (int i = threadIdx.x; i < row_count; i += blockDim.x) {
          const int ty = i / ax.tile, ox = i % ax.tile;
          const float* m = mid + ty * g.mid_pitch + ox * g.down;
          const Span k = real_taps(ox, ax.taps2, mid_x);
          float acc = 0.0f;
          for (int kx = k.first; kx < k.end; ++kx) acc = fmaf(taps2[ay.taps2 + kx], m[kx], acc);
          rows_done[i] = acc;
        }
        __syncthreads();
        for (int i = threadIdx.x; i < count; i += blockDim.x) {
          const int oy = i / ax.tile, ox = i % ax.tile;
          const float* r = rows_done + oy * g.down * ax.tile + ox;
          const Span k = real_taps(oy, ay.taps2, mid_y);
          float acc = 0.0f;
          for (int ky = k.first; ky < k.end; ++ky) acc = fmaf(taps2[ky], r[ky * ax.tile], acc);
          store(oy, ox, acc);
        }
      } else {
        for (int i = threadIdx.x; i < count; i += blockDim.x) {
          const int oy = i / ax.tile, ox = i % ax.tile;
          const Span ky_span = real_taps(oy, ay.taps2, mid_y);
          const Span kx_span = real_taps(ox, ax.taps2, mid_x);
          float acc = 0.0f;
          for (int ky = ky_span.first; ky < ky_span.end; ++ky) {
            const float* m = mid + (oy * g.down + ky) * g.mid_pitch + ox * g.down;
            const float* w = taps2 + ky * ax.taps2;
            for (int kx = kx_span.first; kx < kx_span.end; ++kx) acc = fmaf(w[kx], m[kx], acc);
          }
          store(oy, ox, acc);
        }
      }
    }

    // 5. The tile's sum for db, reduced in a fixed order.
    if (tile_sums != nullptr) {
      const float warp_total = warp_sum(stored_sum);
      if ((threadIdx.x & 31) == 0) warp_totals[threadIdx.x >> 5] = warp_total;
      __syncthreads();
      if (threadIdx.x == 0) {
        float total = 0.0f;
        for (int w = 0; w < kFlThreads / 32; ++w) total += warp_totals[w];
        tile_sums[tile] = total;
      }
    }
    // Nothing of this tile may be overwritten by the next before every thread is done with it.
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------
// Host side

constexpr int kPreferredSharedBytes = 48 * 1024;

struct TileChoice {
  PassGeometry geometry;
  int shared_bytes;
};

void size_tile(PassAxis& a, int tile, int up, int down) {
  a.tile = tile;
  // Enough mid samples for the tile's outputs, and for the TX*down (TY*down) whose codes it owns.
  a.mid_tile = std::max((tile - 1) * down + a.taps2, tile * down);
  a.src_tile = (a.mid_tile + a.taps1 - 2) / up + 1;
  a.tiles = (a.dst + tile - 1) / tile;
}

// The largest tile of this list whose shared memory fits the preferred 48 KiB (no opt-in, more
// blocks per SM), else the largest that fits the device's opt-in limit. Tiles are multiples of
// 4 wide so the codes a tile owns fill whole bytes.
TileChoice choose_tile(PassGeometry g, bool separable1, bool separable2) {
  static const int kTiles[][2] = {{32, 32}, {16, 32}, {16, 16}, {8, 16}, {8, 8}, {4, 8}, {4, 4}};
  const int optin = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
  const int static_bytes = (kFlThreads / 32) * sizeof(float);
  for (int limit : {kPreferredSharedBytes, optin}) {
    for (const auto& t : kTiles) {
      size_tile(g.y, t[0], g.up, g.down);
      size_tile(g.x, t[1], g.up, g.down);
      g.mid_pitch = (g.x.mid_tile + kCodesPerByte - 1) / kCodesPerByte * kCodesPerByte;
      const int64_t bytes =
          int64_t(shared_layout(g, separable1, separable2).total()) * sizeof(float);
      if (bytes + static_bytes <= limit) return {g, static_cast<int>(bytes)};
    }
  }
  throw std::invalid_argument(
      "filters: fu/fd of " + str(g.y.taps1) + "x" + str(g.x.taps1) + " and " + str(g.y.taps2) +
      "x" + str(g.x.taps2) + " taps at up=" + str(g.up) + ", down=" + str(g.down) +
      " need more shared memory than this GPU's " + str(optin) +
      " bytes per block even for 4x4 tiles; use the triton or reference backend");
}

// One pass's arguments (filtered_lrelu_pass's in common.h), as the planning and the launch
// take them.
struct FilteredLreluPass {
  int mode;
  const TensorView4d* src;
  const TensorView4d* bias;
  const TensorView4d* dst;
  const TensorView4d* codes;
  const TensorView4d* tile_sums;
  const TensorView4d* rows1;
  const TensorView4d* cols1;
  const TensorView4d* rows2;
  const TensorView4d* cols2;
  int64_t up, down;
  std::array<int64_t, 4> pads;
  std::array<int64_t, 2> mid_shape;
  float gain, slope;
  const float* clamp;
};

// Taps: (1, 1, 1, n) for one axis of a separable stage, (1, 1, ny, nx) for a 2-D one; float32,
// contiguous. Returns (taps along y, taps along x).
std::pair<int, int> check_taps(const TensorView4d& rows, const TensorView4d* cols,
                               const char* rows_name, const char* cols_name) {
  const TensorView4d* tables[] = {&rows, cols};
  const char* names[] = {rows_name, cols_name};
  for (int i = 0; i < 2; ++i) {
    const TensorView4d* t = tables[i];
    if (t == nullptr) continue;
    require(t->dtype == DType::Float32,
            std::string(names[i]) + ": taps must be float32, got " + dtype_name(t->dtype));
    require(t->size[0] == 1 && t->size[1] == 1 && t->size[2] >= 1 && t->size[3] >= 1 &&
                t->size[2] <= 1024 && t->size[3] <= 1024,
            std::string(names[i]) + ": expected (1, 1, taps_y, taps_x) with 1..1024 taps, got " +
                shape_str(t->size));
    // The kernel steps along a dimension only where it has more than one tap: a size-1
    // dimension may have any stride (torch keeps a one-tap view's stride when it copies it).
    require((t->size[3] == 1 || t->stride[3] == 1) &&
                (t->size[2] == 1 || t->stride[2] == t->size[3]),
            std::string(names[i]) + ": taps must be contiguous");
    require(t->data != nullptr, std::string(names[i]) + ": null data pointer");
  }
  if (cols == nullptr) return {int(rows.size[2]), int(rows.size[3])};
  require(rows.size[2] == 1, std::string(rows_name) +
                                 ": a separable stage takes (1, 1, 1, taps) rows, got " +
                                 shape_str(rows.size));
  require(cols->size[2] == 1, std::string(cols_name) +
                                  ": a separable stage takes (1, 1, 1, taps) cols, got " +
                                  shape_str(cols->size));
  return {int(rows.size[3]), int(cols->size[3])};
}

TileChoice plan_pass(const FilteredLreluPass& a) {
  const int64_t up = a.up, down = a.down;
  const std::array<int64_t, 4>& pads = a.pads;
  const std::array<int64_t, 2>& mid_shape = a.mid_shape;
  require(a.mode == kForward || a.mode == kForwardWithCodes || a.mode == kBackward,
          "mode: must be 0 (forward), 1 (forward with codes) or 2 (backward), got " +
              str(a.mode));
  const TensorView4d &src = *a.src, &dst = *a.dst;
  require_valid_view(src, "src");
  require_valid_view(dst, "dst");
  require_float_dtype(src, "src");
  require_same_dtype(dst, "dst", src, "src");
  require(dst.size[0] == src.size[0] && dst.size[1] == src.size[1],
          "dst: batch and channels must be src's " + shape_str(src.size) + ", got " +
              shape_str(dst.size));
  require_no_broadcast(dst, "dst");
  require(up >= 1 && up <= 64, "up: must be in [1, 64], got " + str(up));
  require(down >= 1 && down <= 64, "down: must be in [1, 64], got " + str(down));
  for (int i = 0; i < 4; ++i)
    require(pads[i] > -(int64_t(1) << 40) && pads[i] < (int64_t(1) << 40),
            "pads: out of range, got " + str(pads[i]));
  require(mid_shape[0] >= 1 && mid_shape[1] >= 1,
          "mid_shape: must be positive, got (" + str(mid_shape[0]) + ", " + str(mid_shape[1]) +
              ")");
  require(std::isfinite(a.gain), "gain: must be finite");
  require(std::isfinite(a.slope), "slope: must be finite");
  require(a.clamp == nullptr || (*a.clamp >= 0.0f && std::isfinite(*a.clamp)),
          "clamp: must be a finite number >= 0 or None");
  if (a.bias != nullptr) {
    const int64_t expected[4] = {1, src.size[1], 1, 1};
    require_shape(*a.bias, "bias", expected, "(1, C, 1, 1), a view of a (C,) vector");
    require_same_dtype(*a.bias, "bias", src, "src");
    require(a.bias->data != nullptr, "bias: null data pointer");
  }
  const auto [taps1_y, taps1_x] = check_taps(*a.rows1, a.cols1, "rows1", "cols1");
  const auto [taps2_y, taps2_x] = check_taps(*a.rows2, a.cols2, "rows2", "cols2");
  // Stage 2 reads mid samples [o*down - pad2, o*down - pad2 + taps2) for every dst sample o:
  // a mid extent that leaves them out would hide a wrong shape, not be zero padding.
  if (a.mode != kBackward) {
    require(pads[2] == 0 && pads[3] == 0,
            "pads: the forward's stage-2 pads must be 0 (dst sample o starts at mid o*down)");
    require((dst.size[2] - 1) * down + taps2_y <= mid_shape[0] || dst.size[2] == 0,
            "dst: height " + str(dst.size[2]) + " needs more mid rows than mid_shape's " +
                str(mid_shape[0]));
    require((dst.size[3] - 1) * down + taps2_x <= mid_shape[1] || dst.size[3] == 0,
            "dst: width " + str(dst.size[3]) + " needs more mid columns than mid_shape's " +
                str(mid_shape[1]));
  }
  const int64_t code_columns = (mid_shape[1] + kCodesPerByte - 1) / kCodesPerByte;
  const int64_t codes_shape[4] = {src.size[0], src.size[1], mid_shape[0], code_columns};
  if (a.mode == kForward) {
    require(a.codes == nullptr, "codes: only the modes with codes take them");
  } else {
    require(a.codes != nullptr, "codes: required in modes 1 and 2");
    require(a.codes->dtype == DType::UInt8,
            std::string("codes: dtype must be uint8, got ") + dtype_name(a.codes->dtype));
    require_shape(*a.codes, "codes", codes_shape, "(B, C, mid_h, ceil(mid_w / 4))");
    require(a.codes->data != nullptr || a.codes->numel() == 0, "codes: null data pointer");
    if (a.mode == kForwardWithCodes) require_no_broadcast(*a.codes, "codes");
  }
  require(a.tile_sums == nullptr || a.mode == kBackward,
          "tile_sums: only the backward sums its tiles");

  PassGeometry g{};
  g.y = {src.size[2], mid_shape[0], dst.size[2], pads[0], pads[2], taps1_y, taps2_y, 0, 0, 0, 0};
  g.x = {src.size[3], mid_shape[1], dst.size[3], pads[1], pads[3], taps1_x, taps2_x, 0, 0, 0, 0};
  g.up = static_cast<int>(up);
  g.down = static_cast<int>(down);
  g.channels = std::max<int64_t>(src.size[1], 1);
  g.planes = src.size[0] * src.size[1];
  g.gain = a.gain;
  g.slope = a.slope;
  g.has_clamp = a.clamp != nullptr;
  g.clamp = a.clamp != nullptr ? *a.clamp : 0.0f;
  g.mode = a.mode;
  ensure_device();
  TileChoice choice = choose_tile(g, a.cols1 != nullptr, a.cols2 != nullptr);
  if (a.tile_sums != nullptr) {
    const PassGeometry& c = choice.geometry;
    const int64_t count = c.planes * c.y.tiles * c.x.tiles;
    const int64_t expected[4] = {1, 1, 1, count};
    require_shape(*a.tile_sums, "tile_sums", expected,
                  "(1, 1, 1, B * C * tiles), tiles from filtered_lrelu_tiles");
    require(a.tile_sums->dtype == DType::Float32 && a.tile_sums->stride[3] == 1,
            "tile_sums: must be contiguous float32");
    require(a.tile_sums->data != nullptr || count == 0, "tile_sums: null data pointer");
  }
  return choice;
}

template <typename T, bool kSeparable1, bool kSeparable2>
void launch_pass(const TileChoice& choice, const FilteredLreluPass& a, cudaStream_t stream) {
  auto kernel = filtered_lrelu_kernel<T, kSeparable1, kSeparable2>;
  if (choice.shared_bytes > kPreferredSharedBytes)
    FASTGEN_CUDA_CHECK(cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, choice.shared_bytes));
  const PassGeometry& g = choice.geometry;
  const int64_t num_tiles = g.planes * g.y.tiles * g.x.tiles;
  int blocks_per_sm = 0;
  FASTGEN_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &blocks_per_sm, kernel, kFlThreads, choice.shared_bytes));
  const int64_t resident = device_sms() * std::max(blocks_per_sm, 1);
  const unsigned int grid = static_cast<unsigned int>(std::min(num_tiles, resident));
  const PassTaps taps{static_cast<const float*>(a.rows1->data),
                      a.cols1 ? static_cast<const float*>(a.cols1->data) : nullptr,
                      static_cast<const float*>(a.rows2->data),
                      a.cols2 ? static_cast<const float*>(a.cols2->data) : nullptr};
  const Strided4d<uint8_t> codes =
      a.codes ? strided<uint8_t>(*a.codes) : Strided4d<uint8_t>{nullptr, 0, 0, 0, 0};
  kernel<<<grid, kFlThreads, choice.shared_bytes, stream>>>(
      g, taps, strided<const T>(*a.src), optional_strided<T>(a.bias), strided<T>(*a.dst), codes,
      a.tile_sums ? static_cast<float*>(a.tile_sums->data) : nullptr);
  FASTGEN_LAUNCH_CHECK();
}

}  // namespace
}  // namespace kernels::filtered_lrelu

using namespace kernels::filtered_lrelu;

std::pair<int64_t, int64_t> filtered_lrelu_tiles(
    int mode, const TensorView4d& src, const TensorView4d* bias, const TensorView4d& dst,
    const TensorView4d* codes, const TensorView4d& rows1, const TensorView4d* cols1,
    const TensorView4d& rows2, const TensorView4d* cols2, int64_t up, int64_t down,
    const std::array<int64_t, 4>& pads, const std::array<int64_t, 2>& mid_shape, float gain,
    float slope, const float* clamp) {
  const TileChoice choice = plan_pass({mode, &src, bias, &dst, codes, nullptr, &rows1, cols1,
                                       &rows2, cols2, up, down, pads, mid_shape, gain, slope,
                                       clamp});
  return {choice.geometry.y.tiles, choice.geometry.x.tiles};
}

void filtered_lrelu_pass(int mode, const TensorView4d& src, const TensorView4d* bias,
                         const TensorView4d& dst, const TensorView4d* codes,
                         const TensorView4d* tile_sums, const TensorView4d& rows1,
                         const TensorView4d* cols1, const TensorView4d& rows2,
                         const TensorView4d* cols2, int64_t up, int64_t down,
                         const std::array<int64_t, 4>& pads,
                         const std::array<int64_t, 2>& mid_shape, float gain, float slope,
                         const float* clamp, cudaStream_t stream) {
  const FilteredLreluPass pass{mode, &src, bias, &dst, codes, tile_sums, &rows1, cols1, &rows2,
                               cols2, up, down, pads, mid_shape, gain, slope, clamp};
  const TileChoice choice = plan_pass(pass);
  if (choice.geometry.planes * choice.geometry.y.tiles * choice.geometry.x.tiles == 0) return;
  dispatch_dtype(pass.src->dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (pass.cols1 && pass.cols2) launch_pass<T, true, true>(choice, pass, stream);
    else if (pass.cols1) launch_pass<T, true, false>(choice, pass, stream);
    else if (pass.cols2) launch_pass<T, false, true>(choice, pass, stream);
    else launch_pass<T, false, false>(choice, pass, stream);
  });
}

}  // namespace fastgen
