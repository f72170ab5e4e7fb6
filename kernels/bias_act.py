"""Triton kernels for bias_act (math in fastgen/ops/bias_act.py).

Both kernels are elementwise passes over a canonical view of the operands, built the way
TensorIterator builds one: the axes are sorted by the output's strides (so the last axis is
the output's unit-stride one: W for NCHW, C for channels_last, C for an (N, C) FC layer),
size-1 axes are dropped and neighbours that every operand walks contiguously are merged.
The bias is one more strided operand, with stride 0 on every axis but `dim`, so broadcasting
needs no special case. The bias axis never merges with its neighbours, since the backward's db
sums run along it: its stride usually keeps it apart, but an expanded b (stride 0 along `dim`
too) would merge by strides alone. At most four
axes remain for the tensors the models produce; an input whose strides leave more (a sliced
5-D view, say) is first copied into the output's layout (the only copy these kernels make).

Each program covers a (BLOCK_R rows x BLOCK_I columns) tile of that view, columns = the last
axis; a row's coordinates on the three outer axes come from two divisions per row, not per
element. Offsets are int64, and so are the row and column indices they are built from.

Forward: one load of x (and the bias), activation, gain and clamp in float32, one store.
Backward: one pass reads dy and either y or x and b (see the op's docstring), writes dx and,
when a bias exists, partial sums of dx for db, so db costs no second read of dx. The
partials are reduced deterministically (fixed order, no atomics):
- bias on the column axis (channels_last, FC layers): each program loops over row_steps tiles
  of rows and writes one partial row of D3 sums; torch sums the partial rows;
- bias on a row axis (NCHW): each program writes one sum per row of its tile; torch sums the
  column blocks and then the axes other than the bias axis.
Arithmetic is float32 after loading (the Triton CPU interpreter also computes bfloat16
arithmetic wrongly).
"""
import torch
import triton
import triton.language as tl

from fastgen.kernels import LAUNCH_OPTIONS
from fastgen.ops.bias_act import ACTIVATIONS, SELU_ALPHA, SELU_SCALE, parse_params

_SELU_SCALE = tl.constexpr(SELU_SCALE)
_SELU_SCALE_ALPHA = tl.constexpr(SELU_SCALE * SELU_ALPHA)

_ELEMENTS_PER_TILE = 1024
_MAX_COLUMN_BLOCK = 1024
# Enough programs to fill an H100 (132 SMs) several times over; the backward's row loop
# lengthens only past that, which bounds the db partials to about this many rows.
_TARGET_PROGRAMS = 1024
_MAX_ROW_STEPS = 64

_NO_SOURCE, _SOURCE_Y, _SOURCE_X = 0, 1, 2
_NO_REDUCE, _REDUCE_ROWS, _REDUCE_COLUMNS = 0, 1, 2


@triton.jit
def _relu(z):
    """max(z, 0) that keeps a NaN, as F.relu does (the default tl.maximum returns 0 for it)."""
    return tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _tanh(z):
    # exp of a non-positive argument only: no overflow for large |z|.
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -t, t)


@triton.jit
def _activate(z, alpha, ACT: tl.constexpr):
    if ACT == 0:
        a = z
    elif ACT == 1:
        a = _relu(z)
    elif ACT == 2:
        a = tl.where(z > 0, z, z * alpha)
    elif ACT == 3:
        a = _tanh(z)
    elif ACT == 4:
        a = _sigmoid(z)
    elif ACT == 5:
        a = tl.where(z >= 0, z, tl.exp(z) - 1.0)
    elif ACT == 6:
        a = tl.where(z >= 0, _SELU_SCALE * z, _SELU_SCALE_ALPHA * (tl.exp(z) - 1.0))
    elif ACT == 7:
        a = _relu(z) + tl.log(1.0 + tl.exp(-tl.abs(z)))
    else:
        a = z * _sigmoid(z)
    return a


@triton.jit
def _piecewise_slope(v, negative_slope, nan_slope):
    """act'(z) of a piecewise linear activation from v, a value with z's sign (z, or y * gain):
    its slope for z <= 0 and for a NaN z (Params.nan_slope) are arguments."""
    return tl.where(v > 0, 1.0, tl.where(v <= 0, negative_slope, nan_slope))


@triton.jit
def _slope(z, negative_slope, nan_slope, ACT: tl.constexpr):
    """act'(z), with torch's one-sided choices at z = 0 (16-bit inputs hit it exactly) and at a
    NaN z (the op's docstring)."""
    if ACT == 3:
        t = _tanh(z)
        d = 1.0 - t * t
    elif ACT == 4:
        s = _sigmoid(z)
        d = s * (1.0 - s)
    elif ACT == 5:
        d = tl.where(z > 0, 1.0, tl.exp(z))
    elif ACT == 6:
        d = tl.where(z > 0, _SELU_SCALE, _SELU_SCALE_ALPHA * tl.exp(z))
    elif ACT == 7:
        d = _sigmoid(z)
    elif ACT == 8:
        s = _sigmoid(z)
        d = s * (1.0 + z * (1.0 - s))
    else:
        d = _piecewise_slope(z, negative_slope, nan_slope)
    return d


@triton.jit
def _block_indices(block, BLOCK: tl.constexpr):
    """The BLOCK row or column indices of block number `block`, int64: the rows, or the columns
    when every axis merges into the last (no bias), can number 2^31 or more."""
    return block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _row_coordinates(rows, D1, D2):
    i2 = rows % D2
    rest = rows // D2
    return rest // D1, rest % D1, i2


@triton.jit
def _offsets(i0, i1, i2, cols, s0, s1, s2, s3):
    return (i0 * s0 + i1 * s1 + i2 * s2)[:, None] + (cols * s3)[None, :]


@triton.jit
def _bias_act_forward_kernel(
    x_ptr, b_ptr, y_ptr,
    D1, D2, D3, R, column_blocks,
    x_s0, x_s1, x_s2, x_s3,
    b_s0, b_s1, b_s2, b_s3,
    y_s0, y_s1, y_s2, y_s3,
    alpha, gain, clamp,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CLAMP: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = _block_indices(pid // column_blocks, BLOCK_R)
    cols = _block_indices(pid % column_blocks, BLOCK_I)
    mask = (rows < R)[:, None] & (cols < D3)[None, :]
    i0, i1, i2 = _row_coordinates(rows, D1, D2)
    z = tl.load(x_ptr + _offsets(i0, i1, i2, cols, x_s0, x_s1, x_s2, x_s3), mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(b_ptr + _offsets(i0, i1, i2, cols, b_s0, b_s1, b_s2, b_s3), mask=mask, other=0.0).to(tl.float32)
    y = _activate(z, alpha, ACT) * gain
    if HAS_CLAMP:  # keeping a NaN, as torch.clamp does
        y = tl.clamp(y, -clamp, clamp, propagate_nan=tl.PropagateNan.ALL)
    tl.store(y_ptr + _offsets(i0, i1, i2, cols, y_s0, y_s1, y_s2, y_s3), y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_act_backward_kernel(
    dy_ptr, ref_ptr, b_ptr, dx_ptr, partial_ptr,
    D1, D2, D3, R, column_blocks, row_steps,
    dy_s0, dy_s1, dy_s2, dy_s3,
    ref_s0, ref_s1, ref_s2, ref_s3,
    b_s0, b_s1, b_s2, b_s3,
    dx_s0, dx_s1, dx_s2, dx_s3,
    alpha, negative_slope, nan_slope, gain, clamp,
    ACT: tl.constexpr, SOURCE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CLAMP: tl.constexpr,
    REDUCE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr,
):
    pid = tl.program_id(0)
    row_program = pid // column_blocks
    column_block = pid % column_blocks
    cols = _block_indices(column_block, BLOCK_I)
    column_sums = tl.zeros((BLOCK_I,), tl.float32)
    for step in range(row_steps):
        rows = _block_indices(row_program.to(tl.int64) * row_steps + step, BLOCK_R)
        mask = (rows < R)[:, None] & (cols < D3)[None, :]
        i0, i1, i2 = _row_coordinates(rows, D1, D2)
        dy = tl.load(dy_ptr + _offsets(i0, i1, i2, cols, dy_s0, dy_s1, dy_s2, dy_s3), mask=mask,
                     other=0.0).to(tl.float32)
        ref_offsets = _offsets(i0, i1, i2, cols, ref_s0, ref_s1, ref_s2, ref_s3)
        # dx = dy * (gain * act'(z) * m): the mask multiplied in keeps a NaN act'(z) NaN where
        # m is 0, as the eager autograd does (and a non-finite dy: the op's docstring).
        if SOURCE == 1:  # y: its sign (times gain's) is z's, and |y| < clamp is the mask
            y = tl.load(ref_ptr + ref_offsets, mask=mask, other=0.0).to(tl.float32)
            factor = gain * _piecewise_slope(y * gain, negative_slope, nan_slope)
            if HAS_CLAMP:
                factor *= (tl.abs(y) < clamp).to(tl.float32)
        elif SOURCE == 2:  # x (+ b): act' at z; the clamp passes |gain * act(z)| <= clamp, as torch's
            z = tl.load(ref_ptr + ref_offsets, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                z += tl.load(b_ptr + _offsets(i0, i1, i2, cols, b_s0, b_s1, b_s2, b_s3), mask=mask,
                             other=0.0).to(tl.float32)
            factor = gain * _slope(z, negative_slope, nan_slope, ACT)
            if HAS_CLAMP:
                factor *= (tl.abs(_activate(z, alpha, ACT) * gain) <= clamp).to(tl.float32)
        else:
            factor = gain
        dx = tl.where(mask, dy * factor, 0.0)
        tl.store(dx_ptr + _offsets(i0, i1, i2, cols, dx_s0, dx_s1, dx_s2, dx_s3),
                 dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if REDUCE == 1:
            tl.store(partial_ptr + column_block.to(tl.int64) * R + rows, tl.sum(dx, axis=1), mask=rows < R)
        elif REDUCE == 2:
            column_sums += tl.sum(dx, axis=0)
    if REDUCE == 2:
        tl.store(partial_ptr + row_program.to(tl.int64) * D3 + cols, column_sums, mask=cols < D3)


def _canonical_view(shape, output_strides, operand_strides, bias_dim):
    """(shape, [strides per operand], bias axis or -1) of the canonical view (module
    docstring), padded to 4 axes at the front; None if more than 4 axes remain. The output's
    strides are operand_strides[0]; bias_dim is None without a bias."""
    axes = sorted((d for d in range(len(shape)) if shape[d] != 1), key=lambda d: -output_strides[d])
    groups = []  # runs of original axes merged into one canonical axis, outermost first
    for d in axes:
        if (groups and bias_dim not in (d, groups[-1][-1])
                and all(s[groups[-1][-1]] == s[d] * shape[d] for s in operand_strides)):
            groups[-1].append(d)
        else:
            groups.append([d])
    if len(groups) > 4:
        return None
    groups = [[]] * (4 - len(groups)) + groups
    sizes = [1] * 4
    for k, group in enumerate(groups):
        for d in group:
            sizes[k] *= shape[d]
    strides = [[s[group[-1]] if group else 0 for group in groups] for s in operand_strides]
    bias_axis = next((k for k, group in enumerate(groups) if bias_dim in group), -1)
    return sizes, strides, bias_axis


def _bias_strides(b, ndim: int, dim: int):
    return [b.stride(0) if d == dim else 0 for d in range(ndim)]


def _prepare(out, inputs, b, dim):
    """The canonical view of out, inputs (list, None entries allowed) and the bias, copying an
    input into out's layout when its strides leave more than 4 axes."""
    shape = list(out.shape)
    bias_strides = [_bias_strides(b, len(shape), dim)] if b is not None else []

    def view_of(tensors):
        strides = [list(out.stride())] + [list(t.stride()) for t in tensors if t is not None] + bias_strides
        return _canonical_view(shape, strides[0], strides, dim if b is not None else None)

    view = view_of(inputs)
    if view is None:
        # In out's own layout everything merges but the bias axis: at most 3 axes remain.
        inputs = [None if t is None else torch.empty_like(out).copy_(t) for t in inputs]
        view = view_of(inputs)
    return view, inputs


def _tiling(sizes) -> tuple:
    """(rows, column blocks, BLOCK_R, BLOCK_I) of the canonical view's (rows x D3) grid."""
    block_i = min(triton.next_power_of_2(sizes[3]), _MAX_COLUMN_BLOCK)
    rows = sizes[0] * sizes[1] * sizes[2]
    return rows, triton.cdiv(sizes[3], block_i), max(1, _ELEMENTS_PER_TILE // block_i), block_i


def bias_act_forward(x, b, act, alpha, gain, clamp, dim, *, out) -> None:
    """out = clamp(gain * act(x + b)), every operand through its strides."""
    if out.numel() == 0:
        return
    params = parse_params(x, b, act, alpha, gain, clamp, dim)
    (sizes, strides, _), (x,) = _prepare(out, [x], b, params.dim)
    rows, column_blocks, block_r, block_i = _tiling(sizes)
    out_strides, x_strides, *bias_strides = strides
    _bias_act_forward_kernel[(triton.cdiv(rows, block_r) * column_blocks,)](
        x, out if b is None else b, out,
        *sizes[1:], rows, column_blocks,
        *x_strides, *(bias_strides[0] if b is not None else [0, 0, 0, 0]), *out_strides,
        params.alpha, params.gain, 0.0 if params.clamp is None else params.clamp,
        ACT=ACTIVATIONS[params.act].index, HAS_BIAS=b is not None, HAS_CLAMP=params.clamp is not None,
        BLOCK_R=block_r, BLOCK_I=block_i, num_warps=4, **LAUNCH_OPTIONS,
    )


def _reduce_partials(partial, reduce, sizes, bias_axis) -> torch.Tensor:
    if reduce == _REDUCE_COLUMNS:
        return partial.sum(0)
    per_row = partial.sum(0).view(sizes[:3])
    if bias_axis < 0:  # a single bias entry: every element feeds it
        return per_row.sum().reshape(1)
    return per_row.sum([k for k in range(3) if k != bias_axis])


def bias_act_backward(dy, x, b, y, act, alpha, gain, clamp, dim, *, out) -> None:
    """out = (dx, db): dx = dy * gain * act'(z) * mask and, with a bias, db = sum of dx."""
    dx, db = out
    if dx.numel() == 0:
        db.zero_()
        return
    params = parse_params(dy, b, act, alpha, gain, clamp, dim)
    source = params.derivative_source(dy.dtype)
    ref = {"x": x, "y": y}.get(source)
    (sizes, strides, bias_axis), (dy, ref) = _prepare(dx, [dy, ref], b, params.dim)
    rows, column_blocks, block_r, block_i = _tiling(sizes)
    row_tiles = triton.cdiv(rows, block_r)
    reduce = _NO_REDUCE if b is None else _REDUCE_COLUMNS if bias_axis == 3 else _REDUCE_ROWS
    row_steps = 1
    if reduce == _REDUCE_COLUMNS:
        wanted_row_programs = max(1, _TARGET_PROGRAMS // column_blocks)
        row_steps = min(_MAX_ROW_STEPS, max(1, row_tiles // wanted_row_programs))
    row_programs = triton.cdiv(row_tiles, row_steps)
    partial_shape = {_NO_REDUCE: (0,), _REDUCE_ROWS: (column_blocks, rows),
                     _REDUCE_COLUMNS: (row_programs, sizes[3])}[reduce]
    partial = torch.empty(partial_shape, dtype=torch.float32, device=dx.device)
    dx_strides, dy_strides, *rest = strides
    ref_strides = rest.pop(0) if ref is not None else [0, 0, 0, 0]
    bias_strides = rest[0] if b is not None else [0, 0, 0, 0]
    _bias_act_backward_kernel[(row_programs * column_blocks,)](
        dy, dx if ref is None else ref, dx if b is None else b, dx, partial,
        *sizes[1:], rows, column_blocks, row_steps,
        *dy_strides, *ref_strides, *bias_strides, *dx_strides,
        params.alpha, params.negative_slope, params.nan_slope, params.gain,
        0.0 if params.clamp is None else params.clamp,
        ACT=ACTIVATIONS[params.act].index,
        SOURCE={None: _NO_SOURCE, "y": _SOURCE_Y, "x": _SOURCE_X}[source],
        HAS_BIAS=b is not None, HAS_CLAMP=params.clamp is not None, REDUCE=reduce,
        BLOCK_R=block_r, BLOCK_I=block_i, num_warps=4, **LAUNCH_OPTIONS,
    )
    if b is not None:
        db.copy_(_reduce_partials(partial, reduce, sizes, bias_axis))
