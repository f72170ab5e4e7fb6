"""Every op, fast backend, dtype and direction on fuzz inputs (tests/fuzz_inputs.py) against the
float64 reference, the way `fastgen check` compares them: NaN-poisoned outputs, the dtype's
tolerance widened to twice the same-dtype reference's own error, gradients through the custom
op's autograd with the backend forced.

Non-finite values are compared by position: an output has NaN exactly where the float64
reference has NaN, and the reference's infinities (once rounded to the output's dtype, where a
finite float64 value can overflow) with their signs; the other elements pass under the usual
tolerance. Integer outputs (code indices, usage counts) equal the reference's, except where an
op promises less (CODE_INDEX_OUTPUT).

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

from conftest import EMULATED_CUDA
from fastgen import check
from fastgen.check import mismatch
from fastgen.ops import registry
from fastgen.ops.registry import KERNEL_DTYPES, OPS
from fastgen.ops.filtered_lrelu import filtered_lrelu_real_samples
from fastgen.ops.upfirdn2d import upfirdn2d_real_samples
from fuzz_inputs import INPUT_CLASSES, argument_names, fuzz_inputs

PROFILE = os.environ.get("FASTGEN_FUZZ", "ci")
CPU = torch.device("cpu")
TARGETS = (
    pytest.param(CPU, "triton", id="cpu-triton-interpreter"),
    pytest.param(torch.device("cuda"), "triton", id="cuda-triton", marks=pytest.mark.gpu),
    pytest.param(torch.device("cuda"), "cuda", id="cuda-cuda", marks=pytest.mark.gpu),
    EMULATED_CUDA,
)


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
CI_EXCLUSIONS = (
    KnownDefect("filtered_lrelu", ("triton",), "huge", arguments=("fd",), directions=("bwd",),
                dtypes=(torch.float16,),
                defect="a down-filter tap above float16's range (the fuzz's 4e9) becomes inf in the float16 "
                       "stage's tap table, and the banded product's zeros turn it into NaN in dx (30 of 36 "
                       "draws: NaN where the reference's -1.4e18 rounds to -inf)"),
    KnownDefect("cross_attention", ("triton",), "huge", arguments=("q", "k"), directions=("bwd",),
                defect="scores near 1e20 make a row one-hot; the flash backward's delta = rowsum(dO * O) then "
                       "differs from dP at the max by a rounding (1e-7) that the huge q or k multiply into dk of -7 "
                       "(expected 0.09) and dq of 38 (expected 0), where the reference's exact one-hot cancels"),
    KnownDefect("filtered_lrelu", ("triton",), "odd sizes", directions=("bwd",), dtypes=(torch.float16,),
                defect="a 16 x 11 two-dimensional down filter: the float16 db is 0.0082 where the reference gives "
                       "0.0133 (allowed 0.002, the float16 reference's own error 1.3e-4); CI's fuzz, 2026-12-06, "
                       "draw 'StyleGAN3 up2 down2 12-tap clamp', seed 6905"),
    KnownDefect("cross_attention", ("triton",), "odd sizes", directions=("bwd",), dtypes=(torch.bfloat16,),
                defect="with 2 keys the bfloat16 dq is up to 8 times the same-dtype reference's error (0.022 "
                       "against 0.007; fastgen check allows 2): FlashAttention-2's bfloat16 dS and delta from the "
                       "bfloat16 output (6.4 times in a correctly rounded emulation of the algorithm, 1.0 with both "
                       "in float32), and the interpreter's truncating float32 -> bfloat16 conversion"),
)

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
    *(StatedContract("filtered_lrelu", value_class, ("x", "fu", "fd", "b"), oracle=filtered_lrelu_real_samples,
                     backends=("cuda",)) for value_class in ("nan", "inf")),
    *(StatedContract("filtered_lrelu", value_class, ("x", "fu", "fd", "b"), oracle=filtered_lrelu_real_samples,
                     non_finite="at least", backends=("triton",)) for value_class in ("nan", "inf")),
)


def _stated_contract(name: str, backend: str, values: Optional[tuple]) -> Optional[StatedContract]:
    if values is None:
        return None
    value_class, argument, _ = values
    return next((contract for contract in STATED_CONTRACTS if contract.op == name
                 and contract.input_class == value_class and argument in contract.arguments
                 and backend in (contract.backends or (backend,))), None)


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
        for target in TARGETS:
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
def test_matches_the_float64_reference(name, device, backend, dtype, direction):
    reason = registry.backend_unavailable_reason(backend, device)
    if reason is not None:
        pytest.skip(reason)
    op = OPS[name]
    excluded = _excluded(name, backend, dtype, direction)

    @settings(settings.get_profile(PROFILE), max_examples=_cases_per_test(name, backend))
    @given(data=st.data())
    def matches(data):
        recipe = data.draw(fuzz_inputs(op, device, dtype, excluded))
        if _codes_unspecified(name, recipe.args):
            _assert_code_indices_in_range(op, backend, recipe.args)
            return
        contract = _stated_contract(name, backend, recipe.values)
        compare = functools.partial(non_finite_aware_mismatch, tied_codes=_float64_tie(name, recipe.args),
                                    non_finite=contract.non_finite if contract else "same")
        oracle = (contract and contract.oracle) or op.reference
        # oneDNN compiles a float16 depthwise convolution (the filters' references on a CPU) per
        # shape, and takes minutes for some (a 1 x 17 filter over 131 columns); torch's own does not.
        with torch.backends.mkldnn.flags(enabled=False), mock.patch.object(check, "mismatch", compare), \
                mock.patch.object(op, "reference", oracle):
            if direction == "fwd":
                _, detail = check.check_forward(op, backend, recipe.args)
            else:
                _, detail = check.check_backward(op, backend, recipe.args, torch.Generator().manual_seed(recipe.seed))
        assert not detail, detail

    matches()
