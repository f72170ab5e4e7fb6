// Adaptive normalization (math in fastgen/ops/ada_norm.py): AdaGN / AdaIN and adaLN, forward and backward.
//
//   ada_group_norm: x (B, C, S) (spatial dims flattened by the caller), G groups of C/G
//     consecutive channels; per (b, g), mu and var (biased) over the group's C/G * S values;
//       z = ((x - mu) * rsqrt(var + eps) * weight[c] + bias[c]) * (1 + scale[b, c]) + shift[b, c]
//       y = z, or silu(z) = z * sigmoid(z)
//     (weight 1 and bias 0 when absent), and gain = weight[c] * (1 + scale[b, c]) is dz / dxhat.
//   ada_layer_norm: x (B, N, C); the same with one group per token (b, n) over its C channels,
//     no weight, bias or activation.
//
// Both ops are one computation over "groups": a group is a 2-D array of outer x inner
// elements at some base address, the inner dimension being the one with the smaller stride
// (positions for NCHW, channels for channels_last and adaLN rows), and each element's channel
// is its outer or its inner index. Threads walk a group in units of VEC elements along inner:
// VEC = 16 bytes / element size when the inner stride is 1 and every group, row and pointer is
// 16-byte aligned in every tensor the launch walks this way (x and y; x, dy and dx in the
// backward; checked at launch), so each unit is one vector access; otherwise VEC = 1 (any
// strides). Consecutive threads take consecutive
// units, so a warp reads contiguous memory whenever the layout has any.
//
// Statistics are float32 and exact for a large mean: every value is first shifted by a pivot,
// the group's first element (x - pivot is exact for values near the group's), each thread
// reduces a register tile of a few units exactly (tile mean, then the sum of squared
// deviations from it) and merges tiles into a running (count, mean, M2) with Chan's parallel
// update, as the Triton kernels do; never E[x^2] - E[x]^2. Threads merge by a warp-shuffle
// tree and then across warps through shared memory, in a fixed order: results are bitwise
// reproducible.
//
// Parallel decomposition:
//   fused  one block per group: statistics, then the apply pass re-reads the same units
//          (the block's working set, at most a few hundred KiB, is served by L1/L2), so DRAM
//          sees one read of x and one write of y. Used whenever the caller asks for one chunk.
//   split  for groups too large for one block to walk quickly, or too few groups to fill the
//          GPU (StyleGAN's AdaIN at 1024 px, small batches): each group's units are cut into
//          chunks, grid (groups x chunks). chunk_moments_kernel writes each chunk's
//          (count, mean, M2) to a float32 workspace; chunk_forward_kernel merges its group's
//          chunks in a fixed order (so every chunk of a group normalizes with bitwise-equal
//          statistics) and writes its chunk of y. x is read twice.
// The launcher picks the number of chunks (group_chunks below) unless the caller forces one,
// as the tests do to reach the split path on small inputs.
//
// Backward (formulas in fastgen/ops/ada_norm.py), with dz = dy * act'(z):
//   dx = rstd * (gain * dz - mean_p - xhat * mean_q), mean_p and mean_q the group means of
//        gain * dz and gain * dz * xhat: two more block reductions per group, so dx takes the
//        same fused or split decomposition as the forward (statistics recomputed, not saved:
//        x is read three times and dy twice, the repeats from L1/L2 on the fused path). The
//        group statistics are stored for the next kernel.
//   per (b, c): A = sum dz, Bc = sum dz * xhat over c's positions (group norm) or tokens
//        (layer norm), giving dshift = A and dscale = weight * Bc + bias * A. A different
//        reduction axis from the group's, so it is a kernel of its own (channel_grad_kernel,
//        which reads x and dy once more): a block per (range of positions, sample, 32
//        channels) when channels are contiguous, else per (range, sample, channel), reducing
//        over its position lanes through shared memory in a fixed order and writing partial
//        sums; the ranges (position_splits below) make small batches still fill the GPU.
//        modulation_grad_kernel adds the ranges in order and writes dshift and dscale, and
//        dweight, dbias = sums over samples, in order, of (1 + scale) * Bc and (1 + scale) * A.
// No atomics anywhere: every gradient is bitwise reproducible.

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "common.h"

namespace fastgen {
namespace kernels::ada_norm {
namespace {

constexpr int kMaxThreads = 256;
// Memory-bound: enough resident threads to keep loads in flight. Three blocks cap registers
// at 80, enough for the kernels that hold one tensor's tiles; the split path's apply kernel
// and the backward kernels, which also hold dy's tiles or the merged records, get 128 at two
// blocks rather than spill.
constexpr int kMinBlocksPerSm = 3;
constexpr int kMinBlocksPerSmWide = 2;
// Units one thread loads per tile before using them, so that several loads are in flight:
// two 16-byte vectors, or four scalars. More costs registers and occupancy.
__host__ __device__ constexpr int tile_units(int vec) { return vec == 1 ? 4 : 2; }
constexpr int64_t kMaxChunks = 1 << 16;
constexpr int64_t kMaxGridBlocks = std::numeric_limits<int32_t>::max();

// ---------------------------------------------------------------------------------------
// Block reductions in a fixed order (warp-shuffle trees, then one warp over the warps).

struct Moments {
  float count, mean, m2;
};

// Sums over a group of gain * dz and gain * dz * xhat: the group terms of dx.
struct GradSums {
  float p, q;
};

// Chan et al.'s update: (count, mean, M2) of the union of two sets. Either may be empty.
__device__ __forceinline__ Moments combine(const Moments& a, const Moments& b) {
  const float total = a.count + b.count;
  const float delta = b.mean - a.mean;
  const float fraction = b.count / fmaxf(total, 1.0f);
  return {total, a.mean + delta * fraction, a.m2 + b.m2 + delta * delta * a.count * fraction};
}

__device__ __forceinline__ GradSums combine(const GradSums& a, const GradSums& b) {
  return {a.p + b.p, a.q + b.q};
}

__device__ __forceinline__ Moments shuffle_down(const Moments& m, int offset) {
  return {__shfl_down_sync(0xffffffffu, m.count, offset),
          __shfl_down_sync(0xffffffffu, m.mean, offset),
          __shfl_down_sync(0xffffffffu, m.m2, offset)};
}

__device__ __forceinline__ GradSums shuffle_down(const GradSums& s, int offset) {
  return {__shfl_down_sync(0xffffffffu, s.p, offset), __shfl_down_sync(0xffffffffu, s.q, offset)};
}

// Lane 0 ends with the combination of the warp's 32 values. Every lane must call it.
template <typename V>
__device__ __forceinline__ V warp_reduce(V v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = combine(v, shuffle_down(v, offset));
  return v;
}

// The combination of every thread's value, returned to every thread. blockDim.x is a
// multiple of 32 and every thread of the block must call it (it synchronizes); at most once
// per kernel and value type, as the shared slots are not guarded against reuse.
template <typename V>
__device__ V block_reduce(V v) {
  __shared__ V per_warp[32];
  __shared__ V total;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_reduce(v);
  if (lane == 0) per_warp[warp] = v;
  __syncthreads();
  if (warp == 0) {
    V w = lane < int(blockDim.x / 32) ? per_warp[lane] : V{};
    w = warp_reduce(w);
    if (lane == 0) total = w;
  }
  __syncthreads();
  return total;
}

// ---------------------------------------------------------------------------------------
// Groups and how threads walk them

// How the groups of the problem lie; inner is counted in units of VEC elements.
struct GroupGeometry {
  int64_t groups_per_sample;  // G for group norm, N for layer norm
  int64_t units;              // per group: outer * inner_units
  int64_t inner_units;
  int64_t channel_step;  // group g's first channel is g * channel_step
  bool channel_inner;    // an element's channel is its inner (else its outer) index

  __device__ __forceinline__ int64_t sample(int64_t group) const {
    return group / groups_per_sample;
  }
  __device__ __forceinline__ int64_t within(int64_t group) const {
    return group % groups_per_sample;
  }
};

// Where one tensor's groups sit, in elements: base of group (b, g) is
// data + b * sample + g * group; element (o, i) of a group is at o * outer + i * inner.
struct GroupStrides {
  int64_t sample, group, outer, inner;
};

template <typename T>
struct GroupTensor {
  T* data;
  GroupStrides s;

  __device__ __forceinline__ T* group_base(const GroupGeometry& geo, int64_t group) const {
    return data + geo.sample(group) * s.sample + geo.within(group) * s.group;
  }
};

// One thread's walk over units first, first + blockDim.x, ... of a group: (outer, inner)
// advance like an odometer, so there is no division per unit.
struct UnitCursor {
  int64_t unit, outer, inner;  // inner in units
  int64_t inner_units, step_outer, step_inner;

  __device__ __forceinline__ UnitCursor(int64_t first, int64_t inner_units_)
      : unit(first), outer(first / inner_units_), inner(first % inner_units_),
        inner_units(inner_units_), step_outer(blockDim.x / inner_units_),
        step_inner(blockDim.x % inner_units_) {}

  __device__ __forceinline__ void advance() {
    unit += blockDim.x;
    outer += step_outer;
    inner += step_inner;
    if (inner >= inner_units) {
      inner -= inner_units;
      ++outer;
    }
  }

  template <int VEC, typename T>
  __device__ __forceinline__ T* at(T* base, const GroupStrides& s) const {
    return base + outer * s.outer + inner * VEC * s.inner;
  }
};

// VEC elements at p: one 16-byte access when VEC > 1 (p then 16-byte aligned, inner stride 1).
template <typename T, int VEC>
__device__ __forceinline__ void load_unit(const T* p, float (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = to_float(*p);
  } else {
    static_assert(VEC * sizeof(T) == sizeof(uint4), "a vector unit is 16 bytes");
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    T values[VEC];
    memcpy(values, &raw, sizeof(raw));
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = to_float(values[j]);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_unit(T* p, const float (&in)[VEC]) {
  if constexpr (VEC == 1) {
    *p = from_float<T>(in[0]);
  } else {
    T values[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) values[j] = from_float<T>(in[j]);
    uint4 raw;
    memcpy(&raw, values, sizeof(raw));
    *reinterpret_cast<uint4*>(p) = raw;
  }
}

// This thread's units of the tile starting at cursor, those before end, from one tensor.
template <typename T, int VEC, int UNITS>
__device__ __forceinline__ void load_tile(UnitCursor cursor, int64_t end, const T* group,
                                          const GroupStrides& s, float (&v)[UNITS][VEC]) {
#pragma unroll
  for (int k = 0; k < UNITS; ++k) {
    if (cursor.unit < end) load_unit<T, VEC>(cursor.at<VEC>(group, s), v[k]);
    cursor.advance();
  }
}

// Walks this thread's units of [begin, end) a tile at a time: load(cursor) loads the tile
// (its loads in flight together), then visit(cursor, k) runs for each unit k of it.
template <int VEC, typename Load, typename Visit>
__device__ __forceinline__ void for_each_tile(const GroupGeometry& geo, int64_t begin,
                                              int64_t end, Load&& load, Visit&& visit) {
  constexpr int kUnits = tile_units(VEC);
  UnitCursor cursor(begin + threadIdx.x, geo.inner_units);
  for (int64_t tile = begin; tile < end; tile += int64_t(kUnits) * blockDim.x) {
    load(cursor);
#pragma unroll
    for (int k = 0; k < kUnits; ++k) {
      if (cursor.unit < end) visit(cursor, k);
      cursor.advance();
    }
  }
}

// ---------------------------------------------------------------------------------------
// Per-element math

// One channel's map from xhat to the pre-activation output z, evaluated in the reference's
// order: an infinite scale then meets the normalized value's sign, where folding it into
// xhat * gain + (bias * (1 + scale) + shift) would add infinities of opposite signs (NaN), or
// make 0 * inf of an absent bias.
struct Affine {
  float weight, bias, one_plus_scale, shift;

  __device__ __forceinline__ float operator()(float xhat) const {
    return fmaf(fmaf(xhat, weight, bias), one_plus_scale, shift);
  }
};

// The per-channel affine map after normalization (Affine) and gain = dz / dxhat.
template <typename T>
struct Modulation {
  const T* scale;  // (B, C)
  int64_t scale_sb, scale_sc;
  const T* shift;  // (B, C)
  int64_t shift_sb, shift_sc;
  const T* weight;  // (C,) or null for 1
  int64_t weight_s;
  const T* bias;  // (C,) or null for 0
  int64_t bias_s;

  __device__ __forceinline__ float one_plus_scale(int64_t b, int64_t c) const {
    return 1.0f + to_float(scale[b * scale_sb + c * scale_sc]);
  }
  __device__ __forceinline__ float weight_at(int64_t c) const {
    return weight != nullptr ? to_float(weight[c * weight_s]) : 1.0f;
  }
  __device__ __forceinline__ float bias_at(int64_t c) const {
    return bias != nullptr ? to_float(bias[c * bias_s]) : 0.0f;
  }
  __device__ __forceinline__ void at(int64_t b, int64_t c, float& gain, Affine& affine) const {
    affine = {weight_at(c), bias_at(c), one_plus_scale(b, c),
              to_float(shift[b * shift_sb + c * shift_sc])};
    gain = affine.weight * affine.one_plus_scale;
  }

  // gain and affine map of each element of the unit at cursor in group (b, channel0...): one
  // channel for the whole unit unless channels run along inner.
  template <int VEC>
  __device__ __forceinline__ void at_unit(const GroupGeometry& geo, const UnitCursor& cursor,
                                          int64_t b, int64_t channel0, float (&gain)[VEC],
                                          Affine (&affine)[VEC]) const {
    if (geo.channel_inner) {
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        at(b, channel0 + cursor.inner * VEC + j, gain[j], affine[j]);
    } else {
      at(b, channel0 + cursor.outer, gain[0], affine[0]);
#pragma unroll
      for (int j = 1; j < VEC; ++j) {
        gain[j] = gain[0];
        affine[j] = affine[0];
      }
    }
  }
};

// xhat = ((x - pivot) - mean) * rstd, with mean taken about the pivot: x - pivot is exact for
// x near the group's values, so a large common offset costs no digits.
struct Normalizer {
  float pivot, mean, rstd;

  __device__ __forceinline__ float operator()(float x) const {
    return ((x - pivot) - mean) * rstd;
  }
};

__device__ __forceinline__ Normalizer normalizer(float pivot, const Moments& m, float eps) {
  return {pivot, m.mean, rsqrtf(m.m2 / fmaxf(m.count, 1.0f) + eps)};
}

template <bool SILU>
__device__ __forceinline__ float activation(float z) {
  return SILU ? z / (1.0f + __expf(-z)) : z;
}

// dz = dy * act'(z) at z = affine(xhat).
template <bool SILU>
__device__ __forceinline__ float pre_activation_grad(float dy, float xhat, const Affine& affine) {
  if (!SILU) return dy;
  const float z = affine(xhat);
  const float sigmoid = 1.0f / (1.0f + __expf(-z));
  return dy * sigmoid * (1.0f + z * (1.0f - sigmoid));
}

// ---------------------------------------------------------------------------------------
// Passes over a range [begin, end) of one group's units, by one thread

// (count, mean, M2) of x - pivot: each tile exactly, then merged into the running moments.
template <typename T, int VEC>
__device__ Moments thread_moments(const GroupGeometry& geo, const T* group,
                                  const GroupStrides& s, float pivot, int64_t begin,
                                  int64_t end) {
  constexpr int kUnits = tile_units(VEC);
  Moments acc{0.0f, 0.0f, 0.0f};
  UnitCursor cursor(begin + threadIdx.x, geo.inner_units);
  for (int64_t tile = begin; tile < end; tile += int64_t(kUnits) * blockDim.x) {
    float v[kUnits][VEC];
    load_tile<T, VEC>(cursor, end, group, s, v);
    bool valid[kUnits];
    int count = 0;
    float sum = 0.0f;
#pragma unroll
    for (int k = 0; k < kUnits; ++k) {
      valid[k] = cursor.unit < end;
      cursor.advance();
      if (!valid[k]) continue;
      count += VEC;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        v[k][j] -= pivot;
        sum += v[k][j];
      }
    }
    if (count == 0) continue;
    const float tile_mean = sum / float(count);
    float m2 = 0.0f;
#pragma unroll
    for (int k = 0; k < kUnits; ++k) {
      if (!valid[k]) continue;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float d = v[k][j] - tile_mean;
        m2 = fmaf(d, d, m2);
      }
    }
    acc = combine(acc, Moments{float(count), tile_mean, m2});
  }
  return acc;
}

// The forward and backward passes of one group (b, its channels from channel0).
template <typename T, int VEC>
struct GroupPass {
  const GroupGeometry& geo;
  const Modulation<T>& mod;
  int64_t b, channel0;
  Normalizer norm;

  // y = act(affine(xhat)) per channel.
  template <bool SILU>
  __device__ void apply(const T* x, const GroupStrides& xs, T* y, const GroupStrides& ys,
                        int64_t begin, int64_t end) const {
    float v[tile_units(VEC)][VEC];
    for_each_tile<VEC>(
        geo, begin, end, [&](const UnitCursor& c) { load_tile<T, VEC>(c, end, x, xs, v); },
        [&](const UnitCursor& c, int k) {
          float gain[VEC], out[VEC];
          Affine affine[VEC];
          mod.template at_unit<VEC>(geo, c, b, channel0, gain, affine);
#pragma unroll
          for (int j = 0; j < VEC; ++j) out[j] = activation<SILU>(affine[j](norm(v[k][j])));
          store_unit<T, VEC>(c.at<VEC>(y, ys), out);
        });
  }

  // Walks this thread's units in [begin, end) with x and dy: visit(cursor, xhat, gain, dz)
  // for each, the arrays holding the unit's VEC elements.
  template <bool SILU, typename Visit>
  __device__ __forceinline__ void for_each_grad_unit(const T* dy, const GroupStrides& dys,
                                                     const T* x, const GroupStrides& xs,
                                                     int64_t begin, int64_t end,
                                                     Visit&& visit) const {
    float xv[tile_units(VEC)][VEC], dyv[tile_units(VEC)][VEC];
    for_each_tile<VEC>(
        geo, begin, end,
        [&](const UnitCursor& c) {
          load_tile<T, VEC>(c, end, x, xs, xv);
          load_tile<T, VEC>(c, end, dy, dys, dyv);
        },
        [&](const UnitCursor& c, int k) {
          float gain[VEC], xhat[VEC], dz[VEC];
          Affine affine[VEC];
          mod.template at_unit<VEC>(geo, c, b, channel0, gain, affine);
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            xhat[j] = norm(xv[k][j]);
            dz[j] = pre_activation_grad<SILU>(dyv[k][j], xhat[j], affine[j]);
          }
          visit(c, xhat, gain, dz);
        });
  }

  // This thread's share of the group sums of gain * dz and gain * dz * xhat.
  template <bool SILU>
  __device__ GradSums grad_sums(const T* dy, const GroupStrides& dys, const T* x,
                                const GroupStrides& xs, int64_t begin, int64_t end) const {
    GradSums acc{0.0f, 0.0f};
    for_each_grad_unit<SILU>(dy, dys, x, xs, begin, end,
                             [&](const UnitCursor&, const float(&xhat)[VEC],
                                 const float(&gain)[VEC], const float(&dz)[VEC]) {
#pragma unroll
                               for (int j = 0; j < VEC; ++j) {
                                 acc.p = fmaf(gain[j], dz[j], acc.p);
                                 acc.q = fmaf(gain[j] * dz[j], xhat[j], acc.q);
                               }
                             });
    return acc;
  }

  // dx = rstd * (gain * dz - mean_p - xhat * mean_q), mean_p and mean_q the group means of
  // gain * dz and gain * dz * xhat.
  template <bool SILU>
  __device__ void input_grad(const T* dy, const GroupStrides& dys, const T* x,
                             const GroupStrides& xs, T* dx, const GroupStrides& dxs,
                             float mean_p, float mean_q, int64_t begin, int64_t end) const {
    for_each_grad_unit<SILU>(dy, dys, x, xs, begin, end,
                             [&](const UnitCursor& c, const float(&xhat)[VEC],
                                 const float(&gain)[VEC], const float(&dz)[VEC]) {
                               float out[VEC];
#pragma unroll
                               for (int j = 0; j < VEC; ++j)
                                 out[j] = norm.rstd * (gain[j] * dz[j] - mean_p - xhat[j] * mean_q);
                               store_unit<T, VEC>(c.at<VEC>(dx, dxs), out);
                             });
  }
};

// ---------------------------------------------------------------------------------------
// Kernels. Fused: one block per group, blockIdx.x = b * groups_per_sample + g. Split: block
// blockIdx.x = group * num_chunks + chunk, and per-chunk records in float32 workspaces laid
// out [field][gridDim.x] (a block's record at blockIdx.x).

template <typename T, int VEC>
__device__ __forceinline__ GroupPass<T, VEC> group_pass(const GroupGeometry& geo,
                                                        const Modulation<T>& mod,
                                                        int64_t group, Normalizer norm) {
  return {geo, mod, geo.sample(group), geo.within(group) * geo.channel_step, norm};
}

// The group's pivot and moments over [begin, end) of its units.
template <typename T, int VEC>
__device__ __forceinline__ Moments block_moments(const GroupGeometry& geo, const T* x,
                                                 const GroupStrides& xs, int64_t begin,
                                                 int64_t end) {
  return block_reduce(thread_moments<T, VEC>(geo, x, xs, to_float(x[0]), begin, end));
}

// stats: float32 [3][groups] of (pivot, mean, rstd), for channel_grad_kernel.
__device__ __forceinline__ void store_stats(float* stats, int64_t group, int64_t groups,
                                            const Normalizer& norm) {
  stats[group] = norm.pivot;
  stats[groups + group] = norm.mean;
  stats[2 * groups + group] = norm.rstd;
}

__device__ __forceinline__ Normalizer load_stats(const float* stats, int64_t group,
                                                 int64_t groups) {
  return {stats[group], stats[groups + group], stats[2 * groups + group]};
}

template <typename T, int VEC, bool SILU>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSm)
    fused_forward_kernel(GroupGeometry geo, GroupTensor<const T> x, GroupTensor<T> y,
                         Modulation<T> mod, float eps) {
  const int64_t group = blockIdx.x;
  const T* xg = x.group_base(geo, group);
  const Moments m = block_moments<T, VEC>(geo, xg, x.s, 0, geo.units);
  group_pass<T, VEC>(geo, mod, group, normalizer(to_float(xg[0]), m, eps))
      .template apply<SILU>(xg, x.s, y.group_base(geo, group), y.s, 0, geo.units);
}

// Both passes recompute the statistics (the forward saves none): x is read three times and
// dy twice, all but the first reads of a group from L1/L2.
template <typename T, int VEC, bool SILU>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSmWide)
    fused_backward_kernel(GroupGeometry geo, GroupTensor<const T> dy, GroupTensor<const T> x,
                          GroupTensor<T> dx, Modulation<T> mod, float eps, float* stats) {
  const int64_t group = blockIdx.x;
  const T* xg = x.group_base(geo, group);
  const T* dyg = dy.group_base(geo, group);
  const Moments m = block_moments<T, VEC>(geo, xg, x.s, 0, geo.units);
  const Normalizer norm = normalizer(to_float(xg[0]), m, eps);
  if (threadIdx.x == 0) store_stats(stats, group, gridDim.x, norm);
  const GroupPass<T, VEC> pass = group_pass<T, VEC>(geo, mod, group, norm);
  const GradSums sums =
      block_reduce(pass.template grad_sums<SILU>(dyg, dy.s, xg, x.s, 0, geo.units));
  const float count = fmaxf(m.count, 1.0f);
  pass.template input_grad<SILU>(dyg, dy.s, xg, x.s, dx.group_base(geo, group), dx.s,
                                 sums.p / count, sums.q / count, 0, geo.units);
}

struct Chunking {
  int64_t chunk_units, num_chunks;

  __device__ __forceinline__ int64_t group() const { return blockIdx.x / num_chunks; }
  __device__ __forceinline__ int64_t begin() const {
    return blockIdx.x % num_chunks * chunk_units;
  }
  __device__ __forceinline__ int64_t end(int64_t units) const {
    return begin() + chunk_units < units ? begin() + chunk_units : units;
  }
  // Where this block's group's records start in a [field][gridDim.x] workspace.
  __device__ __forceinline__ int64_t first_record() const { return group() * num_chunks; }
};

// moments: [3][gridDim.x] of each chunk's (count, mean, M2) about the group's pivot.
template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSm)
    chunk_moments_kernel(GroupGeometry geo, GroupTensor<const T> x, Chunking chunking,
                         float* moments) {
  const Moments m = block_moments<T, VEC>(geo, x.group_base(geo, chunking.group()), x.s,
                                          chunking.begin(), chunking.end(geo.units));
  if (threadIdx.x == 0) {
    const int64_t record = blockIdx.x, records = gridDim.x;
    moments[record] = m.count;
    moments[records + record] = m.mean;
    moments[2 * records + record] = m.m2;
  }
}

// The group's moments from its chunks' records, merged in the same fixed order by every
// block of the group, so all of them normalize with bitwise-equal statistics.
__device__ Moments merged_chunk_moments(const Chunking& chunking, const float* moments) {
  const float* records = moments + chunking.first_record();
  const int64_t field = gridDim.x;
  Moments m{0.0f, 0.0f, 0.0f};
  for (int64_t k = threadIdx.x; k < chunking.num_chunks; k += blockDim.x)
    m = combine(m, Moments{records[k], records[field + k], records[2 * field + k]});
  return block_reduce(m);
}

template <typename T, int VEC, bool SILU>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSmWide)
    chunk_forward_kernel(GroupGeometry geo, GroupTensor<const T> x, GroupTensor<T> y,
                         Modulation<T> mod, Chunking chunking, const float* moments,
                         float eps) {
  const int64_t group = chunking.group();
  const T* xg = x.group_base(geo, group);
  const Moments m = merged_chunk_moments(chunking, moments);
  group_pass<T, VEC>(geo, mod, group, normalizer(to_float(xg[0]), m, eps))
      .template apply<SILU>(xg, x.s, y.group_base(geo, group), y.s, chunking.begin(),
                            chunking.end(geo.units));
}

// grad_sums: [2][gridDim.x] of each chunk's share of the group sums; the group's first chunk
// also stores its statistics.
template <typename T, int VEC, bool SILU>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSmWide)
    chunk_grad_sums_kernel(GroupGeometry geo, GroupTensor<const T> dy, GroupTensor<const T> x,
                           Modulation<T> mod, Chunking chunking, const float* moments,
                           float eps, float* grad_sums, float* stats) {
  const int64_t group = chunking.group();
  const T* xg = x.group_base(geo, group);
  const Normalizer norm = normalizer(to_float(xg[0]), merged_chunk_moments(chunking, moments), eps);
  if (threadIdx.x == 0 && chunking.begin() == 0)
    store_stats(stats, group, gridDim.x / chunking.num_chunks, norm);
  const GradSums sums = block_reduce(group_pass<T, VEC>(geo, mod, group, norm)
                                         .template grad_sums<SILU>(dy.group_base(geo, group),
                                                                   dy.s, xg, x.s,
                                                                   chunking.begin(),
                                                                   chunking.end(geo.units)));
  if (threadIdx.x == 0) {
    const int64_t record = blockIdx.x, records = gridDim.x;
    grad_sums[record] = sums.p;
    grad_sums[records + record] = sums.q;
  }
}

template <typename T, int VEC, bool SILU>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSmWide)
    chunk_input_grad_kernel(GroupGeometry geo, GroupTensor<const T> dy, GroupTensor<const T> x,
                            GroupTensor<T> dx, Modulation<T> mod, Chunking chunking,
                            const float* moments, const float* grad_sums, float eps) {
  const int64_t group = chunking.group();
  const T* xg = x.group_base(geo, group);
  const Moments m = merged_chunk_moments(chunking, moments);
  const float* records = grad_sums + chunking.first_record();
  GradSums sums{0.0f, 0.0f};
  for (int64_t k = threadIdx.x; k < chunking.num_chunks; k += blockDim.x)
    sums = combine(sums, GradSums{records[k], records[gridDim.x + k]});
  sums = block_reduce(sums);
  const float count = fmaxf(m.count, 1.0f);
  group_pass<T, VEC>(geo, mod, group, normalizer(to_float(xg[0]), m, eps))
      .template input_grad<SILU>(dy.group_base(geo, group), dy.s, xg, x.s,
                                 dx.group_base(geo, group), dx.s, sums.p / count,
                                 sums.q / count, chunking.begin(), chunking.end(geo.units));
}

// How channel_grad_kernel walks x and dy: per sample b and channel c, over `positions`
// (group norm: the flattened spatial positions; layer norm: the tokens), cut into `splits`
// ranges of `split_positions` so that small batches still fill the GPU.
struct ChannelWalk {
  int64_t batch, channels, positions, splits, split_positions;
  int64_t x_sb, x_sc, x_sp, dy_sb, dy_sc, dy_sp;
  int64_t stats_per_sample;    // G or N: the statistics of sample b start at b * this
  int64_t channels_per_group;  // group norm: C/G; layer norm: 0, statistics per position
  int64_t stats_groups;        // B * stats_per_sample: the length of each stats field
  int channel_lanes;           // 32 when channels are closer in memory than positions, else 1

  __host__ __device__ int64_t channel_tiles() const {
    return (channels + channel_lanes - 1) / channel_lanes;
  }
  // partials: float32 [2][splits][B][C] of A and Bc.
  __host__ __device__ int64_t partial(int field, int64_t split, int64_t b, int64_t c) const {
    return ((field * splits + split) * batch + b) * channels + c;
  }
};

// Per (b, c) and range of positions: A = sum dz and Bc = sum dz * xhat into partials. A block
// covers channel_lanes channels of one sample and one range, and reduces over its position
// lanes through shared memory in a fixed order. blockDim.x == kMaxThreads; block
// blockIdx.x = (split * B + b) * channel_tiles + tile.
template <typename T, bool SILU>
__global__ void __launch_bounds__(kMaxThreads)
    channel_grad_kernel(ChannelWalk w, const T* dy, const T* x, Modulation<T> mod,
                        const float* stats, float* partials) {
  __shared__ float sum_dz[kMaxThreads], sum_dz_xhat[kMaxThreads];
  const int64_t tiles = w.channel_tiles();
  const int64_t sample_split = blockIdx.x / tiles;
  const int64_t b = sample_split % w.batch, split = sample_split / w.batch;
  const int position_lanes = kMaxThreads / w.channel_lanes;
  const int lane_c = threadIdx.x % w.channel_lanes, lane_p = threadIdx.x / w.channel_lanes;
  const int64_t c = blockIdx.x % tiles * w.channel_lanes + lane_c;
  const int64_t begin = split * w.split_positions;
  const int64_t end = begin + w.split_positions < w.positions ? begin + w.split_positions
                                                              : w.positions;
  float a = 0.0f, bc = 0.0f;
  if (c < w.channels) {
    float gain;
    Affine affine;
    mod.at(b, c, gain, affine);
    const T* xc = x + b * w.x_sb + c * w.x_sc;
    const T* dyc = dy + b * w.dy_sb + c * w.dy_sc;
    const int64_t stats_base = b * w.stats_per_sample;
    Normalizer norm{};
    if (w.channels_per_group > 0)
      norm = load_stats(stats, stats_base + c / w.channels_per_group, w.stats_groups);
#pragma unroll 4
    for (int64_t p = begin + lane_p; p < end; p += position_lanes) {
      if (w.channels_per_group == 0) norm = load_stats(stats, stats_base + p, w.stats_groups);
      const float xhat = norm(to_float(xc[p * w.x_sp]));
      const float dz = pre_activation_grad<SILU>(to_float(dyc[p * w.dy_sp]), xhat, affine);
      a += dz;
      bc = fmaf(dz, xhat, bc);
    }
  }
  sum_dz[threadIdx.x] = a;
  sum_dz_xhat[threadIdx.x] = bc;
  __syncthreads();
  // position_lanes is a power of two; every thread reaches each barrier.
  for (int stride = position_lanes / 2; stride > 0; stride /= 2) {
    if (lane_p < stride) {
      sum_dz[threadIdx.x] += sum_dz[threadIdx.x + stride * w.channel_lanes];
      sum_dz_xhat[threadIdx.x] += sum_dz_xhat[threadIdx.x + stride * w.channel_lanes];
    }
    __syncthreads();
  }
  if (lane_p != 0 || c >= w.channels) return;
  partials[w.partial(0, split, b, c)] = sum_dz[lane_c];
  partials[w.partial(1, split, b, c)] = sum_dz_xhat[lane_c];
}

// Per channel c, from channel_grad_kernel's partials added in range order: per sample
// dshift = A and dscale = weight * Bc + bias * A; and, when dweight is given,
// dweight = sum_b (1 + scale) Bc and dbias = sum_b (1 + scale) A in sample order.
template <typename T>
__global__ void __launch_bounds__(kThreadsPerBlock)
    modulation_grad_kernel(ChannelWalk w, Modulation<T> mod, const float* partials,
                           Strided4d<T> dscale, Strided4d<T> dshift, Strided4d<T> dweight,
                           Strided4d<T> dbias) {
  for (int64_t c = grid_thread_index(); c < w.channels; c += grid_thread_count()) {
    const float weight = mod.weight_at(c), bias = mod.bias_at(c);
    float dw = 0.0f, db = 0.0f;
    for (int64_t b = 0; b < w.batch; ++b) {
      float a = 0.0f, bc = 0.0f;
      for (int64_t k = 0; k < w.splits; ++k) {
        a += partials[w.partial(0, k, b, c)];
        bc += partials[w.partial(1, k, b, c)];
      }
      dshift.at(b, c, 0, 0) = from_float<T>(a);
      dscale.at(b, c, 0, 0) = from_float<T>(weight * bc + bias * a);
      const float s = mod.one_plus_scale(b, c);
      dw = fmaf(s, bc, dw);
      db = fmaf(s, a, db);
    }
    if (dweight.data == nullptr) continue;
    dweight.at(0, c, 0, 0) = from_float<T>(dw);
    dbias.at(0, c, 0, 0) = from_float<T>(db);
  }
}

// ---------------------------------------------------------------------------------------
// Host side

// A problem in elements, before the vector width is chosen, and which dimensions of the 4-D
// views its group strides run along.
struct Problem {
  int64_t batch, groups_per_sample, outer, inner, channel_step;
  bool channel_inner;
  int group_dim;       // a group spans group_span steps of this dimension
  int64_t group_span;
  int outer_dim;       // -1: a group is a single row
  int inner_dim;

  GroupStrides strides(const TensorView4d& t) const {
    return {t.stride[0], group_span * t.stride[group_dim],
            outer_dim < 0 ? 0 : t.stride[outer_dim], t.stride[inner_dim]};
  }

  template <int VEC>
  GroupGeometry geometry() const {
    return {groups_per_sample, outer * (inner / VEC), inner / VEC, channel_step, channel_inner};
  }

  int64_t groups() const { return batch * groups_per_sample; }

  // Whether units of vec elements along inner can be single 16-byte accesses of t.
  bool vectorizable(const TensorView4d& t, int vec) const {
    const GroupStrides s = strides(t);
    const auto multiple = [vec](int64_t stride, int64_t size) {
      return size <= 1 || stride % vec == 0;
    };
    return reinterpret_cast<uintptr_t>(t.data) % 16 == 0 && s.inner == 1 && inner % vec == 0 &&
           multiple(s.sample, batch) && multiple(s.group, groups_per_sample) &&
           multiple(s.outer, outer);
  }
};

template <typename T>
GroupTensor<T> group_tensor(const Problem& p, const TensorView4d& t) {
  return {static_cast<T*>(t.data), p.strides(t)};
}

// Asked-for chunks of equal units; the last may be shorter, none is empty, so there may be
// fewer than asked.
Chunking chunking_for(int64_t units, int64_t num_chunks) {
  const int64_t chunk_units = (units + num_chunks - 1) / num_chunks;
  return {chunk_units, (units + chunk_units - 1) / chunk_units};
}

unsigned int block_threads(int64_t units, int vec) {
  const int64_t tiles = (units + tile_units(vec) - 1) / tile_units(vec);
  return static_cast<unsigned int>(std::clamp<int64_t>((tiles + 31) / 32 * 32, 32, kMaxThreads));
}

template <typename T>
Modulation<T> modulation(const TensorView4d& scale, const TensorView4d& shift,
                         const TensorView4d* weight, const TensorView4d* bias) {
  return {static_cast<const T*>(scale.data),
          scale.stride[0],
          scale.stride[1],
          static_cast<const T*>(shift.data),
          shift.stride[0],
          shift.stride[1],
          weight != nullptr ? static_cast<const T*>(weight->data) : nullptr,
          weight != nullptr ? weight->stride[1] : 0,
          bias != nullptr ? static_cast<const T*>(bias->data) : nullptr,
          bias != nullptr ? bias->stride[1] : 0};
}

// Calls launch(TypeTag<T>, vec, silu) with the widest vector width every one of `tensors`
// allows (16 bytes or one element) and silu as std::integral_constants.
template <typename Launch>
void dispatch(const Problem& p, std::initializer_list<const TensorView4d*> tensors, bool silu,
              Launch&& launch) {
  dispatch_dtype((*tensors.begin())->dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kVec = 16 / sizeof(T);
    const bool vector = std::all_of(tensors.begin(), tensors.end(), [&](const TensorView4d* t) {
      return p.vectorizable(*t, kVec);
    });
    using Scalar = std::integral_constant<int, 1>;
    using Vector = std::integral_constant<int, kVec>;
    using Silu = std::true_type;
    using Linear = std::false_type;
    if (vector) {
      silu ? launch(tag, Vector{}, Silu{}) : launch(tag, Vector{}, Linear{});
    } else {
      silu ? launch(tag, Scalar{}, Silu{}) : launch(tag, Scalar{}, Linear{});
    }
  });
}

// What every kernel launch for one problem shares, for element type T and vector width VEC.
template <typename T, int VEC>
struct LaunchPlan {
  GroupGeometry geo;
  Modulation<T> mod;
  Chunking chunking;
  unsigned int threads;
  unsigned int blocks;  // per group kernel: groups * chunks

  LaunchPlan(const Problem& p, const TensorView4d& scale, const TensorView4d& shift,
             const TensorView4d* weight, const TensorView4d* bias, int64_t num_chunks)
      : geo(p.geometry<VEC>()),
        mod(modulation<T>(scale, shift, weight, bias)),
        chunking(chunking_for(geo.units, num_chunks)),
        threads(block_threads(chunking.chunk_units, VEC)),
        blocks(unsigned(p.groups() * chunking.num_chunks)) {}
};

void forward(const Problem& p, const TensorView4d& x, const TensorView4d& y,
             const TensorView4d& scale, const TensorView4d& shift, const TensorView4d* weight,
             const TensorView4d* bias, float* workspace, int64_t num_chunks, float eps,
             bool silu, cudaStream_t stream) {
  dispatch(p, {&x, &y}, silu, [&](auto tag, auto vec, auto act) {
    using T = typename decltype(tag)::type;
    constexpr int VEC = decltype(vec)::value;
    constexpr bool SILU = decltype(act)::value;
    const LaunchPlan<T, VEC> plan(p, scale, shift, weight, bias, num_chunks);
    const auto xt = group_tensor<const T>(p, x);
    const auto yt = group_tensor<T>(p, y);
    if (plan.chunking.num_chunks == 1) {
      fused_forward_kernel<T, VEC, SILU>
          <<<plan.blocks, plan.threads, 0, stream>>>(plan.geo, xt, yt, plan.mod, eps);
      FASTGEN_LAUNCH_CHECK();
      return;
    }
    chunk_moments_kernel<T, VEC>
        <<<plan.blocks, plan.threads, 0, stream>>>(plan.geo, xt, plan.chunking, workspace);
    FASTGEN_LAUNCH_CHECK();
    chunk_forward_kernel<T, VEC, SILU><<<plan.blocks, plan.threads, 0, stream>>>(
        plan.geo, xt, yt, plan.mod, plan.chunking, workspace, eps);
    FASTGEN_LAUNCH_CHECK();
  });
}

// The modulation gradients' passes: see channel_grad_kernel and modulation_grad_kernel.
struct ModulationGrads {
  ChannelWalk walk;
  float* partials;
  const TensorView4d &dscale, &dshift;
  const TensorView4d *dweight, *dbias;  // null: no affine gradients wanted
};

void backward(const Problem& p, const TensorView4d& dy, const TensorView4d& x,
              const TensorView4d& dx, const TensorView4d& scale, const TensorView4d& shift,
              const TensorView4d* weight, const TensorView4d* bias,
              const ModulationGrads& grads, float* stats, float* chunk_records,
              int64_t num_chunks, float eps, bool silu, cudaStream_t stream) {
  dispatch(p, {&x, &dy, &dx}, silu, [&](auto tag, auto vec, auto act) {
    using T = typename decltype(tag)::type;
    constexpr int VEC = decltype(vec)::value;
    constexpr bool SILU = decltype(act)::value;
    const LaunchPlan<T, VEC> plan(p, scale, shift, weight, bias, num_chunks);
    const GroupGeometry& geo = plan.geo;
    const Modulation<T>& mod = plan.mod;
    const auto dyt = group_tensor<const T>(p, dy);
    const auto xt = group_tensor<const T>(p, x);
    const auto dxt = group_tensor<T>(p, dx);
    if (plan.chunking.num_chunks == 1) {
      fused_backward_kernel<T, VEC, SILU>
          <<<plan.blocks, plan.threads, 0, stream>>>(geo, dyt, xt, dxt, mod, eps, stats);
      FASTGEN_LAUNCH_CHECK();
    } else {
      float* moments = chunk_records;                  // [3][blocks]
      float* grad_sums = moments + 3 * plan.blocks;  // [2][blocks]
      chunk_moments_kernel<T, VEC>
          <<<plan.blocks, plan.threads, 0, stream>>>(geo, xt, plan.chunking, moments);
      FASTGEN_LAUNCH_CHECK();
      chunk_grad_sums_kernel<T, VEC, SILU><<<plan.blocks, plan.threads, 0, stream>>>(
          geo, dyt, xt, mod, plan.chunking, moments, eps, grad_sums, stats);
      FASTGEN_LAUNCH_CHECK();
      chunk_input_grad_kernel<T, VEC, SILU><<<plan.blocks, plan.threads, 0, stream>>>(
          geo, dyt, xt, dxt, mod, plan.chunking, moments, grad_sums, eps);
      FASTGEN_LAUNCH_CHECK();
    }
    const ChannelWalk& w = grads.walk;
    const unsigned int blocks = unsigned(w.splits * w.batch * w.channel_tiles());
    channel_grad_kernel<T, SILU><<<blocks, kMaxThreads, 0, stream>>>(
        w, static_cast<const T*>(dy.data), static_cast<const T*>(x.data), mod, stats,
        grads.partials);
    FASTGEN_LAUNCH_CHECK();
    const Strided4d<T> none{nullptr, 0, 0, 0, 0};
    modulation_grad_kernel<T><<<grid_size(w.channels), kThreadsPerBlock, 0, stream>>>(
        w, mod, grads.partials, strided<T>(grads.dscale), strided<T>(grads.dshift),
        grads.dweight != nullptr ? strided<T>(*grads.dweight) : none,
        grads.dbias != nullptr ? strided<T>(*grads.dbias) : none);
    FASTGEN_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------------------------------
// Argument checks

// One block per `what`: blocks must fit the grid's x dimension.
void require_grid(int64_t blocks, const std::string& what) {
  require(blocks <= kMaxGridBlocks,
          what + " = " + str(blocks) + " blocks exceed the grid's 2^31 - 1");
}

void check_output_like_x(const TensorView4d& t, const char* name, const TensorView4d& x) {
  require_like(t, name, x, "x");
  require_no_broadcast(t, name);
}

// A (B, C) tensor as a (B, C, 1, 1) view, or a (C,) one as (1, C, 1, 1).
void check_per_channel(const TensorView4d& t, const char* name, const TensorView4d& x,
                       int64_t batch, int64_t channels, bool output) {
  require_valid_view(t, name);
  require_same_dtype(t, name, x, "x");
  const int64_t shape[4] = {batch, channels, 1, 1};
  require_shape(t, name, shape, batch == 1 ? "(1, C, 1, 1)" : "(B, C, 1, 1)");
  if (output) require_no_broadcast(t, name);
}

// Checks shared by every entry point: x (B, ?, ?, 1), scale and shift (B, C, 1, 1), eps.
void check_common(const TensorView4d& x, const TensorView4d& scale, const TensorView4d& shift,
                  int64_t channels, float eps) {
  require_valid_view(x, "x");
  require(x.size[3] == 1, "x: expected a trailing dimension of size 1 (a 3-D tensor as a 4-D "
                          "view), got shape " + shape_str(x.size));
  check_per_channel(scale, "scale", x, x.size[0], channels, false);
  check_per_channel(shift, "shift", x, x.size[0], channels, false);
  require(std::isfinite(eps) && eps > 0.0f,
          "eps: must be a finite float32 > 0, got " + std::to_string(eps));
}

// num_chunks 0 asks for the launch plan's chunk count (group_chunks).
void check_groups_and_chunks(const TensorView4d& x, int64_t num_groups, int64_t num_chunks) {
  require(num_groups >= 1 && x.size[1] % num_groups == 0,
          "num_groups: must be >= 1 and divide the channels C=" + str(x.size[1]) + ", got " +
              str(num_groups));
  require(num_chunks >= 0 && num_chunks <= kMaxChunks,
          "num_chunks: must be in [0, " + str(kMaxChunks) + "] (0: planned), got " +
              str(num_chunks));
}

void check_group_norm(const TensorView4d& x, const TensorView4d& scale,
                      const TensorView4d& shift, const TensorView4d* weight,
                      const TensorView4d* bias, int64_t num_groups, int64_t num_chunks,
                      float eps) {
  const int64_t C = x.size[1];
  check_common(x, scale, shift, C, eps);
  check_groups_and_chunks(x, num_groups, num_chunks);
  if (weight != nullptr) check_per_channel(*weight, "weight", x, 1, C, false);
  if (bias != nullptr) check_per_channel(*bias, "bias", x, 1, C, false);
}

// A float32 (1, 1, 1, n) view with unit stride and n >= needed; its data (null if needed is 0
// and none was given).
float* checked_workspace(const TensorView4d* workspace, int64_t needed, const std::string& why) {
  if (needed == 0 && workspace == nullptr) return nullptr;
  require(workspace != nullptr, "workspace: required (" + why + " = " + str(needed) + " floats)");
  require_valid_view(*workspace, "workspace");
  require(workspace->dtype == DType::Float32 && workspace->size[0] == 1 &&
              workspace->size[1] == 1 && workspace->size[2] == 1 &&
              workspace->stride[3] == 1 && workspace->size[3] >= needed,
          "workspace: expected a float32 (1, 1, 1, n) view with unit stride and n >= " + why +
              " = " + str(needed) + ", got " + dtype_name(workspace->dtype) + " " +
              shape_str(workspace->size));
  return static_cast<float*>(workspace->data);
}

// Group norm's problem: walk each group along whichever of channels and positions is closer
// in memory in x.
Problem group_norm_problem(const TensorView4d& x, int64_t num_groups) {
  const int64_t S = x.size[2], per_group = x.size[1] / num_groups;
  const bool channel_inner =
      S == 1 || (per_group > 1 && std::abs(x.stride[1]) < std::abs(x.stride[2]));
  return {x.size[0],
          num_groups,
          channel_inner ? S : per_group,
          channel_inner ? per_group : S,
          per_group,
          channel_inner,
          /*group_dim=*/1,
          per_group,
          /*outer_dim=*/channel_inner ? 2 : 1,
          /*inner_dim=*/channel_inner ? 1 : 2};
}

// Layer norm's problem: one group per token (b, n), a single row of C channels.
Problem layer_norm_problem(const TensorView4d& x) {
  return {x.size[0], x.size[1], 1, x.size[2], 0, true,
          /*group_dim=*/1, 1, /*outer_dim=*/-1, /*inner_dim=*/2};
}

// channel_grad_kernel's walk: `channel_dim` and `position_dim` of the (B, ?, ?, 1) views,
// positions cut into position_splits ranges.
ChannelWalk channel_walk(const TensorView4d& x, const TensorView4d& dy, int channel_dim,
                         int position_dim, int64_t position_splits, int64_t stats_per_sample,
                         int64_t channels_per_group) {
  const int64_t positions = x.size[position_dim];
  const int64_t split_positions = (positions + position_splits - 1) / position_splits;
  const bool channels_closer =
      std::abs(x.stride[channel_dim]) < std::abs(x.stride[position_dim]);
  return {x.size[0],
          x.size[channel_dim],
          positions,
          (positions + split_positions - 1) / split_positions,  // none empty
          split_positions,
          x.stride[0],
          x.stride[channel_dim],
          x.stride[position_dim],
          dy.stride[0],
          dy.stride[channel_dim],
          dy.stride[position_dim],
          stats_per_sample,
          channels_per_group,
          x.size[0] * stats_per_sample,
          channels_closer ? 32 : 1};
}

// Launch plans. A group is split over several blocks when one block would walk more than
// kMaxFusedElements values alone, or when there are fewer groups than SMs to fill, in chunks
// of at least kMinChunkElements values (a split reads x twice). The backward's per-channel
// sums cut each channel's positions (tokens for adaLN) into ranges of about kSplitPositions,
// so that one sample's few channels still make many blocks.
constexpr int64_t kMaxFusedElements = 1 << 16;
constexpr int64_t kMinChunkElements = 1 << 13;
constexpr int64_t kMaxPlannedChunks = 256;
constexpr int64_t kSplitPositions = 2048;

// Chunks per group of x (B, C, S, 1): `forced` when it is not 0, else the plan above.
int64_t group_chunks(const TensorView4d& x, int64_t num_groups, int64_t forced) {
  int64_t chunks = std::max<int64_t>(forced, 1);
  if (forced == 0 && x.numel() > 0) {
    ensure_device();
    const int64_t group_elements = x.size[1] / num_groups * x.size[2];
    const int64_t wanted = std::max(ceil_div(device_sms(), x.size[0] * num_groups),
                                    ceil_div(group_elements, kMaxFusedElements));
    chunks = std::max<int64_t>(
        1, std::min({wanted, kMaxPlannedChunks, group_elements / kMinChunkElements}));
  }
  require_grid(x.size[0] * num_groups * chunks, "x: B * num_groups * num_chunks");
  return chunks;
}

int64_t position_splits(int64_t positions) {
  return std::max<int64_t>(1, std::min(ceil_div(positions, kSplitPositions), kMaxPlannedChunks));
}

// The float32 workspace each launch needs (ada_group_norm_workspace and
// ada_layer_norm_backward_workspace report them; the launchers check them).
int64_t group_norm_workspace(const TensorView4d& x, int64_t num_groups, int64_t chunks,
                             bool backward) {
  const int64_t groups = x.size[0] * num_groups;
  const int64_t chunk_records = chunks > 1 ? (backward ? 5 : 3) * groups * chunks : 0;
  if (!backward) return chunk_records;
  // Group statistics, per-(range, b, c) gradient sums, the split path's chunk records.
  return 3 * groups + 2 * position_splits(x.size[2]) * x.size[0] * x.size[1] + chunk_records;
}

int64_t layer_norm_backward_workspace(const TensorView4d& x) {
  // (pivot, mean, rstd) per token, per-(range, b, c) gradient sums.
  return 3 * x.size[0] * x.size[1] + 2 * position_splits(x.size[1]) * x.size[0] * x.size[2];
}

}  // namespace
}  // namespace kernels::ada_norm

using namespace kernels::ada_norm;

void ada_group_norm(const TensorView4d& x, const TensorView4d& y, const TensorView4d& scale,
                    const TensorView4d& shift, const TensorView4d* weight,
                    const TensorView4d* bias, const TensorView4d* workspace, int64_t num_groups,
                    int64_t num_chunks, float eps, bool silu, cudaStream_t stream) {
  check_group_norm(x, scale, shift, weight, bias, num_groups, num_chunks, eps);
  check_output_like_x(y, "y", x);
  const int64_t chunks = group_chunks(x, num_groups, num_chunks);
  float* records = checked_workspace(workspace, group_norm_workspace(x, num_groups, chunks, false),
                                     "ada_group_norm_workspace");

  ensure_device();
  if (x.numel() == 0) return;
  forward(group_norm_problem(x, num_groups), x, y, scale, shift, weight, bias, records, chunks,
          eps, silu, stream);
}

void ada_group_norm_backward(const TensorView4d& dy, const TensorView4d& x,
                             const TensorView4d& scale, const TensorView4d& shift,
                             const TensorView4d* weight, const TensorView4d* bias,
                             const TensorView4d& dx, const TensorView4d& dscale,
                             const TensorView4d& dshift, const TensorView4d& dweight,
                             const TensorView4d& dbias, const TensorView4d* workspace,
                             int64_t num_groups, int64_t num_chunks, float eps, bool silu,
                             cudaStream_t stream) {
  check_group_norm(x, scale, shift, weight, bias, num_groups, num_chunks, eps);
  const int64_t B = x.size[0], C = x.size[1], groups = B * num_groups;
  require_like(dy, "dy", x, "x");
  check_output_like_x(dx, "dx", x);
  check_per_channel(dscale, "dscale", x, B, C, true);
  check_per_channel(dshift, "dshift", x, B, C, true);
  check_per_channel(dweight, "dweight", x, 1, C, true);
  check_per_channel(dbias, "dbias", x, 1, C, true);
  const int64_t splits = position_splits(x.size[2]);
  require_grid(B * C * splits, "x: B * C * position splits");
  const int64_t chunks = group_chunks(x, num_groups, num_chunks);
  float* stats = checked_workspace(workspace, group_norm_workspace(x, num_groups, chunks, true),
                                   "ada_group_norm_workspace");

  ensure_device();
  if (x.numel() == 0) return;
  const ModulationGrads grads{
      channel_walk(x, dy, /*channel_dim=*/1, /*position_dim=*/2, splits, num_groups,
                   C / num_groups),
      stats + 3 * groups, dscale, dshift, &dweight, &dbias};
  backward(group_norm_problem(x, num_groups), dy, x, dx, scale, shift, weight, bias, grads,
           stats, grads.partials + 2 * splits * B * C, chunks, eps, silu, stream);
}

int64_t ada_group_norm_workspace(const TensorView4d& x, int64_t num_groups, int64_t num_chunks,
                                 bool backward) {
  require_valid_view(x, "x");
  check_groups_and_chunks(x, num_groups, num_chunks);
  return group_norm_workspace(x, num_groups, group_chunks(x, num_groups, num_chunks), backward);
}

int64_t ada_layer_norm_backward_workspace(const TensorView4d& x) {
  require_valid_view(x, "x");
  return layer_norm_backward_workspace(x);
}

void ada_layer_norm(const TensorView4d& x, const TensorView4d& y, const TensorView4d& scale,
                    const TensorView4d& shift, float eps, cudaStream_t stream) {
  check_common(x, scale, shift, x.size[2], eps);
  check_output_like_x(y, "y", x);
  require_grid(x.size[0] * x.size[1], "x: B * N rows");

  ensure_device();
  if (x.numel() == 0) return;
  forward(layer_norm_problem(x), x, y, scale, shift, nullptr, nullptr, nullptr, 1, eps, false,
          stream);
}

void ada_layer_norm_backward(const TensorView4d& dy, const TensorView4d& x,
                             const TensorView4d& scale, const TensorView4d& shift,
                             const TensorView4d& dx, const TensorView4d& dscale,
                             const TensorView4d& dshift, const TensorView4d* workspace,
                             float eps, cudaStream_t stream) {
  const int64_t B = x.size[0], N = x.size[1], C = x.size[2];
  check_common(x, scale, shift, C, eps);
  require_like(dy, "dy", x, "x");
  check_output_like_x(dx, "dx", x);
  check_per_channel(dscale, "dscale", x, B, C, true);
  check_per_channel(dshift, "dshift", x, B, C, true);
  require_grid(B * N, "x: B * N rows");
  const int64_t splits = position_splits(N);
  require_grid(B * C * splits, "x: B * C * position splits");
  float* stats = checked_workspace(workspace, layer_norm_backward_workspace(x),
                                   "ada_layer_norm_backward_workspace");

  ensure_device();
  if (x.numel() == 0) return;
  const ModulationGrads grads{
      channel_walk(x, dy, /*channel_dim=*/2, /*position_dim=*/1, splits, N, 0),
      stats + 3 * B * N, dscale, dshift, nullptr, nullptr};
  backward(layer_norm_problem(x), dy, x, dx, scale, shift, nullptr, nullptr, grads, stats,
           nullptr, 1, eps, false, stream);
}

}  // namespace fastgen
