// ReLU linear attention forward (math in fastgen/ops/linear_attention.py):
//
//   per (batch b, head h):  S = sum_n phi(k_n)^T v_n  (D x D),  z = sum_n phi(k_n)  (D)
//                           out_n = phi(q_n) S / (phi(q_n) . z + eps),  phi = ReLU
//
// Two launches, every tensor read once and addressed through its strides (q, k, v are
// usually views of one fused qkv projection; nothing is copied):
//  1. state partials, one block per (head, chunk of key rows): 32-row tiles of phi(k) and v
//     staged in shared memory, each thread owning fixed entries of S in registers (and the
//     first D threads z), so a tile costs D*D*32 FMAs spread evenly over the block; the
//     block writes its (S, z) to its own workspace slot.
//  2. output, one block per (head, chunk of query rows): the head's partials summed in chunk
//     order into shared memory (each entry by one thread, in a fixed order: bitwise
//     reproducible), then each warp streams query rows: phi(q_n) into a per-warp buffer, the
//     denominator by a warp shuffle reduction, numerator columns lane, lane+32, ..., the
//     division fused, out written once.
// The launcher picks the chunk counts (rows_per_chunk) and linear_attention_partials tells the
// caller the workspace they need: enough chunks that the B*H*chunks blocks fill the GPU (two
// per SM) when B*H alone does not. Arithmetic is fp32.

#include "common.h"

namespace fastgen {
namespace kernels::linear_attention {
namespace {

constexpr int kLaThreads = 256;
constexpr int kLaWarps = kLaThreads / 32;
constexpr int kTileRows = 32;
constexpr int kMaxHeadDim = 128;

// ReLU that keeps a NaN, as F.relu does (fmaxf would return 0 for it).
__device__ __forceinline__ float phi(float x) { return x < 0.0f ? 0.0f : x; }

struct HeadGeometry {
  int64_t heads;
  int head_dim;
  int64_t rows;            // tokens of the tensor this launch walks
  int64_t rows_per_chunk;  // a multiple of kTileRows
  int64_t chunks;          // per head
  int64_t state_chunks;    // per head, for the output kernel
};

// kEntries: state entries per thread, ceil(D*D / kLaThreads) for the largest D it serves.
template <typename T, int kEntries>
__global__ void __launch_bounds__(kLaThreads)
    linear_attention_state_kernel(HeadGeometry g, Strided4d<const T> k, Strided4d<const T> v,
                                  float* partials) {
  extern __shared__ float tiles[];
  const int D = g.head_dim;
  float* k_tile = tiles;                      // kTileRows x D, phi applied
  float* v_tile = tiles + kTileRows * D;      // kTileRows x D
  const int64_t chunk = blockIdx.x % g.chunks, head = blockIdx.x / g.chunks;
  const int64_t b = head / g.heads, h = head % g.heads;
  const int64_t first = chunk * g.rows_per_chunk;
  const int64_t last = first + g.rows_per_chunk < g.rows ? first + g.rows_per_chunk : g.rows;

  float state[kEntries];
#pragma unroll
  for (int m = 0; m < kEntries; ++m) state[m] = 0.0f;
  float normalizer = 0.0f;

  for (int64_t row0 = first; row0 < last; row0 += kTileRows) {
    const int count = kTileRows * D;
    for (int e = threadIdx.x; e < count; e += kLaThreads) {
      const int r = e / D, d = e % D;
      const int64_t n = row0 + r;
      float kv = 0.0f, vv = 0.0f;
      if (n < last) {
        kv = phi(to_float(k.at(b, n, h, d)));
        vv = to_float(v.at(b, n, h, d));
      }
      k_tile[e] = kv;
      v_tile[e] = vv;
    }
    __syncthreads();
#pragma unroll
    for (int m = 0; m < kEntries; ++m) {
      const int e = threadIdx.x + m * kLaThreads;
      if (e < D * D) {
        const int i = e / D, j = e % D;
        float acc = state[m];
        for (int r = 0; r < kTileRows; ++r) acc = fmaf(k_tile[r * D + i], v_tile[r * D + j], acc);
        state[m] = acc;
      }
    }
    if (threadIdx.x < D)
      for (int r = 0; r < kTileRows; ++r) normalizer += k_tile[r * D + threadIdx.x];
    __syncthreads();
  }

  float* slot = partials + blockIdx.x * int64_t(D * D + D);
#pragma unroll
  for (int m = 0; m < kEntries; ++m) {
    const int e = threadIdx.x + m * kLaThreads;
    if (e < D * D) slot[e] = state[m];
  }
  if (threadIdx.x < D) slot[D * D + threadIdx.x] = normalizer;
}

template <typename T>
__global__ void __launch_bounds__(kLaThreads)
    linear_attention_output_kernel(HeadGeometry g, float eps, Strided4d<const T> q,
                                   Strided4d<T> out, const float* partials) {
  extern __shared__ float shared[];
  const int D = g.head_dim;
  float* state = shared;                 // D x D
  float* normalizer = state + D * D;     // D
  float* query_rows = normalizer + D;    // kLaWarps x D
  const int64_t chunk = blockIdx.x % g.chunks, head = blockIdx.x / g.chunks;
  const int64_t b = head / g.heads, h = head % g.heads;

  const float* head_partials = partials + head * g.state_chunks * int64_t(D * D + D);
  for (int e = threadIdx.x; e < D * D + D; e += kLaThreads) {
    float total = 0.0f;
    for (int64_t c = 0; c < g.state_chunks; ++c) total += head_partials[c * (D * D + D) + e];
    state[e] = total;  // normalizer follows state contiguously
  }
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float* phi_q = query_rows + warp * D;
  const int64_t first = chunk * g.rows_per_chunk;
  const int64_t last = first + g.rows_per_chunk < g.rows ? first + g.rows_per_chunk : g.rows;
  // Rows go to warps round robin; each warp's loop is uniform across its lanes.
  for (int64_t n = first + warp; n < last; n += kLaWarps) {
    float den = 0.0f;
    for (int d = lane; d < D; d += 32) {
      const float p = phi(to_float(q.at(b, n, h, d)));
      phi_q[d] = p;
      den = fmaf(p, normalizer[d], den);
    }
    den = warp_sum(den) + eps;
    __syncwarp();
    for (int j = lane; j < D; j += 32) {
      float num = 0.0f;
      for (int i = 0; i < D; ++i) num = fmaf(phi_q[i], state[i * D + j], num);
      out.at(b, n, h, j) = from_float<T>(num / den);
    }
    // The next row overwrites phi_q only after every lane has read this one.
    __syncwarp();
  }
}

void check_attention_tensor(const TensorView4d& t, const char* name, const TensorView4d& q) {
  require_valid_view(t, name);
  require_same_dtype(t, name, q, "q");
}

template <int kEntries, typename T>
void launch_state(const HeadGeometry& g, const TensorView4d& k, const TensorView4d& v,
                  float* partials, int64_t blocks, cudaStream_t stream) {
  const int shared_bytes = 2 * kTileRows * g.head_dim * sizeof(float);
  linear_attention_state_kernel<T, kEntries>
      <<<static_cast<unsigned int>(blocks), kLaThreads, shared_bytes, stream>>>(
          g, strided<const T>(k), strided<const T>(v), partials);
  FASTGEN_LAUNCH_CHECK();
}

// Rows per chunk of a head's `rows` (a multiple of kTileRows): enough chunks that
// heads * chunks reaches two blocks per SM.
int64_t rows_per_chunk(int64_t rows, int64_t heads) {
  const int64_t tiles = ceil_div(std::max<int64_t>(rows, 1), kTileRows);
  const int64_t wanted = ceil_div(2 * device_sms(), std::max<int64_t>(heads, 1));
  return kTileRows * ceil_div(tiles, std::min(tiles, std::max<int64_t>(1, wanted)));
}

// Partial-state slots of the first kernel: one per (head, chunk of key rows).
int64_t state_slots(const TensorView4d& k) {
  const int64_t heads = k.size[0] * k.size[2];
  return heads * ceil_div(k.size[1], rows_per_chunk(k.size[1], heads));
}

}  // namespace
}  // namespace kernels::linear_attention

using namespace kernels::linear_attention;

void linear_attention_forward(const TensorView4d& q, const TensorView4d& k, const TensorView4d& v,
                              const TensorView4d& out, const TensorView4d& partials, float eps,
                              cudaStream_t stream) {
  require_float_dtype(q, "q");
  check_attention_tensor(q, "q", q);
  check_attention_tensor(k, "k", q);
  check_attention_tensor(v, "v", q);
  check_attention_tensor(out, "out", q);
  const int64_t B = q.size[0], H = q.size[2], D = q.size[3];
  require(D >= 1 && D <= kMaxHeadDim,
          "q: head dim D must be in [1, " + str(kMaxHeadDim) + "], got " + str(D));
  require(k.size[0] == B && k.size[2] == H && k.size[3] == D,
          "k: must have q's batch, heads and head dim, got " + shape_str(k.size) + " for q " +
              shape_str(q.size));
  require_shape(v, "v", k.size, "k's shape");
  require_shape(out, "out", q.size, "q's shape");
  require_no_broadcast(out, "out");
  require(eps > 0.0f && std::isfinite(eps), "eps: must be a finite number > 0");
  require(partials.dtype == DType::Float32,
          std::string("partials: dtype must be float32, got ") + dtype_name(partials.dtype));
  require(B * H < (int64_t(1) << 31), "q: B*H must stay below 2^31 (a block per head)");

  ensure_device();
  const int64_t kv_rows_per_chunk = rows_per_chunk(k.size[1], B * H);
  const int64_t q_rows_per_chunk = rows_per_chunk(q.size[1], B * H);
  const int64_t kv_chunks = ceil_div(k.size[1], kv_rows_per_chunk);
  const int64_t q_chunks = ceil_div(q.size[1], q_rows_per_chunk);
  const int64_t slot = D * D + D;
  const int64_t expected[4] = {1, 1, B * H * kv_chunks, slot};
  require_shape(partials, "partials", expected, "(1, 1, linear_attention_partials(q, k), D*D + D)");
  require(partials.stride[3] == 1 && partials.stride[2] == slot, "partials: must be contiguous");
  require(partials.data != nullptr || B * H * kv_chunks == 0, "partials: null data pointer");

  if (out.numel() == 0) return;
  HeadGeometry g{H, static_cast<int>(D), k.size[1], kv_rows_per_chunk, kv_chunks, kv_chunks};
  float* partial_data = static_cast<float*>(partials.data);
  dispatch_dtype(q.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (kv_chunks > 0) {
      const int64_t blocks = B * H * kv_chunks;
      if (D <= 16) launch_state<1, T>(g, k, v, partial_data, blocks, stream);
      else if (D <= 32) launch_state<4, T>(g, k, v, partial_data, blocks, stream);
      else if (D <= 64) launch_state<16, T>(g, k, v, partial_data, blocks, stream);
      else launch_state<64, T>(g, k, v, partial_data, blocks, stream);
    }
    HeadGeometry out_g = g;
    out_g.rows = q.size[1];
    out_g.rows_per_chunk = q_rows_per_chunk;
    out_g.chunks = q_chunks;
    const int shared_bytes = static_cast<int>((D * D + D + kLaWarps * D) * sizeof(float));
    auto kernel = linear_attention_output_kernel<T>;
    if (shared_bytes > 48 * 1024)
      FASTGEN_CUDA_CHECK(cudaFuncSetAttribute(
          kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared_bytes));
    kernel<<<static_cast<unsigned int>(B * H * out_g.chunks), kLaThreads, shared_bytes,
             stream>>>(out_g, eps, strided<const T>(q), strided<T>(out), partial_data);
    FASTGEN_LAUNCH_CHECK();
  });
}

int64_t linear_attention_partials(const TensorView4d& k) {
  require_valid_view(k, "k");
  ensure_device();
  return state_slots(k);
}

}  // namespace fastgen
