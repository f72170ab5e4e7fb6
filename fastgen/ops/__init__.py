"""fastgen ops: each module is one op family (math, reference, custom op, autograd, dispatch).

Importing this package registers every op as `torch.ops.fastgen.<name>`.
"""
from fastgen.ops import (
    ada_norm,
    bias_act,
    cross_attention,
    filtered_lrelu,
    linear_attention,
    rms_norm_2d,
    shortcut,
    upfirdn2d,
    vq,
)
from fastgen.ops.registry import OPS

__all__ = [
    "OPS",
    "ada_norm",
    "bias_act",
    "cross_attention",
    "filtered_lrelu",
    "linear_attention",
    "rms_norm_2d",
    "shortcut",
    "upfirdn2d",
    "vq",
]
