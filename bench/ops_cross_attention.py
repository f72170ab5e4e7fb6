"""Benchmarks of flash cross-attention (math in fastgen/ops/cross_attention.py) at the shapes of the text-to-image
models, against eager math attention, its torch.compile, and every backend of PyTorch's
scaled_dot_product_attention (flash, memory-efficient, cuDNN), xformers' memory_efficient_attention
and flash-attn's flash_attn_func as peers (the last two on unmasked cases, when installed).

Shapes (batch doubled by classifier-free guidance; q, k, v in the op's (B, L, H, D) layout,
k and v views of one fused to_kv projection as diffusers' fused processors give them):
- SD 1.5 at 512 px: latent 64x64; the four UNet levels attend from 4096, 1024, 256 and 64
  image tokens to the 77 CLIP tokens with 8 heads of 40, 80, 160 and 160. Batch 2 x 2.
- SDXL at 1024 px: latent 128x128, attention at 64x64 (10 heads) and 32x32 (20 heads), D 64.
- SANA at 1024 px: 32x32 latent tokens to 300 Gemma caption tokens padded with a key mask,
  16 heads of 72 (0.6B) and 20 heads of 112 (1.6B).
- Self-attention at SD 1.5's first level: Lq = Lkv = 4096, 8 heads of 40.
- MM-DiT joint self-attention over text and image tokens at 1024 px: FLUX.1-dev, 512 + 4096
  tokens, 24 heads of 128, batch 1 (guidance distilled: no CFG batch); SD3-medium, 333 + 4096
  tokens, 24 heads of 64, batch 2 (CFG).

- VAR's block-causal (scale-causal) self-attention in training at 256 px: the ten scales'
  token maps, 1^2 .. 16^2, 680 tokens, each scale seeing itself and the earlier ones
  (`causal_block_ends`), batch 16; VAR-d16 (16 heads of 64, width 1024) and VAR-d30 (30 heads
  of 64, width 1920). A benchmark of its own (also named cross_attention), as its peers differ:
  eager (the reference, which builds the dense mask), its torch.compile, SDPA with the dense
  boolean mask (PyTorch picks the backend: flash takes no mask), and FlexAttention with a block
  mask built once outside the timing (torch.compile'd, on CUDA: without a GPU flex_attention
  runs its unfused fallback, which materializes the scores as eager does, so it is skipped).

Work is FLOPs (bound "compute"): 4 B H Lq Lkv D for the forward (two matrix products); the
backward is counted as 2.5 times that (five products, as FlashAttention counts), so a
fwd+bwd call is 3.5 times the forward. Block-causal cases count only the (query, key) pairs
that attend, sum over blocks of the block's rows times its end, in place of Lq Lkv.
"""
from __future__ import annotations

import functools
import importlib
import itertools

import torch
import torch.nn.functional as F

from fastgen import BackendUnavailable
from fastgen.ops import cross_attention

from .harness import Case, Impl, compile_reference, op_benchmark

_SD15_LEVELS = ((4096, 40), (1024, 80), (256, 160), (64, 160))  # (image tokens, head dim)
_FWD_BWD_FACTOR = 1 + 2.5


def _case(label: str, batch: int, q_len: int, kv_len: int, heads: int, head_dim: int, dtype: torch.dtype,
          direction: str, caption_lengths=None) -> Case:
    def make_inputs(device, dtype, seed):
        generator = torch.Generator(device=device).manual_seed(seed)
        q = torch.randn(batch, q_len, heads, head_dim, generator=generator, device=device, dtype=dtype)
        if q_len == kv_len and caption_lengths is None:  # self-attention: one fused qkv projection
            qkv = torch.randn(batch, q_len, 3, heads, head_dim, generator=generator, device=device, dtype=dtype)
            q, k, v = qkv.unbind(2)
        else:
            kv = torch.randn(batch, kv_len, 2, heads, head_dim, generator=generator, device=device, dtype=dtype)
            k, v = kv.unbind(2)
        mask = None
        if caption_lengths is not None:
            mask = cross_attention.padding_mask(caption_lengths, kv_len, device)
        return {"q": q, "k": k, "v": v, "key_padding_mask": mask}

    flops = 4 * batch * heads * q_len * kv_len * head_dim
    if direction == "fwd+bwd":
        flops = int(flops * _FWD_BWD_FACTOR)
    masked = "" if caption_lengths is None else " masked"
    shape = f"{label} B{batch} Lq{q_len} Lkv{kv_len} H{heads}x{head_dim}{masked}"
    return Case(shape, dtype, direction, make_inputs, flops)


def _sana_lengths(batch: int) -> tuple:
    """Ragged caption lengths out of 300, as a batch of prompts padded to SANA's max length."""
    return tuple(300 - 37 * i for i in range(batch))


def _cases(quick: bool) -> list:
    directions = ("fwd", "fwd+bwd")
    dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16)
    sd15 = [("SD1.5", 4, q_len, 77, 8, head_dim, None) for q_len, head_dim in _SD15_LEVELS]
    sdxl = [("SDXL", 4, 4096, 77, 10, 64, None), ("SDXL", 4, 1024, 77, 20, 64, None)]
    sana = [("SANA-0.6B", 4, 1024, 300, 16, 72, _sana_lengths(4)), ("SANA-1.6B", 4, 1024, 300, 20, 112, _sana_lengths(4))]
    self_attention = [("SD1.5 self", 4, 4096, 4096, 8, 40, None)]
    joint = [("FLUX.1-dev joint", 1, 4608, 4608, 24, 128, None), ("SD3-medium joint", 2, 4429, 4429, 24, 64, None)]
    if quick:
        shapes = [sd15[0], sd15[2], sdxl[0], sana[0], self_attention[0], joint[0]]
    else:
        shapes = sd15 + sdxl + sana + self_attention + joint
    cases = [_case(label, b, lq, lkv, h, d, dtype, direction, lengths)
             for (label, b, lq, lkv, h, d, lengths), dtype, direction in itertools.product(shapes, dtypes, directions)]
    if not quick:  # float32 at the largest SD 1.5 level, for the TF32x3 path
        cases += [_case("SD1.5", 4, 4096, 77, 8, 40, torch.float32, d) for d in directions]
    return cases


def _sdpa(backend, q, k, v, key_padding_mask=None):
    """torch's scaled_dot_product_attention restricted to one backend, in the op's layout."""
    from torch.nn.attention import sdpa_kernel

    attn_mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    try:
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=attn_mask)
    except RuntimeError as exc:  # "No available kernel": this backend does not take these inputs
        raise BackendUnavailable(f"SDPA {backend.name} cannot run this case: {str(exc).splitlines()[0]}") from exc
    return out.transpose(1, 2)


def _sdpa_impls() -> dict:
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:  # torch < 2.3: no per-backend selection
        return {}
    backends = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
                "sdpa-cudnn": getattr(SDPBackend, "CUDNN_ATTENTION", None)}
    return {name: Impl(lambda case, backend=backend: functools.partial(_sdpa, backend))
            for name, backend in backends.items() if backend is not None}


def _library_peer(module: str, function: str, dtypes: tuple = ()) -> Impl:
    """A peer from another attention library, called in the op's (B, L, H, D) layout (which
    both xformers and flash-attn take). A row is skipped when the library is missing, for a
    dtype outside `dtypes` (empty: any), and on masked cases: those need the libraries'
    variable-length forms (packed sequences with cumulative lengths), which are not wired here."""

    def make(case: Case):
        if dtypes and case.dtype not in dtypes:
            raise BackendUnavailable(f"{module} takes {', '.join(str(d) for d in dtypes)} only")
        try:
            attend = getattr(importlib.import_module(module), function)
        except ImportError as exc:  # missing, or built against another torch
            raise BackendUnavailable(f"{module} cannot be imported: {str(exc).splitlines()[0]}") from exc

        def call(q, k, v, key_padding_mask=None):
            if key_padding_mask is not None:
                raise BackendUnavailable(f"the {module} peer runs unmasked cases only")
            return attend(q, k, v)

        return call

    return Impl(make)


_VAR_SCALES = tuple(p * p for p in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16))  # 680 tokens at 256 px
_VAR_MODELS = (("VAR-d16", 16), ("VAR-d30", 30))  # (model, heads of 64)


def _block_causal_case(label: str, batch: int, heads: int, head_dim: int, dtype: torch.dtype, direction: str,
                       block_sizes: tuple = _VAR_SCALES) -> Case:
    length = sum(block_sizes)

    def make_inputs(device, dtype, seed):
        generator = torch.Generator(device=device).manual_seed(seed)
        qkv = torch.randn(batch, length, 3, heads, head_dim, generator=generator, device=device, dtype=dtype)
        q, k, v = qkv.unbind(2)
        return {"q": q, "k": k, "v": v, "causal_block_ends": cross_attention.block_ends(block_sizes, device)}

    ends = itertools.accumulate(block_sizes)
    pairs = sum(size * end for size, end in zip(block_sizes, ends))
    flops = 4 * batch * heads * pairs * head_dim
    if direction == "fwd+bwd":
        flops = int(flops * _FWD_BWD_FACTOR)
    shape = f"{label} block-causal B{batch} L{length} ({len(block_sizes)} scales) H{heads}x{head_dim}"
    return Case(shape, dtype, direction, make_inputs, flops)


def _block_causal_cases(quick: bool) -> list:
    dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16)
    models = _VAR_MODELS[:1] if quick else _VAR_MODELS
    return [_block_causal_case(label, 16, heads, 64, dtype, direction)
            for (label, heads), dtype, direction in itertools.product(models, dtypes, ("fwd", "fwd+bwd"))]


def _sdpa_dense_mask(case: Case):
    """SDPA with the dense boolean mask, built at the first call (the untimed check) and kept:
    every input set of a case has the same ends."""
    masks = {}

    def call(q, k, v, causal_block_ends):
        if "mask" not in masks:
            masks["mask"] = cross_attention.block_causal_mask(causal_block_ends, q.shape[1])
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=masks["mask"])
        return out.transpose(1, 2)

    return call


def _flex_attention(case: Case):
    """torch.compile'd FlexAttention with the block mask of the ends (built at the first call,
    the untimed check, and kept)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as exc:  # torch < 2.5
        raise BackendUnavailable(f"FlexAttention cannot be imported: {str(exc).splitlines()[0]}") from exc
    compiled = compile_reference(flex_attention)
    block_masks = {}

    def call(q, k, v, causal_block_ends):
        if q.device.type != "cuda":
            raise BackendUnavailable("FlexAttention is timed on CUDA only: elsewhere flex_attention falls back to "
                                     "an unfused form that materializes the scores, as eager does")
        if "mask" not in block_masks:
            row_ends = cross_attention.block_causal_mask(causal_block_ends, q.shape[1]).sum(1)

            def sees(batch, head, row, key):
                return key < row_ends[row]

            length = q.shape[1]
            block_masks["mask"] = create_block_mask(sees, None, None, length, length, device=q.device)
        out = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_masks["mask"])
        return out.transpose(1, 2)

    return call


def benchmarks(quick: bool = False) -> list:
    peers = {
        **_sdpa_impls(),
        "xformers": _library_peer("xformers.ops", "memory_efficient_attention"),
        "flash-attn": _library_peer("flash_attn", "flash_attn_func", (torch.float16, torch.bfloat16)),
    }
    block_causal_peers = {"sdpa-dense-mask": Impl(_sdpa_dense_mask), "flex-attention": Impl(_flex_attention)}
    return [op_benchmark("cross_attention", _cases(quick), cross_attention.cross_attention,
                         cross_attention.cross_attention_reference, peers, bound="compute"),
            op_benchmark("cross_attention", _block_causal_cases(quick), cross_attention.cross_attention,
                         cross_attention.cross_attention_reference, block_causal_peers, bound="compute")]
