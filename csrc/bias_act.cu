// bias_act (math in fastgen/ops/bias_act.py), on strided 4-D tensors.
//
//   forward:   y = clamp(gain * act(x + b), -clamp, clamp)
//   backward:  dx = dy * gain * act'(z) * m,  db[c] = sum of dx over every axis but `dim`
// with b broadcast along every axis but `dim`, z = x + b, and m the clamp mask, read from y
// (|y| < clamp, the sign of y*gain is the sign of z) or from x (|gain*act(z)| <= clamp),
// whichever the caller passes. Loads widen to fp32, all math is fp32, one rounding at the
// store; db sums the fp32 dx before it is rounded.
//
// Decomposition. Both ops are one pass over memory, so the cost is bandwidth: the traversal
// follows the output's memory order. The host sorts the four axes by the output's strides
// into three row axes and one column axis (the output's innermost one: W for NCHW, C for
// channels_last and FC layers). A block is (bx columns x by rows) threads, bx a power of
// two fitted to the column count, so a warp touches consecutive addresses; a thread splits
// its row index into three coordinates once per row, not per element.
//
// db must be deterministic (no float atomics), so the backward grid is (channel blocks,
// splits of the rows) and every block owns a fixed set of channels:
// - bias on a row axis (NCHW): a block owns one channel, that axis is pinned to it, and the
//   block sums all its threads;
// - bias on the column axis (channels_last, FC): a block owns bx consecutive channels, one per
//   column lane, so loads stay coalesced, and sums over its rows per lane.
// Each block writes its sums to partial[split][channel] with a fixed-order tree; a second
// small kernel adds the splits in order. The split count depends on the shapes only (not on
// the device), so the caller can size the partial buffer with bias_act_db_splits().
//
// The activation is a runtime switch: it is uniform across the grid, so the branch costs a
// few instructions per element on a bandwidth-bound pass, and it saves 9x the instantiations.

#include <cmath>

#include "common.h"

namespace fastgen {
namespace kernels::bias_act {
namespace {

enum class Act { Linear, Relu, Lrelu, Tanh, Sigmoid, Elu, Selu, Softplus, Swish };

constexpr float kSeluScale = 1.0507009873554804934f;
constexpr float kSeluScaleAlpha = 1.0507009873554804934f * 1.6732632423543772848f;

// Backward blocks per launch the splits aim for: several waves on a 132-SM H100, and a
// bounded partial buffer (splits x C floats).
constexpr int64_t kTargetBackwardBlocks = 1024;
// Channels a backward block owns when they are its column lanes: 64 fp32 = two 128-byte lines.
constexpr int64_t kMaxChannelLanes = 64;

Act parse_act(const std::string& name) {
  static const std::pair<const char*, Act> names[] = {
      {"linear", Act::Linear}, {"relu", Act::Relu},       {"lrelu", Act::Lrelu},
      {"tanh", Act::Tanh},     {"sigmoid", Act::Sigmoid}, {"elu", Act::Elu},
      {"selu", Act::Selu},     {"softplus", Act::Softplus}, {"swish", Act::Swish}};
  for (const auto& [n, act] : names)
    if (name == n) return act;
  throw std::invalid_argument("act: unknown activation '" + name +
                              "' (expected linear, relu, lrelu, tanh, sigmoid, elu, selu, "
                              "softplus or swish)");
}

struct ActParams {
  Act act;
  float alpha;           // lrelu's negative slope
  float negative_slope;  // act'(z) for z <= 0 of a piecewise linear act
  float nan_slope;       // and for a NaN z: torch's relu passes the gradient, lrelu scales it
  float gain;
  float clamp;  // used only when has_clamp
  bool has_clamp;
};

__device__ __forceinline__ float sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

// max(z, 0) that keeps a NaN, as F.relu does (fmaxf would return 0 for it).
__device__ __forceinline__ float relu(float z) { return z < 0.0f ? 0.0f : z; }

__device__ __forceinline__ float activate(float z, const ActParams& p) {
  switch (p.act) {
    case Act::Linear: return z;
    case Act::Relu: return relu(z);
    case Act::Lrelu: return z > 0.0f ? z : z * p.alpha;
    case Act::Tanh: return tanhf(z);
    case Act::Sigmoid: return sigmoid(z);
    case Act::Elu: return z >= 0.0f ? z : expm1f(z);
    case Act::Selu: return z >= 0.0f ? kSeluScale * z : kSeluScaleAlpha * expm1f(z);
    // log(1 + e^z) without overflow for large z.
    case Act::Softplus: return relu(z) + log1pf(expf(-fabsf(z)));
    case Act::Swish: return z * sigmoid(z);
  }
  return z;
}

// act'(z) of a piecewise linear act from v, a value with z's sign (z, or y * gain).
__device__ __forceinline__ float piecewise_slope(float v, const ActParams& p) {
  return v > 0.0f ? 1.0f : (v <= 0.0f ? p.negative_slope : p.nan_slope);
}

// act'(z), with torch's one-sided choices at z = 0 (16-bit inputs hit it exactly) and at a
// NaN z (fastgen/ops/bias_act.py's docstring).
__device__ __forceinline__ float slope(float z, const ActParams& p) {
  switch (p.act) {
    case Act::Tanh: {
      const float t = tanhf(z);
      return 1.0f - t * t;
    }
    case Act::Sigmoid: {
      const float s = sigmoid(z);
      return s * (1.0f - s);
    }
    case Act::Elu: return z > 0.0f ? 1.0f : expf(z);
    case Act::Selu: return z > 0.0f ? kSeluScale : kSeluScaleAlpha * expf(z);
    case Act::Softplus: return sigmoid(z);
    case Act::Swish: {
      const float s = sigmoid(z);
      return s * (1.0f + z * (1.0f - s));
    }
    default: return piecewise_slope(z, p);
  }
}

// Comparisons rather than fminf/fmaxf, so a NaN stays NaN as through torch.clamp.
__device__ __forceinline__ float clamp_value(float v, float c) {
  return v > c ? c : (v < -c ? -c : v);
}

// The traversal: positions 0..2 are the row axes (slowest first), 3 the column axis; operands
// are Strided4d views whose strides the host permuted into this order.
struct Walk {
  int64_t size[4];
  int64_t rows;  // size[0] * size[1] * size[2]

  __device__ __forceinline__ void unravel(int64_t row, int64_t& r0, int64_t& r1,
                                          int64_t& r2) const {
    r2 = row % size[2];
    const int64_t rest = row / size[2];
    r1 = rest % size[1];
    r0 = rest / size[1];
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreadsPerBlock)
    bias_act_forward_kernel(Walk walk, Strided4d<const T> x, Strided4d<const T> b,
                            Strided4d<T> y, ActParams p) {
  const int64_t row_step = int64_t(gridDim.x) * blockDim.y;
  for (int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; row < walk.rows;
       row += row_step) {
    int64_t r0, r1, r2;
    walk.unravel(row, r0, r1, r2);
    for (int64_t col = threadIdx.x; col < walk.size[3]; col += blockDim.x) {
      float z = to_float(x.at(r0, r1, r2, col));
      if (b.data != nullptr) z += to_float(b.at(r0, r1, r2, col));
      float v = activate(z, p) * p.gain;
      if (p.has_clamp) v = clamp_value(v, p.clamp);
      y.at(r0, r1, r2, col) = from_float<T>(v);
    }
  }
}

enum class Source { None, Y, X };

// Bias placement in the backward walk (bias_pos): -1 none, 0..2 the row position pinned to
// the block's channel, 3 the column axis. The grid is (channel blocks, splits): channel
// blocks can exceed gridDim.y's 65535, splits cannot (kTargetBackwardBlocks).
template <typename T>
__global__ void __launch_bounds__(kThreadsPerBlock)
    bias_act_backward_kernel(Walk walk, Strided4d<const T> dy, Strided4d<const T> ref,
                             Strided4d<const T> b, Strided4d<T> dx, float* partial,
                             int64_t channels, int bias_pos, Source source, ActParams p) {
  const bool channel_lanes = bias_pos == 3;
  const int64_t lane_channel = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  // Columns: the lane's own channel, or every blockDim.x-th column.
  int64_t col0 = threadIdx.x, col_step = blockDim.x, col_end = walk.size[3];
  if (channel_lanes) {
    col0 = lane_channel;
    col_step = 1;
    col_end = lane_channel < walk.size[3] ? lane_channel + 1 : 0;
  }
  const int64_t pin0 = bias_pos == 0 ? blockIdx.x : 0;
  const int64_t pin1 = bias_pos == 1 ? blockIdx.x : 0;
  const int64_t pin2 = bias_pos == 2 ? blockIdx.x : 0;

  float sum = 0.0f;
  const int64_t row_step = int64_t(gridDim.y) * blockDim.y;
  for (int64_t row = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; row < walk.rows;
       row += row_step) {
    int64_t r0, r1, r2;
    walk.unravel(row, r0, r1, r2);
    r0 += pin0;
    r1 += pin1;
    r2 += pin2;
    for (int64_t col = col0; col < col_end; col += col_step) {
      // dx = dy * (gain * act'(z) * m): the mask multiplied in keeps a NaN act'(z) NaN where
      // m is 0, as the eager autograd does (and a non-finite dy: the op's docstring).
      float factor = p.gain;
      if (source == Source::Y) {
        // y's sign (times gain's) is z's, and |y| < clamp is the mask.
        const float y = to_float(ref.at(r0, r1, r2, col));
        factor *= piecewise_slope(y * p.gain, p);
        if (p.has_clamp) factor *= fabsf(y) < p.clamp ? 1.0f : 0.0f;
      } else if (source == Source::X) {
        float z = to_float(ref.at(r0, r1, r2, col));
        if (b.data != nullptr) z += to_float(b.at(r0, r1, r2, col));
        factor *= slope(z, p);
        if (p.has_clamp) factor *= fabsf(activate(z, p) * p.gain) <= p.clamp ? 1.0f : 0.0f;
      }
      const float g = to_float(dy.at(r0, r1, r2, col)) * factor;
      dx.at(r0, r1, r2, col) = from_float<T>(g);
      sum += g;
    }
  }
  if (partial == nullptr) return;  // uniform across the grid: no __syncthreads is skipped

  // Fixed-order tree over the threads that share a channel: all of them (outer mode), or
  // those of one column lane, whose indices t differ by multiples of blockDim.x (inner mode).
  __shared__ float sums[kThreadsPerBlock];
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  sums[t] = sum;
  __syncthreads();
  const int groups = channel_lanes ? int(blockDim.x) : 1;
  for (int s = kThreadsPerBlock / 2; s >= groups; s >>= 1) {
    if (t < s) sums[t] += sums[t + s];
    __syncthreads();
  }
  if (t < groups) {
    const int64_t channel = channel_lanes ? int64_t(blockIdx.x) * blockDim.x + t : blockIdx.x;
    if (channel < channels) partial[int64_t(blockIdx.y) * channels + channel] = sums[t];
  }
}

// db[c] = sum over splits of partial[split][c], in split order.
template <typename T>
__global__ void __launch_bounds__(kThreadsPerBlock)
    bias_grad_kernel(const float* partial, int64_t splits, int64_t channels, T* db,
                     int64_t db_stride) {
  for (int64_t c = grid_thread_index(); c < channels; c += grid_thread_count()) {
    float sum = 0.0f;
    for (int64_t s = 0; s < splits; ++s) sum += partial[s * channels + c];
    db[c * db_stride] = from_float<T>(sum);
  }
}

// ---------------------------------------------------------------------------------------
// Host side: validation and the traversal.

void check_dim(int64_t dim) {
  require(dim >= 0 && dim < 4, "dim: must be in [0, 4) for the 4-D views, got " + str(dim));
}

// A per-channel vector (b, db): x's size along dim, 1 elsewhere.
void check_channel_vector(const TensorView4d& v, const char* name, const TensorView4d& x,
                          int64_t dim) {
  require_valid_view(v, name);
  require_same_dtype(v, name, x, "x");
  int64_t expected[4] = {1, 1, 1, 1};
  expected[dim] = x.size[dim];
  require_shape(v, name, expected, "x.size[dim] along dim, 1 elsewhere");
}

ActParams make_params(const std::string& act, float alpha, float gain, const float* clamp) {
  const Act a = parse_act(act);
  require(std::isfinite(alpha), "alpha: must be finite, got " + std::to_string(alpha));
  require(std::isfinite(gain), "gain: must be finite, got " + std::to_string(gain));
  if (clamp != nullptr)
    require(std::isfinite(*clamp) && *clamp >= 0.0f,
            "clamp: must be finite and >= 0, got " + std::to_string(*clamp));
  const float negative_slope = a == Act::Linear ? 1.0f : a == Act::Relu ? 0.0f : alpha;
  const float nan_slope = a == Act::Lrelu ? alpha : 1.0f;
  return {a, alpha, negative_slope, nan_slope, gain, clamp != nullptr ? *clamp : 0.0f,
          clamp != nullptr};
}

// The output's axes, outermost first: size-1 axes (whose strides mean nothing) before the
// others, then by decreasing stride; the last is the column axis.
struct Order {
  int axis[4];
};

Order memory_order(const TensorView4d& out) {
  Order order{{0, 1, 2, 3}};
  std::stable_sort(order.axis, order.axis + 4, [&](int a, int b) {
    const bool a_unit = out.size[a] == 1, b_unit = out.size[b] == 1;
    if (a_unit != b_unit) return a_unit;
    return out.stride[a] > out.stride[b];
  });
  return order;
}

template <typename T>
Strided4d<T> permuted(const TensorView4d& t, const Order& order) {
  return {static_cast<T*>(t.data), t.stride[order.axis[0]], t.stride[order.axis[1]],
          t.stride[order.axis[2]], t.stride[order.axis[3]]};
}

// The bias as an operand: its stride along dim, 0 along the axes it is broadcast over.
template <typename T>
Strided4d<const T> broadcast_bias(const TensorView4d* b, int64_t dim, const Order& order) {
  if (b == nullptr) return {nullptr, 0, 0, 0, 0};
  int64_t s[4];
  for (int k = 0; k < 4; ++k) s[k] = order.axis[k] == dim ? b->stride[dim] : 0;
  return {static_cast<const T*>(b->data), s[0], s[1], s[2], s[3]};
}

Walk make_walk(const TensorView4d& out, const Order& order) {
  Walk walk;
  for (int k = 0; k < 4; ++k) walk.size[k] = out.size[order.axis[k]];
  walk.rows = walk.size[0] * walk.size[1] * walk.size[2];
  return walk;
}

int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p *= 2;
  return p;
}

// Blocks of block.y rows that cover the walk.
int64_t row_tiles(const Walk& walk, const dim3& block) {
  return (walk.rows + block.y - 1) / block.y;
}

// (bx, by): bx column lanes, a power of two up to `max_lanes`, no wider than the columns.
dim3 block_shape(int64_t columns, int64_t max_lanes) {
  const int64_t bx = std::min(next_pow2(std::max<int64_t>(columns, 1)), max_lanes);
  return dim3(unsigned(bx), unsigned(kThreadsPerBlock / bx));
}

// Everything the backward launch and bias_act_db_splits derive from dx's shape and strides.
struct BackwardPlan {
  Order order;
  Walk walk;
  int bias_pos = -1;
  dim3 block;
  int64_t channel_blocks = 1;
  int64_t splits = 1;
};

BackwardPlan plan_backward(const TensorView4d& dx, int64_t dim, bool has_bias) {
  BackwardPlan plan;
  plan.order = memory_order(dx);
  plan.walk = make_walk(dx, plan.order);
  if (has_bias)
    for (int k = 0; k < 4; ++k)
      if (plan.order.axis[k] == dim) plan.bias_pos = k;
  const int64_t channels = dx.size[dim];
  if (plan.bias_pos == 3) {
    plan.block = block_shape(plan.walk.size[3], kMaxChannelLanes);
    plan.channel_blocks = (channels + plan.block.x - 1) / plan.block.x;
  } else {
    plan.block = block_shape(plan.walk.size[3], kThreadsPerBlock);
    if (plan.bias_pos >= 0) {
      plan.channel_blocks = channels;
      // Each block walks its own channel's slice: that row axis is pinned, of size 1.
      plan.walk.size[plan.bias_pos] = 1;
      plan.walk.rows = plan.walk.size[0] * plan.walk.size[1] * plan.walk.size[2];
    }
  }
  const int64_t wanted = kTargetBackwardBlocks / std::max<int64_t>(plan.channel_blocks, 1);
  plan.splits = std::max<int64_t>(1, std::min(wanted, row_tiles(plan.walk, plan.block)));
  return plan;
}

}  // namespace
}  // namespace kernels::bias_act

using namespace kernels::bias_act;

void bias_act_forward(const TensorView4d& x, const TensorView4d* b, const TensorView4d& y,
                      int64_t dim, const std::string& act, float alpha, float gain,
                      const float* clamp, cudaStream_t stream) {
  require_valid_view(x, "x");
  require_like(y, "y", x, "x");
  require_no_broadcast(y, "y");
  check_dim(dim);
  if (b != nullptr) check_channel_vector(*b, "b", x, dim);
  const ActParams params = make_params(act, alpha, gain, clamp);

  ensure_device();
  if (y.numel() == 0) return;
  const Order order = memory_order(y);
  const Walk walk = make_walk(y, order);
  const dim3 block = block_shape(walk.size[3], kThreadsPerBlock);
  // grid_size(n) = min(ceil(n / kThreadsPerBlock), one device-filling wave).
  const unsigned grid = grid_size(row_tiles(walk, block) * kThreadsPerBlock);
  dispatch_dtype(y.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    bias_act_forward_kernel<T><<<grid, block, 0, stream>>>(
        walk, permuted<const T>(x, order), broadcast_bias<T>(b, dim, order),
        permuted<T>(y, order), params);
    FASTGEN_LAUNCH_CHECK();
  });
}

int64_t bias_act_db_splits(const TensorView4d& dx, int64_t dim) {
  require_valid_view(dx, "dx");
  check_dim(dim);
  return plan_backward(dx, dim, true).splits;
}

void bias_act_backward(const TensorView4d& dy, const TensorView4d* x, const TensorView4d* y,
                       const TensorView4d* b, const TensorView4d& dx, const TensorView4d* db,
                       const TensorView4d* partial, int64_t dim, const std::string& act,
                       float alpha, float gain, const float* clamp, cudaStream_t stream) {
  require_valid_view(dy, "dy");
  require_like(dx, "dx", dy, "dy");
  require_no_broadcast(dx, "dx");
  check_dim(dim);
  require(x == nullptr || y == nullptr,
          "x: pass x or y (whichever the activation's derivative reads), not both");
  if (x != nullptr) require_like(*x, "x", dy, "dy");
  if (y != nullptr) require_like(*y, "y", dy, "dy");
  if (b != nullptr) check_channel_vector(*b, "b", dy, dim);
  require((db != nullptr) == (b != nullptr), "db: must be given exactly when b is");
  const ActParams params = make_params(act, alpha, gain, clamp);
  const BackwardPlan plan = plan_backward(dx, dim, b != nullptr);
  const int64_t channels = dy.size[dim];
  require(channels < (int64_t(1) << 31),
          "dy: size along dim must be < 2^31 (one block index each), got " + str(channels));
  if (db != nullptr) {
    check_channel_vector(*db, "db", dy, dim);
    require_no_broadcast(*db, "db");
    require(partial != nullptr, "partial: required with db");
    require_valid_view(*partial, "partial");
    require(partial->dtype == DType::Float32, "partial: dtype must be float32, got " +
                                                  std::string(dtype_name(partial->dtype)));
    const int64_t expected[4] = {1, 1, plan.splits, channels};
    require_shape(*partial, "partial", expected, "(1, 1, bias_act_db_splits(dx, dim), C)");
    require(partial->stride[3] == 1 && partial->stride[2] == channels,
            "partial: must be contiguous");
  }

  ensure_device();
  const int64_t n = dx.numel();
  const Source source = x != nullptr ? Source::X : y != nullptr ? Source::Y : Source::None;
  dispatch_dtype(dx.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (n > 0) {
      // Without db any split count works; keep the device filled as the forward does.
      const int64_t splits = db != nullptr
                                 ? plan.splits
                                 : grid_size(row_tiles(plan.walk, plan.block) * kThreadsPerBlock);
      const dim3 grid(unsigned(plan.channel_blocks), unsigned(splits));
      const TensorView4d* ref = x != nullptr ? x : y;
      bias_act_backward_kernel<T><<<grid, plan.block, 0, stream>>>(
          plan.walk, permuted<const T>(dy, plan.order),
          ref != nullptr ? permuted<const T>(*ref, plan.order) : Strided4d<const T>{},
          broadcast_bias<T>(b, dim, plan.order), permuted<T>(dx, plan.order),
          db != nullptr ? static_cast<float*>(partial->data) : nullptr, channels,
          plan.bias_pos, source, params);
      FASTGEN_LAUNCH_CHECK();
    }
    if (db != nullptr && channels > 0) {
      // An empty dx has no partial sums: db is a sum over nothing, zero.
      bias_grad_kernel<T><<<grid_size(channels), kThreadsPerBlock, 0, stream>>>(
          static_cast<const float*>(partial->data), n > 0 ? plan.splits : 0, channels,
          static_cast<T*>(db->data), db->stride[dim]);
      FASTGEN_LAUNCH_CHECK();
    }
  });
}

}  // namespace fastgen
