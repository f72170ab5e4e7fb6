"""fastgen ops: each module is one op family (math, reference, custom op, autograd, dispatch).

Importing this package registers every op as `torch.ops.fastgen.<name>`.
"""
from fastgen.ops import cross_attention, linear_attention, shortcut, vq
from fastgen.ops.registry import OPS

__all__ = ["OPS", "cross_attention", "linear_attention", "shortcut", "vq"]
