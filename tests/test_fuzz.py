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
    *(KnownDefect("cross_attention", ("triton",), value_class, arguments=arguments, directions=("bwd",),
                  defect="the backward gives finite gradients where the reference's are NaN (a NaN or infinite "
                         "score) and inf, NaN or 1e3 where they are 0 (scores near 1e20 from huge q and k)")
      for value_class, arguments in (("nan", ("q", "k")), ("inf", ("q", "k", "v")), ("huge", ("q", "k")))),
    KnownDefect("cross_attention", ("triton",), "odd sizes", directions=("bwd",), dtypes=(torch.bfloat16,),
                defect="with 2 keys the bfloat16 q gradient is 0.022 off, past twice the reference's own "
                       "error (0.014)"),
    KnownDefect("filtered_lrelu", ("cuda",), "strided", arguments=("fu", "fd"),
                defect="a strided one-tap filter is rejected (ValueError: cols1: taps must be contiguous)"),
    *(KnownDefect("filtered_lrelu", TRITON_AND_CUDA, value_class,
                  defect="NaN and infinities in any argument reach outputs the reference keeps finite, or "
                         "turn infinities to NaN; the clamped backward passes gradients at them")
      for value_class in ("nan", "inf")),
    KnownDefect("filtered_lrelu", ("triton",), "subnormal", arguments=("x",), directions=("bwd",),
                defect="the backward gives a positive subnormal x the negative slope's gradient (0.084 for "
                       "0.42 in bfloat16), as if it were 0"),
    KnownDefect("filtered_lrelu", ("triton",), "huge", arguments=("fd",), directions=("bwd",),
                defect="a huge down-filter tap gives the float16 x gradient NaN where the reference's "
                       "overflows to an infinity"),
    *(KnownDefect(name, TRITON_AND_CUDA, "subnormal",
                  defect="exact mode breaks the float64 ties of subnormal codes (or z) by their true distances, "
                         "not to the lowest index as the reference and vq.py's contract do")
      for name in ("vq_nearest", "vq_quantize")),
    KnownDefect("vq_quantize", TRITON_AND_CUDA, "nan", arguments=("z",),
                defect="z_q is the code where the reference's z + (e - z) is NaN for a z holding NaN"),
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
    reference, and/or asking only that non-finite outputs are where the reference's are, NaN and
    infinities alike (which_non_finite=False)."""

    op: str
    input_class: str
    arguments: tuple
    oracle: Optional[Callable] = None
    which_non_finite: bool = True


STATED_CONTRACTS = (
    # fastgen/ops/upfirdn2d.py, "Non-finite values": a tap multiplies only pixels of x, never a
    # zero that upsampling inserts or padding adds.
    *(StatedContract("upfirdn2d", value_class, ("f",), oracle=upfirdn2d_real_samples)
      for value_class in ("nan", "inf")),
    # fastgen/ops/ada_norm.py, "Non-finite values": an infinite modulation or weight makes
    # non-finite exactly the outputs and gradients it reaches; whether one is NaN or an infinity
    # follows the docstring's formulas, not torch's group_norm / layer_norm internals.
    StatedContract("ada_group_norm", "inf", ("scale", "weight"), which_non_finite=False),
    StatedContract("ada_layer_norm", "inf", ("scale",), which_non_finite=False),
)


def _stated_contract(name: str, values: Optional[tuple]) -> Optional[StatedContract]:
    if values is None:
        return None
    value_class, argument, _ = values
    return next((contract for contract in STATED_CONTRACTS if contract.op == name
                 and contract.input_class == value_class and argument in contract.arguments), None)


def _codes_unspecified(name: str, args: tuple) -> bool:
    return name in CODE_INDEX_OUTPUT and bool(args[0].detach().float().square().sum(1).isinf().any())


def _excluded(name: str, backend: str, dtype: torch.dtype, direction: str) -> frozenset:
    if PROFILE == "deep":
        return frozenset()
    return frozenset((known.input_class, argument) for known in CI_EXCLUSIONS
                     if known.op == name and backend in known.backends and direction in known.directions
                     and dtype in known.dtypes for argument in known.arguments or (None,))


def non_finite_aware_mismatch(actual: torch.Tensor, expected: torch.Tensor,
                              same_dtype_reference=None, magnitude=None, which_non_finite: bool = True) -> tuple:
    """check.mismatch with NaN and infinities compared by position (module docstring): where
    both sides agree on a non-finite element it counts as exact. which_non_finite=False only
    asks that the non-finite elements are the same, whether NaN or an infinity (an op stating
    its own formula there, STATED_CONTRACTS)."""
    expected64 = expected.detach().double().cpu()
    rounded = expected64.to(actual.dtype).double()
    actual_cpu = actual.detach().cpu()
    actual64 = actual_cpu.double()
    if actual64.shape != rounded.shape:
        return mismatch(actual, expected)
    if which_non_finite:
        wrong = (actual64.isnan() != rounded.isnan()) | ((actual64.isinf() | rounded.isinf()) & (actual64 != rounded))
    else:
        wrong = actual64.isfinite() != rounded.isfinite()
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
        contract = _stated_contract(name, recipe.values)
        compare = non_finite_aware_mismatch if contract is None else functools.partial(
            non_finite_aware_mismatch, which_non_finite=contract.which_non_finite)
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
