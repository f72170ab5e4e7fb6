"""The CPU emulation of CUDA (tests/cuda_emulation/cuda_runtime.h) that the cuda_emulation tests
run csrc/'s kernels under: barriers order shared memory as on a GPU, a missing barrier changes
the result, a divergent barrier stops the program with a message, and a block of 1,024 threads
with deep stacks runs."""
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_emulation import build  # noqa: E402

pytestmark = pytest.mark.skipif(build.missing_tools() is not None, reason=f"{build.missing_tools()}")

# Each thread writes its value to shared memory, then reads its mirror's: without the barrier
# between, a thread may read before its mirror has written.
PROGRAM = r"""
#include "cuda_runtime.h"
#include <cstdio>
#include <string>

__global__ void reverse(const int* in, int* out, bool synchronize) {
  __shared__ int values[1024];
  const int t = threadIdx.x, n = blockDim.x;
  values[t] = in[blockIdx.x * n + t];
  if (synchronize) __syncthreads();
  out[blockIdx.x * n + t] = values[n - 1 - t];
}

__global__ void divergent(int* out) {
  if (threadIdx.x % 2 == 0) __syncthreads();
  out[threadIdx.x] = 1;
}

__device__ int deep(int depth, int value) {
  volatile char frame[4096];  // 16 levels: 64 KiB of one fiber's stack
  frame[depth] = char(value);
  return depth == 0 ? value + frame[0] - char(value) : deep(depth - 1, value);
}

__global__ void warp_sum(int* out) {
  int value = int(threadIdx.x), sum = value;
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  out[threadIdx.x] = sum + deep(15, value) - value;
}

int main(int argc, char** argv) {
  const char* mode = argv[1];
  const int blocks = 3, threads = 1024;
  std::vector<int> in(blocks * threads), out(blocks * threads, -1);
  for (int i = 0; i < blocks * threads; ++i) in[i] = i;
  if (std::string(mode) == "divergent") {
    divergent<<<1, 64>>>(out.data());
    return 0;
  }
  if (std::string(mode) == "warp") {
    warp_sum<<<2, threads>>>(out.data());
    int wrong = 0;
    for (int t = 0; t < threads; ++t) wrong += out[t] != (t / 32) * 32 * 32 + 496;
    std::printf("%d wrong\n", wrong);
    return 0;
  }
  reverse<<<blocks, threads>>>(in.data(), out.data(), std::string(mode) == "synchronized");
  int wrong = 0;
  for (int b = 0; b < blocks; ++b)
    for (int t = 0; t < threads; ++t) wrong += out[b * threads + t] != b * threads + threads - 1 - t;
  std::printf("%d wrong\n", wrong);
  return 0;
}
"""


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("emulation")
    # The launches are rewritten as for csrc/ (build.emulated_source).
    (directory / "program.cpp").write_text(build.emulated_source(PROGRAM))
    binary = directory / "program"
    subprocess.run(["g++", "-std=c++20", "-O1", "-w", f"-I{build.SHIM}", f"-I{build.cuda_include_dir()}",
                    str(directory / "program.cpp"), "-o", str(binary)], check=True)
    return binary


def _run(program: Path, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(program), mode], capture_output=True, text=True, timeout=60)


def test_a_barrier_orders_shared_memory(program):
    assert _run(program, "synchronized").stdout.strip() == "0 wrong"


def test_a_missing_barrier_changes_the_result(program):
    """Half the threads read their mirror's slot before it is written: the round that runs
    threads 0..n-1 leaves the upper half's slots unwritten when the lower half reads them."""
    wrong = int(_run(program, "unsynchronized").stdout.split()[0])
    assert wrong >= 3 * 1024 // 2, wrong


def test_a_divergent_barrier_stops_with_a_message(program):
    result = _run(program, "divergent")
    assert result.returncode != 0
    assert "__syncthreads reached by 32 of 64 threads: divergent barrier" in result.stderr


def test_warp_shuffles_and_deep_stacks_in_a_full_block(program):
    assert _run(program, "warp").stdout.strip() == "0 wrong"
