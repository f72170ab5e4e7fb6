// Codebook nearest-neighbour search and the VQ-VAE bottleneck's per-row work (the ops' math,
// modes and guarantees are in fastgen/ops/vq.py).
//
// For rows z_n of z (N, D) and codes e_k of the codebook (K, D) the search minimizes the
// fast score
//     l2:      s(n, k) = ||e_k||^2 - 2 z_n . e_k          (||z_n||^2 is common to every k)
//     cosine:  s(n, k) = -(z_n . e_k) / max(||e_k||, eps)
// with ties to the lowest k, as torch.argmin. Scores are fp32 from SIMT FMAs on operands
// widened to fp32 (fp16/bf16 products are exact in fp32): the accuracy of input_precision
// "ieee" whatever the request.
//
// Kernels, in launch order:
//   code_norms_kernel  one warp per code: ||e_k||^2 (l2) or 1 / max(||e_k||, eps) (cosine),
//                      and for l2 max_k ||e_k||^2 (the exact mode's error bound) by an
//                      integer atomicMax on the float's bits (exact, order-free).
//   search_kernel      block (i, s) owns 64 rows of z and the s-th contiguous range of
//                      64-code tiles; per row the best (score, k) of the range is folded into
//                      a packed uint64 by atomicMin (see pack()): the min of the packed
//                      values is the min score with the lowest k, whatever the order.
//   finish_kernel      (fast mode) one warp per row: idx, and the distance from the best
//                      score and ||z_n||.
//   refine_kernel      (exact mode) one more pass over the codebook with the same tiles:
//                      every code whose fast score is within twice a rigorous error bound of
//                      the row's fast best is a candidate and is rescored in float64 in the
//                      direct form; the float64 scores decide (vq.py states the guarantee).
//   quantize_rows_kernel  (vq_quantize) one warp per row: z_q = e_idx (NaN where z is NaN
//                      or infinite, as the reference's z + (e - z) is), the row's
//                      squared error sum_d (z - e_idx)^2 in fp32, and +1 on the code's usage
//                      count (integer atomics: exact and order-free).
// Nothing N x K is ever stored: the extra memory is the K + 1 norms and one uint64 per row.
//
// Non-finite scores: torch.argmin / argmax take a NaN before any number, so fast_score() ranks
// a NaN as -inf, which the strict <, the lane tie rule and pack() then keep first. A fast score
// is -inf only where the reference's distance is NaN (kernels/vq.py says why), so a row whose
// best is -inf gets a NaN distance and, in exact mode, keeps that code without rescoring.
//
// Search decomposition, and why. A block computes a 64 x 64 tile of dot products as a small
// SIMT GEMM: z rows and codes are staged through shared memory as fp32 in 32-feature chunks,
// [feature][row] so that each of the 256 threads reads a float4 of 4 rows and a float4 of 4
// codes per feature and does 16 FMAs into a 4 x 4 register micro-tile. Each code tile is read
// from global memory once per row block (the codebook is the operand that streams; a row
// block's z is reread per tile from L1/L2 unless D <= 32, when it stays in shared memory for
// the whole pass). Scores never leave registers: each thread keeps a running (best, k) for
// its 4 rows over its 4 columns of every tile, and at the end the 16 threads sharing a row (a
// half-warp) combine theirs by shuffles with the same tie rule. Splitting the codebook over
// gridDim.y keeps the GPU busy when N is small (VAR's first scales have 1 to 100 tokens).
//
// All reductions run in a fixed order (or are exact integer atomics), so results are
// bitwise reproducible. Indices into z, the codebook and the outputs are int64.

#include "common.h"

namespace fastgen {
namespace kernels::vq {
namespace {

constexpr int kTileRows = 64;    // rows of z per search block
constexpr int kTileCodes = 64;   // codes per codebook tile
constexpr int kChunk = 32;       // features staged per step
constexpr int kMicro = 4;        // each thread: kMicro rows x kMicro codes
constexpr int kLanesPerRow = kTileCodes / kMicro;               // 16: half a warp
constexpr int kSearchThreads = (kTileRows / kMicro) * kLanesPerRow;  // 256
// Row stride of the staged chunks: keeps float4 alignment, and with the staging order below
// the 32 stores of a warp hit 32 distinct banks.
constexpr int kStagePitch = kTileRows + 4;
constexpr int kMaxDim = 512;
constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kCosineEps = 1e-12f;  // F.normalize's eps

static_assert(kTileRows == kTileCodes && kChunk == 32 && kTileRows == 64 &&
                  kSearchThreads == 256,
              "stage_chunk's element order is written for 64 x 32 chunks and 256 threads");
static_assert(kLanesPerRow * 2 == kWarp, "a row's lanes are one half-warp");

struct __align__(16) StagedChunks {
  float z[kChunk][kStagePitch];
  float codes[kChunk][kStagePitch];
};

// ---------------------------------------------------------------------------------------
// Small pieces

// Order-preserving map of (score, k) to uint64: the float's bits made monotone in the high
// half (negatives reversed, positives above them), k in the low half. +0.0 turns -0.0 into
// +0.0: the two compare equal as floats and must as integers too.
__device__ __forceinline__ unsigned long long pack(float score, int k) {
  const unsigned bits = __float_as_uint(score + 0.0f);
  const unsigned key = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<unsigned long long>(key) << 32) | static_cast<unsigned>(k);
}

__device__ __forceinline__ float unpack_score(unsigned long long packed) {
  const unsigned key = static_cast<unsigned>(packed >> 32);
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

__device__ __forceinline__ int unpack_index(unsigned long long packed) {
  return static_cast<int>(packed & 0xffffffffu);
}

// NaN ranked as -inf (see the top of the file).
template <bool kCosine>
__device__ __forceinline__ float fast_score(float dot, float code_norm) {
  const float score = kCosine ? -dot * code_norm : code_norm - 2.0f * dot;
  return isnan(score) ? -INFINITY : score;
}

// The distance a row reports from its best fast score and z's squared norm: NaN where the
// best is a NaN score (ranked -inf).
template <bool kCosine>
__device__ __forceinline__ float fast_distance(float best, float z_sq_norm) {
  if (best == -INFINITY) return NAN;
  return kCosine ? -best / fmaxf(sqrtf(z_sq_norm), kCosineEps) : z_sq_norm + best;
}

// Lexicographic min of (score, k) over the lanes that share a row, ties to the lowest k.
// The rule is symmetric, so every lane ends with the same pair; all 32 lanes take part.
template <typename S>
__device__ __forceinline__ void min_over_row_lanes(S& score, int& k) {
#pragma unroll
  for (int offset = kLanesPerRow / 2; offset > 0; offset /= 2) {
    const S other = __shfl_xor_sync(kFullMask, score, offset);
    const int other_k = __shfl_xor_sync(kFullMask, k, offset);
    if (other < score || (other == score && other_k < k)) {
      score = other;
      k = other_k;
    }
  }
}

// fp32 squared norm of row r of an (rows, D) matrix by one warp: lane-strided FMAs, then a
// shuffle tree. Every lane gets the sum.
template <typename T>
__device__ __forceinline__ float warp_squared_norm(Strided4d<const T> m, int64_t r, int D,
                                                   int lane) {
  float sq = 0.0f;
  for (int d = lane; d < D; d += kWarp) {
    const float v = to_float(m.at(r, d, 0, 0));
    sq = fmaf(v, v, sq);
  }
  return warp_sum(sq);
}

// The float64 direct-form score the exact mode decides by: sum_d (z_d - e_d)^2 (l2) or
// -(z . e) / max(||e||, eps) (cosine). One thread, features in order, explicit FMAs: every
// score of the pass is computed by this same sequence of operations, so duplicated codes
// score bit-identically and the lowest index wins their tie.
template <typename T, bool kCosine>
__device__ double exact_score(Strided4d<const T> z, int64_t row, Strided4d<const T> codes,
                              int64_t code, int D) {
  double a = 0.0, b = 0.0;
  for (int d = 0; d < D; ++d) {
    const double zd = to_float(z.at(row, d, 0, 0));
    const double ed = to_float(codes.at(code, d, 0, 0));
    if constexpr (kCosine) {
      a = fma(zd, ed, a);
      b = fma(ed, ed, b);
    } else {
      const double diff = zd - ed;
      a = fma(diff, diff, a);
    }
  }
  if constexpr (kCosine) return -a / fmax(sqrt(b), double(kCosineEps));
  return a;
}

// A bound on |fast score - float64 score| for every code of a row with fp32 squared norm
// z_sq_norm, with a factor 2 of safety. The dot products accumulate exact products in fp32,
// so they err by at most D u ||z|| ||e|| (Cauchy-Schwarz on sum |z_d e_d|); the fp32 norms by
// (D + 1) u relative; each final multiply or add by u; and each fp32 operation by at most
// fp32's smallest normal to underflow (gradual or flushed to zero), 2D of them in a squared
// norm or a dot, so an underflowing norm still bounds the true one. For l2 it adds the
// float64 direct form's rounding, (D + 2) 2^-53 relative to a distance <= (||z|| + max ||e||)^2:
// a code whose float64 score ties or beats the fast winner's is then always a candidate, even
// for codes far shorter than z (subnormal codes), whose fast scores differ where the float64
// ones tie. (Cosine's relative term is 2^29 times its float64 rounding already. The
// Triton kernels use the same bound with an extra operand error for tf32; there is none here.)
template <bool kCosine>
__device__ __forceinline__ float score_error_bound(float z_sq_norm, float max_sq_norm, int D) {
  const float u = 5.9604644775390625e-08f;  // 2^-24, float32's unit roundoff
  const float underflow = 2.0f * D * 1.1754943508222875e-38f;  // 2D operations, 2^-126 each
  const float dot_error = D * u;
  const float z_norm = sqrtf(z_sq_norm + underflow) * (1.0f + D * u);
  if constexpr (kCosine) {
    // |score error| <= |z.e| r (rel. error of r + u) + r |dot error|, ||e|| r <= 1, r <= 1/eps.
    return 2.0f * (z_norm * (dot_error + (0.5f * D + 3.0f) * u) + underflow / kCosineEps);
  }
  const float max_sq = max_sq_norm * (1.0f + (D + 1) * u) + underflow;
  const float max_norm = sqrtf(max_sq);
  const float float64_rounding =
      (D + 2) * 1.1102230246251565e-16f * (z_norm + max_norm) * (z_norm + max_norm);
  return 2.0f * ((D + 2) * u * max_sq + 2.0f * (dot_error + u) * z_norm * max_norm +
                 3.0f * underflow + float64_rounding);
}

// ---------------------------------------------------------------------------------------
// The tile GEMM shared by the search and the exact pass

// Stages features [d0, d0 + kChunk) of rows [first, first + 64) of an (rows, D) matrix into
// tile[feature][row] as fp32, zero past the matrix. A warp takes 8 features x 4 rows: 32-byte
// row segments in global memory, and 32 distinct banks for the stores (pitch 68).
template <typename T>
__device__ __forceinline__ void stage_chunk(float (*tile)[kStagePitch], Strided4d<const T> m,
                                            int64_t rows, int64_t first, int d0, int D) {
#pragma unroll
  for (int j = 0; j < kChunk * kTileRows / kSearchThreads; ++j) {
    const int e = threadIdx.x + j * kSearchThreads;
    const int d = ((e >> 5) & 3) * 8 + (e & 7);
    const int r = (e >> 7) * 4 + ((e >> 3) & 3);
    const int64_t row = first + r;
    tile[d][r] = (row < rows && d0 + d < D) ? to_float(m.at(row, d0 + d, 0, 0)) : 0.0f;
  }
}

__device__ __forceinline__ bool z_fits_one_chunk(int D) { return D <= kChunk; }

// score[i][j] = the fast score of row row0 + 4 ty + i against code k0 + 4 tx + j, from the
// fp32 dot product with features in order; +inf for codes at or past k_end. Every thread of
// the block must call it (it synchronizes). When z_fits_one_chunk(D), the caller has staged
// z's chunk once before its first call; the leading barrier orders that too.
template <typename T, bool kCosine>
__device__ __forceinline__ void tile_scores(StagedChunks& smem, Strided4d<const T> z, int64_t N,
                                            Strided4d<const T> codes, int64_t K, int64_t row0,
                                            int64_t k0, int64_t k_end, int D,
                                            const float* code_norms,
                                            float (&score)[kMicro][kMicro]) {
  const int ty = threadIdx.x / kLanesPerRow, tx = threadIdx.x % kLanesPerRow;
#pragma unroll
  for (int i = 0; i < kMicro; ++i)
#pragma unroll
    for (int j = 0; j < kMicro; ++j) score[i][j] = 0.0f;
  for (int d0 = 0; d0 < D; d0 += kChunk) {
    __syncthreads();  // every thread is done reading the previous chunk
    if (!z_fits_one_chunk(D)) stage_chunk(smem.z, z, N, row0, d0, D);
    stage_chunk(smem.codes, codes, K, k0, d0, D);
    __syncthreads();
    const int len = min(kChunk, D - d0);
#pragma unroll 4
    for (int d = 0; d < len; ++d) {
      const float4 a4 = *reinterpret_cast<const float4*>(&smem.z[d][ty * kMicro]);
      const float4 b4 = *reinterpret_cast<const float4*>(&smem.codes[d][tx * kMicro]);
      const float a[kMicro] = {a4.x, a4.y, a4.z, a4.w};
      const float b[kMicro] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
      for (int i = 0; i < kMicro; ++i)
#pragma unroll
        for (int j = 0; j < kMicro; ++j) score[i][j] = fmaf(a[i], b[j], score[i][j]);
    }
  }
#pragma unroll
  for (int j = 0; j < kMicro; ++j) {
    const int64_t k = k0 + tx * kMicro + j;
    const float norm = k < k_end ? code_norms[k] : 0.0f;
#pragma unroll
    for (int i = 0; i < kMicro; ++i)
      score[i][j] = k < k_end ? fast_score<kCosine>(score[i][j], norm) : INFINITY;
  }
}

// ---------------------------------------------------------------------------------------
// Kernels

template <typename T, bool kCosine>
__global__ void __launch_bounds__(kThreadsPerBlock)
    code_norms_kernel(Strided4d<const T> codes, int64_t K, int D, float* code_norms) {
  const int lane = threadIdx.x % kWarp;
  const int64_t first_warp = grid_thread_index() / kWarp;
  const int64_t warps = grid_thread_count() / kWarp;
  // Squared norms are >= 0 (or NaN, whose bits exceed +inf's and which then propagates as
  // torch's max does): as int32 they order like the floats.
  int max_bits = 0;
  for (int64_t k = first_warp; k < K; k += warps) {
    const float sq = warp_squared_norm(codes, k, D, lane);
    if (lane == 0) code_norms[k] = kCosine ? 1.0f / fmaxf(sqrtf(sq), kCosineEps) : sq;
    max_bits = max(max_bits, __float_as_int(sq));
  }
  if (!kCosine && lane == 0) atomicMax(reinterpret_cast<int*>(code_norms + K), max_bits);
}

template <typename T, bool kCosine>
__global__ void __launch_bounds__(kSearchThreads)
    search_kernel(Strided4d<const T> z, int64_t N, Strided4d<const T> codes, int64_t K, int D,
                  const float* code_norms, int64_t tiles_per_split, unsigned long long* packed) {
  __shared__ StagedChunks smem;
  const int ty = threadIdx.x / kLanesPerRow, tx = threadIdx.x % kLanesPerRow;
  const int64_t row0 = int64_t(blockIdx.x) * kTileRows;
  const int64_t k_begin = int64_t(blockIdx.y) * tiles_per_split * kTileCodes;
  const int64_t k_end = min(K, k_begin + tiles_per_split * kTileCodes);
  if (z_fits_one_chunk(D)) stage_chunk(smem.z, z, N, row0, 0, D);

  float best[kMicro];
  int best_k[kMicro];
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    best[i] = INFINITY;
    best_k[i] = 0;
  }
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kTileCodes) {
    float score[kMicro][kMicro];
    tile_scores<T, kCosine>(smem, z, N, codes, K, row0, k0, k_end, D, code_norms, score);
    // Columns in increasing k and a strict < (+inf past k_end never wins): the lowest k of a
    // tie stays.
#pragma unroll
    for (int j = 0; j < kMicro; ++j)
#pragma unroll
      for (int i = 0; i < kMicro; ++i)
        if (score[i][j] < best[i]) {
          best[i] = score[i][j];
          best_k[i] = static_cast<int>(k0 + tx * kMicro + j);
        }
  }
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    min_over_row_lanes(best[i], best_k[i]);
    const int64_t row = row0 + ty * kMicro + i;
    if (tx == 0 && row < N) atomicMin(packed + row, pack(best[i], best_k[i]));
  }
}

template <typename T, bool kCosine>
__global__ void __launch_bounds__(kThreadsPerBlock)
    finish_kernel(Strided4d<const T> z, int64_t N, int D, const unsigned long long* packed,
                  Strided4d<int64_t> idx, Strided4d<float> distance) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = grid_thread_count() / kWarp;
  for (int64_t row = grid_thread_index() / kWarp; row < N; row += warps) {
    const unsigned long long best = packed[row];
    // distance is null when quantizing: uniform over the warp, like the loop condition.
    const bool want_distance = distance.data != nullptr;
    const float sq = want_distance ? warp_squared_norm(z, row, D, lane) : 0.0f;
    if (lane == 0) {
      idx.at(row, 0, 0, 0) = unpack_index(best);
      if (want_distance) distance.at(row, 0, 0, 0) = fast_distance<kCosine>(unpack_score(best), sq);
    }
  }
}

template <typename T, bool kCosine>
__global__ void __launch_bounds__(kSearchThreads)
    refine_kernel(Strided4d<const T> z, int64_t N, Strided4d<const T> codes, int64_t K, int D,
                  const float* code_norms, const unsigned long long* packed,
                  Strided4d<int64_t> idx, Strided4d<float> distance) {
  __shared__ StagedChunks smem;
  __shared__ float threshold_s[kTileRows];
  __shared__ int fast_k_s[kTileRows];
  __shared__ bool decided_by_nan_s[kTileRows];
  __shared__ double fast_exact_s[kTileRows];
  __shared__ double z_norm64_s[kTileRows];
  const int ty = threadIdx.x / kLanesPerRow, tx = threadIdx.x % kLanesPerRow;
  const int64_t row0 = int64_t(blockIdx.x) * kTileRows;

  // Per row, one thread: the fast winner, the candidate threshold, the winner's exact score,
  // and whether a NaN score (ranked -inf) decided the row as in torch.argmin.
  if (threadIdx.x < kTileRows) {
    const int64_t row = row0 + threadIdx.x;
    float threshold = 0.0f;
    int fast_k = 0;
    bool decided_by_nan = false;
    double fast_exact = INFINITY, z_sq64 = 0.0;
    if (row < N) {
      const unsigned long long best = packed[row];
      fast_k = unpack_index(best);
      decided_by_nan = unpack_score(best) == -INFINITY;
      float z_sq = 0.0f;
      for (int d = 0; d < D; ++d) {
        const float v = to_float(z.at(row, d, 0, 0));
        z_sq = fmaf(v, v, z_sq);
        z_sq64 = fma(double(v), double(v), z_sq64);
      }
      threshold = unpack_score(best) +
                  2.0f * score_error_bound<kCosine>(z_sq, code_norms[K], D);
      fast_exact = exact_score<T, kCosine>(z, row, codes, fast_k, D);
    }
    threshold_s[threadIdx.x] = threshold;
    fast_k_s[threadIdx.x] = fast_k;
    decided_by_nan_s[threadIdx.x] = decided_by_nan;
    fast_exact_s[threadIdx.x] = fast_exact;
    z_norm64_s[threadIdx.x] = sqrt(z_sq64);
  }
  if (z_fits_one_chunk(D)) stage_chunk(smem.z, z, N, row0, 0, D);
  __syncthreads();

  float threshold[kMicro];
  int fast_k[kMicro];
  bool refined[kMicro];
  double other_best[kMicro];
  int other_k[kMicro];
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    refined[i] = row0 + ty * kMicro + i < N && !decided_by_nan_s[ty * kMicro + i];
    threshold[i] = threshold_s[ty * kMicro + i];
    fast_k[i] = fast_k_s[ty * kMicro + i];
    other_best[i] = INFINITY;
    other_k[i] = fast_k[i];
  }
  for (int64_t k0 = 0; k0 < K; k0 += kTileCodes) {
    float score[kMicro][kMicro];
    tile_scores<T, kCosine>(smem, z, N, codes, K, row0, k0, K, D, code_norms, score);
    // Bit i * kMicro + j: code k0 + 4 tx + j is a candidate for row i. (An infinite threshold
    // would take the +inf past K: hence the explicit bound.)
    unsigned candidates = 0;
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int64_t k = k0 + tx * kMicro + j;
#pragma unroll
      for (int i = 0; i < kMicro; ++i)
        if (refined[i] && k < K && score[i][j] <= threshold[i] && k != fast_k[i])
          candidates |= 1u << (i * kMicro + j);
    }
    // Near-ties are rare, so this divergent loop is too; one rescoring call site per row
    // keeps the kernel small.
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
      for (unsigned columns = (candidates >> (i * kMicro)) & ((1u << kMicro) - 1); columns != 0;
           columns &= columns - 1) {
        const int64_t k = k0 + tx * kMicro + (__ffs(columns) - 1);
        const double exact = exact_score<T, kCosine>(z, row0 + ty * kMicro + i, codes, k, D);
        if (exact < other_best[i]) {  // increasing k: the lowest index of a tie stays
          other_best[i] = exact;
          other_k[i] = static_cast<int>(k);
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    min_over_row_lanes(other_best[i], other_k[i]);
    const int r = ty * kMicro + i;
    const int64_t row = row0 + r;
    if (tx == 0 && row < N) {
      const double fast_exact = fast_exact_s[r];
      const bool take_other =
          other_best[i] < fast_exact || (other_best[i] == fast_exact && other_k[i] < fast_k[i]);
      const double best = take_other ? other_best[i] : fast_exact;
      idx.at(row, 0, 0, 0) = take_other ? other_k[i] : fast_k[i];
      if (distance.data != nullptr) {
        const double value = kCosine ? -best / fmax(z_norm64_s[r], double(kCosineEps)) : best;
        distance.at(row, 0, 0, 0) = decided_by_nan_s[r] ? NAN : static_cast<float>(value);
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreadsPerBlock)
    quantize_rows_kernel(Strided4d<const T> z, int64_t N, Strided4d<const T> codes, int D,
                         Strided4d<const int64_t> idx, Strided4d<T> z_q,
                         Strided4d<float> row_errors, Strided4d<unsigned long long> counts) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = grid_thread_count() / kWarp;
  for (int64_t row = grid_thread_index() / kWarp; row < N; row += warps) {
    const int64_t k = idx.at(row, 0, 0, 0);
    float error = 0.0f;
    for (int d = lane; d < D; d += kWarp) {
      const T e = codes.at(k, d, 0, 0);
      const float zd = to_float(z.at(row, d, 0, 0));
      // zd - zd is 0, or NaN for a NaN or infinite z, where the reference's z + (e - z) is NaN.
      const float z_minus_z = zd - zd;
      z_q.at(row, d, 0, 0) = z_minus_z == 0.0f ? e : from_float<T>(z_minus_z);
      const float diff = zd - to_float(e);
      error = fmaf(diff, diff, error);
    }
    error = warp_sum(error);
    if (lane == 0) {
      row_errors.at(row, 0, 0, 0) = error;
      atomicAdd(&counts.at(k, 0, 0, 0), 1ull);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Host side

template <typename U>
Strided4d<U> vector_view(const Int64Vector& v) {
  return {reinterpret_cast<U*>(v.data), v.stride, 0, 0, 0};
}

Strided4d<float> float_vector_view(const TensorView4d* t) {
  return t != nullptr ? strided<float>(*t) : Strided4d<float>{nullptr, 0, 0, 0, 0};
}

void check_int64_vector(const Int64Vector& v, const char* name, int64_t size,
                        const std::string& why) {
  require(v.size == size, std::string(name) + ": expected " + str(size) + " elements = " + why +
                              ", got " + str(v.size));
  require(v.data != nullptr || size == 0, std::string(name) + ": null data pointer");
  require(v.stride != 0 || size <= 1,
          std::string(name) + ": stride 0 (an expanded view); an output must not overlap itself");
}

void check_matrix(const TensorView4d& t, const char* name, const char* layout) {
  require_valid_view(t, name);
  require(t.size[2] == 1 && t.size[3] == 1, std::string(name) + ": expected a " + layout +
                                                " matrix as a (rows, D, 1, 1) view, got " +
                                                shape_str(t.size));
}

// A float32 output or workspace of `size` elements as a (size, 1, 1, 1) view.
void check_float32_vector(const TensorView4d& t, const char* name, int64_t size,
                          const std::string& why) {
  require(t.dtype == DType::Float32, std::string(name) + ": dtype must be float32, got " +
                                         dtype_name(t.dtype));
  const int64_t expected[4] = {size, 1, 1, 1};
  require_shape(t, name, expected, why);
  require(t.data != nullptr || size == 0, std::string(name) + ": null data pointer");
  require_no_broadcast(t, name);
}

// The checks vq_nearest and vq_quantize share.
void check_search(const TensorView4d& z, const TensorView4d& codebook,
                  const TensorView4d& code_norms, const Int64Vector& packed,
                  const Int64Vector& idx) {
  check_matrix(z, "z", "(N, D)");
  require_float_dtype(z, "z");
  check_matrix(codebook, "codebook", "(K, D)");
  const int64_t N = z.size[0], D = z.size[1], K = codebook.size[0];
  require(D >= 1 && D <= kMaxDim,
          "z: D must be in [1, " + str(kMaxDim) + "], got " + str(D));
  // Row blocks are gridDim.x (< 2^31).
  require(N / kTileRows < (int64_t(1) << 31) - 1, "z: too many rows (" + str(N) + ")");
  require_same_dtype(codebook, "codebook", z, "z");
  require(codebook.size[1] == D, "codebook: D=" + str(codebook.size[1]) + " must match z's D=" +
                                     str(D));
  // Code indices travel as int32 in the packed bests.
  require(K >= 1 && K <= INT32_MAX, "codebook: K must be in [1, 2^31 - 1], got " + str(K));
  require(code_norms.dtype == DType::Float32,
          std::string("code_norms: dtype must be float32, got ") + dtype_name(code_norms.dtype));
  const int64_t norms_shape[4] = {K + 1, 1, 1, 1};
  require_shape(code_norms, "code_norms", norms_shape, "(K + 1, 1, 1, 1) workspace");
  require(code_norms.stride[0] == 1, "code_norms: must be contiguous (stride 1), got stride " +
                                         str(code_norms.stride[0]));
  require(code_norms.data != nullptr, "code_norms: null data pointer");
  check_int64_vector(packed, "packed", N, "z's N (a workspace)");
  require(packed.stride == 1, "packed: must be contiguous (stride 1), got stride " +
                                  str(packed.stride));
  check_int64_vector(idx, "idx", N, "z's N");
}

// Codebook splits: enough blocks to fill the device once when there are few row blocks.
template <typename Kernel>
int64_t codebook_splits(Kernel kernel, int64_t row_blocks, int64_t tiles) {
  int blocks_per_sm = 0;
  FASTGEN_CUDA_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, kSearchThreads, 0));
  const int64_t target = device_sms() * std::max(1, blocks_per_sm);
  return std::max<int64_t>(1, std::min(tiles, target / row_blocks));
}

// Norms, search, then idx (and distance, when given) from the fast bests or, with exact,
// from the float64 recheck.
template <typename T, bool kCosine>
void launch_search(const TensorView4d& z_view, const TensorView4d& codebook_view,
                   const TensorView4d& code_norms_view, const Int64Vector& packed_view,
                   const Int64Vector& idx_view, const TensorView4d* distance_view, bool exact,
                   cudaStream_t stream) {
  const int64_t N = z_view.size[0], K = codebook_view.size[0];
  const int D = static_cast<int>(z_view.size[1]);
  const auto z = strided<const T>(z_view);
  const auto codes = strided<const T>(codebook_view);
  float* code_norms = static_cast<float*>(code_norms_view.data);
  auto* packed = reinterpret_cast<unsigned long long*>(packed_view.data);
  const auto idx = vector_view<int64_t>(idx_view);
  const auto distance = float_vector_view(distance_view);

  // The identities of the atomics: 0 for the max squared norm, all ones for the packed min.
  FASTGEN_CUDA_CHECK(cudaMemsetAsync(code_norms + K, 0, sizeof(float), stream));
  FASTGEN_CUDA_CHECK(cudaMemsetAsync(packed, 0xff, N * sizeof(unsigned long long), stream));
  code_norms_kernel<T, kCosine>
      <<<grid_size(K * kWarp), kThreadsPerBlock, 0, stream>>>(codes, K, D, code_norms);
  FASTGEN_LAUNCH_CHECK();

  const int64_t row_blocks = (N + kTileRows - 1) / kTileRows;
  const int64_t tiles = (K + kTileCodes - 1) / kTileCodes;
  int64_t splits = codebook_splits(search_kernel<T, kCosine>, row_blocks, tiles);
  const int64_t tiles_per_split = (tiles + splits - 1) / splits;
  splits = (tiles + tiles_per_split - 1) / tiles_per_split;  // no empty split
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(splits));
  search_kernel<T, kCosine><<<grid, kSearchThreads, 0, stream>>>(z, N, codes, K, D, code_norms,
                                                                 tiles_per_split, packed);
  FASTGEN_LAUNCH_CHECK();

  if (exact) {
    refine_kernel<T, kCosine><<<static_cast<unsigned>(row_blocks), kSearchThreads, 0, stream>>>(
        z, N, codes, K, D, code_norms, packed, idx, distance);
  } else {
    finish_kernel<T, kCosine><<<grid_size(N * kWarp), kThreadsPerBlock, 0, stream>>>(
        z, N, D, packed, idx, distance);
  }
  FASTGEN_LAUNCH_CHECK();
}

}  // namespace
}  // namespace kernels::vq

using namespace kernels::vq;

void vq_nearest(const TensorView4d& z, const TensorView4d& codebook,
                const TensorView4d& code_norms, const Int64Vector& packed,
                const Int64Vector& idx, const TensorView4d& distance, bool cosine, bool exact,
                cudaStream_t stream) {
  check_search(z, codebook, code_norms, packed, idx);
  check_float32_vector(distance, "distance", z.size[0], "(N, 1, 1, 1) from z");

  ensure_device();
  if (z.size[0] == 0) return;
  dispatch_dtype(z.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (cosine)
      launch_search<T, true>(z, codebook, code_norms, packed, idx, &distance, exact, stream);
    else
      launch_search<T, false>(z, codebook, code_norms, packed, idx, &distance, exact, stream);
  });
}

void vq_quantize(const TensorView4d& z, const TensorView4d& codebook,
                 const TensorView4d& code_norms, const Int64Vector& packed,
                 const TensorView4d& z_q, const Int64Vector& idx,
                 const TensorView4d& row_errors, const Int64Vector& counts, bool exact,
                 cudaStream_t stream) {
  check_search(z, codebook, code_norms, packed, idx);
  const int64_t N = z.size[0], K = codebook.size[0];
  require_same_dtype(z_q, "z_q", z, "z");
  require_shape(z_q, "z_q", z.size, "z's shape");
  require(z_q.data != nullptr || z_q.numel() == 0, "z_q: null data pointer");
  require_no_broadcast(z_q, "z_q");
  check_float32_vector(row_errors, "row_errors", N, "(N, 1, 1, 1) from z");
  check_int64_vector(counts, "counts", K, "codebook's K");

  ensure_device();
  if (N == 0) return;
  dispatch_dtype(z.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_search<T, false>(z, codebook, code_norms, packed, idx, nullptr, exact, stream);
    quantize_rows_kernel<T><<<grid_size(N * kWarp), kThreadsPerBlock, 0, stream>>>(
        strided<const T>(z), N, strided<const T>(codebook), static_cast<int>(z.size[1]),
        vector_view<const int64_t>(idx), strided<T>(z_q), strided<float>(row_errors),
        vector_view<unsigned long long>(counts));
    FASTGEN_LAUNCH_CHECK();
  });
}

}  // namespace fastgen
