"""The parts FLUX.1 (`fastgen.models.flux`) and Stable Diffusion 3 (`fastgen.models.sd3`) share:
the MM-DiT joint block, its attention, the adaLN-Zero modulation, rotary position embeddings and
the timestep + pooled-text conditioning, in diffusers' parameter layout.

Joint attention. An image stream x (B, N, C) and a text stream c (B, L, C) each project their
own q, k, v (`to_q`.. for the image, `add_q_proj`.. for the text), split into H heads of D
channels; the two are concatenated along the tokens and attend together,

    [o_c; o_x] = softmax([q_c; q_x] [k_c; k_x]^T / sqrt(D)) [v_c; v_x]

and each stream's part goes through its own output projection (`to_add_out` for the text,
`to_out.0` for the image). With QK-norm (FLUX.1, SD3.5), q and k are RMS-normalised over each
head's D channels (eps 1e-6) with a learned per-channel weight, a separate one per stream; with
RoPE (FLUX.1), each token's q and k are then rotated by its position: the interleaved channel
pairs (2i, 2i + 1) turn by the pair's angle. Each stream's norm and rotation is one
`fastgen.ops.qk_norm_rope` call writing its rows of the joint q and k (no concatenation pass
for them), and the attention one `fastgen.ops.cross_attention` call (SD3 orders the streams
image first; the attention does not depend on the order of its keys, and SD3 has no RoPE).

adaLN-Zero. The conditioning vector e (B, C) gives per-sample vectors through
silu(e) W + b -> (B, k C), split into k vectors in the order diffusers uses; a modulated norm is
LayerNorm(x) (no affine, eps 1e-6) * (1 + scale) + shift, one `fastgen.ops.ada_layer_norm`
call, and each residual branch is scaled by its gate. Where a gated residual is followed by the
next modulated norm of the same stream (the attention's residual and norm2 below), the two are
one `fastgen.ops.gated_residual_ada_layer_norm` call, returning the sum and its normalised form.

Joint block (SD3's JointTransformerBlock, FLUX.1's FluxTransformerBlock), for each stream s of
x and c with its own modulation (shift1, scale1, gate1, shift2, scale2, gate2):

    a_x, a_c = JointAttention(modulate(x, shift1_x, scale1_x), modulate(c, shift1_c, scale1_c))
    x = x + gate1_x a_x
    x = x + gate2_x MLP(modulate(x, shift2_x, scale2_x))      (likewise c with the _c vectors)

where the second and third lines are one gated_residual_modulate call (the residual, then the
modulated norm of its result) and the MLP's residual a plain one.

with MLP = Linear(C, 4C), GELU (tanh), Linear(4C, C). Two variants of SD3:
- context_pre_only (SD3's last block): the text stream only feeds the attention's keys and
  values; its modulation is (scale, shift) and nothing of it is returned.
- dual attention (SD3.5's MMDiT-X blocks): the image stream also runs a self-attention of its
  own, attn2, on a second modulation of the same normalised x (shift3, scale3), added with gate3
  after the joint attention: x = x + gate3 SelfAttention(modulate(x, shift3, scale3)).

Conditioning. e = MLP_t(sinusoid(t)) [+ MLP_g(sinusoid(g))] + MLP_p(pooled text), each MLP
linear, SiLU, linear, with the 256-channel sinusoid of `fastgen.models.common`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastgen.models.common import ProjectionMLP, RMSNorm, TimestepEmbedder, gelu_tanh
from fastgen.ops.ada_norm import ada_layer_norm, gated_residual_ada_layer_norm
from fastgen.ops.cross_attention import cross_attention
from fastgen.ops.qk_norm_rope import qk_norm_rope

# LayerNorm and QK-norm epsilon of both model families.
NORM_EPS = 1e-6

Rope = tuple  # (cos, sin), each (tokens, D / 2) float32: one angle per channel pair of a head


class JointStream(NamedTuple):
    """One stream (text or image) of a joint attention: its q, k, v (B, L_s, H, D), any strides,
    and the RMSNorm weights (D,) of its q and k (None: no QK norm)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    weight_q: Optional[torch.Tensor] = None
    weight_k: Optional[torch.Tensor] = None
    eps: float = NORM_EPS


def joint_attention(streams: list, rope: Optional[Rope] = None) -> torch.Tensor:
    """Softmax attention over the streams' tokens concatenated in the order given, (B, L, H D).
    Each stream's q and k are normalized with its own weights and rotated by its rows of the
    rope tables (rows of the joint sequence), written by one qk_norm_rope call straight into
    its rows of the joint q and k: no concatenation pass over them."""
    first = streams[0].q
    joint_q = first.new_empty(first.shape[0], sum(stream.q.shape[1] for stream in streams), *first.shape[2:])
    joint_k = torch.empty_like(joint_q)
    start = 0
    for stream in streams:
        rows = slice(start, start + stream.q.shape[1])
        cos, sin = (None, None) if rope is None else (rope[0][rows], rope[1][rows])
        qk_norm_rope(stream.q, stream.k, stream.weight_q, stream.weight_k, cos, sin, stream.eps,
                     out_q=joint_q[:, rows], out_k=joint_k[:, rows])
        start = rows.stop
    return cross_attention(joint_q, joint_k, torch.cat([stream.v for stream in streams], dim=1)).flatten(2)


def rope_angles(positions: torch.Tensor, axes_dims: tuple, theta: float) -> Rope:
    """RoPE tables for tokens at `positions` (tokens, len(axes_dims)). Axis a owns the next
    axes_dims[a] channels of each head; its channel pair i turns by the angle
    position[a] * theta^(-2 i / axes_dims[a]) (computed in float64, as FLUX.1 does). Returns
    (cos, sin) float32, (tokens, sum(axes_dims) / 2)."""
    angles = []
    for axis, dim in enumerate(axes_dims):
        frequencies = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
        angles.append(positions[:, axis].to(torch.float64)[:, None] * frequencies[None])
    angle = torch.cat(angles, dim=-1)
    return angle.cos().float(), angle.sin().float()


class JointAttention(nn.Module):
    """Attention over the image tokens and, when `context` (text projections, `add_*`), the
    text tokens together. `image_out`: the image part has an output projection (`to_out.0`; a
    FLUX.1 single block projects it together with its MLP instead); `context_out`: the text part
    has one (`to_add_out`; absent in SD3's last block, whose text output is unused)."""

    def __init__(self, dim: int, heads: int, head_dim: int, qk_norm: bool, context: bool = True,
                 image_out: bool = True, context_out: bool = True):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim

        def norm():
            return RMSNorm(head_dim, NORM_EPS) if qk_norm else None

        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in "qkv")
        self.norm_q, self.norm_k = norm(), norm()
        if image_out:
            # A list so that the parameters are named `to_out.0.*` as in diffusers (whose slot 1
            # is a parameter-free dropout).
            self.to_out = nn.ModuleList([nn.Linear(inner, dim)])
        if context:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, inner) for _ in "qkv")
            self.norm_added_q, self.norm_added_k = norm(), norm()
            if context_out:
                self.to_add_out = nn.Linear(inner, dim)

    def _heads(self, projected: torch.Tensor) -> torch.Tensor:
        return projected.unflatten(-1, (self.heads, self.head_dim))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                rope: Optional[Rope] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x (B, N, dim), context (B, L, dim) or None; rope: tables of the L text tokens then the
        N image tokens. Returns (image output, text output or None): projected where the
        module has the projection, the attention's heads flattened (B, tokens, H D) otherwise."""
        text_tokens = 0 if context is None else context.shape[1]
        sources = [(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)]
        if context is not None:
            sources.insert(0, (context, self.add_q_proj, self.add_k_proj, self.add_v_proj, self.norm_added_q,
                               self.norm_added_k))
        streams = [JointStream(self._heads(to_q(tokens)), self._heads(to_k(tokens)), self._heads(to_v(tokens)),
                               *((None, None) if norm_q is None else (norm_q.weight, norm_k.weight)))
                   for tokens, to_q, to_k, to_v, norm_q, norm_k in sources]
        out = joint_attention(streams, rope)
        text_out, image_out = out[:, :text_tokens], out[:, text_tokens:]
        if hasattr(self, "to_out"):
            image_out = self.to_out[0](image_out)
        if context is None:
            return image_out, None
        return image_out, self.to_add_out(text_out) if hasattr(self, "to_add_out") else None


class Modulation(nn.Module):
    """silu(e) W + b split into `count` (B, C) vectors: the `linear` of diffusers' AdaLayerNormZero
    (6), AdaLayerNormZeroSingle (3), SD35AdaLayerNormZeroX (9) and AdaLayerNormContinuous (2)."""

    def __init__(self, dim: int, count: int):
        super().__init__()
        self.linear = nn.Linear(dim, count * dim)
        self.count = count

    def forward(self, embedding: torch.Tensor) -> tuple:
        return self.linear(F.silu(embedding)).chunk(self.count, dim=1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LayerNorm(x) (no affine, eps 1e-6) * (1 + scale) + shift, per sample."""
    return ada_layer_norm(x, scale, shift, NORM_EPS)


def gated_residual_modulate(x: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                            scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, modulate(h, shift, scale)) with h = x + gate * branch per sample: an adaLN-Zero
    residual and the next modulated norm in one pass."""
    return gated_residual_ada_layer_norm(x, branch, gate, scale, shift, NORM_EPS)


class FeedForward(nn.Module):
    """Linear(dim, 4 dim), GELU (tanh), Linear(4 dim, dim), named `net.0.proj` and `net.2` as in
    diffusers' FeedForward."""

    def __init__(self, dim: int):
        super().__init__()
        hidden = 4 * dim
        gelu_input = nn.Module()
        gelu_input.proj = nn.Linear(dim, hidden)
        # Slot 1 is diffusers' parameter-free dropout.
        self.net = nn.ModuleList([gelu_input, nn.Identity(), nn.Linear(hidden, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](gelu_tanh(self.net[0].proj(x)))


def clip_to_float16(x: torch.Tensor) -> torch.Tensor:
    """Saturate a float16 residual stream at the float16 range (FLUX.1's text and single-block
    streams outgrow it), so that it carries 65504 instead of inf; other dtypes pass through."""
    return x.clamp(-65504.0, 65504.0) if x.dtype == torch.float16 else x


class JointBlock(nn.Module):
    """The MM-DiT block of the module docstring."""

    def __init__(self, dim: int, heads: int, head_dim: int, qk_norm: bool, context_pre_only: bool = False,
                 dual_attention: bool = False):
        super().__init__()
        self.context_pre_only, self.dual_attention = context_pre_only, dual_attention
        self.norm1 = Modulation(dim, 9 if dual_attention else 6)
        self.norm1_context = Modulation(dim, 2 if context_pre_only else 6)
        self.attn = JointAttention(dim, heads, head_dim, qk_norm, context_out=not context_pre_only)
        if dual_attention:
            self.attn2 = JointAttention(dim, heads, head_dim, qk_norm, context=False)
        self.ff = FeedForward(dim)
        if not context_pre_only:
            self.ff_context = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, embedding: torch.Tensor,
                rope: Optional[Rope] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Returns (x, context), context None for a context_pre_only block."""
        shift1, scale1, gate1, shift2, scale2, gate2, *dual = self.norm1(embedding)
        if self.context_pre_only:
            context_scale1, context_shift1 = self.norm1_context(embedding)
        else:
            (context_shift1, context_scale1, context_gate1,
             context_shift2, context_scale2, context_gate2) = self.norm1_context(embedding)
        attended, context_attended = self.attn(modulate(x, shift1, scale1),
                                               modulate(context, context_shift1, context_scale1), rope)
        if self.dual_attention:
            shift3, scale3, gate3 = dual
            self_attended = self.attn2(modulate(x, shift3, scale3))[0]
        if self.dual_attention:
            x = x + gate1.unsqueeze(1) * attended
            x, normed = gated_residual_modulate(x, self_attended, gate3, shift2, scale2)
        else:
            x, normed = gated_residual_modulate(x, attended, gate1, shift2, scale2)
        x = x + gate2.unsqueeze(1) * self.ff(normed)
        if self.context_pre_only:
            return x, None
        context, normed = gated_residual_modulate(context, context_attended, context_gate1, context_shift2,
                                                  context_scale2)
        context = context + context_gate2.unsqueeze(1) * self.ff_context(normed)
        return x, clip_to_float16(context)


class TimestepTextEmbedding(nn.Module):
    """e = MLP_t(sinusoid(t)) [+ MLP_g(sinusoid(g))] + MLP_p(pooled text): diffusers'
    CombinedTimestepTextProjEmbeddings, and CombinedTimestepGuidanceTextProjEmbeddings with
    `guidance`. The sinusoids are cast to the pooled text's dtype."""

    def __init__(self, dim: int, pooled_dim: int, guidance: bool = False):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(dim)
        if guidance:
            self.guidance_embedder = TimestepEmbedder(dim)
        self.text_embedder = ProjectionMLP(pooled_dim, dim)

    def forward(self, timestep: torch.Tensor, pooled_text: torch.Tensor,
                guidance: Optional[torch.Tensor] = None) -> torch.Tensor:
        embedding = self.timestep_embedder(timestep, pooled_text.dtype)
        if guidance is not None:
            embedding = embedding + self.guidance_embedder(guidance, pooled_text.dtype)
        return embedding + self.text_embedder(pooled_text)

