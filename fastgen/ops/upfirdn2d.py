"""FIR resampling of images: upsample by zero insertion, pad, filter, downsample.

`upfirdn2d(x, f, up=1, down=1, padding=0, flip_filter=False, gain=1)` with x of shape
(B, C, H, W) (any strides; channels_last stays channels_last) applies, to every channel plane:

1. Upsampling: up_x - 1 zeros after every pixel along W and up_y - 1 along H, giving an
   (H*up_y, W*up_x) plane u.
2. Padding: px0 / px1 zero columns before / after, py0 / py1 zero rows above / below; a
   negative amount crops instead. Call the result p, of size Hp x Wp.
3. Filtering with the FIR filter w, keeping only the outputs whose footprint lies inside p
   (a "valid" convolution): with w = f flipped in both axes for a true convolution
   (flip_filter=False) and w = f itself for a correlation (flip_filter=True),
       z[v, u] = gain * sum_{i<fh, j<fw} w[i, j] * p[v + i, u + j].
   A 1-D f of n taps is separable: the 2-D filter f[i] * f[j] (n x n). f = None is the
   1 x 1 identity filter.
4. Downsampling: y[oy, ox] = z[oy*down_y, ox*down_x].

So out_h = (H*up_y + py0 + py1 - fh) // down_y + 1 and out_w likewise; arguments that make
either < 1 are an error. `up` and `down` are an int or (x, y); `padding` is an int, (px, py)
or (px0, px1, py0, py1), in pixels of the upsampled image, as in StyleGAN2-ADA / StyleGAN3.

Written with the input plane X directly (no u or p): output row oy reads input rows
ry = (oy*down_y - py0 + i) / up_y for the taps i that make the division exact, i.e.
i = i0(oy) + k*up_y with i0(oy) = (py0 - oy*down_y) mod up_y and k = 0, 1, ...,
ceil(fh / up_y) - 1; likewise for columns. This polyphase form is what the kernels compute.

Non-finite values. NaN and infinities in x propagate as in the eager reference. A filter tap
is multiplied only by pixels of x, never by a zero that upsampling inserts or that padding
adds (the polyphase form above does not visit them): each output is gain times the sum of
w[i, j] * x[ry, rx] over the taps that land on pixels of x (0 where none does). So a NaN or
infinite tap reaches exactly the outputs that weight a pixel of x by it. A separable filter
is two such 1-D passes: along x over every row of x, then along y over the rows that pass
makes (an infinite y tap times a row's sum of 0 is NaN). The eager reference convolves the
zero-stuffed, padded image, so it also forms a non-finite tap's products with those zeros,
NaN wherever they meet; for a filter with a non-finite tap the answer is
`upfirdn2d_real_samples` (this contract, evaluated eagerly), which agrees with the reference
up to rounding for finite taps and whose NaNs are among the reference's.

Gradients. y is linear in x and its adjoint is again an upfirdn2d: the output gradient dy
goes through the same filter flipped (flip_filter negated), up and down swapped, and padding
    (fw - px0 - 1,  W*up_x - out_w*down_x + px0 - up_x + 1,
     fh - py0 - 1,  H*up_y - out_h*down_y + py0 - up_y + 1),
with the same gain. The backward calls the op itself, so gradients of every order work (R1
and path-length regularisation differentiate through it), and the x gradient follows the
contract above with dy's elements as the pixels. The filter's gradient, needed only if f
requires grad (StyleGAN's filters are constant buffers), is the reference's, computed with
eager PyTorch ops along its steps (it is differentiable too): gain times the correlation of
the padded, upsampled input with the zero-interleaved output gradient, through each of the two
1-D passes for a separable filter.

Arithmetic is float32 (float64 for float64 x); the filter may have any float dtype and
strides; the output has x's dtype.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from fastgen import _cuda
from fastgen.ops.registry import (CheckCase, Op, check_float_tensor, check_number, define_custom_op, random_tensor,
                                  register, register_autograd, with_the_math)

_NAME = "upfirdn2d"


def _is_int(value) -> bool:
    # SymInt: under torch.compile with dynamic shapes the backward's padding is symbolic.
    return isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool)


def _int_list(name: str, value, lengths: Sequence[int]) -> list:
    """`value` as a list of ints: an int is repeated, a sequence must have an allowed length."""
    if _is_int(value):
        return [value] * lengths[-1]
    if isinstance(value, (list, tuple)) and len(value) in lengths and all(_is_int(v) for v in value):
        return list(value)
    forms = " or ".join(f"{n} ints" for n in lengths)
    raise TypeError(f"{_NAME}: {name} must be an int or a sequence of {forms}, got {value!r}")


def parse_scaling(name: str, value) -> list:
    """up / down as [x, y], each >= 1."""
    factors = _int_list(name, value, (2,))
    if min(factors) < 1:
        raise ValueError(f"{_NAME}: {name} factors must be >= 1, got {value!r}")
    return factors


def parse_padding(value) -> list:
    """padding as [px0, px1, py0, py1]."""
    padding = _int_list("padding", value, (2, 4))
    if len(padding) == 2:
        return [padding[0], padding[0], padding[1], padding[1]]
    return padding


def filter_size(f: Optional[torch.Tensor]) -> tuple:
    """(fh, fw) of a filter that passed validation; (1, 1) for None."""
    if f is None:
        return 1, 1
    return int(f.shape[0]), int(f.shape[-1])


def check_filter(op_name: str, name: str, f, x: torch.Tensor) -> None:
    """A FIR filter argument: None (identity), or 1-D separable taps / a 2-D (fh, fw) filter of a
    floating dtype on x's device."""
    if f is None:
        return
    if not isinstance(f, torch.Tensor):
        raise TypeError(f"{op_name}: {name} must be a torch.Tensor or None, got {type(f).__name__}")
    if not f.is_floating_point():
        raise TypeError(f"{op_name}: {name} must be a floating-point tensor, got {f.dtype}")
    if f.dim() not in (1, 2) or f.numel() == 0:
        raise ValueError(
            f"{op_name}: {name} must be a non-empty 1-D (separable taps) or 2-D (fh, fw) filter, "
            f"got shape {tuple(f.shape)}"
        )
    if f.device != x.device:
        raise ValueError(f"{op_name}: {name} is on {f.device} but x is on {x.device}")


def _check_inputs(x, f, gain) -> None:
    check_float_tensor(_NAME, "x", x)
    if x.dim() != 4:
        raise ValueError(f"{_NAME}: x must be 4-D (B, C, H, W), got shape {tuple(x.shape)}")
    check_filter(_NAME, "f", f, x)
    check_number(_NAME, "gain", gain)


def output_size(x, f, up, down, padding) -> tuple:
    """(out_h, out_w), validating that the output is not empty."""
    upx, upy = parse_scaling("up", up)
    downx, downy = parse_scaling("down", down)
    px0, px1, py0, py1 = parse_padding(padding)
    fh, fw = filter_size(f)
    _, _, height, width = x.shape
    padded_h, padded_w = height * upy + py0 + py1, width * upx + px0 + px1
    if padded_h < fh or padded_w < fw:
        raise ValueError(
            f"{_NAME}: padding {[px0, px1, py0, py1]} leaves an empty output: the upsampled, padded image is "
            f"{padded_h} x {padded_w}, smaller than the {fh} x {fw} filter"
        )
    return (padded_h - fh) // downy + 1, (padded_w - fw) // downx + 1


def _allocate_output(x, f, up=1, down=1, padding=0, flip_filter=False, gain=1.0):
    _check_inputs(x, f, gain)
    out_h, out_w = output_size(x, f, up, down, padding)
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((x.shape[0], x.shape[1], out_h, out_w), dtype=x.dtype, device=x.device, memory_format=layout)


def _upsample_and_pad(x: torch.Tensor, up, padding) -> torch.Tensor:
    """Steps 1 and 2 of the module docstring, materialised: zero insertion, then pad or crop."""
    upx, upy = parse_scaling("up", up)
    px0, px1, py0, py1 = parse_padding(padding)
    batch, channels, height, width = x.shape
    u = F.pad(x.reshape(batch, channels, height, 1, width, 1), [0, upx - 1, 0, 0, 0, upy - 1])
    u = u.reshape(batch, channels, height * upy, width * upx)
    p = F.pad(u, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    return p[:, :, max(-py0, 0): p.shape[2] - max(-py1, 0), max(-px0, 0): p.shape[3] - max(-px1, 0)]


def upfirdn2d_reference(x, f, up=1, down=1, padding=0, flip_filter=False, gain=1.0):
    """The eager formulation (StyleGAN's reference path): zero insertion, pad and crop, a
    depthwise conv2d (two 1-D ones for a separable filter), then strided slicing."""
    _allocate_output(x, f, up, down, padding, flip_filter, gain)
    downx, downy = parse_scaling("down", down)
    channels = x.shape[1]
    p = _upsample_and_pad(x, up, padding)
    if f is None:
        f = torch.ones(1, 1, dtype=x.dtype, device=x.device)
    # conv2d correlates: flip for a true convolution. The gain goes into the first pass's taps.
    # The depthwise weights are materialised per channel: an expanded (stride-0) weight sends
    # conv2d down a path about 1000x slower on CPU.
    w = f.to(x.dtype)
    if not flip_filter:
        w = w.flip(list(range(w.dim())))
    z = F.conv2d(p, (w * gain).repeat(channels, 1, 1, 1), groups=channels)  # a 1-D filter: along W
    if w.dim() == 1:
        z = F.conv2d(z, w[:, None].repeat(channels, 1, 1, 1), groups=channels)  # then along H
    return z[:, :, ::downy, ::downx]


def _real_sample_sums(x, w, up, down, padding) -> torch.Tensor:
    """sum over taps of w[i, j] * p[oy*down_y + i, ox*down_x + j] (w oriented, no gain), each
    product formed only where p holds a pixel of x: one masked slice of p per tap."""
    downx, downy = parse_scaling("down", down)
    out_h, out_w = output_size(x, w, up, down, padding)
    p = _upsample_and_pad(x, up, padding)
    real = _upsample_and_pad(torch.ones_like(x), up, padding) != 0
    sums = x.new_zeros(*x.shape[:2], out_h, out_w)
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            window = (..., slice(i, i + (out_h - 1) * downy + 1, downy), slice(j, j + (out_w - 1) * downx + 1, downx))
            sums = sums + torch.where(real[window], w[i, j] * p[window], 0)
    return sums


def _real_samples_forward(x, f, up, down, padding, flip_filter, gain):
    w = torch.ones(1, 1, dtype=x.dtype, device=x.device) if f is None else f.to(x.dtype)
    if not flip_filter:
        w = w.flip(list(range(w.dim())))
    if w.dim() == 2:
        return _real_sample_sums(x, w, up, down, padding) * gain
    (upx, upy), (downx, downy) = parse_scaling("up", up), parse_scaling("down", down)
    px0, px1, py0, py1 = parse_padding(padding)
    along_x = _real_sample_sums(x, w[None, :], [upx, 1], [downx, 1], [px0, px1, 0, 0])
    return _real_sample_sums(along_x, w[:, None], [1, upy], [1, downy], [0, 0, py0, py1]) * gain


class _RealSamples(torch.autograd.Function):
    """upfirdn2d_real_samples with the op's backward: the x gradient is the same computation on
    the adjoint problem (as the op's backward runs the op), the filter's is _filter_gradient."""

    @staticmethod
    def forward(ctx, x, f, up, down, padding, flip_filter, gain):
        ctx.args = (up, down, padding, flip_filter, gain)
        ctx.save_for_backward(x, f)
        return _real_samples_forward(x, f, up, down, padding, flip_filter, gain)

    @staticmethod
    def backward(ctx, dy):
        x, f = ctx.saved_tensors
        up, down, padding, flip_filter, gain = ctx.args
        dx = df = None
        if ctx.needs_input_grad[0]:
            adjoint = adjoint_padding(x.shape, dy.shape, f, up, down, padding)
            dx = _real_samples_forward(dy, f, down, up, adjoint, not flip_filter, gain)
        if ctx.needs_input_grad[1]:
            df = _filter_gradient(x, f, dy, up, down, padding, flip_filter, gain)
        return dx, df, None, None, None, None, None


def upfirdn2d_real_samples(x, f, up=1, down=1, padding=0, flip_filter=False, gain=1.0):
    """The kernels' contract for non-finite filter taps (module docstring, "Non-finite taps"),
    evaluated eagerly in x's dtype, one masked product per tap and output: the oracle for a
    filter holding NaN or an infinity, with the op's backward. For finite taps it equals
    upfirdn2d_reference up to rounding, which stays the reference (and the CPU backend): one
    conv2d instead of fh * fw tensor operations."""
    _allocate_output(x, f, up, down, padding, flip_filter, gain)
    return _RealSamples.apply(x, f, up, down, padding, flip_filter, gain)


def adjoint_padding(x_shape, y_shape, f, up, down, padding) -> list:
    """The padding of the upfirdn2d that maps the output gradient back to x's shape."""
    upx, upy = parse_scaling("up", up)
    downx, downy = parse_scaling("down", down)
    px0, _, py0, _ = parse_padding(padding)
    fh, fw = filter_size(f)
    _, _, height, width = x_shape
    _, _, out_h, out_w = y_shape
    return [
        fw - px0 - 1,
        width * upx - out_w * downx + px0 - upx + 1,
        fh - py0 - 1,
        height * upy - out_h * downy + py0 - upy + 1,
    ]


def _check_case(label, x_shape, filter_shape, up, down, padding, flip_filter=False, gain=1.0, layout="contiguous"):
    def make_args(device, dtype, generator):
        x = random_tensor(x_shape, layout, device, dtype, generator)
        f = None if filter_shape is None else torch.randn(filter_shape, generator=generator).to(device, torch.float32)
        return (x, f, up, down, padding, flip_filter, gain)

    return CheckCase(label, make_args)


def _check_cases():
    return [
        _check_case("StyleGAN2 up2 4-tap", (2, 3, 5, 6), (4,), [2, 2], [1, 1], [2, 1, 2, 1], gain=4.0),
        _check_case("StyleGAN2 down2 4-tap channels_last", (1, 4, 9, 8), (4,), [1, 1], [2, 2], [1, 1, 1, 1],
                    layout="channels_last"),
        _check_case("2-D 3x5 up(1,3) down(2,1) crop", (1, 2, 7, 6), (3, 5), [1, 3], [2, 1], [-1, 2, 0, -2],
                    flip_filter=True, gain=0.5),
        _check_case("12-tap up2 down2 sliced", (1, 2, 6, 5), (12,), [2, 2], [2, 2], [5, 6, 6, 5], layout="sliced"),
        _check_case("identity filter crop", (2, 2, 5, 4), None, [1, 1], [1, 1], [-1, 0, 1, -2]),
    ]


UPFIRDN2D = register(Op(name=_NAME, reference=upfirdn2d_reference, allocate_output=_allocate_output,
                        check_cases=_check_cases))


UPFIRDN2D.implement_at("triton", "fastgen.kernels.upfirdn2d:upfirdn2d")


@UPFIRDN2D.implement("cuda")
def _upfirdn2d_cuda(x, f, up, down, padding, flip_filter, gain, *, out):
    """csrc/upfirdn2d.cu. The gradient with respect to x is this op again (see _backward), so it
    runs on this kernel as well, at every order."""
    (upx, upy), (downx, downy) = parse_scaling("up", up), parse_scaling("down", down)
    px0, px1, py0, py1 = parse_padding(padding)
    taps = None
    if f is not None:
        # The kernel reads float32 taps, as the Triton kernel converts each tap it loads, with
        # the taps on the last axes: (1, 1, 1, n) separable taps or a (1, 1, fh, fw) filter.
        taps = f.to(torch.float32).view(1, 1, *([1] if f.dim() == 1 else []), *f.shape)
    _cuda.launch("upfirdn2d", x=x, f=taps, separable=f is not None and f.dim() == 1, y=out, up_x=upx, up_y=upy,
                 down_x=downx, down_y=downy, pad_x0=px0, pad_x1=px1, pad_y0=py0, pad_y1=py1,
                 flip_filter=bool(flip_filter), gain=float(gain))


@define_custom_op(UPFIRDN2D)
def _upfirdn2d_op(
    x: torch.Tensor,
    f: Optional[torch.Tensor],
    up: Sequence[int],
    down: Sequence[int],
    padding: Sequence[int],
    flip_filter: bool,
    gain: float,
) -> torch.Tensor:
    """upfirdn2d with up/down/padding in their normalized (x, y) / (px0, px1, py0, py1) forms."""


@with_the_math
def upfirdn2d(x, f, up=1, down=1, padding=0, flip_filter=False, gain=1):
    """`torch.ops.fastgen.upfirdn2d` with StyleGAN's argument forms: up / down an int or (x, y),
    padding an int, (px, py) or (px0, px1, py0, py1). See the module docstring."""
    _check_inputs(x, f, gain)
    return _upfirdn2d_op(x, f, parse_scaling("up", up), parse_scaling("down", down), parse_padding(padding),
                         bool(flip_filter), float(gain))


def _filter_gradient(x, f, dy, up, down, padding, flip_filter, gain):
    """d loss / d f in eager ops, through the reference's own steps: the padded, upsampled x
    filtered by the 2-D filter, or by the separable taps along x and then along y, and dy
    zero-interleaved by `down` (the gradient of the full-resolution filter output z). Following
    the reference's passes keeps its sums: an infinite x makes a separable tap's gradient the
    sum of each pass's products, whose infinities can agree in sign where those of the 2-D
    filter's products f[i] * f[j] do not."""
    downx, downy = parse_scaling("down", down)
    fh, fw = filter_size(f)
    batch, channels = x.shape[:2]
    # Each tap sums B*C*H*W products of either sign, so float32 sums are off by many times the
    # float32 rounding of the (smaller) result: a float32 x or filter accumulates in float64
    # (the filter is a constant in the models, so this runs only when a user trains it), and
    # only 16-bit ones in float32. The gradient has f's dtype: a float32 filter under 16-bit
    # activations needs float32 accuracy too (float32 sums were 1e-5 relative off).
    wide = (torch.float32, torch.float64)
    compute = torch.float64 if dy.dtype in wide or f.dtype in wide else torch.float32
    if batch * channels == 0:  # every tap's sum is empty (conv2d would return no channel at all)
        return torch.zeros_like(f)
    # Every (b, c) plane is one channel of a single "image": a depthwise filter of B*C channels
    # filters it, and correlating it with a B*C-channel "weight" sums over b, c and pixels. The
    # depthwise weights are materialised, as in the reference.
    planes = batch * channels
    dy = dy.to(compute).reshape(1, planes, *dy.shape[2:])
    p = _upsample_and_pad(x.to(compute), up, padding)
    p = p.reshape(1, planes, *p.shape[2:])
    z_h, z_w = p.shape[2] - fh + 1, p.shape[3] - fw + 1
    dz = dy.new_zeros(1, planes, dy.shape[2] * downy, dy.shape[3] * downx)
    dz[:, :, ::downy, ::downx] = dy
    dz = dz[:, :, :z_h, :z_w]
    w = (f if flip_filter else f.flip(list(range(f.dim())))).to(compute)
    if f.dim() == 2:
        dw = F.conv2d(p, dz)[0, 0] * gain
    else:
        # The reference: z1 = p filtered along x by w * gain, z = z1 filtered along y by w.
        along_x = F.conv2d(p, (w * gain).view(1, 1, 1, fw).repeat(planes, 1, 1, 1), groups=planes)
        dz_along_x = F.conv_transpose2d(dz, w.view(1, 1, fh, 1).repeat(planes, 1, 1, 1), groups=planes)
        dw = F.conv2d(along_x, dz)[0, 0, :, 0] + F.conv2d(p, dz_along_x)[0, 0, 0] * gain
    if not flip_filter:
        dw = dw.flip(list(range(dw.dim())))
    return dw.to(f.dtype)


def _setup_context(ctx, inputs, output):
    x, f, up, down, padding, flip_filter, gain = inputs
    ctx.args = (up, down, padding, flip_filter, gain)
    ctx.x_shape = tuple(x.shape)
    ctx.x_dtype = x.dtype
    # x is kept alive only when the filter's gradient needs it.
    filter_grad = f is not None and f.requires_grad
    ctx.save_for_backward(f, x if filter_grad else None)


def _backward(ctx, dy):
    f, x = ctx.saved_tensors
    up, down, padding, flip_filter, gain = ctx.args
    dx = df = None
    if ctx.needs_input_grad[0]:
        adjoint = adjoint_padding(ctx.x_shape, dy.shape, f, up, down, padding)
        dx = _upfirdn2d_op(dy, f, list(down), list(up), adjoint, not flip_filter, gain)
    if f is not None and ctx.needs_input_grad[1]:
        df = _filter_gradient(x, f, dy, up, down, padding, flip_filter, gain)
    return dx, df, None, None, None, None, None


register_autograd(_upfirdn2d_op, _backward, _setup_context)
