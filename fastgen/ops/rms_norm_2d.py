"""Channel RMSNorm of NCHW feature maps, as DC-AE uses it (`trms2d`).

`trms2d(x, weight=None, bias=None, eps=1e-5)`, x of shape (B, C, H, W) with any strides
(channels_last is read in place), weight and bias (C,) or None. Each pixel's C channel values
are divided by their root mean square, then scaled and shifted per channel:

    r[b, h, w]    = 1 / sqrt(mean_c x[b, c, h, w]^2 + eps)      (eps inside the square root)
    y[b, c, h, w] = x[b, c, h, w] * r[b, h, w] * weight[c] + bias[c]

with weight = 1 and bias = 0 when None. This is diffusers' `RMSNorm` (models/normalization.py)
applied over channels after `movedim(1, -1)`, as `ResBlock` (norm_type "rms_norm") and the
decoder's `norm_out` do in models/autoencoders/autoencoder_dc.py; eps = 1e-5 is the value
`norm_out` passes (RMSNorm(channels, 1e-5, elementwise_affine=True, bias=True)). As there, the
mean square is taken in float32 (float64 for float64 input). Unlike diffusers, which rounds x * r to a
half-precision weight's dtype before the affine, y is rounded to x's dtype once, at the end.
y has x's dtype, shape and memory format (channels_last in, channels_last out).

Backward, with g = dy * weight (per element) and m = mean_c(g * x) per pixel:

    dx = r * g - x * r^3 * m
    dweight[c] = sum over (b, h, w) of dy * x * r,    dbias[c] = sum over (b, h, w) of dy

Precision of dx. The two terms of dx nearly cancel where one channel holds most of a pixel's
mean square (always at C = 1, where dx = g r eps / (x^2 + eps)), so dx is within the dtype's
tolerance of its terms' sizes, r (|g| + |x r| mean_c |g x r|), not of its value (measured: Triton,
float16, C = 1, weight -11800: dx 0.108887 where float64 gives 0.111447, the terms 22 times
the value); dweight and dbias are within it of sum |dy x r| and sum |dy|. The eager formulas
round the same way.

The backward is an op of its own (`trms2d_backward`) so the fast backward is one graph node
under torch.compile; r is recomputed there from x, so the forward keeps a single output. The
backward op has no autograd formula itself: first-order gradients only.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastgen import _cuda
from fastgen.ops.registry import (CheckCase, Op, check_companion, check_float_tensor, check_number, define_custom_op,
                                  random_tensor, register, register_autograd)


def _check_inputs(op_name: str, x, weight, bias, eps) -> None:
    check_float_tensor(op_name, "x", x)
    if x.dim() != 4:
        raise ValueError(f"{op_name}: x must be 4-D (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"{op_name}: x must have at least one channel, got shape {tuple(x.shape)}")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None:
            check_companion(op_name, name, tensor, x, (x.shape[1],), "(C,)")
    check_number(op_name, "eps", eps, positive=True)


def _like_x(x: torch.Tensor) -> torch.Tensor:
    """Uninitialised, shaped like x: channels_last when x is (and is not also contiguous)."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=layout)


def _allocate_output(x, weight=None, bias=None, eps=1e-5):
    _check_inputs("trms2d", x, weight, bias, eps)
    return _like_x(x)


def _allocate_gradients(grad, x, weight=None, bias=None, eps=1e-5):
    """(dx, dweight, dbias); dweight and dbias are what the affine parameters would get
    (weight = 1, bias = 0 when absent): autograd drops them then."""
    _check_inputs("trms2d_backward", x, weight, bias, eps)
    check_companion("trms2d_backward", "grad", grad, x, tuple(x.shape), "of x")
    return _like_x(x), x.new_empty(x.shape[1]), x.new_empty(x.shape[1])


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def trms2d_reference(x, weight=None, bias=None, eps=1e-5):
    """diffusers' formulation: move channels last, RMSNorm over them, move them back."""
    _check_inputs("trms2d", x, weight, bias, eps)
    h = x.movedim(1, -1)
    mean_square = h.to(_compute_dtype(x.dtype)).pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(mean_square + eps)
    if weight is not None:
        h = h * weight
    if bias is not None:
        h = h + bias
    return h.to(x.dtype).movedim(-1, 1)


def trms2d_backward_reference(grad, x, weight=None, bias=None, eps=1e-5):
    """The backward formulas of the module docstring in eager PyTorch."""
    _check_inputs("trms2d_backward", x, weight, bias, eps)
    check_companion("trms2d_backward", "grad", grad, x, tuple(x.shape), "of x")
    compute = _compute_dtype(x.dtype)
    x_, dy = x.to(compute), grad.to(compute)
    rstd = torch.rsqrt(x_.pow(2).mean(1, keepdim=True) + eps)
    g = dy if weight is None else dy * weight.to(compute)[:, None, None]
    dx = rstd * g - x_ * rstd.pow(3) * (g * x_).mean(1, keepdim=True)
    dweight = (dy * x_ * rstd).sum((0, 2, 3))
    return dx.to(x.dtype), dweight.to(x.dtype), dy.sum((0, 2, 3)).to(x.dtype)


def _check_case(label, shape, layout="contiguous", weight=True, bias=True):
    def make_args(device, dtype, generator):
        x = random_tensor(shape, layout, device, dtype, generator)
        affine = [random_tensor(shape[1:2], "contiguous", device, dtype, generator) if present else None
                  for present in (weight, bias)]
        return (x, *affine, 1e-5)

    return CheckCase(label, make_args)


def _check_cases():
    return [
        _check_case("C128 affine", (2, 128, 6, 10)),
        _check_case("C96 channels_last", (1, 96, 5, 7), "channels_last"),
        _check_case("C40 sliced no affine", (2, 40, 3, 5), "sliced", weight=False, bias=False),
        _check_case("C1024 weight only", (1, 1024, 2, 3), bias=False),
    ]


TRMS2D = register(
    Op(name="trms2d", reference=trms2d_reference, allocate_output=_allocate_output, check_cases=_check_cases)
)
# Not in OPS, like the other backward ops: it is checked through trms2d's fwd+bwd runs and by
# tests/test_rms_norm_2d.py, which drives its Triton implementation directly.
TRMS2D_BACKWARD = Op(name="trms2d_backward", called_as="trms2d's backward",
                     reference=trms2d_backward_reference, allocate_output=_allocate_gradients)


TRMS2D.implement_at("triton", "fastgen.kernels.rms_norm_2d:trms2d_forward")
TRMS2D_BACKWARD.implement_at("triton", "fastgen.kernels.rms_norm_2d:trms2d_backward")


@TRMS2D.implement("cuda")
def _trms2d_cuda(x, weight, bias, eps, *, out):
    _cuda.launch("trms2d_forward", x=x, weight=_cuda.per_channel(weight), bias=_cuda.per_channel(bias), y=out, eps=eps)


@TRMS2D_BACKWARD.implement("cuda")
def _trms2d_backward_cuda(grad, x, weight, bias, eps, *, out):
    dx, dweight, dbias = out
    blocks = _cuda.query("trms2d_backward_blocks", x=x)
    partial = torch.empty(blocks, 2, x.shape[1], 1, dtype=torch.float32, device=x.device)
    _cuda.launch("trms2d_backward", grad=grad, x=x, weight=_cuda.per_channel(weight), dx=dx, partial=partial, eps=eps)
    sums = partial.sum(0)
    dweight.copy_(sums[0, :, 0])
    dbias.copy_(sums[1, :, 0])


@define_custom_op(TRMS2D)
def trms2d(
    x: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """y = x / sqrt(mean_c x^2 + eps) * weight + bias, per pixel over the C channels."""


@define_custom_op(TRMS2D_BACKWARD)
def trms2d_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias) of trms2d for the output gradient `grad`."""


def _setup_context(ctx, inputs, output):
    x, weight, bias, ctx.eps = inputs
    ctx.save_for_backward(x, weight, bias)


def _backward(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    dx, dweight, dbias = trms2d_backward(grad, x, weight, bias, ctx.eps)
    return dx, dweight if weight is not None else None, dbias if bias is not None else None, None


register_autograd(trms2d, _backward, _setup_context)
