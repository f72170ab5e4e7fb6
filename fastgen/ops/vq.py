"""Codebook nearest-neighbour search and vector quantization (VQ-VAE, VQGAN, VAR's VQVAE).

`vq_nearest(z, codebook, metric="l2", return_distance=False, exact=False, input_precision="ieee")`
For rows z_n of z (N, D) and codes e_k of codebook (K, D):

    l2:      idx[n] = argmin_k ||z_n||^2 + ||e_k||^2 - 2 z_n . e_k       (= ||z_n - e_k||^2)
    cosine:  idx[n] = argmax_k z_n . e_k / max(||e_k||, 1e-12)

ties going to the lowest k (as torch.argmin / argmax). With return_distance the op also
gives, per row, the l2 distance ||z||^2 + ||e||^2 - 2 z.e of the chosen code or the cosine
similarity z.e / (max(||z||, eps) max(||e||, eps)), in float32 (float64 for float64 inputs).
The l2 distance in the expanded form can come out slightly negative for a near-exact match,
as the eager formulation's does. Neither output has a gradient.

`vq_quantize(z, codebook, beta=0.25, exact=False, input_precision="ieee")` ->
(z_q, idx, loss, counts), the VQ-VAE bottleneck with the l2 search above and e = codebook[idx]:

    z_q    = z + (e - z).detach()        value e (NaN where z is NaN or +-inf, as z + (e - z)
                                         is), gradient straight through to z
    loss   = mean((z.detach() - e)^2) + beta * mean((z - e.detach())^2)
             (codebook loss + commitment loss; both means over all N*D elements)
    counts = bincount(idx, minlength=K)  (int64 code usage)

so that, for upstream gradients g (of z_q) and gl (of loss):
    dz = g + gl * beta * 2 (z - e) / (N D)
    dcodebook[k] = gl * sum_{n: idx[n] = k} 2 (e_k - z_n) / (N D)
The loss is float32 (float64 for float64 inputs), z_q has z's dtype.

Precision. The eager reference (ground truth and benchmark baseline) is VAR's formulation:
the N x K distance matrix by `addmm_` and `argmin` (normalized matmul and `argmax` for
cosine), in float32 (float64 for float64 inputs). The Triton kernels never form that
matrix: they stream codebook tiles with a running best per row (kernels/vq.py). Their
scores are float32 from tensor-core dot products: fp16/bf16 operands as given (exact
products, float32 accumulation), fp32 operands with `input_precision` "ieee" (plain fp32),
"tf32" (operands rounded to 10 mantissa bits: fast, but about 1e-3 relative error) or
"tf32x3" (three tf32 products, about fp32 accuracy); the option only matters for fp32.
Without `exact`, the result can differ from the reference only between codes whose
distances differ by less than the fast scores' error (for fp16/bf16/ieee about D * 2^-24 *
(||e||^2 + 2 ||z|| ||e||), for tf32 about 2^-9 ||z|| ||e||). The CUDA kernels (csrc/vq.cu)
stream the codebook the same way with fp32 FMAs (SIMT, not tensor cores) on operands widened
to fp32: every input_precision runs as "ieee" there, which is at least as accurate as asked.

`exact=True` guarantees: the returned index minimizes the distance evaluated in float64 from
the input values in the direct form, sum_d (z_d - e_kd)^2 for l2 and
-(z . e_k) / max(||e_k||, eps) for cosine, with ties (equal float64 values) to the lowest
index. Ties come from duplicated codes, and from codes so much shorter than z that every
z_d - e_kd rounds to z_d in float64 (subnormal float32 or bfloat16 codes next to a normal z):
all of them score the same and the lowest index wins, as in the float64 reference, though
their exact distances differ (by ~1e-38 in ~30 for subnormal codes). That is the exact
answer up to float64 rounding (relative (D + 2) 2^-53) and, unlike any expanded-form
evaluation, also right for codes much closer to z than z's norm. It costs one more pass over
the codebook: every code whose fast score is within twice a rigorous error bound of the fast
best is a candidate, and candidates other than the fast winner are rescored in float64. The
bound assumes float32 accumulation with at most twice round-to-nearest's error (which covers
tensor cores), lets each float32 operation lose float32's smallest normal to underflow
(gradual or flushed to zero), and adds the float64 rounding, so that every code whose float64
distance can tie or beat the winner's is a candidate. Distances returned in exact mode are the
float64 direct-form values rounded to float32. The rescoring costs in proportion to the
number of near-tie candidates: negligible on real codebooks, up to a float64 brute-force
search for a codebook of identical codes, or of codes so short (norm below about 1e-18)
that their float32 squared norms underflow.

NaN and Inf propagate as in the eager reference, whose argmin (argmax for cosine) takes the
first NaN before any number. So a code whose distance is NaN is chosen first, with a NaN
distance, in exact mode too: a code holding NaN; a code holding inf, for the rows where the
expanded l2 form gives inf - inf (under cosine for every row: the normalized code is NaN);
any code for a z row holding NaN. z_q is NaN wherever z is NaN or infinite, as the
reference's z + (e - z) is. A distance that overflows to inf (a code near 1e19, whose
float32 squared norm overflows) never beats a finite one, and ties of inf go to the lowest
index; exact mode instead rescores such codes in float64, and for l2 their infinite squared
norm makes its error bound infinite, so it then rescores the whole codebook. For a z row
holding inf, or so large that its float32 squared norm overflows, the index is a code in
[0, K) that may differ from the reference's.

Inputs: z and codebook of the same floating dtype and device, any strides (read in place),
1 <= K < 2^31 (the kernels carry code indices as int32), 1 <= D <= 512. The usage counts are
exact; the loss is summed in a fixed order (bitwise reproducible); the codebook gradient's
sums over rows sharing a code use `index_add_`, which on CUDA is order-dependent in the last
bits unless `torch.use_deterministic_algorithms(True)` is set.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from fastgen import _cuda
from fastgen.ops.registry import (CheckCase, Op, check_float_tensor, check_number, check_same_dtype_and_device,
                                  define_custom_op, random_tensor, register, register_autograd, with_the_math)

MAX_DIM = 512
MAX_CODES = 2**31 - 1
METRICS = ("l2", "cosine")
INPUT_PRECISIONS = ("ieee", "tf32", "tf32x3")


def _check_inputs(op_name: str, z, codebook, metric: str, exact: bool, input_precision: str) -> None:
    for name, tensor, layout in (("z", z, "(N, D)"), ("codebook", codebook, "(K, D)")):
        check_float_tensor(op_name, name, tensor)
        if tensor.dim() != 2:
            raise ValueError(f"{op_name}: {name} must be 2-D {layout}, got shape {tuple(tensor.shape)}")
    check_same_dtype_and_device(op_name, "codebook", codebook, z, "z")
    if codebook.shape[1] != z.shape[1]:
        raise ValueError(f"{op_name}: codebook dim D={codebook.shape[1]} must match z's D={z.shape[1]}")
    if codebook.shape[0] == 0:
        raise ValueError(f"{op_name}: codebook is empty (K=0); it needs at least one code")
    if codebook.shape[0] > MAX_CODES:
        raise ValueError(f"{op_name}: codebook has K={codebook.shape[0]} codes, at most {MAX_CODES} "
                         f"(2^31 - 1) are supported")
    if not 1 <= z.shape[1] <= MAX_DIM:
        raise ValueError(f"{op_name}: D must be between 1 and {MAX_DIM}, got {z.shape[1]}")
    if metric not in METRICS:
        raise ValueError(f"{op_name}: metric must be 'l2' or 'cosine', got {metric!r}")
    if not isinstance(exact, bool):
        raise TypeError(f"{op_name}: exact must be a bool, got {type(exact).__name__}")
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"{op_name}: input_precision must be one of {', '.join(INPUT_PRECISIONS)}, "
                         f"got {input_precision!r}")


def _statistic_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _allocate_nearest(z, codebook, metric="l2", exact=False, input_precision="ieee"):
    _check_inputs("vq_nearest", z, codebook, metric, exact, input_precision)
    n = z.shape[0]
    return (torch.empty(n, dtype=torch.int64, device=z.device),
            torch.empty(n, dtype=_statistic_dtype(z.dtype), device=z.device))


def _check_quantize_inputs(z, codebook, beta, exact, input_precision) -> None:
    _check_inputs("vq_quantize", z, codebook, "l2", exact, input_precision)
    check_number("vq_quantize", "beta", beta)


def _allocate_quantize(z, codebook, beta=0.25, exact=False, input_precision="ieee"):
    _check_quantize_inputs(z, codebook, beta, exact, input_precision)
    return (torch.empty(z.shape, dtype=z.dtype, device=z.device),
            torch.empty(z.shape[0], dtype=torch.int64, device=z.device),
            torch.empty((), dtype=_statistic_dtype(z.dtype), device=z.device),
            torch.empty(codebook.shape[0], dtype=torch.int64, device=z.device))


def vq_nearest_reference(z, codebook, metric="l2", exact=False, input_precision="ieee"):
    """VAR's eager search (the whole distance matrix, then argmin) in float32 or wider. With
    exact=True, the search exact mode promises (module docstring): the direct form evaluated
    elementwise, so that identical codes score identically, in float64 for float64 inputs.
    input_precision does not apply (these are plain computations at the compute dtype)."""
    _check_inputs("vq_nearest", z, codebook, metric, exact, input_precision)
    compute = _statistic_dtype(z.dtype)
    z_, e_ = z.detach().to(compute), codebook.detach().to(compute)
    if exact:
        return _direct_form_search(z_, e_, metric)
    if metric == "l2":
        scores = z_.square().sum(1, keepdim=True) + e_.square().sum(1)
        scores.addmm_(z_, e_.T, alpha=-2, beta=1)
        idx = scores.argmin(1)
    else:
        scores = F.normalize(z_, dim=1) @ F.normalize(e_, dim=1).T
        idx = scores.argmax(1)
    return idx, scores.gather(1, idx[:, None]).squeeze(1)


# The eps of the cosine direct form's max(||e||, eps) (module docstring), F.normalize's default;
# the kernels take the same value (kernels/vq.py, COSINE_EPS), and a test holds the two equal.
COSINE_EPS = 1e-12
# Elements of the (rows, K) scores per chunk of the direct-form search, whatever the codebook's
# size.
_DIRECT_FORM_ELEMENTS = 1 << 22


def _direct_form_search(z, codebook, metric):
    """(index, distance) of exact mode's contract: the l2 distance sum_d (z_d - e_kd)^2, or the
    cosine similarity (z . e_k) / max(||e_k||, eps) / ||z||, each summed over d in order, one
    rounding per term for every code alike (neither a matrix product, whose blocking can round
    identical codes differently, nor a vectorized sum, whose order follows each code's memory
    alignment), best first and ties to the lowest index."""
    rows = max(1, _DIRECT_FORM_ELEMENTS // max(1, codebook.shape[0]))
    indices, distances = [], []
    for chunk in z.split(rows):
        sums = chunk.new_zeros(len(chunk), codebook.shape[0])
        for d in range(chunk.shape[1]):
            if metric == "l2":
                sums += (chunk[:, d, None] - codebook[None, :, d]).square()
            else:
                sums += chunk[:, d, None] * codebook[None, :, d]
        if metric == "l2":
            # The NaN of the expanded form (inf - inf, for a code holding inf) picks the code
            # first, in exact mode too (module docstring); no rounding decides whether it occurs.
            expanded = chunk.square().sum(1, keepdim=True) + codebook.square().sum(1) - 2 * chunk @ codebook.T
            scores = sums.masked_fill(expanded.isnan(), float("nan"))
            best = scores.argmin(1) if scores.shape[1] else torch.zeros(len(chunk), dtype=torch.int64)
        else:
            similarity = sums / codebook.norm(dim=1).clamp_min(COSINE_EPS)
            scores = similarity / chunk.norm(dim=1, keepdim=True).clamp_min(COSINE_EPS)
            best = scores.argmax(1) if scores.shape[1] else torch.zeros(len(chunk), dtype=torch.int64)
        indices.append(best)
        distances.append(scores.gather(1, best[:, None]).squeeze(1))
    if not indices:
        return (torch.empty(0, dtype=torch.int64, device=z.device), torch.empty(0, dtype=z.dtype, device=z.device))
    return torch.cat(indices), torch.cat(distances)


def vq_quantize_reference(z, codebook, beta=0.25, exact=False, input_precision="ieee"):
    """The VQ-VAE bottleneck as written in VQ-VAE / VQGAN / VAR code, differentiable by autograd."""
    _check_quantize_inputs(z, codebook, beta, exact, input_precision)
    idx, _ = vq_nearest_reference(z, codebook, "l2", exact, input_precision)
    compute = _statistic_dtype(z.dtype)
    z_, e = z.to(compute), codebook.to(compute)[idx]
    z_q = (z_ + (e - z_).detach()).to(z.dtype)
    loss = F.mse_loss(z_.detach(), e) + beta * F.mse_loss(z_, e.detach())
    return z_q, idx, loss, torch.bincount(idx, minlength=codebook.shape[0])


def _check_case(label, rows, codes, dim, layout, *extra):
    """exact=True: without it a legitimate near-tie pick could differ from the reference."""
    def make_args(device, dtype, generator):
        z = random_tensor((rows, dim), layout, device, dtype, generator)
        codebook = random_tensor((codes, dim), "contiguous", device, dtype, generator)
        return (z, codebook, *extra, True, "ieee")

    return CheckCase(label, make_args)


def _nearest_cases():
    return [
        _check_case("VAR-like l2 D32 K300", 37, 300, 32, "contiguous", "l2"),
        _check_case("cosine D8 K70 sliced z", 21, 70, 8, "sliced", "cosine"),
        _check_case("l2 D40 K129", 9, 129, 40, "sliced", "l2"),
    ]


def _quantize_cases():
    return [
        _check_case("D32 K300 beta 0.25", 37, 300, 32, "contiguous", 0.25),
        _check_case("D8 K70 sliced z beta 1", 21, 70, 8, "sliced", 1.0),
    ]


VQ_NEAREST = register(Op(name="vq_nearest", reference=vq_nearest_reference, allocate_output=_allocate_nearest,
                         check_cases=_nearest_cases, differentiable=False))
VQ_QUANTIZE = register(Op(name="vq_quantize", reference=vq_quantize_reference, allocate_output=_allocate_quantize,
                          check_cases=_quantize_cases))


VQ_NEAREST.implement_at("triton", "fastgen.kernels.vq:vq_nearest")
VQ_QUANTIZE.implement_at("triton", "fastgen.kernels.vq:vq_quantize")


# input_precision does not reach the CUDA kernels: they always compute plain fp32 (module docstring).
def _cuda_search_args(z, codebook) -> dict:
    """The arguments the extension's searches start with: z, codebook and the workspaces, the
    codebook norms (K, then the max squared norm) and one packed (score, index) per row."""
    code_norms = torch.empty(codebook.shape[0] + 1, dtype=torch.float32, device=z.device)
    packed = torch.empty(z.shape[0], dtype=torch.int64, device=z.device)
    return dict(z=z, codebook=codebook, code_norms=code_norms, packed=packed)


@VQ_NEAREST.implement("cuda")
def _nearest_cuda(z, codebook, metric, exact, input_precision, *, out):
    idx, distance = out
    _cuda.launch("vq_nearest", **_cuda_search_args(z, codebook), idx=idx, distance=distance, cosine=metric == "cosine",
                 exact=exact)


@VQ_QUANTIZE.implement("cuda")
def _quantize_cuda(z, codebook, beta, exact, input_precision, *, out):
    z_q, idx, loss, counts = out
    counts.zero_()
    row_errors = torch.empty(z.shape[0], dtype=torch.float32, device=z.device)
    _cuda.launch("vq_quantize", **_cuda_search_args(z, codebook), z_q=z_q, idx=idx, row_errors=row_errors,
                 counts=counts, exact=exact)
    # (1 + beta) mean((z - e)^2) from the rows' sums (torch's sum: a fixed order); an empty z
    # gives 0/0 = NaN, as torch's mean does.
    torch.div(row_errors.sum() * (1.0 + beta), z.numel(), out=loss)


@define_custom_op(VQ_NEAREST)
def _vq_nearest_op(
    z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2", exact: bool = False, input_precision: str = "ieee"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, distance) of the nearest code per row."""


@define_custom_op(VQ_QUANTIZE)
def _vq_quantize_op(
    z: torch.Tensor, codebook: torch.Tensor, beta: float = 0.25, exact: bool = False, input_precision: str = "ieee"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z_q, idx, loss, counts)."""


# The public functions check first so that a non-tensor argument gets this module's TypeError
# rather than the dispatcher's schema error.
@with_the_math
def vq_nearest(z, codebook, metric="l2", return_distance=False, exact=False, input_precision="ieee"):
    """idx (N,) int64, or (idx, distance) with return_distance; see the module docstring."""
    _check_inputs("vq_nearest", z, codebook, metric, exact, input_precision)
    idx, distance = _vq_nearest_op(z, codebook, metric, exact, input_precision)
    return (idx, distance) if return_distance else idx


@with_the_math
def vq_quantize(z, codebook, beta=0.25, exact=False, input_precision="ieee"):
    """(z_q, idx, loss, counts); see the module docstring."""
    _check_quantize_inputs(z, codebook, beta, exact, input_precision)
    return _vq_quantize_op(z, codebook, beta, exact, input_precision)


def _quantize_setup_context(ctx, inputs, output):
    z, codebook, beta, _, _ = inputs
    ctx.save_for_backward(z, codebook, output[1])
    ctx.beta = beta


def _quantize_backward(ctx, grad_zq, _grad_idx, grad_loss, _grad_counts):
    """Eager math on the saved indices (a gather and an index_add_): cheap next to the search."""
    z, codebook, idx = ctx.saved_tensors
    compute = _statistic_dtype(z.dtype)
    n, d = z.shape
    residual = z.to(compute) - codebook.to(compute)[idx]  # z - e
    scale = 2.0 * grad_loss.to(compute) / (n * d)
    grad_z = grad_codebook = None
    if ctx.needs_input_grad[0]:
        # Unused outputs' gradients arrive as zeros (custom ops materialize them).
        grad_z = (grad_zq.to(compute) + (ctx.beta * scale) * residual).to(z.dtype)
    if ctx.needs_input_grad[1]:
        grad_codebook = torch.zeros(codebook.shape, dtype=compute, device=codebook.device)
        grad_codebook.index_add_(0, idx, residual * -scale)
        grad_codebook = grad_codebook.to(codebook.dtype)
    return grad_z, grad_codebook, None, None, None


register_autograd(_vq_quantize_op, _quantize_backward, _quantize_setup_context)
