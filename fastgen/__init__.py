"""fastgen: hand-written Triton and CUDA kernels for generative image models, as PyTorch ops.

Every op is exported here under its name (`fastgen.trms2d`, ...), from its family module in
fastgen.ops, which finds the families itself: a new family's ops appear here without an edit.
"""
from fastgen.accelerator import AccelerationReport, accelerate, restore
from fastgen.ops import FUNCTIONS, OPS
from fastgen.ops.registry import BACKENDS, BackendUnavailable, current_backend, use_backend

globals().update(FUNCTIONS)

__all__ = sorted(["AccelerationReport", "BACKENDS", "BackendUnavailable", "OPS", "accelerate", "current_backend",
                  "restore", "use_backend", *FUNCTIONS])
