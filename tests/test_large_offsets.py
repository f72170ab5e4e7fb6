"""Addresses past 2^31 elements: views whose index x stride products overflow 32 bits. Each
view lies in a large buffer that is allocated lazily (only the pages its elements touch take
memory), so these run on a CPU with the kernels under the interpreter.

An index itself passes 2^31 only on an axis of 2^31 elements or more (channels, positions,
pixels, columns). An op on such a tensor launches 2^19 programs or more, over an hour under
the interpreter, so those tests launch one program that calls the kernels' own index and load
helpers at such an index, with the buffer behind them allocated lazily as well."""
import pytest
import torch
import triton
import triton.language as tl

import fastgen
from fastgen.kernels import ada_norm as ada_norm_kernels
from fastgen.kernels import bias_act as bias_act_kernels
from fastgen.kernels import rms_norm_2d as rms_norm_2d_kernels

# A stride that puts element 40 of an axis past 2^31 elements, and storage sized for it.
HUGE_STRIDE = 2**26


def _view_in_large_buffer(shape: tuple, strides: tuple, dtype: torch.dtype, generator) -> torch.Tensor:
    extent = 1 + sum((size - 1) * stride for size, stride in zip(shape, strides))
    view = torch.empty(extent, dtype=dtype).as_strided(shape, strides)
    view.copy_(torch.randn(shape, generator=generator))
    return view


def _assert_matches_the_reference(op, args: tuple, backend: str, rtol: float, atol: float) -> None:
    """op(*args) on `backend` against the reference backend on contiguous copies of args, every
    output compared."""
    with fastgen.use_backend(backend):
        out = op(*args)
    with fastgen.use_backend("reference"):
        expected = op(*(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args))
    for actual, reference in zip(*(t if isinstance(t, tuple) else (t,) for t in (out, expected))):
        torch.testing.assert_close(actual.float(), reference.float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", ["triton"])
def test_cross_attention_reads_head_dims_past_two_to_the_31(backend, generator):
    """D = 40 with the head dim's stride 2^26: d x stride reaches 2.6e9 elements."""
    shape = (1, 5, 1, 40)
    q = _view_in_large_buffer(shape, (0, 40, 0, HUGE_STRIDE), torch.float16, generator)
    k, v = (torch.randn(1, 7, 1, 40, generator=generator).half() for _ in range(2))
    _assert_matches_the_reference(fastgen.cross_attention, (q, k, v), backend, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("backend", ["triton"])
def test_upfirdn2d_reads_columns_past_two_to_the_31(backend, generator):
    """A 1 x 1 x 3 x 40 map whose column stride is 2^26, through a 4-tap up-2 filter."""
    x = _view_in_large_buffer((1, 1, 3, 40), (0, 0, 40, HUGE_STRIDE), torch.float32, generator)
    f = torch.tensor([1.0, 3.0, 3.0, 1.0]) / 8
    _assert_matches_the_reference(fastgen.upfirdn2d, (x, f, 2, 1, [2, 1, 2, 1]), backend, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton"])
def test_linear_attention_reads_heads_and_head_dims_past_two_to_the_31(backend, generator):
    """q's head stride and k's head-dim stride are 2^26: h x stride and d x stride reach 2.6e9
    elements (40 heads of 40 dims)."""
    q = _view_in_large_buffer((1, 5, 40, 40), (0, 40, HUGE_STRIDE, 1), torch.float32, generator)
    k = _view_in_large_buffer((1, 7, 40, 40), (0, 1, 7, HUGE_STRIDE), torch.float32, generator)
    v = torch.randn(1, 7, 40, 40, generator=generator)
    _assert_matches_the_reference(fastgen.linear_attention, (q, k, v), backend, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton"])
def test_filtered_lrelu_reads_columns_past_two_to_the_31(backend, generator):
    """A 1 x 1 x 3 x 40 map whose column stride is 2^26, up 2 and down 2 through 4-tap filters."""
    x = _view_in_large_buffer((1, 1, 3, 40), (0, 0, 40, HUGE_STRIDE), torch.float32, generator)
    f = torch.tensor([1.0, 3.0, 3.0, 1.0]) / 8
    _assert_matches_the_reference(fastgen.filtered_lrelu, (x, f, f, None, 2, 2, 2), backend, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton"])
def test_qk_norm_rope_reads_head_dims_past_two_to_the_31(backend, generator):
    """q's head-dim stride is 2^26 (D = 40): d x stride reaches 2.6e9 elements, in the norm's
    sums and in the rotation's pairs."""
    q = _view_in_large_buffer((1, 3, 2, 40), (0, 80, 40, HUGE_STRIDE), torch.float32, generator)
    k = torch.randn(1, 3, 2, 40, generator=generator)
    weight_q, weight_k = (torch.randn(40, generator=generator) for _ in "qk")
    angles = torch.randn(3, 20, generator=generator)
    _assert_matches_the_reference(fastgen.qk_norm_rope, (q, k, weight_q, weight_k, angles.cos(), angles.sin()),
                                  backend, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton"])
def test_shortcuts_read_columns_past_two_to_the_31(backend, generator):
    """DC-AE's two shortcuts on maps whose column stride is 2^26 (40 columns)."""
    x = _view_in_large_buffer((1, 4, 2, 40), (0, 80, 40, HUGE_STRIDE), torch.float32, generator)
    y = _view_in_large_buffer((1, 8, 2, 40), (0, 80, 40, HUGE_STRIDE), torch.float32, generator)
    _assert_matches_the_reference(fastgen.pixel_unshuffle_channel_avg, (x, 2, 8), backend, rtol=1e-6, atol=1e-6)
    _assert_matches_the_reference(fastgen.channel_dup_pixel_shuffle, (y, 2, 4), backend, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton"])
def test_layer_norms_read_channels_past_two_to_the_31(backend, generator):
    """ada_layer_norm's x and the gated residual's branch with channel stride 2^26 (C = 40)."""
    x = _view_in_large_buffer((1, 3, 40), (0, 40, HUGE_STRIDE), torch.float32, generator)
    residual = torch.randn(1, 3, 40, generator=generator)
    gate, scale, shift = (torch.randn(1, 40, generator=generator) for _ in range(3))
    _assert_matches_the_reference(fastgen.ada_layer_norm, (x, scale, shift), backend, rtol=1e-5, atol=1e-5)
    _assert_matches_the_reference(fastgen.gated_residual_ada_layer_norm, (residual, x, gate, scale, shift), backend,
                                  rtol=1e-5, atol=1e-5)


def _values_past_two_to_the_31(count: int, generator) -> torch.Tensor:
    """A lazily allocated float16 buffer of 2^31 + count elements, random from 2^31 on (4 GiB
    of address space, one page of memory)."""
    buffer = torch.empty(2**31 + count, dtype=torch.float16)
    buffer[2**31:] = torch.randn(count, generator=generator)
    return buffer


@triton.jit
def _group_channels_kernel(x_ptr, channel_ptr, pivot_ptr, g0, G, CPG, CPG_TILE: tl.constexpr):
    channel, _ = ada_norm_kernels._group_rows(g0, 0, G, CPG, 1, CPG_TILE)
    tl.store(channel_ptr + tl.arange(0, CPG_TILE), channel)
    pivot = ada_norm_kernels._pivots(x_ptr, tl.program_id(0), g0, G, CPG, x_sb=0, x_sc=1, GPP=1)
    tl.store(pivot_ptr + tl.arange(0, 1), pivot)


def test_ada_group_norm_reads_channels_past_two_to_the_31(generator):
    """Group 2 of 4 groups of 2^30 channels starts at channel 2^31: the rows of its tiles and
    its pivot, the element its statistics are shifted by, are read there."""
    x = _values_past_two_to_the_31(1, generator)
    channel = torch.empty(4, dtype=torch.int64)
    pivot = torch.empty(1, dtype=torch.float32)
    _group_channels_kernel[(1,)](x, channel, pivot, 2, 4, 2**30, CPG_TILE=4)
    assert channel.tolist() == [2**31 + i for i in range(4)]
    assert pivot.item() == x[2**31].item()


@triton.jit
def _chunk_mean_kernel(x_ptr, out_ptr, chunk, S, CHUNK, BLOCK_S: tl.constexpr):
    begin, end = ada_norm_kernels._chunk_range(chunk, S, CHUNK)
    count, mean, _ = ada_norm_kernels._range_stats(
        x_ptr, tl.program_id(0), 0, tl.zeros((1,), tl.float32), begin, end, G=1, CPG=1,
        x_sb=0, x_sc=0, x_ss=1, GPP=1, CPG_TILE=1, BLOCK_S=BLOCK_S)
    tl.store(out_ptr + tl.arange(0, 1), count)
    tl.store(out_ptr + 1 + tl.arange(0, 1), mean)


def test_ada_group_norm_reads_positions_past_two_to_the_31(generator):
    """The split path's chunk 2 of 2^30 positions starts at position 2^31 (layer norm's row
    ranges come from the same helper): its statistics are those of the positions there."""
    x = _values_past_two_to_the_31(5, generator)
    out = torch.empty(2, dtype=torch.float32)
    _chunk_mean_kernel[(1,)](x, out, 2, 2**31 + 5, 2**30, BLOCK_S=8)
    assert out[0].item() == 5
    torch.testing.assert_close(out[1], x[2**31:].float().mean(), rtol=1e-5, atol=1e-6)


@triton.jit
def _pixel_tile_kernel(x_ptr, out_ptr, tile_index, HW, TILES_PER_IMAGE, BLOCK_P: tl.constexpr):
    b, c, s, mask = rms_norm_2d_kernels._tile(tile_index, 1, HW, HW, TILES_PER_IMAGE, 1, BLOCK_P)
    offsets = rms_norm_2d_kernels._offsets(b, c, s, HW, sb=0, sc=0, sh=0, sw=1, FLAT_PIXELS=True)
    tl.store(out_ptr + tl.arange(0, BLOCK_P)[None, :], tl.load(x_ptr + offsets, mask=mask))


def test_trms2d_reads_pixels_past_two_to_the_31(generator):
    """A single-channel image of 2^31 + 16 pixels in tiles of 16: tile 2^27 starts at pixel
    2^31 and reads the pixels there."""
    x = _values_past_two_to_the_31(16, generator)
    out = torch.empty(16, dtype=torch.float16)
    _pixel_tile_kernel[(1,)](x, out, 2**27, 2**31 + 16, 2**27 + 1, BLOCK_P=16)
    assert torch.equal(out, x[2**31:])


@triton.jit
def _column_block_kernel(x_ptr, out_ptr, column_block, D3, BLOCK_I: tl.constexpr):
    cols = bias_act_kernels._block_indices(column_block, BLOCK_I)
    row = tl.zeros((1,), tl.int64)
    offsets = bias_act_kernels._offsets(row, row, row, cols, s0=0, s1=0, s2=0, s3=1)
    tl.store(out_ptr + tl.arange(0, BLOCK_I)[None, :], tl.load(x_ptr + offsets, mask=(cols < D3)[None, :]))


def test_bias_act_reads_columns_past_two_to_the_31(generator):
    """Without a bias every axis of a dense tensor merges into the column axis: with 2^31 + 16
    elements, column block 2^27 of 16 starts at column 2^31 and reads the elements there."""
    x = _values_past_two_to_the_31(16, generator)
    out = torch.empty(16, dtype=torch.float16)
    _column_block_kernel[(1,)](x, out, 2**27, 2**31 + 16, BLOCK_I=16)
    assert torch.equal(out, x[2**31:])
