// Query/key RMSNorm then rotary embedding, qk_norm_rope (math in fastgen/ops/qk_norm_rope.py),
// one tensor (q or k) per launch:
//
//   r      = 1 / sqrt(mean_d x[d]^2 + eps)               (no norm: r = 1 and weight = 1)
//   x'[d]  = x[d] * r * weight[d]
//   pairs (d1, d2) of pair index j: interleaved (2j, 2j + 1), else (j, j + P) with P = ceil(D/2)
//   y[d1]  = x'[d1] cos[l, j] - x'[d2] sin[l, j],  y[d2] = x'[d1] sin[l, j] + x'[d2] cos[l, j]
//   backward, g = dy rotated back (sin negated):  dx = r (g w - xhat mean_d(g w xhat)),
//     xhat = x r, dweight[d] = sum over rows of g[d] xhat[d]; dx = g without norm.
//
// Decomposition. A row is the D features of one (b, l, h); one warp owns a row at a time and
// warps walk the rows with a grid-wide stride. Lane t takes the pairs j = t, t + 32, ..., so
// both features of a pair and its angle are in the same lane and the rotation needs no
// exchange; the row's sums (of x^2, and of g w x in the backward) are warp shuffles in a fixed
// order. The row is read twice, sums then outputs: the second read of its D elements hits in
// L1. The weight arrives as float32 (the caller converts it once), the angle tables as float32
// (L, P) views.
//
// dweight without atomics: each warp adds its rows' g * xhat into its own row of a
// (warps, D) float32 buffer, each element only ever touched by the lane that owns its pair;
// torch sums the rows. Results are identical run to run. Offsets are int64.

#include "common.h"

namespace fastgen {
namespace kernels::qk_norm_rope {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;

struct RowGeometry {
  int64_t rows, L, H, D, pairs;
  bool interleaved;
  float eps;
};

struct Pair {
  int64_t first, second;
  bool has_second;
};

__device__ __forceinline__ Pair pair_of(const RowGeometry& g, int64_t j) {
  const int64_t first = g.interleaved ? 2 * j : j;
  const int64_t second = g.interleaved ? 2 * j + 1 : j + g.pairs;
  return {first, second, second < g.D};
}

// The per-row tensors of one launch: x (and dy) read, y (or dx) written, all (B, L, H, D).
template <typename T>
struct RowTensors {
  Strided4d<const T> x;
  Strided4d<T> out;
  const float* weight;  // null: no norm
  int64_t weight_stride;
  Strided4d<const float> cos, sin;  // null data: no rotation
};

// (b, l, h) of row r = (b * L + l) * H + h.
__device__ __forceinline__ void row_index(const RowGeometry& g, int64_t row, int64_t& b, int64_t& l,
                                          int64_t& h) {
  h = row % g.H;
  l = (row / g.H) % g.L;
  b = row / (g.H * g.L);
}

// The rotation by angle (cos, sin), or by its opposite (the transpose) when `inverse`.
__device__ __forceinline__ void rotate(float& a, float& b, float c, float s, bool inverse) {
  if (inverse) s = -s;
  const float first = a * c - b * s, second = a * s + b * c;
  a = first;
  b = second;
}

template <typename T>
__device__ __forceinline__ float load(const Strided4d<const T>& t, int64_t b, int64_t l, int64_t h,
                                      int64_t d) {
  return to_float(t.at(b, l, h, d));
}

// sum_d x[d]^2 over the row, in every lane.
template <typename T>
__device__ __forceinline__ float sum_of_squares(const RowGeometry& g, const Strided4d<const T>& x,
                                                int64_t b, int64_t l, int64_t h, int lane) {
  float sum = 0.0f;
  for (int64_t d = lane; d < g.D; d += 32) {
    const float v = load(x, b, l, h, d);
    sum += v * v;
  }
  return warp_sum(sum);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) qk_norm_rope_forward_kernel(RowGeometry g, RowTensors<T> t) {
  const int lane = threadIdx.x & 31;
  const int64_t stride = int64_t(gridDim.x) * kWarps;
  for (int64_t row = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5); row < g.rows; row += stride) {
    int64_t b, l, h;
    row_index(g, row, b, l, h);
    float r = 1.0f;
    if (t.weight != nullptr) r = rsqrtf(sum_of_squares(g, t.x, b, l, h, lane) / float(g.D) + g.eps);
    for (int64_t j = lane; j < g.pairs; j += 32) {
      const Pair p = pair_of(g, j);
      float first = load(t.x, b, l, h, p.first);
      float second = p.has_second ? load(t.x, b, l, h, p.second) : 0.0f;
      if (t.weight != nullptr) {
        first = first * r * t.weight[p.first * t.weight_stride];
        if (p.has_second) second = second * r * t.weight[p.second * t.weight_stride];
      }
      if (t.cos.data != nullptr) rotate(first, second, t.cos.at(l, j, 0, 0), t.sin.at(l, j, 0, 0), false);
      t.out.at(b, l, h, p.first) = from_float<T>(first);
      if (p.has_second) t.out.at(b, l, h, p.second) = from_float<T>(second);
    }
  }
}

// g of one pair: dy rotated back.
template <typename T>
__device__ __forceinline__ void grad_pair(const RowTensors<T>& t, const Strided4d<const T>& dy, const Pair& p,
                                          int64_t b, int64_t l, int64_t h, int64_t j, float& first,
                                          float& second) {
  first = load(dy, b, l, h, p.first);
  second = p.has_second ? load(dy, b, l, h, p.second) : 0.0f;
  if (t.cos.data != nullptr) rotate(first, second, t.cos.at(l, j, 0, 0), t.sin.at(l, j, 0, 0), true);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) qk_norm_rope_backward_kernel(RowGeometry g, RowTensors<T> t,
                                                                         Strided4d<const T> dy,
                                                                         float* partial) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t stride = int64_t(gridDim.x) * kWarps;
  float* sums = partial == nullptr ? nullptr : partial + warp * g.D;
  if (sums != nullptr) {
    for (int64_t j = lane; j < g.pairs; j += 32) {
      const Pair p = pair_of(g, j);
      sums[p.first] = 0.0f;
      if (p.has_second) sums[p.second] = 0.0f;
    }
  }
  for (int64_t row = warp; row < g.rows; row += stride) {
    int64_t b, l, h;
    row_index(g, row, b, l, h);
    float r = 1.0f, mean_gwx = 0.0f;
    if (t.weight != nullptr) {
      float dot = 0.0f;
      for (int64_t j = lane; j < g.pairs; j += 32) {
        const Pair p = pair_of(g, j);
        float g1, g2;
        grad_pair(t, dy, p, b, l, h, j, g1, g2);
        dot += g1 * t.weight[p.first * t.weight_stride] * load(t.x, b, l, h, p.first);
        if (p.has_second) dot += g2 * t.weight[p.second * t.weight_stride] * load(t.x, b, l, h, p.second);
      }
      r = rsqrtf(sum_of_squares(g, t.x, b, l, h, lane) / float(g.D) + g.eps);
      mean_gwx = warp_sum(dot) * r / float(g.D);
    }
    for (int64_t j = lane; j < g.pairs; j += 32) {
      const Pair p = pair_of(g, j);
      float grads[2];
      grad_pair(t, dy, p, b, l, h, j, grads[0], grads[1]);
      const int64_t features[2] = {p.first, p.second};
      for (int e = 0; e < (p.has_second ? 2 : 1); ++e) {
        float dx = grads[e];
        if (t.weight != nullptr) {
          const float xhat = load(t.x, b, l, h, features[e]) * r;
          dx = r * (grads[e] * t.weight[features[e] * t.weight_stride] - xhat * mean_gwx);
          sums[features[e]] += grads[e] * xhat;
        }
        t.out.at(b, l, h, features[e]) = from_float<T>(dx);
      }
    }
  }
}

// Checks shared by both directions; the launch's geometry.
RowGeometry check_inputs(const TensorView4d& x, const TensorView4d* weight, const TensorView4d* cos,
                         const TensorView4d* sin, bool interleaved, float eps) {
  require_valid_view(x, "x");
  require_float_dtype(x, "x");
  const int64_t D = x.size[3];
  require(D >= 1, "x: head dim D must be >= 1, got shape " + shape_str(x.size));
  if (weight != nullptr) {
    require_valid_view(*weight, "weight");
    require(weight->dtype == DType::Float32, "weight: dtype must be float32 (the caller converts it)");
    const int64_t expected[4] = {D, 1, 1, 1};
    require_shape(*weight, "weight", expected, "(D,)");
  }
  require((cos == nullptr) == (sin == nullptr), "cos: cos and sin must be given together");
  if (cos != nullptr) {
    require(D % 2 == 0, "x: RoPE pairs the features, so head dim D must be even, got " + str(D));
    const int64_t expected[4] = {x.size[1], D / 2, 1, 1};
    for (const auto& [table, name] : {std::pair{cos, "cos"}, std::pair{sin, "sin"}}) {
      require_valid_view(*table, name);
      require(table->dtype == DType::Float32, std::string(name) + ": dtype must be float32");
      require_shape(*table, name, expected, "(L, D/2)");
    }
  }
  require(eps > 0.0f && std::isfinite(eps), "eps: must be a finite number > 0");
  // Without rotation the pairs only group the features two by two: (j, j + P), any layout.
  return {x.size[0] * x.size[1] * x.size[2], x.size[1], x.size[2], D, (D + 1) / 2,
          cos != nullptr && interleaved, eps};
}

template <typename T>
RowTensors<T> row_tensors(const TensorView4d& x, const TensorView4d& out, const TensorView4d* weight,
                          const TensorView4d* cos, const TensorView4d* sin) {
  return {strided<const T>(x), strided<T>(out),
          weight == nullptr ? nullptr : static_cast<const float*>(weight->data),
          weight == nullptr ? 0 : weight->stride[0], optional_strided<float>(cos), optional_strided<float>(sin)};
}

unsigned int row_blocks(int64_t rows) { return grid_size(rows * 32, kThreads); }

}  // namespace
}  // namespace kernels::qk_norm_rope

using namespace kernels::qk_norm_rope;

void qk_norm_rope_forward(const TensorView4d& x, const TensorView4d* weight, const TensorView4d* cos,
                          const TensorView4d* sin, const TensorView4d& y, bool interleaved, float eps,
                          cudaStream_t stream) {
  const RowGeometry g = check_inputs(x, weight, cos, sin, interleaved, eps);
  require_like(y, "y", x, "x");
  require_no_broadcast(y, "y");

  ensure_device();
  if (g.rows == 0) return;
  dispatch_dtype(x.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    qk_norm_rope_forward_kernel<T><<<row_blocks(g.rows), kThreads, 0, stream>>>(
        g, row_tensors<T>(x, y, weight, cos, sin));
    FASTGEN_LAUNCH_CHECK();
  });
}

int64_t qk_norm_rope_backward_rows(const TensorView4d& x) {
  require_valid_view(x, "x");
  ensure_device();
  return int64_t(row_blocks(x.size[0] * x.size[1] * x.size[2])) * kWarps;
}

void qk_norm_rope_backward(const TensorView4d& dy, const TensorView4d& x, const TensorView4d* weight,
                           const TensorView4d* cos, const TensorView4d* sin, const TensorView4d& dx,
                           const TensorView4d* partial, bool interleaved, float eps, cudaStream_t stream) {
  const RowGeometry g = check_inputs(x, weight, cos, sin, interleaved, eps);
  require_like(dy, "dy", x, "x");
  require_like(dx, "dx", x, "x");
  require_no_broadcast(dx, "dx");
  require((partial != nullptr) == (weight != nullptr), "partial: must be given exactly when weight is");

  ensure_device();
  const unsigned int blocks = row_blocks(g.rows);
  if (partial != nullptr) {
    const int64_t expected[4] = {int64_t(blocks) * kWarps, g.D, 1, 1};
    require_shape(*partial, "partial", expected, "(qk_norm_rope_backward_rows(x), D)");
    require(partial->dtype == DType::Float32 && partial->stride[1] == 1 && partial->stride[0] == g.D,
            "partial: must be contiguous float32");
    require(partial->data != nullptr, "partial: null data pointer");
  }
  // An empty x still launches when partial is given: its rows must be zeroed.
  if (g.rows == 0 && partial == nullptr) return;
  dispatch_dtype(x.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    qk_norm_rope_backward_kernel<T><<<blocks, kThreads, 0, stream>>>(
        g, row_tensors<T>(x, dx, weight, cos, sin), strided<const T>(dy),
        partial == nullptr ? nullptr : static_cast<float*>(partial->data));
    FASTGEN_LAUNCH_CHECK();
  });
}

}  // namespace fastgen
