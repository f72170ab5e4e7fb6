"""diffusers' MM-DiT attention (FLUX.1's `FluxAttention`, SD3's joint `Attention`) on fastgen's
`qk_norm_rope` and `cross_attention`, and the gated residual of its joint blocks fused with the
next modulated norm (`gated_residual_ada_layer_norm`).

Both attend jointly over the tokens of one or two streams, each with its own projections and
per-head q/k RMSNorms:

    q_s, k_s, v_s = projections of stream s (the image, and in a joint block the text)
    q_s, k_s      = RMSNorm_s(q_s), RMSNorm_s(k_s)         (per head over D; skipped without a norm)
    q, k, v       = the streams' q, k, v concatenated along the tokens
    q, k          = RoPE(q), RoPE(k)                        (FLUX.1: interleaved pairs, diffusers'
                                                             (cos, sin) tables of the joint sequence)
    out           = softmax(q k^T / sqrt(D)) v, split back into the streams, each stream then
                    through its output projection (where the block has one)

The text comes first in FLUX.1's joint sequence and last in SD3's. Here each stream's norm and
RoPE are one `qk_norm_rope` call that writes its q and k straight into their rows of the joint
q and k (no concatenation pass for them), and the attention is one `cross_attention` call over
the joint sequence. FLUX.1's single-stream blocks (one stream, already joint, no output
projection) and SD3.5's second attention (image stream only, `dual_attention_layers`) are the
same computation with one stream.

The processors replace `FluxAttnProcessor` and `JointAttnProcessor2_0` through the module's
`processor` attribute, as the other diffusers attention processors are replaced. An attention
mask, or a call with arguments the replaced processor does not take, is handed to the original
processor. Left alone, with the reason: q/k norms other than an RMSNorm without bias (SD3's
"layer_norm" option), RMSNorms whose eps is left to the dtype, q and k norms of one stream with
different eps, head dims above cross_attention's limit, and other processors (IP-adapter,
fused-projection and custom processors).

Joint blocks (FLUX.1's `FluxTransformerBlock`, SD3's `JointTransformerBlock`). For each stream
(the image, and the text where the block returns it), with the gates, shifts and scales its
norm1 / norm1_context (adaLN-Zero) computes from the embedding,

    x = x + gate_msa * attn_output                      (SD3.5's dual blocks: then + gate_msa2 * attn2's)
    n = norm2(x) * (1 + scale_mlp) + shift_mlp          -> (x, n) = gated_residual_ada_layer_norm(
                                                            x, attn_output, gate_msa, scale_mlp, shift_mlp)
    x = x + gate_mlp * ff(n)

with norm2 a LayerNorm without affine. The fused forward calls norm1, norm1_context, the
attentions and the feed-forwards as the block's own forward does, and replaces the residual and
norm2 (norm2_context) by one op that reads x and the attention output once and writes x and n.
diffusers rounds gate * attn_output, the sum and the normalised value to the activations'
dtype, the op once each. Whether the fused op is worth it against torch.compile of diffusers'
two steps is decided by its benchmark (bench/ops_ada_norm.py, on a GPU); leaving it out of
accelerate's `ops=` keeps the blocks as diffusers wrote them. Where the modulation and the
activations differ in dtype (autocast), a call runs diffusers' two steps; an SD3 block with a
chunked feed-forward (`set_chunk_feed_forward`) runs diffusers' forward. Left alone, with the
reason: a norm2 that is not a LayerNorm without affine, norms with hooks (the fused forward does
not call them), and blocks whose forward something else replaced.
"""
from __future__ import annotations

import types
from typing import Optional, Union

import torch
from torch import nn

from fastgen.accelerators.diffusers_norm import _not_diffusers_forward, _not_plain_layer_norm, _skipped_hooks
from fastgen.accelerators.patch import (BackendScope, Swap, accelerator, is_diffusers, op_not_selected,
                                        replace_attribute, replace_forward)
from fastgen.models.mmdit import clip_to_float16
from fastgen.ops import ada_norm

_OPS = ("qk_norm_rope", "cross_attention")
_GATED_RESIDUAL_OP = "gated_residual_ada_layer_norm"


def _rms_norm(norm: Optional[nn.Module], head_dim: int) -> Union[None, tuple, str]:
    """(weight or None, eps) of a per-head RMSNorm the op computes, None for no norm, or the
    reason the norm is not one."""
    if norm is None:
        return None
    if isinstance(norm, nn.RMSNorm):
        shape, eps = tuple(norm.normalized_shape), norm.eps
    elif is_diffusers(norm, "RMSNorm"):
        if norm.bias is not None:
            return "a q/k RMSNorm with a bias"
        shape, eps = tuple(norm.dim), norm.eps
    else:
        return f"q/k norm {type(norm).__name__} is not an RMSNorm"
    if shape != (head_dim,):
        return f"a q/k RMSNorm over {shape}, not over each head's {head_dim} channels"
    if eps is None:
        return "a q/k RMSNorm with eps=None (the input dtype's machine epsilon)"
    return norm.weight, eps


def _stream_norms(attn: nn.Module, names: tuple, head_dim: int) -> Union[tuple, str]:
    """(weight_q, weight_k, eps) of one stream's q and k norms, or the reason they do not fuse."""
    norms = [_rms_norm(getattr(attn, name, None), head_dim) for name in names]
    for norm in norms:
        if isinstance(norm, str):
            return norm
    present = [norm for norm in norms if norm is not None]
    if len({eps for _, eps in present}) > 1:
        return f"{names[0]} and {names[1]} have different eps"
    return (*(None if norm is None else norm[0] for norm in norms), present[0][1] if present else 1e-6)


class JointAttentionProcessor(BackendScope):
    """What `FluxAttnProcessor` (flux: the text first, and a single stream's output returned
    without projection) or `JointAttnProcessor2_0` (the text last, every output projected)
    computes (module docstring)."""

    def __init__(self, backend: str, original, flux: bool):
        super().__init__(backend)
        self.original = original
        self.flux = flux

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 *args, **kwargs):
        if attention_mask is not None or args or kwargs:
            rope = () if image_rotary_emb is None else (image_rotary_emb,)
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *rope, *args, **kwargs)
        from fastgen.models.mmdit import JointStream, joint_attention
        from fastgen.ops.qk_norm_rope import rope_tables_from_diffusers

        joint = encoder_hidden_states is not None
        sources = [(hidden_states, False)]
        if joint:
            sources.insert(0 if self.flux else 1, (encoder_hidden_states, True))
        heads, head_dim = attn.heads, attn.inner_dim // attn.heads
        streams = []
        for x, is_text in sources:
            q, k, v = (t.unflatten(-1, (heads, head_dim)) for t in _projections(attn, x, is_text))
            norms = _stream_norms(attn, ("norm_added_q", "norm_added_k") if is_text else ("norm_q", "norm_k"), head_dim)
            streams.append(JointStream(q, k, v, *norms))
        rope = None if image_rotary_emb is None else rope_tables_from_diffusers(*image_rotary_emb, "interleaved")
        out = self.run(joint_attention, streams, rope)
        if not joint:
            return out if self.flux else _image_out(attn, out)
        rows = {"text": encoder_hidden_states.shape[1], "image": hidden_states.shape[1]}
        if self.flux:
            text, image = out.split([rows["text"], rows["image"]], dim=1)
        else:
            image, text = out.split([rows["image"], rows["text"]], dim=1)
        if not attn.context_pre_only:
            text = attn.to_add_out(text.contiguous())
        return _image_out(attn, image.contiguous()), text


def _projections(attn: nn.Module, x: torch.Tensor, text: bool) -> tuple:
    """q, k, v projections of one stream: the text stream's added projections or the image's,
    fused into one linear where diffusers' fuse_projections made one (then views of it)."""
    if getattr(attn, "fused_projections", False):
        return (attn.to_added_qkv if text else attn.to_qkv)(x).chunk(3, dim=-1)
    names = ("add_q_proj", "add_k_proj", "add_v_proj") if text else ("to_q", "to_k", "to_v")
    return tuple(getattr(attn, name)(x) for name in names)


def _image_out(attn: nn.Module, out: torch.Tensor) -> torch.Tensor:
    return attn.to_out[1](attn.to_out[0](out))


# (diffusers attention class, its processor class) -> whether it is FLUX.1's
_PROCESSORS = {("FluxAttention", "FluxAttnProcessor"): True, ("Attention", "JointAttnProcessor2_0"): False}
# The processors replaced here, which diffusers_attention leaves to this module.
JOINT_PROCESSORS = frozenset(processor for _, processor in _PROCESSORS)


@accelerator
def diffusers_joint_attention(module: nn.Module, backend: str, ops: frozenset) -> Union[None, Swap, str]:
    kind = next(((cls, proc) for cls, proc in _PROCESSORS if is_diffusers(module, cls)), None)
    if kind is None or type(module.processor).__name__ != kind[1]:
        return None  # another class, or an Attention with another processor (diffusers_attention's)
    for op in _OPS:
        if op_not_selected(op, ops):
            return op_not_selected(op, ops)
    from fastgen.ops.cross_attention import MAX_HEAD_DIM

    head_dim = module.inner_dim // module.heads
    if head_dim > MAX_HEAD_DIM:
        return f"head dim {head_dim} is above fastgen::cross_attention's limit of {MAX_HEAD_DIM}"
    for names in (("norm_q", "norm_k"), ("norm_added_q", "norm_added_k")):
        norms = _stream_norms(module, names, head_dim)
        if isinstance(norms, str):
            return norms
    replacement = JointAttentionProcessor(backend, module.processor, flux=_PROCESSORS[kind])
    return replace_attribute(module, "processor", replacement, type(replacement).__name__, ", ".join(_OPS))


def _gated_residual_norm(scope: BackendScope, norm: nn.LayerNorm, x: torch.Tensor, branch: torch.Tensor,
                         gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> tuple:
    """(h, norm(h) * (1 + scale) + shift) with h = x + gate * branch: one op where every tensor
    has x's dtype, diffusers' two steps otherwise (a modulation of another dtype promotes them)."""
    if all(t.dtype == x.dtype for t in (branch, gate, shift, scale)):
        return scope.run(ada_norm.gated_residual_ada_layer_norm, x, branch, gate, scale, shift, norm.eps)
    h = x + gate.unsqueeze(1) * branch
    return h, norm(h) * (1 + scale[:, None]) + shift[:, None]


def _stream_update(scope: BackendScope, norm2: nn.LayerNorm, ff: nn.Module, x: torch.Tensor, attended: torch.Tensor,
                   gate_msa: torch.Tensor, shift_mlp: torch.Tensor, scale_mlp: torch.Tensor,
                   gate_mlp: torch.Tensor) -> torch.Tensor:
    """The rest of a joint block for one stream after its attention (module docstring)."""
    x, normed = _gated_residual_norm(scope, norm2, x, attended, gate_msa, shift_mlp, scale_mlp)
    return x + gate_mlp.unsqueeze(1) * ff(normed)


def _fused_sd3_block_forward(scope: BackendScope, original_forward):
    """JointTransformerBlock.forward with each stream's residual and norm2 as one op."""

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                joint_attention_kwargs: Optional[dict] = None) -> tuple:
        if self._chunk_size is not None:
            return original_forward(hidden_states, encoder_hidden_states, temb, joint_attention_kwargs)
        kwargs = joint_attention_kwargs or {}
        normed, gate_msa, shift_mlp, scale_mlp, gate_mlp, *dual = self.norm1(hidden_states, emb=temb)
        if self.context_pre_only:
            normed_context = self.norm1_context(encoder_hidden_states, temb)
        else:
            normed_context, *context_modulation = self.norm1_context(encoder_hidden_states, emb=temb)
        attended, context_attended = self.attn(hidden_states=normed, encoder_hidden_states=normed_context, **kwargs)
        if self.use_dual_attention:
            normed2, gate_msa2 = dual
            hidden_states = hidden_states + gate_msa.unsqueeze(1) * attended
            attended, gate_msa = self.attn2(hidden_states=normed2, **kwargs), gate_msa2
        hidden_states = _stream_update(scope, self.norm2, self.ff, hidden_states, attended, gate_msa, shift_mlp,
                                       scale_mlp, gate_mlp)
        if self.context_pre_only:
            return None, hidden_states
        encoder_hidden_states = _stream_update(scope, self.norm2_context, self.ff_context, encoder_hidden_states,
                                               context_attended, *context_modulation)
        return encoder_hidden_states, hidden_states

    return forward


def _fused_flux_block_forward(scope: BackendScope):
    """FluxTransformerBlock.forward with each stream's residual and norm2 as one op."""

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                image_rotary_emb: Optional[tuple] = None, joint_attention_kwargs: Optional[dict] = None) -> tuple:
        normed, *modulation = self.norm1(hidden_states, emb=temb)
        normed_context, *context_modulation = self.norm1_context(encoder_hidden_states, emb=temb)
        attended, context_attended, *ip_adapter = self.attn(
            hidden_states=normed, encoder_hidden_states=normed_context, image_rotary_emb=image_rotary_emb,
            **(joint_attention_kwargs or {}))
        hidden_states = _stream_update(scope, self.norm2, self.ff, hidden_states, attended, *modulation)
        if ip_adapter:  # an IP-adapter processor's third output joins after the feed-forward
            hidden_states = hidden_states + ip_adapter[0]
        encoder_hidden_states = _stream_update(scope, self.norm2_context, self.ff_context, encoder_hidden_states,
                                               context_attended, *context_modulation)
        return clip_to_float16(encoder_hidden_states), hidden_states

    return forward


@accelerator
def diffusers_joint_block(module: nn.Module, backend: str, ops: frozenset) -> Union[None, Swap, str]:
    flux = is_diffusers(module, "FluxTransformerBlock")
    if not flux and not is_diffusers(module, "JointTransformerBlock"):
        return None
    norms = [("norm2", module.norm2)] + ([] if module.norm2_context is None else
                                         [("norm2_context", module.norm2_context)])
    for name, norm in norms:
        reason = _not_plain_layer_norm(name, norm) or _skipped_hooks(name, norm)
        if reason:
            return reason
    reason = _not_diffusers_forward(module) or op_not_selected(_GATED_RESIDUAL_OP, ops)
    if reason:
        return reason
    scope = BackendScope(backend)
    forward = _fused_flux_block_forward(scope) if flux else _fused_sd3_block_forward(scope, module.forward)
    fused = " and ".join(f"residual+{name}+modulation" for name, _ in norms)
    return replace_forward(module, types.MethodType(forward, module), f"{type(module).__name__} {fused}",
                           "fastgen fused forward", _GATED_RESIDUAL_OP)
