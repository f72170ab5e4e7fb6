"""Every op, fast backend, dtype and direction on fuzz inputs (tests/fuzz_inputs.py) against the
float64 reference, the way `fastgen check` compares them: NaN-poisoned outputs, the dtype's
tolerance widened to twice the same-dtype reference's own error, gradients through the custom
op's autograd with the backend forced (and, where an op's docstring says so, TERM_SIZES: outputs
or gradients under the tolerance of the sizes of the terms that sum to them).

Non-finite values are compared by position: an output has NaN exactly where the float64
reference has NaN, and the reference's infinities (once rounded to the output's dtype, where a
finite float64 value can overflow) with their signs, unless the tolerance reaches across the
dtype's overflow threshold; the other elements pass under the usual tolerance. Integer outputs
(code indices, usage counts) equal the reference's, except where an op promises less
(CODE_INDEX_OUTPUT).

Run with `pytest -m fuzz`; FASTGEN_FUZZ picks the hypothesis profile (tests/conftest.py): "ci"
(the default, a few cases per test) or "deep" (10,000 per op and backend, divided among its
dtype and direction tests). Cases are fresh every run:
hypothesis prints the minimal failing `Recipe` and the blob that replays it.
"""
import functools
import math
import os
from dataclasses import dataclass
from typing import Callable, Optional
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import DEVICES_AND_BACKENDS
from fastgen import check
from fastgen.check import mismatch
from fastgen.ops import registry
from fastgen.ops.registry import KERNEL_DTYPES, OPS
from fastgen.ops.ada_norm import ada_group_norm_reference, ada_layer_norm_reference, gated_residual
from fastgen.ops.cross_attention import _probabilities as cross_attention_probabilities, effective_scale
from fastgen.ops.filtered_lrelu import (CODE_CLAMPED, FILTERED_LRELU_WITH_CODES,
                                       activation_and_codes, filtered_lrelu_backward_reference,
                                       filtered_lrelu_real_samples, intermediate_size, normalized_padding, pack_codes,
                                       real_samples_pre_activation, sample_codes, unpack_codes)
from fastgen.ops.upfirdn2d import filter_size, upfirdn2d_real_samples, upfirdn2d_reference
from fuzz_inputs import INPUT_CLASSES, argument_names, fuzz_inputs
from session_report import FUZZ_CASES_PASSED

PROFILE = os.environ.get("FASTGEN_FUZZ", "ci")


@dataclass(frozen=True)
class KnownDefect:
    """An input class that hits a defect not fixed yet, left out of the draw of these backends,
    directions and dtypes of the op (except under the "deep" profile, which draws everything)
    until the fix lands. `arguments` narrows it to those arguments; () means all of them."""

    op: str
    backends: tuple
    input_class: str
    defect: str
    arguments: tuple = ()
    directions: tuple = ("fwd", "bwd")
    dtypes: tuple = KERNEL_DTYPES


TRITON_AND_CUDA = ("triton", "cuda")
# None at present: each entry is removed with the fix that makes its class pass.
CI_EXCLUSIONS = ()

# Inputs on which an op promises less than the reference's answer, and the output that holds
# what it does promise: code indices in [0, K). fastgen/ops/vq.py: "For a z row holding inf, or
# so large that its float32 squared norm overflows, the index is a code in [0, K) that may
# differ from the reference's."
CODE_INDEX_OUTPUT = {"vq_nearest": 0, "vq_quantize": 1}


@dataclass(frozen=True)
class StatedContract:
    """An input class on which an op's docstring states its answer by the op's own formula, not
    by the eager reference's arithmetic, and how the test holds the op to it: against `oracle`
    (a float64-capable function evaluating that formula, with a backward) in place of the
    reference, and/or by how non-finite outputs compare (`non_finite`, a mode of
    non_finite_aware_mismatch), on `backends` (all when empty)."""

    op: str
    input_class: str
    arguments: tuple
    oracle: Optional[Callable] = None
    non_finite: str = "same"
    backends: tuple = ()


STATED_CONTRACTS = (
    # fastgen/ops/upfirdn2d.py, "Non-finite values": a tap multiplies only pixels of x, never a
    # zero that upsampling inserts or padding adds.
    *(StatedContract("upfirdn2d", value_class, ("f",), oracle=upfirdn2d_real_samples)
      for value_class in ("nan", "inf")),
    # fastgen/ops/ada_norm.py, "Non-finite values": an infinite modulation or weight makes
    # non-finite exactly the outputs and gradients it reaches; whether one is NaN or an infinity
    # follows the docstring's formulas, not torch's group_norm / layer_norm internals.
    StatedContract("ada_group_norm", "inf", ("scale", "weight"), non_finite="either"),
    StatedContract("ada_layer_norm", "inf", ("scale",), non_finite="either"),
    StatedContract("gated_residual_ada_layer_norm", "inf", ("scale",), non_finite="either"),
    # fastgen/ops/filtered_lrelu.py: a tap multiplies only samples of the signal it filters; the
    # CUDA kernel gives exactly that, the Triton kernel's banded products make a whole tile of y
    # or dx NaN around a non-finite value (a finite value where the contract has none: never).
    # An infinite tap meets sums whose rounding makes them 0 (NaN) or not (an infinity): the CUDA
    # kernel is non-finite exactly where the contract is, NaN and infinities alike.
    StatedContract("filtered_lrelu", "inf", ("fu", "fd"), oracle=filtered_lrelu_real_samples, non_finite="either",
                   backends=("cuda",)),
    *(StatedContract("filtered_lrelu", value_class, ("x", "fu", "fd", "b"), oracle=filtered_lrelu_real_samples,
                     backends=("cuda",)) for value_class in ("nan", "inf")),
    *(StatedContract("filtered_lrelu", value_class, ("x", "fu", "fd", "b"), oracle=filtered_lrelu_real_samples,
                     non_finite="at least", backends=("triton",)) for value_class in ("nan", "inf")),
)


def _float64(args: tuple) -> tuple:
    return tuple(a.detach().cpu().double() if isinstance(a, torch.Tensor) else a for a in args)


def ada_group_norm_gradient_terms(args: tuple, output_grads: Callable, expected: dict) -> dict:
    """dx = rstd (u dz - mean_group(u A) - xhat mean_group(u Bc)), dscale = weight Bc + bias A,
    dshift = A, dweight and dbias sums over the batch of (1 + scale) Bc and (1 + scale) A: their
    terms' sizes, in float64 (fastgen/ops/ada_norm.py, "Precision of the gradients"). Keys for
    weight and bias also where they are None (the gradients they would get)."""
    x, scale, shift, num_groups, weight, bias, eps, act = _float64(args)
    grad = output_grads()[0].cpu().double()
    batch, channels = x.shape[:2]
    per_channel = (batch, channels) + (1,) * (x.dim() - 2)

    def by_group(t):  # not -1: ambiguous for an empty batch
        return t.expand(x.shape).reshape(batch, num_groups, math.prod(x.shape[1:]) // num_groups)

    groups = by_group(x)
    rstd = torch.rsqrt(groups.var(-1, unbiased=False, keepdim=True) + eps)
    xhat = ((groups - groups.mean(-1, keepdim=True)) * rstd).reshape(x.shape)
    modulation = (1 + scale).reshape(per_channel)
    w = 1 if weight is None else weight.reshape(per_channel[1:])
    b = 0 if bias is None else bias.reshape(per_channel[1:])
    dz = grad
    if act == "silu":
        z = ada_group_norm_reference(x, scale, shift, num_groups, weight, bias, eps, None)
        dz = dz * torch.sigmoid(z) * (1 + z * torch.sigmoid(-z))
    u_dz = by_group((modulation * w * dz).abs())
    xhat_abs = by_group(xhat.abs())
    dx = rstd * (u_dz + u_dz.mean(-1, keepdim=True) + xhat_abs * (u_dz * xhat_abs).mean(-1, keepdim=True))
    spatial = tuple(range(2, x.dim()))
    dz_abs, modulated_dz = dz.abs(), (modulation * dz).abs()
    return {"x": dx.reshape(x.shape), "scale": (dz_abs * (xhat * w + b).abs()).sum(spatial),
            "shift": dz_abs.sum(spatial), "weight": (modulated_dz * xhat.abs()).sum((0, *spatial)),
            "bias": modulated_dz.sum((0, *spatial))}


def _layer_norm_gradient_terms(h: torch.Tensor, scale: torch.Tensor, grad: torch.Tensor, eps: float) -> tuple:
    """The sizes of adaLN's dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), dxhat =
    grad (1 + scale), and of dscale = sum grad xhat and dshift = sum grad over the tokens."""
    rstd = torch.rsqrt(h.var(-1, unbiased=False, keepdim=True) + eps)
    xhat = (h - h.mean(-1, keepdim=True)) * rstd
    dxhat = (grad * (1 + scale[:, None, :])).abs()
    dx = rstd * (dxhat + dxhat.mean(-1, keepdim=True) + xhat.abs() * (dxhat * xhat.abs()).mean(-1, keepdim=True))
    return dx, (grad * xhat).abs().sum(1), grad.abs().sum(1)


def ada_layer_norm_gradient_terms(args: tuple, output_grads: Callable, expected: dict) -> dict:
    """adaLN's gradients' terms' sizes, in float64 (fastgen/ops/ada_norm.py, "Precision of the
    gradients")."""
    x, scale, _, eps = _float64(args)
    grad = output_grads()[0].cpu().double()
    return dict(zip(("x", "scale", "shift"), _layer_norm_gradient_terms(x, scale, grad, eps)))


def gated_residual_gradient_terms(args: tuple, output_grads: Callable, expected: dict) -> dict:
    """dx = dH = dh + adaLN's dx of the rounded h, dbranch = gate dH, dgate = sum branch dH over
    the tokens, and adaLN's dscale and dshift: their terms' sizes, in float64
    (fastgen/ops/ada_norm.py, "Precision of the gradients")."""
    h = gated_residual(*args[:3]).detach().cpu().double()
    _, branch, gate, scale, _, eps = _float64(args)
    grad_h, grad_y = (g.cpu().double() for g in output_grads())
    dh_norm, dscale, dshift = _layer_norm_gradient_terms(h, scale, grad_y, eps)
    dh = grad_h.abs() + dh_norm
    return {"x": dh, "branch": gate.abs()[:, None, :] * dh, "gate": (branch.abs() * dh).sum(1),
            "scale": dscale, "shift": dshift}


def linear_attention_gradient_terms(args: tuple, output_grads: Callable, expected: dict) -> dict:
    """dq_n = (sum_j g_nj S_ij - z_i (g_n . out_n)) / den_n and dk_n = sum_m phi(q_m) (g_m . v_n -
    g_m . out_m) / den_m: their terms' sizes, in float64 (fastgen/ops/linear_attention.py)."""
    q, k, v, eps = (a.detach().cpu().double().transpose(1, 2) if isinstance(a, torch.Tensor) else a
                    for a in args)
    grad = output_grads()[0].cpu().double().transpose(1, 2).abs()  # (B, H, N, D) like q, k, v
    phi_q, phi_k = q.clamp(min=0), k.clamp(min=0)
    state_sizes = phi_k.mT @ v.abs()
    normalizer = phi_k.sum(-2, keepdim=True)
    denominator = (phi_q * normalizer).sum(-1, keepdim=True) + eps
    out_sizes = (phi_q @ state_sizes) / denominator
    delta_sizes = (grad * out_sizes).sum(-1, keepdim=True) / denominator
    dq = (grad @ state_sizes.mT) / denominator + delta_sizes * normalizer
    dk = v.abs() @ (phi_q.mT @ (grad / denominator)).mT + (delta_sizes * phi_q).sum(-2, keepdim=True)
    return {"q": dq.transpose(1, 2), "k": dk.transpose(1, 2)}


def trms2d_gradient_terms(args: tuple, output_grads: Callable, expected: dict) -> dict:
    """dx = r (g - xhat mean_c(g xhat)) with g = dy weight, dweight = sum dy xhat and dbias =
    sum dy: their terms' sizes, in float64 (fastgen/ops/rms_norm_2d.py)."""
    x, weight, _, eps = _float64(args)
    grad = output_grads()[0].cpu().double()
    g = grad if weight is None else grad * weight[:, None, None]
    rstd = torch.rsqrt(x.square().mean(1, keepdim=True) + eps)
    xhat = x * rstd
    dx = rstd * (g.abs() + xhat.abs() * (g * xhat).abs().mean(1, keepdim=True))
    return {"x": dx, "weight": (grad * xhat).abs().sum((0, 2, 3)), "bias": grad.abs().sum((0, 2, 3))}


def _rotated_back_sizes(grad_sizes: torch.Tensor, cos, sin, rope_layout: str) -> torch.Tensor:
    """|dy| rotated back by the pair rotation with |cos| and |sin|: each g's terms' sizes."""
    if cos is None:
        return grad_sizes
    cos, sin = (table.abs()[None, :, None, :] for table in (cos, sin))
    if rope_layout == "interleaved":
        first, second = grad_sizes.unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack((first * cos + second * sin, first * sin + second * cos), dim=-1).flatten(-2)
    first, second = grad_sizes.chunk(2, dim=-1)
    return torch.cat((first * cos + second * sin, first * sin + second * cos), dim=-1)


def _qk_norm_rope_gradient_terms(args: tuple, output_grads: Callable, expected: dict) -> dict:
    """dx = r (g w - xhat mean(g w xhat)) and dweight = sum g xhat: their terms' sizes, in
    float64 (fastgen/ops/qk_norm_rope.py)."""
    q, k, weight_q, weight_k, cos, sin, eps, rope_layout = _float64(args)
    terms = {}
    for name, x, weight, grad in zip("qk", (q, k), (weight_q, weight_k), output_grads()):
        g = _rotated_back_sizes(grad.cpu().double().abs(), cos, sin, rope_layout)
        if weight is None:
            terms[name] = g
            continue
        r = torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
        xhat_sizes, scaled = (x * r).abs(), g * weight.abs()
        terms[name] = r * (scaled + xhat_sizes * (scaled * xhat_sizes).mean(-1, keepdim=True))
        terms[f"weight_{name}"] = (g * xhat_sizes).sum((0, 1, 2))
    return terms


def filtered_lrelu_output_terms(args: tuple, output_grads, expected: dict) -> dict:
    """y = D a: its terms' sizes are D's sums over |a| (float64) and |fd|."""
    x, fu, fd, b, up, down, padding, gain, slope, clamp, flip_filter = _float64(args)
    activation, _ = activation_and_codes(x, fu, fd, b, up, down, normalized_padding(padding), gain, slope, clamp,
                                         flip_filter, with_codes=False)
    return {"output 0": upfirdn2d_reference(activation.abs(), None if fd is None else fd.abs(), 1, down, 0,
                                            flip_filter, 1.0)}


def filtered_lrelu_bias_gradient_terms(args: tuple, output_grads: Callable, expected: dict) -> dict:
    """db is dx summed over (B, H, W): its terms' sizes are sum |dx| (the float64 dx)."""
    return {"b": expected["x"].abs().sum((0, 2, 3))}


def filtered_lrelu_gradient_terms(args: tuple, output_grads: Callable, expected: dict) -> dict:
    """dx = U^T (d * D^T dy): its terms' sizes are the same sums of |dy|, |taps| and the larger
    slope's |d|; db's are sum |dx|."""
    x, fu, fd, _, up, down, padding, gain, slope, _, flip_filter = _float64(args)
    padding = normalized_padding(padding)
    zh, zw, _, _ = intermediate_size(x.shape, fu, fd, up, down, padding)
    positive = pack_codes(torch.ones(*x.shape[:2], zh, zw, dtype=torch.int64))
    dx_terms, _ = filtered_lrelu_backward_reference(
        output_grads()[0].cpu().double().abs(), positive, None if fu is None else fu.abs(),
        None if fd is None else fd.abs(), up, down, padding, abs(gain) * max(1.0, abs(slope)), 1.0, flip_filter,
        *x.shape[2:], False)
    return {"x": dx_terms, **filtered_lrelu_bias_gradient_terms(args, output_grads, expected)}


def _filtered_lrelu_triton_gradient_terms(args: tuple, output_grads: Callable, expected: dict) -> dict:
    """db's terms' sizes, and dx's too where the float16 backward stages round dx's terms."""
    terms = filtered_lrelu_gradient_terms if args[0].dtype == torch.float16 else filtered_lrelu_bias_gradient_terms
    return terms(args, output_grads, expected)


def _cross_attention_output_terms(args: tuple, output_grads: Callable, expected: dict) -> dict:
    """out_i = sum_j P_ij v_j: its terms' sizes, in float64."""
    q, k, v, mask, scale, ends = (a.detach().cpu() if isinstance(a, torch.Tensor) else a for a in args)
    probabilities = cross_attention_probabilities(q.double(), k.double(), mask, scale, ends)[0]
    return {"output 0": torch.einsum("bhqk,bkhd->bqhd", probabilities, v.double().abs())}


def cross_attention_gradient_terms(args: tuple, output_grads: Callable, expected: dict) -> dict:
    """dq_i = scale sum_j P_ij (g_i . v_j - g_i . out_i) k_j and dk_j = scale sum_i P_ij (g_i . v_j
    - g_i . out_i) q_i: their terms' sizes written out to products of the inputs, in float64
    (fastgen/ops/cross_attention.py, "Precision of dq and dk")."""
    q, k, v, mask, scale, ends = (a.detach().cpu() if isinstance(a, torch.Tensor) else a for a in args)
    q64, k64, v64, grad64 = (t.double() for t in (q, k, v, output_grads()[0].cpu()))
    probabilities = cross_attention_probabilities(q64, k64, mask, scale, ends)[0]
    out_abs = torch.einsum("bhqk,bkhd->bqhd", probabilities, v64.abs())
    dprobabilities = torch.einsum("bqhd,bkhd->bhqk", grad64.abs(), v64.abs())
    delta = torch.einsum("bqhd,bqhd->bhq", grad64.abs(), out_abs)[..., None]
    terms = probabilities * (dprobabilities + delta) * effective_scale(q, scale)
    return {"q": torch.einsum("bhqk,bkhd->bqhd", terms, k64.abs()),
            "k": torch.einsum("bhqk,bqhd->bkhd", terms, q64.abs())}


# Outputs and gradients whose error an op's docstring bounds by its tolerance of the sizes of
# the terms that sum to them (check.mismatch's magnitude), not of their value, which can cancel:
# (op, backend, direction) -> (dtypes, function of (args, output gradients (a callable giving one
# per floating output), float64 values by name) giving {name: terms' sizes}). Names are the
# argument names in the backward and "output <i>" in the forward.
TERM_SIZES = {
    # fastgen/ops/ada_norm.py, "Precision of the gradients": dx's three terms cancel where one
    # value holds most of its group's (row's) variance (always at two values), and the parameter
    # gradients sum terms of either sign.
    **{(name, backend, "bwd"): (KERNEL_DTYPES, terms) for name, terms in
       (("ada_group_norm", ada_group_norm_gradient_terms), ("ada_layer_norm", ada_layer_norm_gradient_terms))
       for backend in TRITON_AND_CUDA},
    ("gated_residual_ada_layer_norm", "triton", "bwd"): (KERNEL_DTYPES, gated_residual_gradient_terms),
    # fastgen/ops/filtered_lrelu.py, "Precision of float16": the float16 stage 2 rounds a, the
    # taps and the half-filtered rows (measured up to 7.7e-4 of the terms' sizes in y); the float16
    # backward stages round the terms of dx. "Precision of db": db = sum dx cancels where dx's
    # signs balance, in every dtype (measured: float32 1.6e-8 of sum |dx|, 3.2e-5 of |db|).
    ("filtered_lrelu", "triton", "fwd"): ((torch.float16,), filtered_lrelu_output_terms),
    ("filtered_lrelu", "triton", "bwd"): (KERNEL_DTYPES, _filtered_lrelu_triton_gradient_terms),
    ("filtered_lrelu", "cuda", "bwd"): (KERNEL_DTYPES, filtered_lrelu_bias_gradient_terms),
    # fastgen/ops/cross_attention.py, "Precision of out": P enters P V rounded to 16 bits; and
    # "Precision of dq and dk": dS = P (dP - delta) with delta = g . out, which equals sum_j P dP
    # only up to rounding (FlashAttention-2's backward).
    ("cross_attention", "triton", "fwd"): (KERNEL_DTYPES, _cross_attention_output_terms),
    ("cross_attention", "triton", "bwd"): (KERNEL_DTYPES, cross_attention_gradient_terms),
    # fastgen/ops/linear_attention.py, "Precision of dq and dk": g . S and z (g . out) cancel where
    # a head's keys are few. The cuda backend's backward is the Triton kernel's (the eager one on a
    # CPU).
    **{("linear_attention", backend, "bwd"): (KERNEL_DTYPES, linear_attention_gradient_terms)
       for backend in TRITON_AND_CUDA},
    # fastgen/ops/rms_norm_2d.py, "Precision of dx": g and xhat mean(g xhat) cancel where one
    # channel holds most of a pixel's mean square (always at C = 1).
    **{("trms2d", backend, "bwd"): (KERNEL_DTYPES, trms2d_gradient_terms) for backend in TRITON_AND_CUDA},
    # fastgen/ops/qk_norm_rope.py, "Precision of dx and dweight": g w and xhat mean(g w xhat)
    # cancel where one feature holds most of a row's norm.
    **{("qk_norm_rope", backend, "bwd"): (KERNEL_DTYPES, _qk_norm_rope_gradient_terms)
       for backend in TRITON_AND_CUDA},
}


def _worst_with_term_sizes(triples, what: str, original_worst: Callable, names: list, terms: Callable,
                           args: tuple, output_grads: Callable) -> tuple:
    """check._worst, with each tensor that `terms` sizes compared under its terms' sizes."""
    triples = list(triples)
    expected = {name: triple[1] for name, triple in zip(names, triples)}
    magnitudes = terms(args, output_grads, expected)
    others = [(None, None, None) if name in magnitudes else triple for name, triple in zip(names, triples)]
    worst, detail = original_worst(others, what)
    if detail:
        return worst, detail
    for i, (name, (actual, expected_value, same_dtype_reference)) in enumerate(zip(names, triples)):
        if name not in magnitudes:
            continue
        # Where a term is non-finite its size says nothing: |expected| alone scales the tolerance.
        magnitude = torch.nan_to_num(magnitudes[name], nan=0.0, posinf=0.0)
        error, detail = check.mismatch(actual, expected_value, same_dtype_reference, magnitude)
        if detail:
            return error, f"{what} {i}: {detail}"
        worst = max(worst, error)
    return worst, ""


def _worst_for(op, backend: str, dtype: torch.dtype, direction: str, args: tuple, seed: int) -> Callable:
    """check._worst for a check of these arguments (TERM_SIZES). The output gradients are
    check_backward's: drawn in turn, one per floating output, from a generator seeded by `seed`."""
    dtypes, terms = TERM_SIZES.get((op.name, backend, direction), ((), None))
    if dtype not in dtypes:
        return check._worst
    if direction == "fwd":
        names = [f"output {i}" for i in range(len(check._as_tuple(op.allocate_output(*args))))]
    else:
        names = [name for name, a in zip(argument_names(op), args)
                 if isinstance(a, torch.Tensor) and a.is_floating_point()]

    def output_grads():
        generator = torch.Generator().manual_seed(seed)
        return [torch.randn(out.shape, generator=generator).to(out.dtype)
                for out in check._as_tuple(op.allocate_output(*args)) if out.is_floating_point()]

    return functools.partial(_worst_with_term_sizes, original_worst=check._worst, names=names, terms=terms,
                             args=args, output_grads=output_grads)


def check_at_stated_precision(op, backend: str, dtype: torch.dtype, direction: str, args: tuple, seed: int) -> tuple:
    """check.check_forward or check.check_backward (output gradients drawn from `seed`), with
    each output or gradient whose precision the op's docstring states by its terms' sizes
    (TERM_SIZES) held to those sizes."""
    with mock.patch.object(check, "_worst", _worst_for(op, backend, dtype, direction, args, seed)):
        if direction == "fwd":
            return check.check_forward(op, backend, args)
        return check.check_backward(op, backend, args, torch.Generator().manual_seed(seed))


def _stated_contract(name: str, backend: str, values: Optional[tuple]) -> Optional[StatedContract]:
    if values is None:
        return None
    value_class, argument, _ = values
    return next((contract for contract in STATED_CONTRACTS if contract.op == name
                 and contract.input_class == value_class and argument in contract.arguments
                 and backend in (contract.backends or (backend,))), None)


def _filtered_lrelu_codes_at_ties(backend: str, args: tuple) -> Optional[Callable]:
    """The oracle for a filtered_lrelu draw where the kernel's codes differ from the contract's
    only at samples whose float64 v lies within rounding of a case's boundary (0 or +-clamp;
    filtered_lrelu.py: such a sample may take either case, and every gradient, the filters'
    too, follows the code recorded): the contract (filtered_lrelu_real_samples, which agrees
    with the reference up to rounding where every input is finite) through the kernel's codes
    at those samples. None where the codes agree, or differ anywhere else (the gradients then
    show the error). A tie is a sample within that rounding of 0 coded negative or positive, or
    of +-clamp coded clamped or by v's sign. Rounding: stage 1 runs in float32, x + b then one
    fused multiply-add per tap (the CUDA kernel), so v is within (taps + 3) 2^-24 of its terms'
    sizes; the Triton kernel's stage 1 rounds its half-filtered rows too, and a 2-D fu's split
    terms can round past that bound: such a draw keeps the contract's codes and shows as a
    mismatch to examine. The kernel's codes take a launch of their own (a third of an
    interpreted backward case), so they are read only where a sample lies that near a boundary."""
    x, fu, fd, b, up, down, padding, gain, slope, clamp, flip_filter = _float64(args)
    v = real_samples_pre_activation(x, fu, fd, b, up, down, padding, gain, flip_filter)
    terms = real_samples_pre_activation(x.abs(), *(None if f is None else f.abs() for f in (fu, fd, b)), up, down,
                                        padding, abs(gain), flip_filter)
    fh, fw = filter_size(fu)
    bound = (fh * fw + 3) * 2.0**-24 * terms
    bounded = bound.isfinite()  # an infinite term bounds nothing
    near_zero = (v.abs() <= bound) & bounded
    near_clamp = torch.zeros_like(near_zero)
    if clamp is not None:
        distance = (torch.nn.functional.leaky_relu(v, slope).abs() - clamp).abs()
        near_clamp = (distance <= bound * max(1.0, abs(slope))) & bounded
    if not (near_zero | near_clamp).any():
        return None
    y, packed = FILTERED_LRELU_WITH_CODES.allocate_output(*args)
    FILTERED_LRELU_WITH_CODES.implementations[backend].run(*args, out=(y, packed))
    kernel_codes, expected = unpack_codes(packed.cpu(), v.shape[-1]), sample_codes(v, slope, clamp)
    differ = kernel_codes != expected
    sign_codes = (kernel_codes != CODE_CLAMPED) & (expected != CODE_CLAMPED)
    tie = (near_zero & sign_codes) | (near_clamp & ((kernel_codes == CODE_CLAMPED)
                                                    | (kernel_codes == sample_codes(v, slope, None))))
    if not differ.any() or (differ & ~tie).any():
        return None
    codes = pack_codes(torch.where(differ, kernel_codes, expected)).to(args[0].device)
    return functools.partial(filtered_lrelu_real_samples, codes=codes)


class _WithValue(torch.autograd.Function):
    """t's place in the graph with another tensor's value: an intermediate that an op rounds and
    returns, and that its backward formulas treat as exact."""

    @staticmethod
    def forward(ctx, t, value):
        return value.to(t.dtype, copy=True)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def gated_residual_reference_at(h: torch.Tensor) -> Callable:
    """The gated residual's contract with y at a given h, the one the op returned: (x + gate
    branch, adaLN of h), h carrying x + gate branch's gradient (fastgen/ops/ada_norm.py: y
    normalizes h "rounded once to x's dtype ... the tensor the op returns", and the backward
    formulas treat that rounding as exact)."""

    def reference(x, branch, gate, scale, shift, eps=1e-6):
        exact = gated_residual(x, branch, gate)
        return exact, ada_layer_norm_reference(_WithValue.apply(exact, h), scale, shift, eps)

    return reference


def _gated_residual_at_returned_h(backend: str, args: tuple) -> Callable:
    """The oracle for a gated residual draw: gated_residual_reference_at the h the kernel returns
    for these arguments. h itself is held to the float64 h as any output. The normalization
    multiplies a change of h by rstd: where a token's channels nearly agree, y of the unrounded
    h differs from y of the rounded one by far more than the dtype's tolerance, and float16's h
    is +-inf where x + gate branch passes its range (that token's y NaN)."""
    op = OPS["gated_residual_ada_layer_norm"]
    out = op.allocate_output(*args)
    op.implementations[backend].run(*args, out=out)
    return gated_residual_reference_at(out[0].detach())


# The contract at a choice it leaves to the kernel, taken as the kernel took it: (op, direction)
# -> function of (backend, args) giving the oracle, or None where the draw meets no such choice.
# The filtered_lrelu backward's gradients follow the code it recorded at a tie; the gated
# residual's y normalizes the h it returns.
ORACLES_AT_THE_KERNELS_CHOICES = {
    ("filtered_lrelu", "bwd"): _filtered_lrelu_codes_at_ties,
    ("gated_residual_ada_layer_norm", "fwd"): _gated_residual_at_returned_h,
    ("gated_residual_ada_layer_norm", "bwd"): _gated_residual_at_returned_h,
}


def _float64_tie(name: str, args: tuple) -> Optional[Callable]:
    """For a search op, tied_codes of non_finite_aware_mismatch: exact mode promises the float64
    direct form's best "up to float64 rounding (relative (D + 2) 2^-53)" (vq.py), so two codes
    whose float64 scores differ by less than that bound of the scores' terms are a tie that
    evaluation order breaks (a cosine search over codes that are multiples of one vector)."""
    if name not in CODE_INDEX_OUTPUT:
        return None
    z, codebook = (t.detach().cpu().double() for t in args[:2])
    metric = args[2] if name == "vq_nearest" else "l2"
    bound = (z.shape[1] + 2) * 2.0**-53

    def scores(codes):
        e = codebook[codes]
        if metric == "l2":
            terms = (z - e).square()
            return terms.sum(1), terms.abs().sum(1)
        terms = z * e
        scale = e.norm(dim=1).clamp_min(1e-12) * z.norm(dim=1).clamp_min(1e-12)
        return -terms.sum(1) / scale, terms.abs().sum(1) / scale

    def tied_codes(actual, expected):
        if len(actual) != len(z) or not ((actual >= 0) & (actual < len(codebook))).all():
            return torch.zeros_like(actual, dtype=torch.bool)
        (got, got_size), (want, want_size) = scores(actual), scores(expected)
        return (got - want).abs() <= 2 * bound * torch.maximum(got_size, want_size)

    return tied_codes


def _codes_unspecified(name: str, args: tuple) -> bool:
    return name in CODE_INDEX_OUTPUT and bool(args[0].detach().float().square().sum(1).isinf().any())


def _excluded(name: str, backend: str, dtype: torch.dtype, direction: str) -> frozenset:
    if PROFILE == "deep":
        return frozenset()
    return frozenset((known.input_class, argument) for known in CI_EXCLUSIONS
                     if known.op == name and backend in known.backends and direction in known.directions
                     and dtype in known.dtypes for argument in known.arguments or (None,))


def _overflow_within_tolerance(dtype: torch.dtype, actual64: torch.Tensor, expected64: torch.Tensor,
                               magnitude) -> torch.Tensor:
    """Where the tolerance check.mismatch gives an element (of an output in `dtype`) reaches past
    the threshold at which `dtype` rounds to an infinity, both sides of it are correct answers:
    an infinity of the sign reached, or a finite value (compared under the tolerance, as every
    finite one is). True at the infinities so excused and at the finite values whose reference
    overflows."""
    finfo = torch.finfo(dtype)
    _, exponent = math.frexp(finfo.max)
    threshold = finfo.max + 2.0 ** (exponent - round(-math.log2(finfo.eps)) - 2)  # half an ulp past max
    rtol, atol = check.TOLERANCES[dtype]
    scale = expected64.abs() if magnitude is None else torch.maximum(expected64.abs(), magnitude.double().cpu())
    allowed = atol + rtol * scale
    return (((actual64 == math.inf) & (expected64 + allowed >= threshold))
            | ((actual64 == -math.inf) & (expected64 - allowed <= -threshold))
            | (actual64.isfinite() & (expected64.abs() - allowed < threshold)))


def non_finite_aware_mismatch(actual: torch.Tensor, expected: torch.Tensor,
                              same_dtype_reference=None, magnitude=None, non_finite: str = "same",
                              tied_codes: Optional[Callable] = None) -> tuple:
    """check.mismatch with NaN and infinities compared by position (module docstring): where
    both sides are non-finite the element counts as exact. non_finite "same": NaN where the
    reference has NaN and its infinities with their signs; "either": non-finite where the
    reference is, NaN and infinities alike; "at least": non-finite wherever the reference is,
    and maybe elsewhere (an op stating so, STATED_CONTRACTS). tied_codes(actual, expected), for
    code indices, marks the rows where the two codes tie within float64 rounding (_float64_tie)."""
    if tied_codes is not None and not actual.is_floating_point() and actual.shape == expected.shape \
            and actual.dim() == 1:
        actual = torch.where(tied_codes(actual.cpu(), expected.cpu()), expected.cpu(), actual.cpu())
    expected64 = expected.detach().double().cpu()
    rounded = expected64.to(actual.dtype).double()
    actual_cpu = actual.detach().cpu()
    actual64 = actual_cpu.double()
    if actual64.shape != rounded.shape:
        return mismatch(actual, expected)
    if non_finite == "same":
        wrong = (actual64.isnan() != rounded.isnan()) | ((actual64.isinf() | rounded.isinf()) & (actual64 != rounded))
        if actual.is_floating_point():
            wrong &= ~_overflow_within_tolerance(actual.dtype, actual64, expected64, magnitude)
    elif non_finite == "either":
        wrong = actual64.isfinite() != rounded.isfinite()
    else:
        wrong = actual64.isfinite() & ~rounded.isfinite()
    if wrong.any():
        index = tuple(int(i) for i in wrong.nonzero()[0])
        return float("inf"), (f"{int(wrong.sum())} of {wrong.numel()} elements non-finite where the reference is "
                              f"not, or the other way round, first at {index}: got {actual64[index].item():.6g}, "
                              f"expected {expected64[index].item():.6g}")
    agreed = ~actual64.isfinite()

    def finite_part(t):
        return None if t is None else t.detach().cpu().masked_fill(agreed, 0)

    return mismatch(finite_part(actual_cpu), finite_part(expected64), finite_part(same_dtype_reference),
                    finite_part(magnitude))


def _assert_code_indices_in_range(op, backend: str, args: tuple) -> None:
    out = op.allocate_output(*args)
    op.implementations[backend].run(*args, out=out)
    idx, codes = out[CODE_INDEX_OUTPUT[op.name]], args[1].shape[0]
    assert bool(((idx >= 0) & (idx < codes)).all()), f"code indices outside [0, {codes}): {idx.tolist()}"


def _params() -> list:
    params = []
    for name in sorted(OPS):
        op = OPS[name]
        for target in DEVICES_AND_BACKENDS:
            device, backend = target.values
            if backend not in op.implementations:
                continue
            for dtype in op.implementations[backend].dtypes:
                for direction in ("fwd", "bwd") if op.differentiable else ("fwd",):
                    params.append(pytest.param(name, device, backend, dtype, direction, marks=target.marks,
                                               id=f"{name}-{target.id}-{str(dtype)[6:]}-{direction}"))
    return params


def test_exclusions_name_registered_ops_backends_and_input_classes():
    for known in CI_EXCLUSIONS:
        assert known.op in OPS and set(known.backends) <= set(OPS[known.op].implementations), known
        assert set(known.arguments) <= set(argument_names(OPS[known.op])), known
        assert known.input_class in INPUT_CLASSES and set(known.directions) <= {"fwd", "bwd"}, known
        assert set(known.dtypes) <= set(KERNEL_DTYPES), known


def test_non_finite_comparison_accepts_either_side_of_overflow_only_within_tolerance():
    expected = torch.tensor([66000.0, 66000.0, 66000.0, 70000.0, -1e6, 1.0], dtype=torch.float64)
    magnitude = torch.tensor([1e6, 1e6, 10.0, 10.0, 10.0, 10.0], dtype=torch.float64)  # tolerance 2e3 where 1e6
    for got in ([65504.0, math.inf, math.inf, math.inf, -math.inf, 1.0],   # every one correct
                [math.inf, 65504.0, math.inf, math.inf, -math.inf, 1.0]):
        _, detail = non_finite_aware_mismatch(torch.tensor(got, dtype=torch.float16), expected, None, magnitude)
        assert not detail, (got, detail)
    for wrong_at, got in ((1, -math.inf), (2, 65504.0), (3, 65504.0), (4, math.inf), (5, math.inf)):
        actual = torch.tensor([65504.0, math.inf, math.inf, math.inf, -math.inf, 1.0], dtype=torch.float16)
        actual[wrong_at] = got
        _, detail = non_finite_aware_mismatch(actual, expected, None, magnitude)
        assert detail, (wrong_at, got)


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_a_draw_off_the_contract_is_judged_at_the_kernels_choices(direction):
    """The gated residual's float16 h overflowing in one element: y, normalizing the rounded h
    the op returns, is NaN in that token where the float64 reference's is finite. The reference
    fails the draw; draw_mismatch, which judges it at the h the kernel returned, passes it."""
    op = OPS["gated_residual_ada_layer_norm"]
    generator = torch.Generator().manual_seed(0)
    x, branch = (torch.randn(2, 5, 24, generator=generator).half() for _ in "xb")
    gate, scale, shift = (torch.randn(2, 24, generator=generator).half() for _ in "gab")
    gate[1, 7], branch[1, 3, 7] = 4.0, 2e4
    args = (x, branch, gate, scale, shift, 1e-6)
    with mock.patch.object(check, "mismatch", non_finite_aware_mismatch):
        _, detail = check_at_stated_precision(op, "triton", torch.float16, direction, args, 0)
    assert detail
    assert draw_mismatch(op.name, "triton", torch.float16, direction, args, 0, None) == ""


@pytest.mark.parametrize("argument", ["fu", "fd"])
def test_filtered_lrelu_float16_with_a_huge_1d_filter_tap(argument):
    """A 4e9 tap in a 1-D filter (the fuzz's "huge"): float16 cannot hold the table's small taps
    beside it, nor the spread of values that stage gives the next, so those stages run in
    float32 (kernels/filtered_lrelu.py, _taps_fit_float16); y and dx meet the fuzz's comparison
    (dx 0 where float64 gives -1.1e8 while they ran in float16)."""
    op = OPS["filtered_lrelu"]
    for seed in range(4):
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(1, 2, 9, 8, generator=generator).half()
        filters = {"fu": torch.randn(4, generator=generator) / 3, "fd": torch.randn(6, generator=generator) / 4}
        huge = filters[argument]
        huge[int(torch.randint(0, len(huge), (1,), generator=generator))] = 4e9 * (-1) ** seed
        args = (x, filters["fu"], filters["fd"], torch.randn(2, generator=generator).half(), 2, 2, [3, 2, 1, 4],
                1.4, 0.2, None, False)
        for direction in ("fwd", "bwd"):
            with mock.patch.object(check, "mismatch", non_finite_aware_mismatch):
                _, detail = check_at_stated_precision(op, "triton", torch.float16, direction, args, seed)
            assert not detail, (seed, direction, detail)


@pytest.mark.cuda_emulation
def test_filtered_lrelu_infinite_tap_meeting_a_cancelled_sum():
    """Two dy that cancel exactly make da = D^T dy 0 for the eager contract, whose -inf tap of fu
    then gives dx NaN; the CUDA kernel's fused multiply-add leaves da a rounding error and gives
    -inf or inf. fastgen/ops/filtered_lrelu.py states both (STATED_CONTRACTS: "either")."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 12, 1, generator=generator)
    fu = torch.randn(3, 1, generator=generator)
    fu[1, 0] = -math.inf
    fd = torch.full((4, 1), 1.7837)
    args = (x, fu, fd, None, 1, 2, [0, 0, 1, 1], 1.0, 0.2, None, False)
    # Output rows 1 and 2 alone read mid rows 4 and 5, through the down filter's equal taps.
    dy = torch.randn(1, 1, 5, 1, generator=generator)
    dy[0, 0, 2] = -dy[0, 0, 1]
    gradients = []
    for function, backend, dtype in ((torch.ops.fastgen.filtered_lrelu, "cuda", torch.float32),
                                     (filtered_lrelu_real_samples, "reference", torch.float64)):
        x_leaf = x.detach().to(dtype).requires_grad_()
        with registry.use_backend(backend):
            y = function(x_leaf, *(a.to(dtype) if isinstance(a, torch.Tensor) else a for a in args[1:]))
        assert y.shape == dy.shape
        y.backward(dy.to(dtype))
        gradients.append(x_leaf.grad)
    actual, expected = gradients
    assert expected.isnan().any() and not actual.isnan().any()  # the kernel's infinities there
    contract = _stated_contract("filtered_lrelu", "cuda", ("inf", "fu", 1))
    assert non_finite_aware_mismatch(actual, expected, non_finite="same")[1]
    assert not non_finite_aware_mismatch(actual, expected, non_finite=contract.non_finite)[1]


def draw_mismatch(name: str, backend: str, dtype: torch.dtype, direction: str, args: tuple, seed: int,
                  values: Optional[tuple]) -> str:
    """The fuzz's verdict on one draw: check_at_stated_precision's detail ("" where it passes)
    against the contract at the kernel's own choices where the op leaves it one
    (ORACLES_AT_THE_KERNELS_CHOICES), or else the op's stated contract for the draw's value
    class (`values`, as fuzz_inputs records it), or else its reference."""
    op = OPS[name]
    contract = _stated_contract(name, backend, values)
    compare = functools.partial(non_finite_aware_mismatch, tied_codes=_float64_tie(name, args),
                                non_finite=contract.non_finite if contract else "same")
    at_the_kernels_choice = ORACLES_AT_THE_KERNELS_CHOICES.get((name, direction))
    oracle = (at_the_kernels_choice and at_the_kernels_choice(backend, args)) or (contract and contract.oracle) \
        or op.reference
    # oneDNN compiles a float16 depthwise convolution (the filters' references on a CPU) per
    # shape, and takes minutes for some (a 1 x 17 filter over 131 columns); torch's own does not.
    with torch.backends.mkldnn.flags(enabled=False), mock.patch.object(check, "mismatch", compare), \
            mock.patch.object(op, "reference", oracle):
        return check_at_stated_precision(op, backend, dtype, direction, args, seed)[1]


def _cases_per_test(name: str, backend: str) -> int:
    """The profile's cases for one (op, backend, dtype, direction) test: "deep" counts its cases
    per op and backend, so they are divided among that backend's dtype and direction tests;
    FASTGEN_FUZZ_EXAMPLES, when set, is the count per test."""
    cases = settings.get_profile(PROFILE).max_examples
    if PROFILE != "deep" or "FASTGEN_FUZZ_EXAMPLES" in os.environ:
        return cases
    op = OPS[name]
    return math.ceil(cases / (len(op.implementations[backend].dtypes) * (2 if op.differentiable else 1)))


@pytest.mark.fuzz
@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
@pytest.mark.parametrize("name, device, backend, dtype, direction", _params())
def test_matches_the_float64_reference(name, device, backend, dtype, direction, record_property):
    reason = registry.backend_unavailable_reason(backend, device)
    if reason is not None:
        pytest.skip(reason)
    op = OPS[name]
    excluded = _excluded(name, backend, dtype, direction)

    passed = 0

    @settings(settings.get_profile(PROFILE), max_examples=_cases_per_test(name, backend))
    @given(data=st.data())
    def matches(data):
        nonlocal passed
        recipe = data.draw(fuzz_inputs(op, device, dtype, excluded))
        if _codes_unspecified(name, recipe.args):
            _assert_code_indices_in_range(op, backend, recipe.args)
            passed += 1
            return
        detail = draw_mismatch(name, backend, dtype, direction, recipe.args, recipe.seed, recipe.values)
        assert not detail, detail
        passed += 1

    try:
        matches()
    finally:
        where = {"triton": " (interpreter)", "cuda": " (emulated)"}.get(backend, "") if device.type == "cpu" else ""
        record_property(FUZZ_CASES_PASSED, (name, backend + where, passed))
