"""Triton kernels, one module per op family, installed as `fastgen.kernels`.

Import these modules only after deciding on TRITON_INTERPRET: `triton.jit` reads it when a
kernel is defined. fastgen imports them lazily, on the first call of a Triton implementation.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

# Passed to every launch. FMA contraction is pinned on because the kernels are written for it
# (their float32 error budgets count one rounding per multiply-add) and Triton is changing the
# default: 3.9 warns on every compile that 3.10 will turn it off.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}

# The SM count of the GPU that `fastgen precompile` compiles for, while it runs: launchers then
# size grids for CPU tensors as they would on that GPU, so the kernel variants they compile
# (split counts reach the specialization) are the ones the GPU will look up.
compile_target_sm_count: Optional[int] = None


@functools.lru_cache(maxsize=None)
def _device_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> Optional[int]:
    """The streaming multiprocessors a launch on `device` has to fill: the GPU's own, the
    precompile target's for CPU tensors, or None under the interpreter (it runs programs one
    after another, so launchers there ask for a few)."""
    if device.type == "cuda":
        return _device_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return compile_target_sm_count
