"""Addresses past 2^31 elements: views whose index x stride products overflow 32 bits. Each
view lies in a large buffer that is allocated lazily (only the pages its elements touch take
memory), so these run on a CPU with the kernels under the interpreter."""
import pytest
import torch

import fastgen

# A stride that puts element 40 of an axis past 2^31 elements, and storage sized for it.
HUGE_STRIDE = 2**26


def _view_in_large_buffer(shape: tuple, strides: tuple, dtype: torch.dtype, generator) -> torch.Tensor:
    extent = 1 + sum((size - 1) * stride for size, stride in zip(shape, strides))
    view = torch.empty(extent, dtype=dtype).as_strided(shape, strides)
    view.copy_(torch.randn(shape, generator=generator))
    return view


@pytest.mark.parametrize("backend", ["triton"])
def test_cross_attention_reads_head_dims_past_two_to_the_31(backend, generator):
    """D = 40 with the head dim's stride 2^26: d x stride reaches 2.6e9 elements."""
    shape = (1, 5, 1, 40)
    q = _view_in_large_buffer(shape, (0, 40, 0, HUGE_STRIDE), torch.float16, generator)
    k, v = (torch.randn(1, 7, 1, 40, generator=generator).half() for _ in range(2))
    with fastgen.use_backend(backend):
        out = fastgen.cross_attention(q, k, v)
    with fastgen.use_backend("reference"):
        expected = fastgen.cross_attention(q.contiguous(), k, v)
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("backend", ["triton"])
def test_upfirdn2d_reads_columns_past_two_to_the_31(backend, generator):
    """A 1 x 1 x 3 x 40 map whose column stride is 2^26, through a 4-tap up-2 filter."""
    x = _view_in_large_buffer((1, 1, 3, 40), (0, 0, 40, HUGE_STRIDE), torch.float32, generator)
    f = torch.tensor([1.0, 3.0, 3.0, 1.0]) / 8
    with fastgen.use_backend(backend):
        out = fastgen.upfirdn2d(x, f, up=2, padding=[2, 1, 2, 1])
    with fastgen.use_backend("reference"):
        expected = fastgen.upfirdn2d(x.contiguous(), f, up=2, padding=[2, 1, 2, 1])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton"])
def test_linear_attention_reads_heads_and_head_dims_past_two_to_the_31(backend, generator):
    """q's head stride and k's head-dim stride are 2^26: h x stride and d x stride reach 2.6e9
    elements (40 heads of 40 dims)."""
    q = _view_in_large_buffer((1, 5, 40, 40), (0, 40, HUGE_STRIDE, 1), torch.float32, generator)
    k = _view_in_large_buffer((1, 7, 40, 40), (0, 1, 7, HUGE_STRIDE), torch.float32, generator)
    v = torch.randn(1, 7, 40, 40, generator=generator)
    with fastgen.use_backend(backend):
        out = fastgen.linear_attention(q, k, v)
    with fastgen.use_backend("reference"):
        expected = fastgen.linear_attention(q.contiguous(), k.contiguous(), v)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton"])
def test_filtered_lrelu_reads_columns_past_two_to_the_31(backend, generator):
    """A 1 x 1 x 3 x 40 map whose column stride is 2^26, up 2 and down 2 through 4-tap filters."""
    x = _view_in_large_buffer((1, 1, 3, 40), (0, 0, 40, HUGE_STRIDE), torch.float32, generator)
    f = torch.tensor([1.0, 3.0, 3.0, 1.0]) / 8
    with fastgen.use_backend(backend):
        out = fastgen.filtered_lrelu(x, f, f, up=2, down=2, padding=2)
    with fastgen.use_backend("reference"):
        expected = fastgen.filtered_lrelu(x.contiguous(), f, f, up=2, down=2, padding=2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
