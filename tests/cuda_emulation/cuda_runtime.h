// A CPU emulation of the part of the CUDA programming model that csrc/ uses, so the tests can
// execute the CUDA kernels on a machine without a GPU (tests/cuda_emulation/build.py compiles
// csrc/ as host C++ against this header instead of the CUDA runtime's).
//
// Execution model: a launch runs its blocks one after another; the threads of a block are
// real OS threads (from a pool kept for the process) running concurrently, so __syncthreads, warp shuffles and shared memory
// behave as on a GPU for a correct kernel, and a missing barrier shows up as a race (results
// that vary, or differ from the reference) instead of being hidden by lockstep execution.
// __shared__ variables are function-local statics (one block at a time uses them); dynamic
// shared memory is a per-launch buffer. A barrier that not every thread reaches (a divergent
// __syncthreads or shuffle) aborts with a message after a timeout instead of hanging.
// "Device" pointers are host pointers: the tests pass CPU tensors.
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <vector_types.h>

#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#define FASTGEN_CUDA_EMULATION 1
#define CUDART_VERSION 13000

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

// ---------------------------------------------------------------------------------------
// Runtime API

// The types (cudaError_t, cudaStream_t, cudaDeviceAttr, dim3...) are the CUDA headers' own,
// which cuda_fp16.h brings in; only the functions are emulated.

inline const char* cudaGetErrorName(cudaError_t e) { return e == cudaSuccess ? "cudaSuccess" : "cudaError"; }
inline const char* cudaGetErrorString(cudaError_t e) { return cudaGetErrorName(e); }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

// A small device: two SMs make grid-stride loops and split reductions take several turns.
// FASTGEN_EMULATED_SMS sets another count, for tests of the launch plans at a GPU's size.
inline int emulated_sms() {
  const char* sms = std::getenv("FASTGEN_EMULATED_SMS");
  return sms != nullptr && std::atoi(sms) > 0 ? std::atoi(sms) : 2;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 * 1024; break;
    case cudaDevAttrMultiProcessorCount: *value = emulated_sms(); break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = 2048; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = 228 * 1024; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = 227 * 1024; break;
    default: *value = 0; break;
  }
  return cudaSuccess;
}

template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel, cudaFuncAttribute, int) {
  return cudaSuccess;
}

template <typename Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int, size_t) {
  *blocks = 1;
  return cudaSuccess;
}

inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------------
// Thread hierarchy

namespace emulation {

// A reusable barrier for `count` threads that reports, instead of hanging, when some thread
// never arrives.
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void arrive_and_wait(const char* what) {
    std::unique_lock<std::mutex> lock(mutex_);
    const long generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    if (!cv_.wait_for(lock, std::chrono::seconds(60), [&] { return generation_ != generation; })) {
      std::fprintf(stderr, "cuda emulation: %s reached by %d of %d threads: divergent barrier\n",
                   what, arrived_, count_);
      std::abort();
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int count_, arrived_ = 0;
  long generation_ = 0;
};

struct Warp {
  Barrier barrier{32};
  uint64_t slots[32];
};

struct Block {
  dim3 grid, block;
  Barrier barrier;
  std::vector<Warp> warps;
  Block(dim3 g, dim3 b) : grid(g), block(b), barrier(int(b.x * b.y * b.z)), warps((b.x * b.y * b.z + 31) / 32) {}
};

inline thread_local dim3 thread_index{0, 0, 0};
inline thread_local dim3 block_index{0, 0, 0};
inline thread_local Block* current_block = nullptr;
inline std::vector<unsigned char> dynamic_shared_memory;
inline std::mutex atomics_mutex;

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(dynamic_shared_memory.data());
}

inline int lane() { return int(thread_index.x % 32); }
inline Warp& warp() { return current_block->warps[thread_index.x / 32]; }

// Worker threads kept for the whole process (starting 256 threads per block would dominate
// the run time): run(n, fn) calls fn(0) ... fn(n-1) on n of them concurrently and returns
// when all have finished. Leaked on purpose, so that no joinable thread is destroyed at exit.
class ThreadPool {
 public:
  static ThreadPool& instance() {
    static ThreadPool* pool = new ThreadPool;
    return *pool;
  }

  void run(unsigned threads, const std::function<void(unsigned)>& fn) {
    std::unique_lock<std::mutex> lock(mutex_);
    while (workers_ < threads) {
      std::thread(&ThreadPool::work, this, workers_++).detach();
    }
    job_ = &fn;
    active_ = threads;
    remaining_ = threads;
    ++generation_;
    start_.notify_all();
    done_.wait(lock, [&] { return remaining_ == 0; });
    job_ = nullptr;
  }

 private:
  void work(unsigned id) {
    long seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      start_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (id >= active_) continue;
      const std::function<void(unsigned)>* job = job_;
      lock.unlock();
      (*job)(id);
      lock.lock();
      if (--remaining_ == 0) done_.notify_one();
    }
  }

  std::mutex mutex_;
  std::condition_variable start_, done_;
  const std::function<void(unsigned)>* job_ = nullptr;
  unsigned workers_ = 0, active_ = 0, remaining_ = 0;
  long generation_ = 0;
};

// Runs kernel(args...) for every block of the grid, the threads of one block concurrently.
template <typename... Params>
struct Launch {
  void (*kernel)(Params...);
  dim3 grid, block;
  size_t shared_bytes;

  template <typename... Args>
  void operator()(Args&&... args) const {
    const std::tuple<Params...> params(std::forward<Args>(args)...);
    dynamic_shared_memory.assign(shared_bytes + 16, 0xCD);  // poisoned, like uninitialized smem
    const unsigned threads = block.x * block.y * block.z;
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          Block state(grid, block);
          ThreadPool::instance().run(threads, [&](unsigned t) {
            thread_index = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            block_index = dim3(bx, by, bz);
            current_block = &state;
            std::apply(kernel, params);
          });
        }
  }
};

template <typename... Params>
Launch<Params...> launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes = 0,
                         cudaStream_t = nullptr) {
  return {kernel, grid, block, shared_bytes};
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}

template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

// Every lane publishes its value, then reads the source lane's: both steps behind the warp's
// barrier, so all 32 lanes must take part, as a full-mask shuffle requires.
template <typename T>
T shuffle(T v, int source_lane, const char* what) {
  Warp& w = warp();
  w.slots[lane()] = to_bits(v);
  w.barrier.arrive_and_wait(what);
  const T result = from_bits<T>(w.slots[source_lane]);
  w.barrier.arrive_and_wait(what);
  return result;
}

}  // namespace emulation

#define threadIdx (::emulation::thread_index)
#define blockIdx (::emulation::block_index)
#define blockDim (::emulation::current_block->block)
#define gridDim (::emulation::current_block->grid)

inline void __syncthreads() { emulation::current_block->barrier.arrive_and_wait("__syncthreads"); }
inline void __syncwarp(unsigned = 0xffffffffu) { emulation::warp().barrier.arrive_and_wait("__syncwarp"); }

template <typename T>
T __shfl_xor_sync(unsigned, T v, int lane_mask, int = 32) {
  return emulation::shuffle(v, emulation::lane() ^ lane_mask, "__shfl_xor_sync");
}
template <typename T>
T __shfl_down_sync(unsigned, T v, unsigned delta, int = 32) {
  const int source = emulation::lane() + int(delta);
  // Out-of-range lanes keep their own value, as on the GPU.
  return emulation::shuffle(v, source < 32 ? source : emulation::lane(), "__shfl_down_sync");
}
template <typename T>
T __shfl_sync(unsigned, T v, int source_lane, int = 32) {
  return emulation::shuffle(v, source_lane & 31, "__shfl_sync");
}

// ---------------------------------------------------------------------------------------
// Device functions

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __fdividef(float a, float b) { return a / b; }
template <typename T>
T __ldg(const T* p) {
  return *p;
}
template <typename A, typename B>
std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}
template <typename A, typename B>
std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __float_as_int(float v) { return emulation::from_bits<int>(emulation::to_bits(v)); }
inline float __int_as_float(int v) { return emulation::from_bits<float>(emulation::to_bits(v)); }
inline unsigned __float_as_uint(float v) { return emulation::from_bits<unsigned>(emulation::to_bits(v)); }
inline float __uint_as_float(unsigned v) { return emulation::from_bits<float>(emulation::to_bits(v)); }
using std::isnan;
using std::isinf;
using std::isfinite;
inline unsigned __ballot_sync(unsigned, int predicate) {
  unsigned bits = 0;
  for (int source = 0; source < 32; ++source)
    bits |= unsigned(emulation::shuffle(predicate != 0, source, "__ballot_sync")) << source;
  return bits;
}

template <typename T>
T atomicMax(T* address, T value) {
  std::lock_guard<std::mutex> lock(emulation::atomics_mutex);
  const T old = *address;
  if (value > old) *address = value;
  return old;
}
template <typename T>
T atomicMin(T* address, T value) {
  std::lock_guard<std::mutex> lock(emulation::atomics_mutex);
  const T old = *address;
  if (value < old) *address = value;
  return old;
}
template <typename T>
T atomicAdd(T* address, T value) {
  std::lock_guard<std::mutex> lock(emulation::atomics_mutex);
  const T old = *address;
  *address = old + value;
  return old;
}
