"""diffusers `Attention` modules: fastgen attention processors installed through diffusers' own
`set_processor`, so the module tree and the state dict stay as they are.

Replaced processors and what each replacement reproduces:
- `SanaLinearAttnProcessor2_0` -> `LinearAttentionProcessor` (`fastgen::linear_attention`).
- `SanaAttnProcessor2_0` -> `SanaCrossAttentionProcessor` (`fastgen::cross_attention`): q/k
  norms on the projections, the caption mask.
- `AttnProcessor2_0` and `AttnProcessor` (UNet2DConditionModel's transformer blocks, the
  attention of AutoencoderKL's mid block...) -> `SoftmaxAttentionProcessor`
  (`fastgen::cross_attention`): spatial_norm, (B, C, H, W) inputs as H W tokens, group_norm,
  norm_cross, the q/k norms per head (AttnProcessor2_0 only), the output projection and its
  dropout, residual_connection and rescale_output_factor. The scale is 1/sqrt(head dim) for
  AttnProcessor2_0 (which, like PyTorch's SDPA it calls, ignores `attn.scale`) and `attn.scale`
  for AttnProcessor.

Attention masks. diffusers hands masks to processors as additive biases: the UNet and SANA
turn a 0/1 token mask into 0 (attend) / -10000 (ignore), broadcast over queries (shape (B, 1,
Lkv)). Such a bias is a key padding mask and becomes the op's boolean `key_padding_mask`; a bool
mask (True = attend) is taken as it is. Any other mask (per query, per head, other bias values,
a length other than the keys') is computed by the original diffusers processor, call by call.
Checking the bias values costs a host sync in eager mode, once per mask tensor (not per layer);
under torch.compile the values cannot
be inspected without a graph break, so there a bias of the right shape is taken to be a 0 / -10000
mask. One difference remains: a query row whose keys are all masked gets zeros here, where the
-10000 bias averages the masked tokens (a real caption always keeps a token).

Modules left alone, with the reason in the report: processors without a fastgen counterpart
(added key/value projections, IP-adapter, xformers, custom processors...), grouped key/value
heads, and head dims above the op's limit of 256.
"""
from __future__ import annotations

import functools
import weakref
from typing import Optional, Union

import torch
from torch import nn

from fastgen.accelerators.diffusers_mmdit import JOINT_PROCESSORS
from fastgen.accelerators.patch import (BackendScope, Swap, accelerator, is_diffusers, op_not_selected,
                                        replace_attribute)

# A bias at or below this keeps exp(s + bias) at 0 in float32 next to any realistic score s:
# diffusers writes -10000 for masked tokens.
_MASKED_BIAS = -1e4


def _projected_heads(attn, hidden_states, context, qk_norm_on: Optional[str]):
    """q, k, v of a diffusers Attention as (B, L, H, D) views of its projections (channel
    h*D + d, as diffusers splits heads). Its q/k norms act on the "projections" (SANA's
    processors), on each head's D channels ("heads", AttnProcessor2_0) or not at all (None,
    AttnProcessor)."""
    query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)

    def normed(query, key):
        return (query if attn.norm_q is None else attn.norm_q(query)), (key if attn.norm_k is None else attn.norm_k(key))

    if qk_norm_on == "projections":
        query, key = normed(query, key)
    query, key, value = (t.unflatten(-1, (attn.heads, -1)) for t in (query, key, value))
    if qk_norm_on == "heads":
        query, key = normed(query, key)
    return query, key, value


def _project_out(attn, heads_out):
    return attn.to_out[1](attn.to_out[0](heads_out.flatten(2)))


class _BiasVerdict:
    """Whether the last additive mask seen holds only 0 and masked values. A model passes the
    same mask tensor to every attention layer, so checking it once per forward instead of once
    per layer saves a host sync in each. The verdict is kept while the tensor is alive and
    unmodified (its version counter); inference tensors have none and are checked every time."""

    def __init__(self):
        self.tensor, self.version, self.is_padding = None, None, None

    def __call__(self, bias: torch.Tensor) -> bool:
        if bias.is_inference():
            return self._check(bias)
        if self.tensor is None or self.tensor() is not bias or self.version != bias._version:
            self.tensor, self.version = weakref.ref(bias), bias._version
            self.is_padding = self._check(bias)
        return self.is_padding

    @staticmethod
    def _check(bias: torch.Tensor) -> bool:
        return bool(((bias == 0) | (bias <= _MASKED_BIAS)).all())


_is_padding_bias = _BiasVerdict()


def _key_padding_mask(attention_mask: torch.Tensor, batch: int, kv_len: int) -> Optional[torch.Tensor]:
    """The (B, Lkv) bool mask (True = attend) equivalent to a diffusers attention mask, or None
    when the mask is not a pure key padding mask (see the module docstring)."""
    if attention_mask.shape[0] != batch or attention_mask.shape[-1] != kv_len or attention_mask.numel() != batch * kv_len:
        return None
    mask = attention_mask.reshape(batch, kv_len)
    if mask.dtype == torch.bool:
        return mask
    keep = mask == 0
    if not torch.compiler.is_compiling() and not _is_padding_bias(attention_mask):
        return None
    return keep


class LinearAttentionProcessor(BackendScope):
    """diffusers attention processor for SANA's ReLU linear attention, backed by
    `fastgen::linear_attention`. It computes what `SanaLinearAttnProcessor2_0` computes: the
    ReLU kernel over the heads, the eps = 1e-15 denominator, the output projection, and the
    float16 clip."""

    eps = 1e-15

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        from fastgen.ops.linear_attention import linear_attention

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = _projected_heads(attn, hidden_states, context, "projections")
        out = _project_out(attn, self.run(linear_attention, q, k, v, self.eps))
        if out.dtype == torch.float16:
            out = out.clip(-65504, 65504)
        return out


class _MaskedAttention(BackendScope):
    """Softmax attention through `fastgen::cross_attention`, handing masks that are not key
    padding masks to the diffusers processor it replaced."""

    def __init__(self, backend: str, original):
        super().__init__(backend)
        self.original = original

    def _attend(self, attn, q, k, v, key_padding_mask, scale=None):
        from fastgen.ops.cross_attention import cross_attention

        return _project_out(attn, self.run(cross_attention, q, k, v, key_padding_mask, scale))


class SanaCrossAttentionProcessor(_MaskedAttention):
    """What `SanaAttnProcessor2_0` computes (SANA's caption cross-attention)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        key_padding_mask = None
        if attention_mask is not None:
            key_padding_mask = _key_padding_mask(attention_mask, context.shape[0], context.shape[1])
            if key_padding_mask is None:
                return self.original(attn, hidden_states, encoder_hidden_states, attention_mask)
        q, k, v = _projected_heads(attn, hidden_states, context, "projections")
        return self._attend(attn, q, k, v, key_padding_mask)


class SoftmaxAttentionProcessor(_MaskedAttention):
    """What diffusers' `AttnProcessor2_0` (classic False) or `AttnProcessor` (classic True: the
    module's own scale, and no q/k norms, which that processor does not apply) computes."""

    def __init__(self, backend: str, original, classic: bool):
        super().__init__(backend, original)
        self.classic = classic

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = None
        if hidden_states.ndim == 4:  # (B, C, H, W): attend over the H W positions
            image_shape = hidden_states.shape
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        key_padding_mask = None
        if attention_mask is not None:
            key_padding_mask = _key_padding_mask(attention_mask, context.shape[0], context.shape[1])
            if key_padding_mask is None:
                return self.original(attn, residual, encoder_hidden_states, attention_mask, temb)

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q, k, v = _projected_heads(attn, hidden_states, context, None if self.classic else "heads")
        out = self._attend(attn, q, k, v, key_padding_mask, attn.scale if self.classic else None)
        if image_shape is not None:
            out = out.transpose(1, 2).reshape(image_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


# diffusers processor class name -> (make the fastgen processor from (backend, original), the op it runs)
_DIFFUSERS_PROCESSORS = {
    "SanaLinearAttnProcessor2_0": (lambda backend, original: LinearAttentionProcessor(backend), "linear_attention"),
    "SanaAttnProcessor2_0": (SanaCrossAttentionProcessor, "cross_attention"),
    "AttnProcessor2_0": (functools.partial(SoftmaxAttentionProcessor, classic=False), "cross_attention"),
    "AttnProcessor": (functools.partial(SoftmaxAttentionProcessor, classic=True), "cross_attention"),
}


@accelerator
def diffusers_attention(module: nn.Module, backend: str, ops: frozenset) -> Union[None, Swap, str]:
    if not is_diffusers(module, "Attention"):
        return None
    original = module.processor
    name = type(original).__name__
    if name in JOINT_PROCESSORS:
        return None  # diffusers_mmdit's
    if isinstance(original, BackendScope):
        return f"already runs fastgen's {name}"
    if name not in _DIFFUSERS_PROCESSORS:
        return f"attention processor {name} has no fastgen replacement yet"
    make, op = _DIFFUSERS_PROCESSORS[name]
    unselected = op_not_selected(op, ops)
    if unselected:
        return unselected
    if op == "cross_attention":
        from fastgen.ops.cross_attention import MAX_HEAD_DIM

        if module.inner_kv_dim != module.inner_dim:
            return (f"grouped key/value heads (kv_heads) are not supported: {module.inner_kv_dim} key channels "
                    f"for {module.inner_dim} query channels")
        head_dim = module.inner_dim // module.heads
        if head_dim > MAX_HEAD_DIM:
            return f"head dim {head_dim} is above fastgen::cross_attention's limit of {MAX_HEAD_DIM}"
    replacement = make(backend, original)
    return replace_attribute(module, "processor", replacement, type(replacement).__name__, op)
