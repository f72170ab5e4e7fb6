"""diffusers' `AutoencoderDC` (DC-AE): shortcuts, channel RMSNorms and multi-scale linear
attention through fastgen ops, in place.

fastgen.models.dcae mirrors AutoencoderDC's modules attribute for attribute, and its forwards
are written against those attributes, so the replacements here are the model's own forwards
run on diffusers' modules: the accelerated diffusers model computes what fastgen's DC-AE
computes, up to rounding.

- `DCDownBlock2d` / `DCUpBlock2d` with a shortcut: pixel_unshuffle + group mean + add becomes
  one `pixel_unshuffle_channel_avg`; repeat_interleave + pixel_shuffle + add one
  `channel_dup_pixel_shuffle` (instance-level `forward`).
- `Encoder` / `Decoder`: the output channel averaging and the input channel duplication, the
  factor-1 forms of the same ops (instance-level `forward`).
- `RMSNorm` of `ResBlock`, `GLUMBConv`, `SanaMultiscaleLinearAttention` and the decoder's
  `norm_out`: diffusers calls it on the channel-last view (B, H, W, C) of a map and normalises
  the last dimension, which is trms2d of the map (instance-level `forward` of the norm; the
  report names the owning block). diffusers rounds x / rms to a half-precision weight's dtype
  before the affine; trms2d rounds once, at the end.
- `SanaMultiscaleLinearAttention`: its processor, replaced by one running the LiteMLA forward
  with `linear_attention`. diffusers switches to an equivalent N x N form for maps with no
  more pixels than the head dim; the replacement always runs the linear form.

BatchNorm2d norms (the in-1.0 decoders' first stages) and the resampling blocks without a
shortcut (at the image side of the in-1.0 models) are left as they are, with the reason.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Union

from torch import nn

from fastgen.accelerators.patch import (BackendScope, Swap, accelerator, is_diffusers, op_not_selected,
                                        replace_attribute, replace_forward)
from fastgen.models import dcae

_AUTOENCODER_DC = "diffusers.models.autoencoders.autoencoder_dc"
_UNSHUFFLE, _SHUFFLE, _NORM, _ATTENTION = (
    "pixel_unshuffle_channel_avg", "channel_dup_pixel_shuffle", "trms2d", "linear_attention")


def _run_on(scope: BackendScope, forward: Callable, module: nn.Module) -> Callable:
    """`forward` (a fastgen.models.dcae method) bound to a diffusers module, under `scope`."""
    return functools.partial(scope.run, forward, module)


# diffusers class -> (the attribute that must be true for a shortcut to exist, its op, the
# fastgen forward that fuses it)
_SHORTCUT_BLOCKS = {
    "DCDownBlock2d": ("shortcut", _UNSHUFFLE, dcae.DownBlock.forward),
    "DCUpBlock2d": ("shortcut", _SHUFFLE, dcae.UpBlock.forward),
    "Encoder": ("out_shortcut", _UNSHUFFLE, dcae.Encoder.forward),
    "Decoder": ("in_shortcut", _SHUFFLE, dcae.Decoder.forward),
}


@accelerator
def diffusers_dcae_shortcut(module: nn.Module, backend: str, ops: frozenset) -> Union[None, Swap, str]:
    name = type(module).__name__
    if name not in _SHORTCUT_BLOCKS or not is_diffusers(module, name, _AUTOENCODER_DC):
        return None
    flag, op, forward = _SHORTCUT_BLOCKS[name]
    if not getattr(module, flag):
        return f"{flag}=False: no shortcut to fuse"
    return op_not_selected(op, ops) or replace_forward(module, _run_on(BackendScope(backend), forward, module), f"{name} shortcut",
                           f"{forward.__qualname__} (fastgen.models.dcae)", op)


def _channel_norm(module: nn.Module) -> Optional[tuple]:
    """(the attribute holding a DC-AE block's channel norm, its norm_type), or None when
    `module` is not a DC-AE block with a norm."""
    if is_diffusers(module, "Decoder", _AUTOENCODER_DC):
        return "norm_out", "rms_norm"
    if is_diffusers(module, "SanaMultiscaleLinearAttention"):
        return "norm_out", module.norm_type
    if is_diffusers(module, "ResBlock", _AUTOENCODER_DC) or (
            is_diffusers(module, "GLUMBConv") and module.norm_type is not None):
        return "norm", module.norm_type
    return None


@accelerator
def diffusers_dcae_rms_norm(module: nn.Module, backend: str, ops: frozenset) -> Union[None, Swap, str]:
    found = _channel_norm(module)
    if found is None:
        return None
    attribute, norm_type = found
    if norm_type != "rms_norm":
        return f"norm_type={norm_type!r}: only RMSNorm has a fastgen op"
    norm = getattr(module, attribute)
    if norm.weight is None or norm.bias is None:
        return f"{attribute} has no weight or no bias (DC-AE's RMSNorms have both)"
    return op_not_selected(_NORM, ops) or replace_forward(norm, _run_on(BackendScope(backend), dcae.RMSNorm.forward, norm),
                           f"{attribute}: RMSNorm over channel-last", "trms2d over channels", _NORM)


class MultiscaleLinearAttentionProcessor(BackendScope):
    """Processor for diffusers' SanaMultiscaleLinearAttention: fastgen's LiteMLA forward
    (fastgen.models.dcae.MultiscaleLinearAttention), with `linear_attention`."""

    def __call__(self, attn: nn.Module, hidden_states):
        return self.run(dcae.MultiscaleLinearAttention.forward, attn, hidden_states)


@accelerator
def diffusers_dcae_attention(module: nn.Module, backend: str, ops: frozenset) -> Union[None, Swap, str]:
    if not is_diffusers(module, "SanaMultiscaleLinearAttention"):
        return None
    original = type(module.processor).__name__
    if original != "SanaMultiscaleAttnProcessor2_0":
        return f"processor {original} has no fastgen replacement"
    return op_not_selected(_ATTENTION, ops) or replace_attribute(
        module, "processor", MultiscaleLinearAttentionProcessor(backend), MultiscaleLinearAttentionProcessor.__name__,
        _ATTENTION)
