"""fastgen: hand-written Triton and CUDA kernels for generative image models, as PyTorch ops."""
from fastgen.ops.registry import BACKENDS, BackendUnavailable, current_backend, use_backend
from fastgen.ops import OPS
from fastgen.ops.shortcut import channel_dup_pixel_shuffle, pixel_unshuffle_channel_avg

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "OPS",
    "channel_dup_pixel_shuffle",
    "current_backend",
    "pixel_unshuffle_channel_avg",
    "use_backend",
]
