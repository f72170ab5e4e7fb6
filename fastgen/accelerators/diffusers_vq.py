"""diffusers `VectorQuantizer` (the bottleneck of `VQModel`): its forward replaced, on the
instance, by one through `fastgen::vq_quantize`, which never forms the N x K distance matrix
that diffusers' `torch.cdist` + `argmin` does.

The replacement returns what diffusers' forward returns: z_q (B, C, H, W) contiguous with value
codebook[idx] and the straight-through gradient, the loss in z's dtype with diffusers'
weighting (legacy: beta on the codebook term; otherwise on the commitment term), and
(None, None, idx), idx (B*H*W,) or (B, H, W) with sane_index_shape. The search is the l2 one
of diffusers (cdist's Euclidean distance has the same argmin as the squared distance); outputs
agree up to rounding, and indices can differ only between codes at near-equal distance.
Quantizers with `remap` (an index remapping loaded from a file) and legacy quantizers with
beta = 0 are left as they are.
"""
from __future__ import annotations

import functools
from typing import Union

from torch import nn

from fastgen.accelerators.patch import BackendScope, Swap, accelerator, is_diffusers, op_not_selected, replace_forward
from fastgen.models.vqgan import straight_through_quantize


def _quantizer_forward(scope: BackendScope, quantizer: nn.Module, z):
    batch, channels, height, width = z.shape
    rows = z.permute(0, 2, 3, 1).reshape(-1, quantizer.vq_embed_dim)
    z_q, idx, loss, _ = scope.run(straight_through_quantize, rows, quantizer.embedding.weight, quantizer.beta,
                                  quantizer.legacy)
    z_q = z_q.view(batch, height, width, channels).permute(0, 3, 1, 2).contiguous()
    if quantizer.sane_index_shape:
        idx = idx.view(batch, height, width)
    return z_q, loss.to(z.dtype), (None, None, idx)


@accelerator
def diffusers_vector_quantizer(module: nn.Module, backend: str, ops: frozenset) -> Union[None, Swap, str]:
    if not is_diffusers(module, "VectorQuantizer"):
        return None
    if module.remap is not None:
        return "remap (index remapping to a used-code subset) is not supported"
    if module.legacy and module.beta == 0:
        return "legacy loss with beta = 0 has no vq_quantize form"
    return op_not_selected("vq_quantize", ops) or replace_forward(module, functools.partial(_quantizer_forward, BackendScope(backend), module),
                           "VectorQuantizer.forward", "vq_quantize forward", "vq_quantize")
