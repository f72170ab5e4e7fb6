"""Filtered leaky ReLU: StyleGAN3's alias-free nonlinearity, upsample -> lrelu -> downsample.

`filtered_lrelu(x, fu=None, fd=None, b=None, up=1, down=1, padding=0, gain=sqrt(2),
slope=0.2, clamp=None, flip_filter=False)` with x of shape (B, C, H, W) (any strides) computes,
per channel plane,

    z = upfirdn2d(x + b, fu, up=up, padding=padding, gain=up*up)     (b[c] added to channel c)
    v = gain * z
    a = clamp(lrelu(v), -clamp, clamp),  lrelu(v) = v if v > 0 else slope * v
    y = upfirdn2d(a, fd, down=down)

with the upfirdn2d of fastgen/ops/upfirdn2d.py (flip_filter applies to both filters). The gain
multiplies before the leaky ReLU, as the SPEC orders it (for gain > 0 the order does not
matter; StyleGAN3's CUDA kernel also scales first). The gain up*up restores a normalized
filter's DC gain after zero insertion leaves 1 / up^2 of the samples non-zero. A 1-D filter of
n taps is separable (f outer f); None is the identity. `padding` is an int, (px, py) or
(px0, px1, py0, py1) in pixels of the upsampled image; negative crops.
With (fuh, fuw) / (fdh, fdw) the filter sizes:

    out_h = (H*up + py0 + py1 - (fuh - 1) - (fdh - 1) + down - 1) // down        (likewise W)

z is up^2 times larger than x; the fused kernel never writes it to memory. Only the part of z
that fd reads exists conceptually: rows [0, zh), zh = (out_h - 1)*down + fdh, likewise columns.

Gradients. The map x -> y is piecewise linear: for fixed signs, y is linear in x, with the
per-sample derivative of a with respect to z

    d = gain * (1 if v > 0 else slope) * [|lrelu(v)| <= clamp]     (inclusive, like torch.clamp)

(a NaN v is on the negative side, as in leaky_relu's gradient, and clamped, as in clamp's: its
d is 0 with a clamp; a clamped sample's gradient is 0 even where the incoming one is NaN or
infinite, as torch.clamp's backward selects rather than multiplies)

so dx = U^T (d * D^T dy), where U / D are the two (linear) upfirdn2d maps and their transposes
are upfirdn2d with the filter flipped and up / down swapped. The forward therefore records, per
sample of z, which of the three cases of d holds (a 2-bit "code": 0 negative side, 1 positive
side, 2 clamped), packed four to a byte along the columns (the code of column j in bits
2*(j % 4) of byte j // 4) in a uint8 tensor of shape (B, C, zh, ceil(zw / 4)): an eighth of z's
bytes in float16. A sample whose v lies within rounding of a case's boundary (0, or +-clamp)
may take either case: where the terms of z cancel exactly (x + b values of opposite sign under
equal taps) the eager reference's v is 0, the negative side, and the kernels' fused
multiply-adds leave a rounding error of either sign; every gradient (dx, db and the filters')
follows the code the forward recorded (measured: one such sample in a bfloat16 draw, dx 0.108
where the float64 codes give 0.267 at the two samples it reaches).
`filtered_lrelu_backward(dy, codes, ...)` evaluates dx from dy and the codes alone, and db = dx
summed over (B, H, W) in float32 before dx is rounded.
The second derivative through the codes is zero almost everywhere, and dx is linear in dy, so the gradient
of dx with respect to dy is the forward map with frozen codes, dy' = D (d * U g): written with
the upfirdn2d op, whose own gradients exist to every order. That is what R1 regularisation
differentiates through. Filter gradients (StyleGAN3's filters are
constant buffers) come from autograd through filtered_lrelu_real_samples (below), recomputed in
the backward, and are first order only: each stage's filter gradient is upfirdn2d's, the
reference's sums.

Three custom ops: `filtered_lrelu` (registered in OPS, output y; its backward recomputes the
codes), the internal `filtered_lrelu_with_codes` (y and the codes; what the public function
calls when a gradient is needed, so the backward does not recompute) and
`filtered_lrelu_backward`. Arithmetic is float32 (float64 for float64 x); outputs take x's dtype.

Precision of float16. For float16 the Triton kernel runs the forward's second stage (fd over the
activation a; the first, which decides the codes, stays float32) and the backward's separable
stages in float16 (taps, stage inputs and half-filtered rows rounded to float16, float32
accumulation) wherever that stage's filter is one term (1-D, or a separable 2-D filter:
factor_tables) and neither it nor the previous stage's has a tap past 2^14 (whose small taps, or
the spread of values they make, float16 cannot hold beside it), so y, dx and db carry the
roundings of their terms. Each element of y is within float16's tolerance of the same sum taken
over |a| and |fd| (measured: y 1.3789 where float64 gives 1.3843, 0.0054 off where float16's
tolerance of |y| allows 0.0048, 5.2e-4 of the terms' sum 10.4; up1 down2 with a separable 4 x 3
fd and slope -0.3). Each element of dx is within float16's tolerance of the same sums taken over
|dy|, |taps| and the larger slope's |d| (measured: dx -0.4727 where float64 gives -0.4678,
0.0049 off where float16's tolerance of |dx|, widened to twice the float16 reference's own
error, allows 0.0038; up2 down1 with a 5-tap up filter), and db as "Precision of db" states
(measured: 1.0e-4 of sum |dx|, db 0.0082 where float64 gives 0.0133 with sum |dx| = 49, on
StyleGAN3's up2 down2 geometry with a 16-tap down filter and a clamp, whose codes equal
float64's there; float32 stages on the same values are off by 5e-7).

Precision of db. db is dx summed over (B, H, W) in float32, on both backends and for every
dtype. Where dx's signs balance, that sum cancels, and rounding its terms (each dx, and each
partial sum) costs more than a dtype's tolerance of |db| in any order of summation, the float32
eager reference's included. Each element of db is within its dtype's tolerance of the channel's
sum of |dx|, not of |db| (measured: float32 db -15.61248 where float64 gives -15.61198, 5.0e-4
off, 1.6e-8 of sum |dx| = 31,443, and the float32 eager reference 4.5e-4 off; up2 down1 with a
7-tap up and a 13-tap down filter on 2 x 4 x 32 x 5).

Non-finite values. A filter tap multiplies only samples of the signal it filters: the zeros
that upsampling inserts, the padding around x and, in the backward, the zeros of the
downsampling's and the crop's adjoints (around dy, and outside z's extent) are absent, not
multiplied (as upfirdn2d's contract states for one stage). The eager reference convolves
zero-stuffed, padded images, so a NaN or infinite tap also meets those zeros there (NaN * 0 and
inf * 0 are NaN) and the reference has NaN at more outputs and gradients than this contract;
`filtered_lrelu_real_samples` evaluates the contract eagerly (each stage an
upfirdn2d_real_samples, autograd its gradients) and agrees with the reference up to rounding
when every input is finite. Otherwise NaN and infinities in x, b and dy propagate through the
formulas above: a NaN v is coded as the gradient paragraph says, torch.clamp keeps a NaN, and a
clamped sample passes no gradient. An infinite tap of a second stage (fd in the forward, fu in
the backward) meets samples the first stage summed (a, or da = D^T dy), and inf * 0 is NaN
where inf * 1e-9 is an infinity: where such a sum cancels, its rounding decides between NaN and
either infinity (two dy that cancel exactly give da 0 to the eager reference, and a rounding
error to a fused multiply-add: dx NaN there, -inf here). The CUDA kernel follows this
contract: non-finite exactly where it is, and NaN or an infinity as above. The Triton kernel
promises less: its banded matrix products also multiply the zeros off the band, so a NaN or
infinity in a tile's stage input (x + b or dy, an activation a or da, or a tap of that stage's
filter) makes every output of that tile NaN: its outputs are non-finite at least wherever the
contract's are (NaN also where the contract has an infinity, or a finite value in that tile),
never finite where the contract's are not. Its codes are the contract's all the same (a tile
whose first stage comes out NaN or inf, from x + b, a tap or an overflow, computes it again
over real samples, a non-finite tap meeting only those), so gradients away from the non-finite
values keep their slopes.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from fastgen import _cuda
from fastgen.ops.registry import (CheckCase, Op, check_float_tensor, check_number, check_same_dtype_and_device,
                                  define_custom_op, random_tensor, register, register_autograd)
from fastgen.ops.upfirdn2d import (
    adjoint_padding,
    check_filter,
    filter_size,
    parse_padding,
    upfirdn2d,
    upfirdn2d_real_samples,
    upfirdn2d_reference,
)

_NAME = "filtered_lrelu"
CODE_NEGATIVE, CODE_POSITIVE, CODE_CLAMPED = 0, 1, 2
_CODES_PER_BYTE = 4


def _check_factor(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{_NAME}: {name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{_NAME}: {name} must be >= 1, got {value}")


def normalized_padding(padding) -> list:
    """padding as [px0, px1, py0, py1] (upfirdn2d's forms), with this op's name in the error."""
    try:
        return parse_padding(padding)
    except TypeError:
        raise TypeError(
            f"{_NAME}: padding must be an int, (px, py) or (px0, px1, py0, py1) ints, got {padding!r}"
        ) from None


def check_arguments(x, fu, fd, b, up, down, padding, gain, slope, clamp) -> None:
    """Validate every argument; errors name the argument and what was expected."""
    check_float_tensor(_NAME, "x", x)
    if x.dim() != 4:
        raise ValueError(f"{_NAME}: x must be 4-D (B, C, H, W), got shape {tuple(x.shape)}")
    check_filter(_NAME, "fu", fu, x)
    check_filter(_NAME, "fd", fd, x)
    if b is not None:
        if not isinstance(b, torch.Tensor):
            raise TypeError(f"{_NAME}: b must be a torch.Tensor or None, got {type(b).__name__}")
        check_same_dtype_and_device(_NAME, "b", b, x, "x")
        if b.shape != (x.shape[1],):
            raise ValueError(
                f"{_NAME}: b must have shape ({x.shape[1]},) (one entry per channel), got {tuple(b.shape)}")
    _check_factor("up", up)
    _check_factor("down", down)
    for name, value in (("gain", gain), ("slope", slope)):
        check_number(_NAME, name, value)
    check_number(_NAME, "clamp", clamp, allow_none=True)
    if clamp is not None and clamp < 0:
        raise ValueError(f"{_NAME}: clamp must be >= 0 or None, got {clamp}")
    intermediate_size(x.shape, fu, fd, up, down, normalized_padding(padding))


def intermediate_size(x_shape, fu, fd, up, down, padding) -> tuple:
    """(zh, zw, out_h, out_w): the part of z that fd reads, and the output size (module
    docstring); raises when the padding leaves no output."""
    px0, px1, py0, py1 = padding
    (fuh, fuw), (fdh, fdw) = filter_size(fu), filter_size(fd)
    _, _, height, width = x_shape
    # z as upfirdn2d(fu) leaves it (a "valid" filter over the padded, upsampled image).
    full_h = height * up + py0 + py1 - fuh + 1
    full_w = width * up + px0 + px1 - fuw + 1
    if full_h < fdh or full_w < fdw:
        raise ValueError(
            f"{_NAME}: padding {list(padding)} leaves an empty output: the upsampled, padded, fu-filtered image is "
            f"{max(full_h, 0)} x {max(full_w, 0)}, smaller than the {fdh} x {fdw} fd filter"
        )
    out_h, out_w = (full_h - fdh) // down + 1, (full_w - fdw) // down + 1
    return (out_h - 1) * down + fdh, (out_w - 1) * down + fdw, out_h, out_w


def _memory_format(x: torch.Tensor):
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _allocate_output(x, fu, fd, b, up, down, padding, gain, slope, clamp, flip_filter):
    check_arguments(x, fu, fd, b, up, down, padding, gain, slope, clamp)
    _, _, out_h, out_w = intermediate_size(x.shape, fu, fd, up, down, padding)
    return torch.empty((*x.shape[:2], out_h, out_w), dtype=x.dtype, device=x.device, memory_format=_memory_format(x))


def _packed_codes_shape(batch_channels, zh: int, zw: int) -> tuple:
    return (*batch_channels, zh, -(-zw // _CODES_PER_BYTE))


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Per-sample codes (..., zw) -> 2-bit codes packed along the last axis (module docstring)."""
    padded = F.pad(codes.to(torch.int32), [0, -codes.shape[-1] % _CODES_PER_BYTE])
    shifts = 2 * torch.arange(_CODES_PER_BYTE, device=codes.device)
    return (padded.unflatten(-1, (-1, _CODES_PER_BYTE)) << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, zw: int) -> torch.Tensor:
    shifts = 2 * torch.arange(_CODES_PER_BYTE, device=packed.device)
    return ((packed.to(torch.int32)[..., None] >> shifts) & 3).flatten(-2)[..., :zw]


def _allocate_output_and_codes(x, fu, fd, b, up, down, padding, gain, slope, clamp, flip_filter):
    y = _allocate_output(x, fu, fd, b, up, down, padding, gain, slope, clamp, flip_filter)
    zh, zw, _, _ = intermediate_size(x.shape, fu, fd, up, down, padding)
    return y, torch.empty(_packed_codes_shape(x.shape[:2], zh, zw), dtype=torch.uint8, device=x.device)


def activation_and_codes(x, fu, fd, b, up, down, padding, gain, slope, clamp, flip_filter, with_codes=True):
    """(a, codes) of the module docstring, in eager ops on the cropped z; codes None unless
    with_codes."""
    zh, zw, _, _ = intermediate_size(x.shape, fu, fd, up, down, padding)
    compute = torch.promote_types(x.dtype, torch.float32)
    xb = x.to(compute) if b is None else x.to(compute) + b.to(compute)[:, None, None]
    z = upfirdn2d_reference(xb, fu, up, 1, padding, flip_filter, up * up)[:, :, :zh, :zw]
    v = z * gain
    a = F.leaky_relu(v, slope)
    codes = pack_codes(sample_codes(v, slope, clamp)) if with_codes else None
    return a if clamp is None else a.clamp(-clamp, clamp), codes


def sample_codes(v: torch.Tensor, slope: float, clamp) -> torch.Tensor:
    """Each sample's case of d (module docstring) from v, unpacked."""
    codes = torch.where(v > 0, CODE_POSITIVE, CODE_NEGATIVE)
    if clamp is None:
        return codes
    # torch.clamp's gradient mask is lower <= a <= upper: false at NaN too.
    return torch.where(F.leaky_relu(v, slope).abs() <= clamp, codes, CODE_CLAMPED)


def filtered_lrelu_with_codes_reference(x, fu, fd, b, up, down, padding, gain, slope, clamp, flip_filter,
                                        with_codes=True):
    """The eager formulation (zero insertion, pad, conv2d, separate activation) and the codes."""
    check_arguments(x, fu, fd, b, up, down, padding, gain, slope, clamp)
    padding = normalized_padding(padding)
    a, codes = activation_and_codes(x, fu, fd, b, up, down, padding, gain, slope, clamp, flip_filter, with_codes)
    return upfirdn2d_reference(a, fd, 1, down, 0, flip_filter, 1.0).to(x.dtype), codes


def filtered_lrelu_reference(x, fu=None, fd=None, b=None, up=1, down=1, padding=0, gain=math.sqrt(2), slope=0.2,
                             clamp=None, flip_filter=False):
    """The eager formulation in float32 (float64 for float64 x): the ground truth."""
    return filtered_lrelu_with_codes_reference(x, fu, fd, b, up, down, padding, gain, slope, clamp, flip_filter,
                                               with_codes=False)[0]


def activation_through_codes(v: torch.Tensor, codes: torch.Tensor, slope: float, clamp) -> torch.Tensor:
    """leaky_relu(v, slope) clamped, with each sample's case (and so its gradient) taken from its
    packed code rather than decided from v: where v lies within rounding of a boundary, the case
    the forward recorded."""
    unpacked = unpack_codes(codes, v.shape[-1])
    if unpacked.shape != v.shape:
        raise ValueError(f"codes of shape {tuple(codes.shape)} do not cover v of shape {tuple(v.shape)}")
    activated = F.leaky_relu(v, slope)
    if clamp is not None:
        activated = activated.clamp(-clamp, clamp)
    return torch.where(unpacked == CODE_POSITIVE, v,
                       torch.where(unpacked == CODE_NEGATIVE, v * slope, activated.detach()))


def real_samples_pre_activation(x, fu, fd, b, up, down, padding, gain, flip_filter) -> torch.Tensor:
    """v = gain z of the contract (filtered_lrelu_real_samples) over exactly the rows and columns
    fd reads, in float32 (float64 for float64 x)."""
    px0, px1, py0, py1 = normalized_padding(padding)
    zh, zw, _, _ = intermediate_size(x.shape, fu, fd, up, down, [px0, px1, py0, py1])
    fuh, fuw = filter_size(fu)
    full_h = x.shape[2] * up + py0 + py1 - fuh + 1
    full_w = x.shape[3] * up + px0 + px1 - fuw + 1
    compute = torch.promote_types(x.dtype, torch.float32)
    xb = x.to(compute) if b is None else x.to(compute) + b.to(compute)[:, None, None]
    z = upfirdn2d_real_samples(xb, fu, up, 1, [px0, px1 - (full_w - zw), py0, py1 - (full_h - zh)], flip_filter,
                               up * up)
    return z * gain


def filtered_lrelu_real_samples(x, fu=None, fd=None, b=None, up=1, down=1, padding=0, gain=math.sqrt(2), slope=0.2,
                                clamp=None, flip_filter=False, codes=None):
    """The op's contract (module docstring, "Non-finite values") evaluated eagerly in float32
    (float64 for float64 x): both FIR stages are upfirdn2d_real_samples, whose taps multiply only
    samples of the signal they filter, and autograd through it gives the contract's gradients
    (the x gradient through each stage's adjoint, again over real samples only). z is computed
    over exactly the rows and columns fd reads, by trimming the far padding rather than cropping
    z afterwards, so that the crop's adjoint adds no zeros to the backward. Agrees with
    filtered_lrelu_reference up to rounding when every input is finite. Given the forward's packed
    codes, each sample takes the case its code records (activation_through_codes)."""
    check_arguments(x, fu, fd, b, up, down, padding, gain, slope, clamp)
    v = real_samples_pre_activation(x, fu, fd, b, up, down, padding, gain, flip_filter)
    if codes is not None:
        a = activation_through_codes(v, codes, slope, clamp)
    else:
        a = F.leaky_relu(v, slope)
        if clamp is not None:
            a = a.clamp(-clamp, clamp)
    return upfirdn2d_real_samples(a, fd, 1, down, 0, flip_filter, 1.0).to(x.dtype)


def _intermediate_shape(dy: torch.Tensor, fd, down: int) -> tuple:
    """(zh, zw): the part of z that fd reads, from the output (gradient)'s size."""
    fdh, fdw = filter_size(fd)
    return (dy.shape[2] - 1) * down + fdh, (dy.shape[3] - 1) * down + fdw


def times_derivative(t: torch.Tensor, codes: torch.Tensor, gain: float, slope: float) -> torch.Tensor:
    """t * d (module docstring) for t on z's samples, d from the packed codes: 0 where clamped
    even for a NaN or infinite t, as torch.clamp's gradient."""
    unpacked = unpack_codes(codes, t.shape[-1])
    slopes = torch.tensor([gain * slope, gain, 0.0], dtype=t.dtype, device=t.device)[unpacked.long()]
    return torch.where(unpacked == CODE_CLAMPED, 0.0, t * slopes)


def _allocate_input_gradients(dy, codes, fu, fd, up, down, padding, gain, slope, flip_filter, x_height, x_width,
                              bias_grad):
    expected = _packed_codes_shape(dy.shape[:2], *_intermediate_shape(dy, fd, down))
    if codes.dtype != torch.uint8 or tuple(codes.shape) != expected:
        raise ValueError(f"{_NAME}: codes must be uint8 of shape {expected} for dy of shape {tuple(dy.shape)}, "
                         f"got {codes.dtype} {tuple(codes.shape)}")
    dx = torch.empty((*dy.shape[:2], x_height, x_width), dtype=dy.dtype, device=dy.device,
                     memory_format=_memory_format(dy))
    return dx, torch.empty(dy.shape[1] if bias_grad else 0, dtype=dy.dtype, device=dy.device)


def filtered_lrelu_backward_reference(dy, codes, fu, fd, up, down, padding, gain, slope, flip_filter, x_height,
                                      x_width, bias_grad):
    """(dx, db): dx = U^T (d * D^T dy) with U^T, D^T the adjoint upfirdn2d maps, and db its sum
    over (B, H, W) before rounding to dy's dtype (empty unless bias_grad), in eager ops."""
    compute = torch.promote_types(dy.dtype, torch.float32)
    z_shape = (*dy.shape[:2], *_intermediate_shape(dy, fd, down))
    x_shape = (*dy.shape[:2], x_height, x_width)
    da = upfirdn2d_reference(dy.to(compute), fd, down, 1, adjoint_padding(z_shape, dy.shape, fd, 1, down, [0] * 4),
                             not flip_filter, 1.0)
    dz = times_derivative(da, codes, gain, slope)
    dx = upfirdn2d_reference(dz, fu, 1, up, adjoint_padding(x_shape, z_shape, fu, up, 1, padding), not flip_filter,
                             float(up * up))
    db = dx.sum((0, 2, 3)) if bias_grad else dx.new_empty(0)
    return dx.to(dy.dtype), db.to(dy.dtype)


def factor_tables(f, flip_filter: bool, gain: float, device) -> tuple:
    """(rows, cols), float32 (rank, taps) tables with correlation weights
    w[i, j] = sum_r rows[r, i] * cols[r, j] (the filter flipped unless flip_filter) times gain.
    A 2-D filter is split into the fewest SVD terms whose sum gives every tap to float32
    resolution of that tap (2^-22 of it: a float32 filter built as an outer product is
    separable only up to its own rounding; or for taps near 0, 2^-48 of the largest singular
    value: float64 SVD's own rounding), so a separable 2-D filter becomes rank 1 (one pass,
    float16 stages). Where no split shorter than the filter's smaller side does that, it is
    split exactly, along that side (term r: the filter's row r, or column r, and a one at r),
    not into SVD terms: their sum cancels, and the SVD resolves a singular vector's small
    components only to float64 rounding of its large ones (one tap of 4e9 among taps near 1:
    rank 1 loses every small tap outside its row and column, rank 4 of 4 x 5 carries the
    small taps of its row and column to 1e-6 of themselves). A filter holding NaN or an
    infinity, whose SVD is NaN throughout, is split exactly by rows, each tap kept exactly where
    the sum over r skips the terms whose rows entry is 0 (_cuda_taps)."""
    if f is None:
        one = torch.full((1, 1), float(gain), dtype=torch.float32, device=device)
        return one, torch.ones_like(one)
    w = f.detach().to(torch.float64)
    if not flip_filter:
        w = w.flip(list(range(w.dim())))
    if w.dim() == 1:
        return (w * gain)[None].float().contiguous(), w[None].float().contiguous()
    rank = min(w.shape)
    finite = bool(w.isfinite().all())
    if finite:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        sums = torch.cumsum(u.mT[:, :, None] * s[:, None, None] * vh[:, None, :], dim=0)  # sums[r]: terms 0..r
        # A NaN error counts as too large.
        error = ((sums - w).abs() / (w.abs() + s[0] * 2.0**-26)).amax((1, 2))
        rank = 1 if s[0] == 0 else int((~(error <= 2.0**-22)).cumprod(0).sum()) + 1
    if rank < min(w.shape):
        return (u[:, :rank] * (s[:rank] * gain)).mT.float().contiguous(), vh[:rank].float().contiguous()
    if w.shape[0] <= w.shape[1] or not finite:
        return (torch.eye(w.shape[0], dtype=torch.float64, device=w.device) * gain).float(), w.float().contiguous()
    return (w * gain).mT.float().contiguous(), torch.eye(w.shape[1], dtype=torch.float32, device=w.device)


# id(filter) -> (weak reference to it, its version counter, {(flip_filter, gain): tables}), and
# (device, gain) -> the identity's tables.
_cached_tables: dict = {}
_identity_tables: dict = {}


def filter_tables(f, flip_filter: bool, gain: float, device) -> tuple:
    """factor_tables, built once per filter tensor and reused while the tensor lives unmodified:
    a layer's filters are constant buffers, and rebuilding costs several small launches per call
    (and, for a 2-D filter, an SVD that synchronises with the GPU). An in-place change (copy_,
    load_state_dict, EMA updates) moves the tensor's version counter and rebuilds; writes that
    bypass the counter (through .data or a NumPy view) are not seen. Not cached: inference
    tensors (no version counter) and calls inside CUDA graph capture (the tables would hold
    values only once the graph replays)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return factor_tables(f, flip_filter, gain, device)
    if f is None:
        key = (device, gain)
        if key not in _identity_tables:
            _identity_tables[key] = factor_tables(None, flip_filter, gain, device)
        return _identity_tables[key]
    if f.is_inference():
        return factor_tables(f, flip_filter, gain, device)
    key = id(f)
    entry = _cached_tables.get(key)
    if entry is None or entry[0]() is not f or entry[1] != f._version:
        def forget(ref, key=key):
            if _cached_tables.get(key, (None,))[0] is ref:
                del _cached_tables[key]

        entry = (weakref.ref(f, forget), f._version, {})
        _cached_tables[key] = entry
    tables = entry[2].get((flip_filter, gain))
    if tables is None:
        tables = entry[2][flip_filter, gain] = factor_tables(f, flip_filter, gain, device)
    return tables


@dataclass(frozen=True)
class FusedPass:
    """What one fused kernel pass (Triton or CUDA) computes per channel plane:

        src --[stage 1 FIR, up]--> mid --pointwise--> --[stage 2 FIR, down]--> dst

    The forward is x -> z -> y; the backward is the same shape, dy -> da -> dx, with the
    stages' roles swapped and each filter reversed (the adjoint of a correlation is the
    correlation with the reversed taps). stage1 / stage2 are (rows, cols) tables
    (filter_tables); mid sample m reads src sample q through stage-1 tap q*up + pads1 - m, and
    dst sample o reads mid sample m through stage-2 tap m + pads2 - o*down, per axis
    (pads are (y, x)); mid_shape is the extent of mid outside which it is zero."""

    stage1: tuple
    stage2: tuple
    mid_shape: tuple
    pads1: tuple
    pads2: tuple
    up: int
    down: int


def forward_pass(fu, fd, up, down, padding, flip_filter, out_shape, device) -> FusedPass:
    px0, _, py0, _ = padding
    stage1 = filter_tables(fu, flip_filter, up * up, device)
    stage2 = filter_tables(fd, flip_filter, 1.0, device)
    zh = (out_shape[2] - 1) * down + stage2[0].shape[1]
    zw = (out_shape[3] - 1) * down + stage2[1].shape[1]
    return FusedPass(stage1, stage2, (zh, zw), (py0, px0), (0, 0), up, down)


def backward_pass(fu, fd, up, down, padding, flip_filter, dy_shape, device) -> FusedPass:
    px0, _, py0, _ = padding
    # Reversed taps are the tables of the filter with flip_filter toggled.
    stage1 = rows_d, cols_d = filter_tables(fd, not flip_filter, 1.0, device)
    stage2 = rows_u, cols_u = filter_tables(fu, not flip_filter, up * up, device)
    pads1 = (rows_d.shape[1] - 1, cols_d.shape[1] - 1)
    pads2 = (rows_u.shape[1] - 1 - py0, cols_u.shape[1] - 1 - px0)
    mid_shape = ((dy_shape[2] - 1) * down + rows_d.shape[1], (dy_shape[3] - 1) * down + cols_d.shape[1])
    return FusedPass(stage1, stage2, mid_shape, pads1, pads2, down, up)


def _check_case(label, x_shape, fu_shape, fd_shape, up, down, padding, with_bias=True, gain=math.sqrt(2), slope=0.2,
                clamp=None, flip_filter=False, layout="contiguous"):
    def make_args(device, dtype, generator):
        x = random_tensor(x_shape, layout, device, dtype, generator)
        fu, fd = (None if shape is None else torch.randn(shape, generator=generator).to(device) / shape[0]
                  for shape in (fu_shape, fd_shape))
        b = random_tensor((x_shape[1],), "contiguous", device, dtype, generator) if with_bias else None
        return (x, fu, fd, b, up, down, padding, gain, slope, clamp, flip_filter)

    return CheckCase(label, make_args)


def _check_cases():
    return [
        _check_case("StyleGAN3 up2 down2 12-tap clamp", (2, 3, 6, 5), (12,), (12,), 2, 2, [11, 10, 11, 10], clamp=1.5),
        _check_case("up2 down1 6-tap channels_last", (1, 4, 5, 7), (6,), (6,), 2, 1, [5, 4, 5, 4],
                    layout="channels_last"),
        _check_case("up1 down2 2-D filters sliced flip", (1, 2, 9, 8), (3, 4), (4, 3), 1, 2, [2, 1, 3, -1],
                    slope=-0.3, flip_filter=True, layout="sliced"),
        _check_case("identity filters no bias", (2, 2, 4, 5), None, None, 1, 1, [0, 0, 0, 0], with_bias=False,
                    gain=0.5, clamp=0.4),
    ]


FILTERED_LRELU = register(Op(name=_NAME, reference=filtered_lrelu_reference, allocate_output=_allocate_output,
                             check_cases=_check_cases))
# Not in OPS (`fastgen check` compares every output, and codes at |v| ~ 0 legitimately differ
# between dtypes); tested through the public function's autograd.
FILTERED_LRELU_WITH_CODES = Op(name="filtered_lrelu_with_codes", called_as="filtered_lrelu",
                               reference=filtered_lrelu_with_codes_reference,
                               allocate_output=_allocate_output_and_codes)
FILTERED_LRELU_BACKWARD = Op(name="filtered_lrelu_backward", called_as="filtered_lrelu's backward",
                             reference=filtered_lrelu_backward_reference,
                             allocate_output=_allocate_input_gradients)


FILTERED_LRELU.implement_at("triton", "fastgen.kernels.filtered_lrelu:filtered_lrelu")
FILTERED_LRELU_WITH_CODES.implement_at("triton", "fastgen.kernels.filtered_lrelu:filtered_lrelu_with_codes")
FILTERED_LRELU_BACKWARD.implement_at("triton", "fastgen.kernels.filtered_lrelu:filtered_lrelu_backward")


# csrc/filtered_lrelu.cu's pass modes.
_CUDA_FORWARD, _CUDA_FORWARD_WITH_CODES, _CUDA_BACKWARD = 0, 1, 2


def _cuda_taps(tables: tuple) -> tuple:
    """A stage's (rows, cols) tables as the CUDA kernel takes them, as 4-D tensors: the separable
    pair when the split has one term, else (the 2-D correlation table, None): the kernel loops
    over its taps directly, and the split's terms are summed back up, in float64, leaving out
    each term where its rows entry is 0 (so the row split of a non-finite filter, factor_tables,
    gives back its taps, not 0 * inf)."""
    rows, cols = tables
    if rows.shape[0] == 1:
        return rows.view(1, 1, 1, -1), cols.view(1, 1, 1, -1)
    terms = rows.double()[:, :, None] * cols.double()[:, None, :]
    full = torch.where(rows[:, :, None] != 0, terms, 0.0).sum(0).float()
    return full.view(1, 1, *full.shape), None


def _cuda_pass(mode, src, bias, dst, codes, fused: FusedPass, gain, slope, clamp, channel_sums=None) -> None:
    """One fused pass of csrc/filtered_lrelu.cu; channel_sums (C,), when given, receives dst
    summed over (B, H, W) in float32, from the kernel's per-tile sums."""
    if dst.numel() == 0:
        if channel_sums is not None:
            channel_sums.zero_()
        return
    taps = dict(zip(("rows1", "cols1", "rows2", "cols2"), (*_cuda_taps(fused.stage1), *_cuda_taps(fused.stage2))))
    args = dict(mode=mode, src=src, bias=_cuda.per_channel(bias), dst=dst, codes=codes, **taps, up=fused.up,
                down=fused.down, pads=(*fused.pads1, *fused.pads2), mid_shape=fused.mid_shape, gain=gain, slope=slope,
                clamp=clamp)
    tile_sums = None
    if channel_sums is not None:
        tiles_y, tiles_x = _cuda.query("filtered_lrelu_tiles", **args)
        tile_sums = torch.empty(1, 1, 1, dst.shape[0] * dst.shape[1] * tiles_y * tiles_x, dtype=torch.float32,
                                device=dst.device)
    _cuda.launch("filtered_lrelu_pass", **args, tile_sums=tile_sums)
    if channel_sums is not None:
        channel_sums.copy_(tile_sums.view(dst.shape[0], dst.shape[1], -1).sum((0, 2)))


@FILTERED_LRELU.implement("cuda")
def _forward_cuda(x, fu, fd, b, up, down, padding, gain, slope, clamp, flip_filter, *, out):
    fused = forward_pass(fu, fd, up, down, padding, flip_filter, out.shape, x.device)
    _cuda_pass(_CUDA_FORWARD, x, b, out, None, fused, gain, slope, clamp)


@FILTERED_LRELU_WITH_CODES.implement("cuda")
def _forward_with_codes_cuda(x, fu, fd, b, up, down, padding, gain, slope, clamp, flip_filter, *, out):
    y, codes = out
    fused = forward_pass(fu, fd, up, down, padding, flip_filter, y.shape, x.device)
    _cuda_pass(_CUDA_FORWARD_WITH_CODES, x, b, y, codes, fused, gain, slope, clamp)


@FILTERED_LRELU_BACKWARD.implement("cuda")
def _backward_cuda(dy, codes, fu, fd, up, down, padding, gain, slope, flip_filter, x_height, x_width, bias_grad, *,
                   out):
    dx, db = out
    fused = backward_pass(fu, fd, up, down, padding, flip_filter, dy.shape, dy.device)
    _cuda_pass(_CUDA_BACKWARD, dy, None, dx, codes, fused, gain, slope, None, db if db.numel() else None)


def _forward_signature(returns):
    """The forward ops' typed signature, padding as (px0, px1, py0, py1); define_custom_op reads
    only its parameters and annotations. One definition for both ops: they differ in outputs."""

    def signature(
        x: torch.Tensor,
        fu: Optional[torch.Tensor],
        fd: Optional[torch.Tensor],
        b: Optional[torch.Tensor],
        up: int,
        down: int,
        padding: Sequence[int],
        gain: float,
        slope: float,
        clamp: Optional[float],
        flip_filter: bool,
    ):
        """filtered_lrelu (module docstring); the _with_codes op also returns the packed 2-bit codes."""

    signature.__annotations__["return"] = returns
    return signature


_filtered_lrelu_op = define_custom_op(FILTERED_LRELU)(_forward_signature(torch.Tensor))
_filtered_lrelu_with_codes_op = define_custom_op(FILTERED_LRELU_WITH_CODES)(
    _forward_signature(tuple[torch.Tensor, torch.Tensor]))


@define_custom_op(FILTERED_LRELU_BACKWARD)
def _filtered_lrelu_backward_op(
    dy: torch.Tensor,
    codes: torch.Tensor,
    fu: Optional[torch.Tensor],
    fd: Optional[torch.Tensor],
    up: int,
    down: int,
    padding: Sequence[int],
    gain: float,
    slope: float,
    flip_filter: bool,
    x_height: int,
    x_width: int,
    bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, db): dx = U^T (d * D^T dy) from the output gradient and the forward's codes, db its
    per-channel sum (accumulated in float32; empty unless bias_grad)."""


def filtered_lrelu(x, fu=None, fd=None, b=None, up=1, down=1, padding=0, gain=math.sqrt(2), slope=0.2, clamp=None,
                   flip_filter=False):
    """Bias, upsample with fu, gain, leaky ReLU, clamp, downsample with fd (module docstring).

    x (B, C, H, W); fu / fd 1-D (separable), 2-D or None (identity); b (C,) or None; up / down
    ints; padding an int, (px, py) or (px0, px1, py0, py1) in upsampled pixels (negative crops).
    """
    check_arguments(x, fu, fd, b, up, down, padding, gain, slope, clamp)
    args = (x, fu, fd, b, up, down, normalized_padding(padding), float(gain), float(slope),
            None if clamp is None else float(clamp), bool(flip_filter))
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, fu, fd, b))
    if needs_grad:
        return _filtered_lrelu_with_codes_op(*args)[0]
    return _filtered_lrelu_op(*args)


def _save_for_backward(ctx, inputs, codes):
    """codes (None: recomputed in the backward from x and b, which are then kept); x and b are
    also kept for the filters' gradient, which recomputes the reference."""
    x, fu, fd, b, up, down, padding, gain, slope, clamp, flip_filter = inputs
    ctx.args = (up, down, padding, gain, slope, clamp, flip_filter)
    ctx.x_shape = tuple(x.shape)
    ctx.has_bias = b is not None
    ctx.filter_grad = any(f is not None and f.requires_grad for f in (fu, fd))
    keep = ctx.filter_grad or codes is None
    ctx.save_for_backward(codes, fu, fd, x if keep else None, b if keep else None)


def _gradients(ctx, dy, codes, fu, fd, x, b):
    up, down, padding, gain, slope, clamp, flip_filter = ctx.args
    dx = db = dfu = dfd = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[3]:
        bias_grad = ctx.has_bias and ctx.needs_input_grad[3]
        dx, db = _filtered_lrelu_backward_op(dy, codes, fu, fd, up, down, padding, gain, slope, flip_filter,
                                             ctx.x_shape[2], ctx.x_shape[3], bias_grad)
        db = db if bias_grad else None
    if ctx.filter_grad:
        dfu, dfd = _filter_gradients(dy, codes, x, fu, fd, b, ctx.args, ctx.needs_input_grad[1:3])
    return (dx if ctx.needs_input_grad[0] else None, dfu, dfd, db) + (None,) * 7


def _filter_gradients(dy, codes, x, fu, fd, b, args, needed):
    """Autograd through the contract evaluated eagerly (filtered_lrelu_real_samples),
    recomputed: filters are rarely trained. Each sample takes the case the forward coded, as dx
    does: the eager v decides a sample within rounding of a boundary its own way."""
    with torch.enable_grad():
        filters = [f.detach().requires_grad_() if f is not None and need else f for f, need in zip((fu, fd), needed)]
        y = filtered_lrelu_real_samples(x.detach(), *filters, None if b is None else b.detach(), *args, codes=codes)
        leaves = [f for f, need in zip(filters, needed) if need]
        grads = iter(torch.autograd.grad(y, leaves, dy))
    return tuple(next(grads) if need else None for need in needed)


def _setup_with_codes(ctx, inputs, output):
    _save_for_backward(ctx, inputs, output[1])


def _backward_with_codes(ctx, dy, _):
    codes, fu, fd, x, b = ctx.saved_tensors
    return _gradients(ctx, dy, codes, fu, fd, x, b)


def _setup_plain(ctx, inputs, output):
    _save_for_backward(ctx, inputs, None)


def _backward_plain(ctx, dy):
    """The op without codes (a direct torch.ops call, `fastgen check`) recomputes them."""
    _, fu, fd, x, b = ctx.saved_tensors
    with torch.no_grad():
        _, codes = _filtered_lrelu_with_codes_op(x, fu, fd, b, *ctx.args)
    return _gradients(ctx, dy, codes, fu, fd, x, b)


def _setup_backward(ctx, inputs, output):
    dy, codes, fu, fd, up, down, padding, gain, slope, flip_filter, _, _, _ = inputs
    ctx.args = (up, down, padding, gain, slope, flip_filter)
    ctx.z_size = _intermediate_shape(dy, fd, down)
    ctx.save_for_backward(codes, fu, fd)


def _backward_of_backward(ctx, grad_dx, grad_db):
    """dx is linear in dy: its gradient is the forward map with the codes frozen; db = sum dx
    sends its gradient through dx, broadcast."""
    codes, fu, fd = ctx.saved_tensors
    up, down, padding, gain, slope, flip_filter = ctx.args
    grad_dy = None
    if ctx.needs_input_grad[0]:
        if grad_db is not None and grad_db.numel():
            grad_dx = grad_dx + grad_db[:, None, None]
        zh, zw = ctx.z_size
        z = upfirdn2d(grad_dx, fu, up, 1, padding, flip_filter, up * up)[:, :, :zh, :zw]
        a = times_derivative(z, codes, gain, slope)
        grad_dy = upfirdn2d(a, fd, 1, down, 0, flip_filter, 1)
    return (grad_dy,) + (None,) * 12


register_autograd(_filtered_lrelu_op, _backward_plain, _setup_plain)
register_autograd(_filtered_lrelu_with_codes_op, _backward_with_codes, _setup_with_codes)
register_autograd(_filtered_lrelu_backward_op, _backward_of_backward, _setup_backward)
