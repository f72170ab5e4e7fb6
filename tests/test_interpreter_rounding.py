"""The Triton interpreter's conversion to bfloat16 (conftest.py) rounds as a GPU does."""
import math

import pytest
import torch
import triton
import triton.language as tl

from fastgen.ops.registry import triton_interpreter_enabled

pytestmark = pytest.mark.skipif(not triton_interpreter_enabled(), reason="runs the Triton interpreter only")


@triton.jit
def _store_converted(x_ptr, cast_ptr, store_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets, mask=offsets < n)
    tl.store(cast_ptr + offsets, x.to(tl.bfloat16), mask=offsets < n)  # an explicit cast
    tl.store(store_ptr + offsets, x, mask=offsets < n)  # the store's own conversion


def _values(dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    one_ulp = 2.0**-7  # bfloat16's spacing above 1
    specials = [0.16112, 1 + one_ulp / 2, 1 + 3 * one_ulp / 2, -(1 + one_ulp / 2), 1 + one_ulp / 2 + 2**-20,
                -0.0, math.inf, -math.inf, math.nan, 3.3e38, 3.4e38, 1e-39, -1e-40, 65504.0, 6e-8]
    x = torch.tensor(specials, dtype=torch.float64)
    finite_in_dtype = x.to(dtype).isfinite() | ~x.isfinite()
    return torch.cat([x[finite_in_dtype], torch.randn(1000, generator=generator, dtype=torch.float64) * 100]).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_conversion_to_bfloat16_rounds_to_nearest_even(dtype, generator):
    """Halfway cases, a value just past halfway, signed zero, infinities, NaN, bfloat16's
    largest values and its overflow (3.4e38 rounds to inf), subnormals and 1,000 random values,
    by the explicit cast and by a store: the bits torch's rounding gives."""
    x = _values(dtype, generator)
    cast, stored = (torch.empty(len(x), dtype=torch.bfloat16) for _ in "cs")
    _store_converted[(1,)](x, cast, stored, len(x), BLOCK=triton.next_power_of_2(len(x)))
    expected = x.to(torch.bfloat16)
    for name, actual in (("cast", cast), ("store", stored)):
        same = (actual.view(torch.int16) == expected.view(torch.int16)) | (actual.isnan() & expected.isnan())
        assert same.all(), (name, x[~same][:4].tolist(), actual[~same][:4].tolist(), expected[~same][:4].tolist())
