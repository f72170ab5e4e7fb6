"""VAR, the next-scale prediction transformer (Tian et al., 2024, "Visual Autoregressive
Modeling: Scalable Image Generation via Next-Scale Prediction", arXiv:2404.02905), and
class-conditional generation through VAR's multi-scale VQVAE (`fastgen.models.var_vqvae`).

An image is S token maps r_1..r_S of sides p_1 < ... < p_S (patch_nums), L = sum_s p_s^2
tokens in all, scale after scale, each map in raster order. The transformer predicts every
token of scale s at once from the class and all tokens of the scales before it:

    x_1 = class_emb[c] + pos_start                  (the start token, p_1^2 = 1 row)
    x_s = word_embed(down_s(f_hat_{s-1}))           s > 1: the VQVAE's accumulated latent
                                                    f_hat_{s-1} = sum_{t<s} h_t area-downsampled
                                                    to p_s x p_s, one row of Cvae per position
    x  += lvl_embed[s] + pos_1LC[position]          (scale and absolute position embeddings)

with h_t = phi_t(bicubic-upsample(codebook[r_t])) the VQVAE's residual of scale t. The
condition is cond = class_emb[c] (D = C wide; row num_classes is the unconditional class that
classifier-free guidance uses). Each of the `depth` blocks is

    (g1, g2, a1, a2, b1, b2) = AdaLN(cond)          six (B, C) vectors
    x = x + g1 * Attention(LN(x) (1 + a1) + b1)
    x = x + g2 * FFN(LN(x) (1 + a2) + b2)           FFN: Linear C -> 4C, GELU (tanh), Linear

LN is a LayerNorm without affine (eps 1e-6); LN(x)(1 + a) + b is one `fastgen.ops.ada_layer_norm`
call. AdaLN is per block, Linear(SiLU(cond)) to 6C (`ada_lin`), or with shared_aln one
Linear(SiLU(cond)) for the network (`shared_ada_lin`) plus a learned (6, C) table per block
(`ada_gss`). The logits are head(LN(x)(1 + a) + b) with (a, b) = Linear(SiLU(cond)) (`head_nm`).

Attention has H heads of C / H channels; q, k, v = x W_qkv + (q_bias, 0, v_bias). With
attn_l2_norm (every released model) q and k are l2-normalized per head and q multiplied by
exp(min(tau_h, log 100)) (tau = `scale_mul_1H11`, learned, per head), and the softmax scale is 1:
a cosine attention with a learned, bounded temperature (`fastgen.ops.cross_attention.
l2_normalized_qk`). Without it the scale is 0.25 / sqrt(C/H). The tokens of scale s attend to
every token of the scales <= s: `cross_attention(..., causal_block_ends=ends)` with the scales'
cumulative token counts, whose kernel skips the key tiles of later scales (block-causal
attention over the scales, no L x L mask).

Generation (VAR's autoregressive_infer_cfg): the class and the unconditional class run as one
batch of 2B; scale by scale the transformer runs on that scale's p_s^2 rows only, its queries
attending to the cached keys and values of the earlier scales and to its own (the KV cache);
the logits are guided, l = (1 + t) l_cond - t l_uncond with t = cfg * (s - 1) / (S - 1) growing
linearly from 0 at the first scale to cfg at the last; top-k and top-p restrict them and one
token per position is drawn from their softmax; the tokens' residual h_s is added to f_hat and
f_hat downsampled to the next side, word-embedded, is the next scale's input. The decoded f_hat_S
is the image.

Parameter and buffer names are those of FoundationVision's `VAR` module, so their released
var_d16.pth ... var_d30.pth, converted to safetensors (`save_file(torch.load(pth))`), load as
they are: the three buffers the file also holds (`lvl_1L`, `attn_bias_for_masking` and each
block's `attn.zero_k_bias`) are constants derived from the config, checked against it and
dropped. Differences from their code: the class-dropout of training (cond_drop_rate) is the
caller's (pass label num_classes for the dropped samples); the head runs in the model's dtype
(theirs in float32), the logits come back in float32 or wider (float64 for a float64 model);
drop-path (VAR trains with rate 0.1 d / 24) and dropout are not implemented, being identities
at inference; the "more_smooth" Gumbel sampling of their visualizations is not offered.

`fastgen.accelerate` targets diffusers modules and fastgen's own: FoundationVision's `VAR`
module (their package, which is not installable as a dependency) is not one of its kinds. A
FoundationVision checkpoint runs through fastgen by loading it into this module
(`from_safetensors`; the state dict loads as it is), the supported path: every modulated
LayerNorm and both attentions (block-causal in training, cached in generation) are fastgen ops
already, and `accelerate(model, backend=...)` pins a backend on the forward, which generation
calls once per scale.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastgen.models import var_vqvae
from fastgen.models.common import example_resolution_fixed, gelu_tanh, load_safetensors, resolve_config
from fastgen.ops.ada_norm import ada_layer_norm
from fastgen.ops.cross_attention import cross_attention, l2_normalized_qk


@dataclasses.dataclass(frozen=True)
class VarConfig:
    """Field names follow FoundationVision's `VAR` constructor (depth, embed_dim, num_heads, ...);
    `vqvae` is the `var_vqvae` config (or its name) whose tokens the model predicts: it sets the
    vocabulary V, the code width Cvae and the patch_nums."""

    depth: int
    embed_dim: int
    num_heads: int
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    vqvae: Union[str, var_vqvae.VarVQVAEConfig] = "var-256"
    shared_aln: bool = False
    attn_l2_norm: bool = True
    norm_eps: float = 1e-6

    def __post_init__(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim must be divisible by num_heads; got {self.embed_dim} and {self.num_heads}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1; got {self.num_classes}")
        resolve_config(self.vqvae, var_vqvae.CONFIGS, var_vqvae.VarVQVAEConfig, "VAR VQVAE")

    @property
    def tokenizer(self) -> var_vqvae.VarVQVAEConfig:
        return resolve_config(self.vqvae, var_vqvae.CONFIGS, var_vqvae.VarVQVAEConfig, "VAR VQVAE")

    @property
    def patch_nums(self) -> tuple:
        return tuple(self.tokenizer.patch_nums)

    @property
    def num_tokens(self) -> int:
        """L, the tokens of all scales."""
        return sum(p * p for p in self.patch_nums)

    @property
    def scale_ends(self) -> List[int]:
        """The cumulative token counts: scale s's rows are [ends[s-1], ends[s]) of the sequence."""
        ends, total = [], 0
        for p in self.patch_nums:
            total += p * p
            ends.append(total)
        return ends


def _var_config(depth: int, **overrides) -> VarConfig:
    """FoundationVision's build_vae_var: width 64 d, d heads."""
    return VarConfig(depth=depth, embed_dim=64 * depth, num_heads=depth, **overrides)


CONFIGS = {
    # The released ImageNet 256 px models (var_d16.pth ... var_d30.pth): per-block AdaLN
    # (shared_aln=False, as their demo builds them; the published 2.0B of d30 counts per-block
    # AdaLN), attn_l2_norm.
    "var-d16": _var_config(16),
    "var-d20": _var_config(20),
    "var-d24": _var_config(24),
    "var-d30": _var_config(30),
    # On the tiny VQVAE: 64 codes of 16 channels, scales 1, 2, 3, 4, 6 (66 tokens).
    "tiny": _var_config(2, num_classes=10, vqvae="tiny"),
}

# The sampling recipe of VAR's published FID: cfg=1.5, top_p=0.96, top_k=900.
DEFAULT_CFG = 1.5
DEFAULT_TOP_K = 900
DEFAULT_TOP_P = 0.96
EXAMPLE_BATCH = 1


class LayerKVCache:
    """One block's keys and values of the scales decoded so far, (B, L_so_far, H, D) each."""

    def __init__(self):
        self.keys: Optional[torch.Tensor] = None
        self.values: Optional[torch.Tensor] = None

    @property
    def length(self) -> int:
        """The tokens cached so far."""
        return 0 if self.keys is None else self.keys.shape[1]

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Appends a scale's keys and values; returns all of them so far."""
        if self.keys is None:
            self.keys, self.values = k, v
        else:
            self.keys, self.values = torch.cat((self.keys, k), dim=1), torch.cat((self.values, v), dim=1)
        return self.keys, self.values


class SelfAttention(nn.Module):
    def __init__(self, config: VarConfig):
        super().__init__()
        width = config.embed_dim
        self.num_heads, self.head_dim = config.num_heads, width // config.num_heads
        self.attn_l2_norm = config.attn_l2_norm
        if self.attn_l2_norm:
            # VAR's (1, H, 1, 1) layout, initialised to log 4.
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, self.num_heads, 1, 1), math.log(4.0)))
        self.softmax_scale = 1.0 if self.attn_l2_norm else 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, ends: Optional[torch.Tensor] = None,
                cache: Optional[LayerKVCache] = None) -> torch.Tensor:
        """Block-causal attention over the full sequence (`ends`), or a scale's rows against the
        cache of the earlier scales plus their own (`cache`)."""
        batch, tokens, width = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        q, k, v = F.linear(x, self.mat_qkv.weight, bias).view(batch, tokens, 3, self.num_heads,
                                                               self.head_dim).unbind(2)
        if self.attn_l2_norm:
            q, k = l2_normalized_qk(q, k, self.scale_mul_1H11)
        if cache is None:
            out = cross_attention(q, k, v, scale=self.softmax_scale, causal_block_ends=ends)
        else:
            keys, values = cache.extend(k, v)
            out = cross_attention(q, keys, values, scale=self.softmax_scale)
        return self.proj(out.reshape(batch, tokens, width))


class FFN(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_tanh(self.fc1(x)))


def _silu_linear(in_features: int, out_features: int) -> nn.Sequential:
    """Linear(SiLU(cond)), as a Sequential so that the weights are named `<name>.1.*` as VAR's."""
    return nn.Sequential(nn.SiLU(), nn.Linear(in_features, out_features))


class AdaLNSelfAttn(nn.Module):
    def __init__(self, config: VarConfig):
        super().__init__()
        width = config.embed_dim
        self.eps = config.norm_eps
        self.attn = SelfAttention(config)
        self.ffn = FFN(width, round(width * config.mlp_ratio))
        if config.shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, width) / width ** 0.5)
        else:
            self.ada_lin = _silu_linear(width, 6 * width)

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        """(B, 6, C): gamma1, gamma2, scale1, scale2, shift1, shift2. `cond` is the class embedding
        (B, D), or with shared_aln the shared projection (B, 6, C)."""
        if hasattr(self, "ada_gss"):
            return self.ada_gss[0] + cond
        return self.ada_lin(cond).unflatten(-1, (6, -1))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, ends: Optional[torch.Tensor] = None,
                cache: Optional[LayerKVCache] = None) -> torch.Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.modulation(cond).unbind(1)
        x = x + self.attn(ada_layer_norm(x, scale1, shift1, self.eps), ends, cache) * gamma1[:, None]
        return x + self.ffn(ada_layer_norm(x, scale2, shift2, self.eps)) * gamma2[:, None]


class AdaLNBeforeHead(nn.Module):
    def __init__(self, config: VarConfig):
        super().__init__()
        self.eps = config.norm_eps
        self.ada_lin = _silu_linear(config.embed_dim, 2 * config.embed_dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).chunk(2, dim=-1)
        return ada_layer_norm(x, scale, shift, self.eps)


class VAR(nn.Module):
    def __init__(self, config: VarConfig):
        super().__init__()
        self.config = config
        width, tokenizer = config.embed_dim, config.tokenizer
        patch_nums = config.patch_nums
        # VAR's initialisation of the embeddings: truncated normal, std sqrt(1 / (3 C)).
        init_std = math.sqrt(1 / width / 3)
        self.word_embed = nn.Linear(tokenizer.z_channels, width)
        self.class_emb = nn.Embedding(config.num_classes + 1, width)
        self.pos_start = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, patch_nums[0] ** 2, width), std=init_std))
        self.pos_1LC = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, config.num_tokens, width), std=init_std))
        self.lvl_embed = nn.Embedding(len(patch_nums), width)
        if config.shared_aln:
            self.shared_ada_lin = _silu_linear(width, 6 * width)
        self.blocks = nn.ModuleList(AdaLNSelfAttn(config) for _ in range(config.depth))
        self.head_nm = AdaLNBeforeHead(config)
        self.head = nn.Linear(width, tokenizer.vocab_size)
        # The attention's causal_block_ends, one tensor for the model's life: the op reads the
        # values of a given tensor once (a device-to-host copy), not at every call.
        self.register_buffer("scale_block_ends", torch.tensor(config.scale_ends), persistent=False)

    def _check_labels(self, labels: torch.Tensor) -> None:
        classes = self.config.num_classes
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.ndim != 1:
            raise ValueError(f"labels must be a 1-D int64 tensor of class indices; got "
                             f"{labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__} "
                             f"{tuple(getattr(labels, 'shape', ()))}")
        if labels.numel() and (labels.min() < 0 or labels.max() > classes):
            raise ValueError(f"labels must lie in [0, {classes}] ({classes}: the unconditional class); got "
                             f"[{labels.min().item()}, {labels.max().item()}]")

    def level_position(self, begin: int, end: int) -> torch.Tensor:
        """lvl_embed[scale of the row] + pos_1LC[row] for the rows [begin, end), (1, end - begin, C)."""
        rows = torch.arange(begin, end, device=self.pos_1LC.device)
        scale_of_row = torch.bucketize(rows, self.scale_block_ends, right=True)
        return self.lvl_embed(scale_of_row)[None] + self.pos_1LC[:, begin:end]

    def start_tokens(self, cond: torch.Tensor) -> torch.Tensor:
        """The first scale's input (B, p_1^2, C): class embedding + pos_start + its level and position."""
        first = self.config.patch_nums[0] ** 2
        return cond[:, None] + self.pos_start + self.level_position(0, first)

    def block_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """What the blocks' AdaLN takes: the class embedding, or with shared_aln its shared
        projection (B, 6, C)."""
        if hasattr(self, "shared_ada_lin"):
            return self.shared_ada_lin(cond).unflatten(-1, (6, -1))
        return cond

    def logits(self, x: torch.Tensor, cond: torch.Tensor, ends: Optional[torch.Tensor] = None,
               caches: Optional[Sequence[LayerKVCache]] = None) -> torch.Tensor:
        """The blocks and the head on (B, n, C) rows: logits (B, n, V) in float32, or the model's
        dtype where it is wider (a float64 model keeps its precision to the end)."""
        block_cond = self.block_condition(cond)
        for index, block in enumerate(self.blocks):
            x = block(x, block_cond, ends, None if caches is None else caches[index])
        logits = self.head(self.head_nm(x, cond))
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def forward(self, labels: torch.Tensor, next_scale_inputs: Optional[torch.Tensor] = None,
                caches: Optional[Sequence[LayerKVCache]] = None) -> torch.Tensor:
        """Float32 logits of the tokens given the class `labels` (B,).

        Without `caches`, the training forward (teacher forcing): the logits (B, L, V) of every
        scale's tokens, `next_scale_inputs` (B, L - p_1^2, Cvae) being the VQVAE's
        `quantize.teacher_forcing_input` of the ground-truth token maps.

        With `caches` (`new_caches()`, one per block), one decoding step: the logits
        (B, p_s^2, V) of the next scale s, the one after those the caches hold, whose input
        `next_scale_inputs` is f_hat_{s-1} downsampled to p_s, (B, p_s^2, Cvae) (None for the
        first scale, whose input is the start token); the caches gain that scale's keys and values.
        Generation calls this, so a backend pinned on the model by fastgen.accelerate covers it."""
        self._check_labels(labels)
        config = self.config
        first, total = config.patch_nums[0] ** 2, config.num_tokens
        cond = self.class_emb(labels)
        if caches is not None:
            return self._decode_scale(cond, next_scale_inputs, caches)
        expected = (labels.shape[0], total - first, config.tokenizer.z_channels)
        if next_scale_inputs is None or next_scale_inputs.shape != expected:
            raise ValueError(f"next_scale_inputs must be (B, L - p_1^2, Cvae) = {expected}; "
                             f"got {None if next_scale_inputs is None else tuple(next_scale_inputs.shape)}")
        rest = self.word_embed(next_scale_inputs.to(cond.dtype)) + self.level_position(first, total)
        x = torch.cat((self.start_tokens(cond), rest), dim=1)
        return self.logits(x, cond, ends=self.scale_block_ends)

    def _decode_scale(self, cond: torch.Tensor, inputs: Optional[torch.Tensor],
                      caches: Sequence[LayerKVCache]) -> torch.Tensor:
        config = self.config
        if len(caches) != config.depth:
            raise ValueError(f"caches must hold one LayerKVCache per block ({config.depth}); got {len(caches)}")
        begin = caches[0].length
        if begin == config.num_tokens:
            raise ValueError(f"the caches hold all {len(config.patch_nums)} scales already: nothing left to decode")
        scale = config.scale_ends.index(begin) + 1 if begin else 0
        if scale == 0:
            if inputs is not None:
                raise ValueError("next_scale_inputs must be None for the first scale (its input is the start token)")
            return self.logits(self.start_tokens(cond), cond, caches=caches)
        end = config.scale_ends[scale]
        expected = (cond.shape[0], end - begin, config.tokenizer.z_channels)
        if inputs is None or inputs.shape != expected:
            raise ValueError(f"next_scale_inputs of scale {scale} must be (B, p_s^2, Cvae) = {expected}; "
                             f"got {None if inputs is None else tuple(inputs.shape)}")
        x = self.word_embed(inputs.to(cond.dtype)) + self.level_position(begin, end)
        return self.logits(x, cond, caches=caches)

    def new_caches(self) -> List[LayerKVCache]:
        return [LayerKVCache() for _ in self.blocks]


def build(name_or_config: Union[str, VarConfig]) -> VAR:
    """A randomly initialised model. Build under `with torch.device("meta"):` for structure only."""
    return VAR(resolve_config(name_or_config, CONFIGS, VarConfig, "VAR"))


def _derived_buffers(config: VarConfig) -> dict:
    """The constant buffers FoundationVision's VAR keeps in its state dict: each token's scale
    (1, L), the training forward's additive block-causal mask (1, 1, L, L), and each block's
    zero key bias."""
    ends = torch.tensor(config.scale_ends)
    scale_of_token = torch.bucketize(torch.arange(config.num_tokens), ends, right=True)
    mask = torch.where(scale_of_token[:, None] >= scale_of_token[None, :], 0.0, -math.inf)
    buffers = {"lvl_1L": scale_of_token[None], "attn_bias_for_masking": mask[None, None]}
    buffers.update({f"blocks.{i}.attn.zero_k_bias": torch.zeros(config.embed_dim) for i in range(config.depth)})
    return buffers


def from_safetensors(path: str, config: Union[str, VarConfig] = "var-d16",
                     device: Union[str, torch.device] = "cpu") -> VAR:
    """Load FoundationVision's VAR state dict (their key names) from a .safetensors file; the
    tensors keep the file's dtype. The derived buffers (lvl_1L, attn_bias_for_masking,
    blocks.*.attn.zero_k_bias) may be in the file: each must hold the value the config implies."""
    resolved = resolve_config(config, CONFIGS, VarConfig, "VAR")

    def without_derived_buffers(state: dict) -> dict:
        for key, expected in _derived_buffers(resolved).items():
            if key in state:
                value = state.pop(key)
                if value.shape != expected.shape or not torch.equal(value.cpu().to(expected.dtype), expected):
                    raise ValueError(f"{path}: {key} must be the constant {tuple(expected.shape)} the config implies "
                                     f"(patch_nums {resolved.patch_nums}, embed_dim {resolved.embed_dim}); "
                                     f"the file holds another {tuple(value.shape)} tensor")
        return state

    model = load_safetensors(path, lambda: build(resolved), device, without_derived_buffers)
    # Built on the meta device, the model holds its non-persistent block ends there still.
    model.scale_block_ends = torch.tensor(resolved.scale_ends, device=device)
    return model


# ---------------------------------------------------------------------------------------------
# Generation


def guidance_strength(cfg: float, scale: int, num_scales: int) -> float:
    """t_s = cfg * s / (S - 1) for the 0-based scale s of S: no guidance at the first scale, cfg
    at the last (VAR's linear ramp)."""
    return cfg * scale / (num_scales - 1) if num_scales > 1 else 0.0


def guided_logits(conditional: torch.Tensor, unconditional: torch.Tensor, strength: float) -> torch.Tensor:
    """(1 + t) l_cond - t l_uncond."""
    return (1 + strength) * conditional - strength * unconditional


def restrict_support(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """logits (..., V) with -inf outside the kept tokens, as VAR's sample_with_top_k_top_p_:
    top_k > 0 keeps the logits at least the k-th largest (ties kept; k >= V keeps all); then
    top_p > 0 drops, in ascending order of the (top-k restricted) probabilities, every token
    whose cumulative probability is at most 1 - top_p (the most likely token always stays)."""
    vocab = logits.shape[-1]
    if top_k > 0 and top_k < vocab:
        kth_largest = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, -math.inf)
    if top_p > 0:
        ascending, order = logits.sort(dim=-1)
        drop_sorted = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop_sorted[..., -1] = False
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), -math.inf)
    return logits


def sample_tokens(logits: torch.Tensor, top_k: int, top_p: float,
                  generator: Optional[torch.Generator]) -> torch.Tensor:
    """One token per row of (B, n, V) logits, drawn from softmax(restrict_support(logits)): (B, n) int64."""
    probabilities = restrict_support(logits.float(), top_k, top_p).softmax(dim=-1)
    drawn = torch.multinomial(probabilities.reshape(-1, logits.shape[-1]), 1, generator=generator)
    return drawn.view(logits.shape[:-1])


def _check_generation(var: VAR, vqvae: var_vqvae.VarVQVAE, cfg, top_k, top_p) -> None:
    tokenizer, paired = var.config.tokenizer, vqvae.config
    for field in ("vocab_size", "z_channels", "patch_nums"):
        if getattr(tokenizer, field) != getattr(paired, field):
            raise ValueError(f"vqvae must be the tokenizer the VAR predicts: its {field} is {getattr(paired, field)}, "
                             f"the VAR's {getattr(tokenizer, field)}")
    if isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or not math.isfinite(cfg):
        raise ValueError(f"cfg must be a finite number; got {cfg!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0: no top-k); got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 <= top_p <= 1:
        raise ValueError(f"top_p must be a number in [0, 1] (0: no top-p); got {top_p!r}")


@torch.no_grad()
def generate_tokens(var: VAR, vqvae: var_vqvae.VarVQVAE, labels: torch.Tensor, cfg: float = DEFAULT_CFG,
                    top_k: int = DEFAULT_TOP_K, top_p: float = DEFAULT_TOP_P,
                    seed: Optional[int] = None) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """(the token maps, one (B, p_s^2) int64 per scale; f_hat_S (B, Cvae, h, h)) of one image per
    class label (module docstring, "Generation"). `seed` seeds a torch.Generator on the model's
    device that draws every token (None: torch's global generator)."""
    var._check_labels(labels)
    _check_generation(var, vqvae, cfg, top_k, top_p)
    device = var.pos_1LC.device
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    config, quantizer = var.config, vqvae.quantize
    patch_nums, batch = config.patch_nums, labels.shape[0]
    labels = labels.to(device)
    both_labels = torch.cat((labels, torch.full_like(labels, config.num_classes)))
    caches, tokens, f_hat, next_input = var.new_caches(), [], 0, None
    for scale in range(len(patch_nums)):
        both = var(both_labels, next_input, caches=caches)
        logits = guided_logits(both[:batch], both[batch:], guidance_strength(cfg, scale, len(patch_nums)))
        idx = sample_tokens(logits, top_k, top_p, generator)
        tokens.append(idx)
        f_hat = f_hat + quantizer.scale_contribution(idx.reshape(-1), scale, batch)
        if scale + 1 < len(patch_nums):
            next_input = quantizer.to_scale(f_hat, scale + 1).flatten(2).transpose(1, 2)
            next_input = next_input.repeat(2, 1, 1)  # the class and the unconditional halves take the same input
    return tokens, f_hat


def generate(var: VAR, vqvae: var_vqvae.VarVQVAE, labels: torch.Tensor, cfg: float = DEFAULT_CFG,
             top_k: int = DEFAULT_TOP_K, top_p: float = DEFAULT_TOP_P, seed: Optional[int] = None) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1], one per class label (FoundationVision's
    autoregressive_infer_cfg returns (image + 1) / 2 in [0, 1]); the same seed gives the same tokens."""
    _, f_hat = generate_tokens(var, vqvae, labels, cfg=cfg, top_k=top_k, top_p=top_p, seed=seed)
    with torch.no_grad():
        return vqvae.decode(f_hat)


def example_resolution(model: VAR, resolution: Optional[int] = None) -> int:
    """The tokenizer's resolution (256 px for the released models), the only one VAR generates."""
    tokenizer = model.config.tokenizer
    return example_resolution_fixed(resolution, tokenizer.resolution, f"patch_nums end at {tokenizer.patch_nums[-1]}")


def example_step(model: VAR, batch: int = EXAMPLE_BATCH, resolution: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> Callable[[], torch.Tensor]:
    """One generation of `batch` images (all scales, CFG with VAR's FID recipe, decoded) with a
    randomly initialised VQVAE of the model's tokenizer config on the model's device and dtype;
    the labels are drawn once from `generator`. Returns the zero-argument call."""
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int; got {batch!r}")
    example_resolution(model, resolution)
    parameter = model.pos_1LC
    vqvae = var_vqvae.build(model.config.tokenizer).to(device=parameter.device, dtype=parameter.dtype).eval()
    labels = torch.randint(model.config.num_classes, (batch,), generator=generator).to(parameter.device)

    def step() -> torch.Tensor:
        return generate(model, vqvae, labels, seed=0)

    return step
