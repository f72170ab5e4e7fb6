"""diffusers `Attention` modules: fastgen attention processors installed through diffusers' own
`set_processor`, so the module tree and the state dict stay as they are."""
from __future__ import annotations

from typing import Union

import torch
from torch import nn

from fastgen.accelerator import BackendScope, Swap, accelerator


def _projected_heads(attn, hidden_states, encoder_hidden_states):
    """q, k, v of a diffusers Attention as (B, L, H, D) views of its projections (channel
    h*D + d, as diffusers splits heads), with its optional q/k norms applied."""
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return tuple(t.unflatten(-1, (attn.heads, -1)) for t in (query, key, value))


def _project_out(attn, heads_out):
    return attn.to_out[1](attn.to_out[0](heads_out.flatten(2)))


class LinearAttentionProcessor(BackendScope):
    """diffusers attention processor for SANA's ReLU linear attention, backed by
    `fastgen::linear_attention`. It computes what `SanaLinearAttnProcessor2_0` computes: the
    ReLU kernel over the heads, the eps = 1e-15 denominator, the output projection, and the
    float16 clip."""

    eps = 1e-15

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        from fastgen.ops.linear_attention import linear_attention

        q, k, v = _projected_heads(attn, hidden_states, encoder_hidden_states)
        out = _project_out(attn, self.run(linear_attention, q, k, v, self.eps))
        if out.dtype == torch.float16:
            out = out.clip(-65504, 65504)
        return out


class CrossAttentionProcessor(BackendScope):
    """diffusers attention processor for softmax attention to a padded context (SANA's caption
    cross-attention), backed by `fastgen::cross_attention`.

    diffusers hands the caption mask over as an additive bias (0 to attend, -10000 for padding,
    broadcast over queries); it becomes the op's boolean key padding mask. The one difference:
    a row whose keys are all padding gives zeros here, where the bias form averages the padding
    tokens (a real caption always keeps at least one token)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        from fastgen.ops.cross_attention import cross_attention

        q, k, v = _projected_heads(attn, hidden_states, encoder_hidden_states)
        key_padding_mask = None
        if attention_mask is not None:
            key_padding_mask = attention_mask.reshape(k.shape[0], k.shape[1]) == 0
        return _project_out(attn, self.run(cross_attention, q, k, v, key_padding_mask))


# diffusers processor class name -> (fastgen processor class, the op it runs)
_DIFFUSERS_PROCESSORS = {
    "SanaLinearAttnProcessor2_0": (LinearAttentionProcessor, "linear_attention"),
    "SanaAttnProcessor2_0": (CrossAttentionProcessor, "cross_attention"),
}


@accelerator
def diffusers_attention(module: nn.Module, backend: str, ops: frozenset) -> Union[None, Swap, str]:
    if type(module).__name__ != "Attention" or not type(module).__module__.startswith("diffusers."):
        return None
    original = module.processor
    name = type(original).__name__
    if name not in _DIFFUSERS_PROCESSORS:
        return f"attention processor {name} has no fastgen replacement yet"
    processor_class, op = _DIFFUSERS_PROCESSORS[name]
    if op not in ops:
        return f"op {op} was not selected (ops=...)"
    module.set_processor(processor_class(backend))
    return Swap(name, processor_class.__name__, op, lambda: module.set_processor(original))
