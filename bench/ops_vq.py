"""Benchmarks of codebook search and quantization (math in fastgen/ops/vq.py) at the tokenizers' shapes.

- VAR: vocab 4096 x 32 channels; one image's 10 scales (1,2,3,4,5,6,8,10,13,16)^2 give
  N = 680 tokens per image, searched as one batch here (N = B x 680).
- VQGAN: 16384 x 256 codes, a 16 x 16 latent per 256 px image (N = B x 256).
- l2-normalized (ViT-VQGAN / LlamaGen style): 16384 x 8 unit codes, cosine metric,
  N = B x 256.
B runs over 1, 4, 16, 64; fp32 (VAR's quantizer runs in fp32) and bf16.

Impls: `eager` is the op's reference, VAR's way (distance matrix by addmm_, then argmin; the
normalized matmul and argmax for cosine), `compile` its torch.compile; peers `cdist`
(torch.cdist + argmin; for cosine, cdist of the normalized vectors) and `faiss` (exact GPU
k-NN, only if faiss is importable); then each backend the op registers, as the default fast
path (`triton`, `cuda`) and with exact=True (`triton-exact`, `cuda-exact`). Triton's exact
rows ask for input_precision="tf32" (what an fp32 user would run for speed without giving up
the exact answer; the precision option does not apply to bf16).

What is checked and timed: vq_nearest's benchmarked call returns the distance of the chosen
code (the harness compares floating outputs under a tolerance; a legitimate near-tie pick
has the same distance up to rounding, while a wrong code has a far larger one). vq_quantize
returns z_q + loss so that fwd+bwd drives both the straight-through and the loss gradients.
Work is the FLOP count 2 N K D of the cross term, the part that scales.
"""
from __future__ import annotations

import functools
import itertools

import torch
import torch.nn.functional as F

from fastgen.ops import vq

from .harness import Case, Impl, op_backends, op_benchmark

_VAR_TOKENS = sum(side * side for side in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16))  # 680
# (label, tokens per image, K, D, metric)
_TOKENIZERS = (
    ("VAR", _VAR_TOKENS, 4096, 32, "l2"),
    ("VQGAN", 256, 16384, 256, "l2"),
    ("l2-normalized", 256, 16384, 8, "cosine"),
)
_BATCHES = (1, 4, 16, 64)
_BETA = 0.25


def _nearest_distance(z, codebook, metric, **options):
    return vq.vq_nearest(z, codebook, metric, return_distance=True, **options)[1]


def _eager_nearest(z, codebook, metric):
    return vq.vq_nearest_reference(z, codebook, metric)[1]


def _cdist_nearest(z, codebook, metric):
    z, codebook = z.float(), codebook.float()
    if metric == "cosine":
        z, codebook = F.normalize(z, dim=1), F.normalize(codebook, dim=1)
    squared = torch.cdist(z, codebook).min(1).values.square()
    return 1 - squared / 2 if metric == "cosine" else squared


def _faiss_nearest():
    import faiss  # noqa: F401  (ModuleNotFoundError: the harness reports a skipped row)
    import faiss.contrib.torch_utils  # noqa: F401  (lets faiss take torch tensors)

    resources = faiss.StandardGpuResources()

    def search(z, codebook, metric):
        z, codebook = z.float(), codebook.float()
        if metric == "cosine":
            z, codebook = F.normalize(z, dim=1), F.normalize(codebook, dim=1)
        kind = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
        distances, _ = faiss.knn_gpu(resources, z, codebook, 1, metric=kind)
        return distances[:, 0]

    return search


def _quantize_output(z, codebook, beta, **options):
    z_q, _, loss, _ = vq.vq_quantize(z, codebook, beta, **options)
    return z_q + loss


def _eager_quantize(z, codebook, beta):
    z_q, _, loss, _ = vq.vq_quantize_reference(z, codebook, beta)
    return z_q + loss


# Triton's exact rows score fp32 inputs on tf32 tensor cores, as a user after speed would (plain
# fp32 scores run at a third of the rate); the CUDA kernel's scores are fp32 FMAs either way.
_EXACT_OPTIONS = {"triton": {"input_precision": "tf32"}}


def _exact_impls(op_name: str, op_call) -> dict:
    """`op_call` with exact=True under each backend the op registers."""
    impls = {}
    for backend in op_backends(op_name):
        exact_call = functools.partial(op_call, exact=True, **_EXACT_OPTIONS.get(backend, {}))
        impls[f"{backend}-exact"] = Impl(lambda case, call=exact_call: call, backend=backend)
    return impls


def _case(tokenizer, batch: int, dtype: torch.dtype, direction: str, quantize: bool) -> Case:
    label, tokens, codes, dim, metric = tokenizer
    rows = batch * tokens

    def make_inputs(device, dtype, seed):
        generator = torch.Generator(device=device).manual_seed(seed)
        z = torch.randn(rows, dim, generator=generator, device=device)
        codebook = torch.randn(codes, dim, generator=generator, device=device)
        if metric == "cosine":
            codebook = F.normalize(codebook, dim=1)
        inputs = {"z": z.to(dtype), "codebook": codebook.to(dtype)}
        inputs.update({"beta": _BETA} if quantize else {"metric": metric})
        return inputs

    shape = f"{label} B{batch} N{rows} K{codes} D{dim}" + (" cosine" if metric == "cosine" else "")
    return Case(shape, dtype, direction, make_inputs, 2 * rows * codes * dim)


def _grid(quick: bool):
    if quick:
        return [(t, b, torch.float32) for t in _TOKENIZERS for b in (1, 64)]
    return [(t, b, dtype) for t, b, dtype in itertools.product(_TOKENIZERS, _BATCHES, (torch.float32, torch.bfloat16))]


def benchmarks(quick: bool = False) -> list:
    grid = _grid(quick)
    nearest = op_benchmark(
        "vq_nearest",
        [_case(t, b, dtype, "fwd", quantize=False) for t, b, dtype in grid],
        _nearest_distance,
        _eager_nearest,
        {
            "cdist": Impl(lambda case: _cdist_nearest),
            "faiss": Impl(lambda case: _faiss_nearest()),
            **_exact_impls("vq_nearest", _nearest_distance),
        },
        bound="compute",
    )
    quantize = op_benchmark(
        "vq_quantize",
        [_case(t, b, dtype, direction, quantize=True)
         for (t, b, dtype), direction in itertools.product(grid, ("fwd", "fwd+bwd")) if t[4] == "l2"],
        _quantize_output,
        _eager_quantize,
        _exact_impls("vq_quantize", _quantize_output),
        bound="compute",
    )
    return [nearest, quantize]
