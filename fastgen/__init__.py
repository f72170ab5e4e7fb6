"""fastgen: hand-written Triton and CUDA kernels for generative image models, as PyTorch ops."""
from fastgen.accelerator import AccelerationReport, accelerate, restore
from fastgen.ops.registry import BACKENDS, BackendUnavailable, current_backend, use_backend
from fastgen.ops import OPS
from fastgen.ops.ada_norm import ada_group_norm, ada_layer_norm
from fastgen.ops.bias_act import bias_act
from fastgen.ops.cross_attention import cross_attention
from fastgen.ops.filtered_lrelu import filtered_lrelu
from fastgen.ops.linear_attention import linear_attention
from fastgen.ops.rms_norm_2d import trms2d
from fastgen.ops.shortcut import channel_dup_pixel_shuffle, pixel_unshuffle_channel_avg
from fastgen.ops.upfirdn2d import upfirdn2d
from fastgen.ops.vq import vq_nearest, vq_quantize

__all__ = [
    "AccelerationReport",
    "BACKENDS",
    "BackendUnavailable",
    "OPS",
    "accelerate",
    "ada_group_norm",
    "ada_layer_norm",
    "bias_act",
    "channel_dup_pixel_shuffle",
    "cross_attention",
    "current_backend",
    "filtered_lrelu",
    "linear_attention",
    "pixel_unshuffle_channel_avg",
    "restore",
    "trms2d",
    "upfirdn2d",
    "use_backend",
    "vq_nearest",
    "vq_quantize",
]
