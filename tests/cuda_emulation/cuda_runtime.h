// A CPU emulation of the part of the CUDA programming model that csrc/ uses, so the tests can
// execute the CUDA kernels on a machine without a GPU (tests/cuda_emulation/build.py compiles
// csrc/ as host C++ against this header instead of the CUDA runtime's).
//
// Execution model: a launch runs its blocks one after another; the threads of a block are
// fibers on the calling thread, switched only at barriers (__syncthreads, __syncwarp and the
// warp shuffles), so __syncthreads, shuffles and shared memory behave as on a GPU for a correct
// kernel. Between two barriers each thread runs alone to its next barrier, and successive
// rounds run the threads in opposite orders (0..n-1, then n-1..0): a read of shared memory
// that a missing barrier leaves unordered sees another thread's write before it in one round
// and the poison or a stale value in the next, so the results differ from the reference. Fibers
// cost a few nanoseconds a switch where OS threads on a few cores cost microseconds a barrier
// per thread, which dominated the tests' run time.
// __shared__ variables are function-local statics (one block at a time uses them); dynamic
// shared memory is a per-launch buffer. A barrier that not every thread reaches (a divergent
// __syncthreads or shuffle) aborts with a message as soon as no thread can go on.
// "Device" pointers are host pointers: the tests pass CPU tensors.
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <vector_types.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <vector>

#include <sys/mman.h>

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

#if !defined(__x86_64__)
#error "the CUDA emulation's fiber switch is written for x86-64"
#endif

// Saves the callee-saved registers, the SSE and x87 control words and the stack pointer of the
// running fiber in *from_sp, and resumes the fiber whose stack pointer is to_sp (System V
// x86-64: everything else is caller-saved across this call). swapcontext would do the same
// with two system calls per switch for the signal mask, as slow as the OS threads it replaces.
extern "C" void fastgen_emulation_switch(void** from_sp, void* to_sp);
asm(R"(
    .text
    .weak fastgen_emulation_switch
    .hidden fastgen_emulation_switch
    .type fastgen_emulation_switch, @function
fastgen_emulation_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size fastgen_emulation_switch, .-fastgen_emulation_switch
)");

class Barrier;

// The running fiber's thread index (each fiber restores its own when it resumes).
inline thread_local dim3 thread_index{0, 0, 0};

// The threads of the running block as fibers, one set per OS thread that launches kernels,
// with their stacks kept for the process (mapped lazily: untouched stack pages cost no memory).
class Fibers {
 public:
  static Fibers& instance() {
    static thread_local Fibers* fibers = new Fibers;
    return *fibers;
  }

  // Runs body(t) for t in [0, threads) as fibers until all have returned.
  void run(unsigned threads, const std::function<void(unsigned)>& body);
  // The running fiber waits until `barrier` passes `generation`.
  void wait(const Barrier& barrier, long generation, const char* what);

 private:
  static constexpr size_t kStackBytes = size_t(1) << 19;
  static constexpr size_t kGuardBytes = 4096;  // unmapped below each stack: an overflow faults

  struct Fiber {
    void* sp = nullptr;
    char* stack = nullptr;
    bool finished = false;
    const Barrier* barrier = nullptr;
    long generation = 0;
    const char* what = nullptr;
  };

  [[noreturn]] static void entry();
  bool blocked(const Fiber& fiber) const;
  [[noreturn]] void report_divergence() const;

  std::vector<Fiber> fibers_;
  void* scheduler_sp_ = nullptr;
  unsigned running_ = 0;
  const std::function<void(unsigned)>* body_ = nullptr;
};

// A reusable barrier for `count` threads: the last to arrive releases the others.
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void arrive_and_wait(const char* what) {
    const long generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      return;
    }
    Fibers::instance().wait(*this, generation, what);
  }
  long generation() const { return generation_; }
  int arrived() const { return arrived_; }
  int count() const { return count_; }

 private:
  int count_, arrived_ = 0;
  long generation_ = 0;
};

inline bool Fibers::blocked(const Fiber& fiber) const {
  return fiber.barrier != nullptr && fiber.barrier->generation() == fiber.generation;
}

inline void Fibers::wait(const Barrier& barrier, long generation, const char* what) {
  Fiber& fiber = fibers_[running_];
  fiber.barrier = &barrier;
  fiber.generation = generation;
  fiber.what = what;
  const dim3 own_index = thread_index;
  fastgen_emulation_switch(&fiber.sp, scheduler_sp_);
  thread_index = own_index;
  fiber.barrier = nullptr;
}

inline void Fibers::report_divergence() const {
  for (const Fiber& fiber : fibers_)
    if (!fiber.finished && fiber.barrier != nullptr) {
      std::fprintf(stderr, "cuda emulation: %s reached by %d of %d threads: divergent barrier\n", fiber.what,
                   fiber.barrier->arrived(), fiber.barrier->count());
      break;
    }
  std::abort();
}

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

inline void Fibers::entry() {
  Fibers& self = instance();
  (*self.body_)(self.running_);
  Fiber& fiber = self.fibers_[self.running_];
  fiber.finished = true;
  fastgen_emulation_switch(&fiber.sp, self.scheduler_sp_);
  std::abort();  // a finished fiber is never resumed
}

inline void Fibers::run(unsigned threads, const std::function<void(unsigned)>& body) {
  while (fibers_.size() < threads) {
    void* mapping = mmap(nullptr, kGuardBytes + kStackBytes, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mapping == MAP_FAILED) {
      std::fprintf(stderr, "cuda emulation: cannot map a fiber stack\n");
      std::abort();
    }
    mprotect(mapping, kGuardBytes, PROT_NONE);
    fibers_.push_back(Fiber{nullptr, static_cast<char*>(mapping) + kGuardBytes});
  }
  uint32_t control_words[2];
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(control_words[0]), "=m"(control_words[1]));
  body_ = &body;
  for (unsigned t = 0; t < threads; ++t) {
    // The frame fastgen_emulation_switch restores: control words, r15, r14, r13, r12, rbx, rbp,
    // then entry() as the return address, above it a null return address for entry itself, so
    // that entry starts with the stack alignment of a called function.
    auto* top = reinterpret_cast<uint64_t*>(fibers_[t].stack + kStackBytes);
    uint64_t* frame = top - 9;
    std::memcpy(frame, control_words, sizeof(control_words));
    std::fill(frame + 1, frame + 7, uint64_t(0));
    frame[7] = reinterpret_cast<uint64_t>(&Fibers::entry);
    frame[8] = 0;
    fibers_[t].sp = frame;
    fibers_[t].finished = false;
    fibers_[t].barrier = nullptr;
  }
  unsigned finished = 0;
  for (bool forward = true; finished < threads; forward = !forward) {
    bool progressed = false;
    for (unsigned i = 0; i < threads; ++i) {
      const unsigned t = forward ? i : threads - 1 - i;
      Fiber& fiber = fibers_[t];
      if (fiber.finished || blocked(fiber)) continue;
      running_ = t;
      fastgen_emulation_switch(&scheduler_sp_, fiber.sp);
      progressed = true;
      finished += fiber.finished;
    }
    if (!progressed) report_divergence();
  }
  body_ = nullptr;
}

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
          Fibers::instance().run(threads, [&](unsigned t) {
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
