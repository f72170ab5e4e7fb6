"""Adaptive normalization: AdaGN / AdaIN (group norm) and adaLN (layer norm), each followed by
a per-sample affine modulation.

`ada_group_norm(x, scale, shift, num_groups, weight=None, bias=None, eps=1e-5, act=None)`,
x of shape (B, C, *spatial) (any strides; channels_last is read in place), scale and shift
(B, C), weight and bias (C,) or None. The C channels split into G = num_groups groups of C/G
consecutive channels. For sample b and group g, mu and var are the mean and the biased
variance of x over the C/G channels of g and every spatial position; then, per element,

    y = ((x - mu) / sqrt(var + eps) * weight[c] + bias[c]) * (1 + scale[b, c]) + shift[b, c]
    y = act(y)                              act: None (identity) or "silu" (y * sigmoid(y))

with weight = 1 and bias = 0 when they are None. ADM's AdaGN is G = 32 with an affine
GroupNorm and SiLU; StyleGAN's AdaIN is G = C (instance norm, one group per channel) with
no affine and no activation. y has x's dtype, shape and memory format (channels_last in,
channels_last out; other layouts give a contiguous y).

`ada_layer_norm(x, scale, shift, eps=1e-6)`, x of shape (B, N, C): per token, normalize over
the C channels (no affine of its own) and modulate with the token's sample:

    y[b, n, :] = (x[b, n, :] - mu[b, n]) / sqrt(var[b, n] + eps) * (1 + scale[b]) + shift[b]

as in DiT's adaLN, SANA's t2i_modulate and VAR's AdaLN. y is contiguous with x's dtype.

`gated_residual_ada_layer_norm(x, branch, gate, scale, shift, eps=1e-6)` -> (h, y), x and branch
(B, N, C), gate, scale and shift (B, C): the gated residual of an adaLN-Zero block followed by the
next modulated norm (SD3's and FLUX.1's joint blocks: the attention's residual, then norm2),

    h[b, n, :] = x[b, n, :] + gate[b] * branch[b, n, :]
    y          = ada_layer_norm(h, scale, shift, eps)

h is computed in float32 (float64 for float64 inputs) and rounded once to x's dtype, and y
normalizes that rounded h, the tensor the op returns: the result is the two-step composition
with a once-rounded residual. Where x + gate * branch passes the dtype's range (float16's
65,504), the rounded h is +-inf and that token's y is NaN, as in the two steps; the backward
below then reaches NaN through that token. One pass reads x and branch and writes h and y,
where the two steps read x, branch and h and write h and y (with the product gate * branch a
pass of its own in eager PyTorch). Whether that beats torch.compile of the two steps is for
the benchmark (bench/ops_ada_norm.py) to decide, on a GPU: `fastgen.accelerate` leaves it out
when `ops=` does.

Statistics are float32 (float64 for float64 inputs) whatever the input dtype. They stay exact
for a large mean: the fast kernels subtract a pivot (the group's / row's first element) before
summing, so neither the mean of shifted values nor (x - pivot) - mean loses digits to the
offset, and variances are merged tile by tile with Chan's parallel update instead of
E[x^2] - E[x]^2.

Backward, writing xhat = (x - mu) * rstd (rstd = 1 / sqrt(var + eps)), z the pre-activation
output, dz = dy * act'(z), u[b, c] = weight[c] * (1 + scale[b, c]) and, per (b, c),
A = sum over positions of dz, Bc = sum over positions of dz * xhat:

    dshift[b, c] = A                    dscale[b, c] = weight[c] * Bc + bias[c] * A
    dbias[c] = sum_b (1 + scale) A      dweight[c] = sum_b (1 + scale) Bc
    dx = rstd * (u dz - mean_group(u A) - xhat * mean_group(u Bc))     (group means over the
                                                                        group's C/G*S elements)

adaLN is the same with G = 1 per token, u = 1 + scale and sums over the token's channels.
For the gated residual, with dh and dy the gradients of its two outputs, the gradient reaching h
is dH = dh + (adaLN's dx of h for dy), and

    dx = dH        dbranch = gate[b] * dH        dgate[b, c] = sum over tokens of branch * dH

with dscale and dshift those of adaLN for dy; h is recomputed (and rounded) from x, branch and gate.

Precision of the gradients. dx's three terms nearly cancel where one value holds most of its
group's (adaLN: its token's) variance, always where the group holds two values (there 1 - xhat^2
= eps / (var + eps)), and the parameter gradients, dgate among them, sum terms of either sign.
So each gradient is within the dtype's tolerance of its terms' sizes, not of its value: for dx,
rstd (|u dz| + mean_group |u dz| + |xhat| mean_group |u dz xhat|), plus |dh| in the gated
residual's dH, times |gate| for dbranch; for the sums, the sums of their terms' sizes (measured:
the gated residual in float32 at C = 2 with a scale of 7.3e9, dgate 70666.5 where float64 gives
73321.4 and the eager float32 formulas 74070.7; its terms' sizes sum to 1.9e11, so the error is
1.4e-8 of them). The eager formulas round the same way.

Non-finite values propagate through these formulas, evaluated in the order written: every
output and gradient that a NaN or an infinity reaches is non-finite, and no other. Where an
infinite scale or weight meets it, which of NaN and +-inf an element holds follows the formulas
above (an infinity times a 0 xhat is NaN); the eager references' torch group_norm / layer_norm
compute x * (rstd * weight) + (bias - mu * rstd * weight) and backward formulas of their own,
so they can hold NaN there where the kernels hold an infinity, and the other way round.

Each backward is an op of its own (`ada_group_norm_backward`, `ada_layer_norm_backward`,
`gated_residual_ada_layer_norm_backward`) so that the fast backward is one graph node under
torch.compile; the statistics are recomputed there from x rather than saved, so no forward op
has outputs beyond its results. The backward ops have no autograd formula themselves:
first-order gradients only.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from fastgen import _cuda
from fastgen.ops.registry import (CheckCase, Op, check_companion, check_float_tensor, check_number, define_custom_op,
                                  random_tensor, register, register_autograd)

ACTIVATIONS = (None, "silu")


def _check_tensor(op_name: str, name: str, tensor, min_dim: int, layout: str) -> None:
    check_float_tensor(op_name, name, tensor)
    if tensor.dim() < min_dim:
        raise ValueError(f"{op_name}: {name} must be {layout}, got shape {tuple(tensor.shape)}")


def _check_group_norm_inputs(op_name, x, scale, shift, num_groups, weight, bias, eps, act) -> None:
    _check_tensor(op_name, "x", x, 2, "(B, C, *spatial)")
    batch, channels = x.shape[:2]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"{op_name}: num_groups must be an int >= 1, got {num_groups!r}")
    if channels % num_groups:
        raise ValueError(f"{op_name}: channels C={channels} must be divisible by num_groups={num_groups}")
    if channels // num_groups * math.prod(x.shape[2:]) == 1:
        raise ValueError(f"{op_name}: each group must hold more than one value (its variance), got C/G * spatial = 1")
    check_companion(op_name, "scale", scale, x, (batch, channels), "(B, C)")
    check_companion(op_name, "shift", shift, x, (batch, channels), "(B, C)")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None:
            check_companion(op_name, name, tensor, x, (channels,), "(C,)")
    check_number(op_name, "eps", eps, positive=True)
    if act not in ACTIVATIONS:
        raise ValueError(f"{op_name}: act must be None or 'silu', got {act!r}")


def _check_layer_norm_inputs(op_name, x, scale, shift, eps) -> None:
    _check_tensor(op_name, "x", x, 3, "3-D (B, N, C)")
    if x.dim() != 3:
        raise ValueError(f"{op_name}: x must be 3-D (B, N, C), got shape {tuple(x.shape)}")
    batch, _, channels = x.shape
    check_companion(op_name, "scale", scale, x, (batch, channels), "(B, C)")
    check_companion(op_name, "shift", shift, x, (batch, channels), "(B, C)")
    check_number(op_name, "eps", eps, positive=True)


def _check_gated_residual_inputs(op_name, x, branch, gate, scale, shift, eps) -> None:
    _check_layer_norm_inputs(op_name, x, scale, shift, eps)
    check_companion(op_name, "branch", branch, x, tuple(x.shape), "of x")
    check_companion(op_name, "gate", gate, x, tuple(scale.shape), "(B, C)")


def _check_grad(op_name: str, grad, x: torch.Tensor, name: str = "grad") -> None:
    _check_tensor(op_name, name, grad, 0, "like x")
    check_companion(op_name, name, grad, x, tuple(x.shape), "of x")


def _like_x(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor shaped like x: channels_last (or channels_last_3d) when x is,
    contiguous otherwise."""
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    layout = formats.get(x.dim(), torch.contiguous_format)
    if x.is_contiguous() or not x.is_contiguous(memory_format=layout):
        layout = torch.contiguous_format
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=layout)


def _allocate_group_norm_output(x, scale, shift, num_groups, weight=None, bias=None, eps=1e-5, act=None):
    _check_group_norm_inputs("ada_group_norm", x, scale, shift, num_groups, weight, bias, eps, act)
    return _like_x(x)


def _allocate_group_norm_gradients(grad, x, scale, shift, num_groups, weight=None, bias=None, eps=1e-5, act=None):
    """(dx, dscale, dshift, dweight, dbias); dweight and dbias are the gradients the affine
    parameters would get (weight = 1, bias = 0 when absent): autograd drops them then."""
    _check_group_norm_inputs("ada_group_norm_backward", x, scale, shift, num_groups, weight, bias, eps, act)
    _check_grad("ada_group_norm_backward", grad, x)
    per_channel = x.new_empty(x.shape[1])
    return _like_x(x), torch.empty_like(scale), torch.empty_like(shift), per_channel, torch.empty_like(per_channel)


def _allocate_layer_norm_output(x, scale, shift, eps=1e-6):
    _check_layer_norm_inputs("ada_layer_norm", x, scale, shift, eps)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _allocate_layer_norm_gradients(grad, x, scale, shift, eps=1e-6):
    _check_layer_norm_inputs("ada_layer_norm_backward", x, scale, shift, eps)
    _check_grad("ada_layer_norm_backward", grad, x)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), torch.empty_like(scale), torch.empty_like(shift)


def _allocate_gated_residual_outputs(x, branch, gate, scale, shift, eps=1e-6):
    """(h, y)."""
    _check_gated_residual_inputs("gated_residual_ada_layer_norm", x, branch, gate, scale, shift, eps)
    return tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for _ in "hy")


def _check_gated_residual_gradients(grad_h, grad_y, x, branch, gate, scale, shift, eps) -> None:
    op_name = "gated_residual_ada_layer_norm_backward"
    _check_gated_residual_inputs(op_name, x, branch, gate, scale, shift, eps)
    _check_grad(op_name, grad_h, x, "grad_h")
    _check_grad(op_name, grad_y, x, "grad_y")


def _allocate_gated_residual_gradients(grad_h, grad_y, x, branch, gate, scale, shift, eps=1e-6):
    """(dx, dbranch, dgate, dscale, dshift)."""
    _check_gated_residual_gradients(grad_h, grad_y, x, branch, gate, scale, shift, eps)
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device), torch.empty(x.shape, dtype=x.dtype, device=x.device),
            torch.empty_like(gate), torch.empty_like(scale), torch.empty_like(shift))


def _expand_per_channel(t: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    return t.reshape(*t.shape, *([1] * spatial_dims))


def ada_group_norm_reference(x, scale, shift, num_groups, weight=None, bias=None, eps=1e-5, act=None):
    """The eager formulation as ADM and diffusers write it: GroupNorm, multiply, add, SiLU."""
    _check_group_norm_inputs("ada_group_norm", x, scale, shift, num_groups, weight, bias, eps, act)
    spatial_dims = x.dim() - 2
    if weight is None and bias is not None:
        # torch's group_norm backward fails on a bias without a weight (torch 2.13): add it here.
        y = F.group_norm(x, num_groups, None, None, eps) + _expand_per_channel(bias, spatial_dims)
    else:
        y = F.group_norm(x, num_groups, weight, bias, eps)
    y = y * (1 + _expand_per_channel(scale, spatial_dims)) + _expand_per_channel(shift, spatial_dims)
    return F.silu(y) if act == "silu" else y


def ada_layer_norm_reference(x, scale, shift, eps=1e-6):
    """DiT's eager formulation: LayerNorm without affine, then modulate(x, shift, scale)."""
    _check_layer_norm_inputs("ada_layer_norm", x, scale, shift, eps)
    y = F.layer_norm(x, x.shape[-1:], eps=eps)
    return y * (1 + scale[:, None, :]) + shift[:, None, :]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def gated_residual(x, branch, gate):
    """h = x + gate[b] * branch in float32 (float64 for float64), rounded once to x's dtype."""
    compute = _compute_dtype(x.dtype)
    return (x.to(compute) + gate.to(compute)[:, None, :] * branch.to(compute)).to(x.dtype)


def gated_residual_ada_layer_norm_reference(x, branch, gate, scale, shift, eps=1e-6):
    """(h, y): the gated residual of the module docstring, then ada_layer_norm's eager formulation
    of the rounded h."""
    _check_gated_residual_inputs("gated_residual_ada_layer_norm", x, branch, gate, scale, shift, eps)
    h = gated_residual(x, branch, gate)
    return h, ada_layer_norm_reference(h, scale, shift, eps)


def ada_group_norm_backward_reference(grad, x, scale, shift, num_groups, weight=None, bias=None, eps=1e-5, act=None):
    """The backward formulas of the module docstring in eager PyTorch."""
    _check_group_norm_inputs("ada_group_norm_backward", x, scale, shift, num_groups, weight, bias, eps, act)
    _check_grad("ada_group_norm_backward", grad, x)
    compute = _compute_dtype(x.dtype)
    batch, channels = x.shape[:2]
    spatial = tuple(range(2, x.dim()))
    per_group = channels // num_groups
    group_size = per_group * math.prod(x.shape[2:])
    grouped = x.to(compute).reshape(batch, num_groups, group_size)  # not -1: ambiguous for an empty batch
    mean = grouped.mean(-1, keepdim=True)
    rstd_per_group = (grouped.var(-1, unbiased=False, keepdim=True) + eps).rsqrt()
    xhat = ((grouped - mean) * rstd_per_group).reshape(x.shape)
    weight_ = torch.ones(channels, dtype=compute, device=x.device) if weight is None else weight.to(compute)
    bias_ = torch.zeros(channels, dtype=compute, device=x.device) if bias is None else bias.to(compute)
    one_plus_scale = 1 + scale.to(compute)
    u = weight_ * one_plus_scale  # (B, C)
    dz = grad.to(compute)
    if act == "silu":
        z = xhat * _expand_per_channel(u, len(spatial)) + _expand_per_channel(
            bias_ * one_plus_scale + shift.to(compute), len(spatial))
        sigmoid = torch.sigmoid(z)
        dz = dz * sigmoid * (1 + z * (1 - sigmoid))
    sum_dz = dz.sum(spatial) if spatial else dz
    sum_dz_xhat = (dz * xhat).sum(spatial) if spatial else dz * xhat

    def group_mean(per_channel):  # (B, C) -> each channel gets its group's sum / group size
        sums = per_channel.reshape(batch, num_groups, per_group).sum(-1) / group_size
        return _expand_per_channel(sums.repeat_interleave(per_group, dim=1), len(spatial))

    rstd = _expand_per_channel(rstd_per_group.reshape(batch, num_groups).repeat_interleave(per_group, dim=1),
                               len(spatial))
    dx = rstd * (_expand_per_channel(u, len(spatial)) * dz - group_mean(u * sum_dz) - xhat * group_mean(u * sum_dz_xhat))
    dscale = weight_ * sum_dz_xhat + bias_ * sum_dz
    dweight = (one_plus_scale * sum_dz_xhat).sum(0)
    dbias = (one_plus_scale * sum_dz).sum(0)
    return tuple(t.to(x.dtype) for t in (dx, dscale, sum_dz, dweight, dbias))


def _layer_norm_gradients(grad, x, scale, eps) -> tuple:
    """(dx, dscale, dshift) of adaLN by the module docstring's formulas, in the compute dtype."""
    compute = _compute_dtype(x.dtype)
    x_, grad_ = x.to(compute), grad.to(compute)
    mean = x_.mean(-1, keepdim=True)
    rstd = (x_.var(-1, unbiased=False, keepdim=True) + eps).rsqrt()
    xhat = (x_ - mean) * rstd
    dxhat = grad_ * (1 + scale.to(compute))[:, None, :]
    dx = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    return dx, (grad_ * xhat).sum(1), grad_.sum(1)


def ada_layer_norm_backward_reference(grad, x, scale, shift, eps=1e-6):
    """The backward formulas of the module docstring in eager PyTorch."""
    _check_layer_norm_inputs("ada_layer_norm_backward", x, scale, shift, eps)
    _check_grad("ada_layer_norm_backward", grad, x)
    return tuple(t.to(x.dtype) for t in _layer_norm_gradients(grad, x, scale, eps))


def gated_residual_ada_layer_norm_backward_reference(grad_h, grad_y, x, branch, gate, scale, shift, eps=1e-6):
    """(dx, dbranch, dgate, dscale, dshift) by the module docstring's formulas in eager PyTorch."""
    _check_gated_residual_gradients(grad_h, grad_y, x, branch, gate, scale, shift, eps)
    compute = _compute_dtype(x.dtype)
    h = gated_residual(x, branch, gate)
    dh_norm, dscale, dshift = _layer_norm_gradients(grad_y, h, scale, eps)
    dh = grad_h.to(compute) + dh_norm
    dbranch = gate.to(compute)[:, None, :] * dh
    dgate = (branch.to(compute) * dh).sum(1)
    return tuple(t.to(x.dtype) for t in (dh, dbranch, dgate, dscale, dshift))


def _group_norm_case(label, shape, num_groups, layout="contiguous", affine=True, act="silu", eps=1e-5):
    def make_args(device, dtype, generator):
        x = random_tensor(shape, layout, device, dtype, generator)
        scale, shift = (random_tensor(shape[:2], "contiguous", device, dtype, generator) for _ in "ab")
        weight, bias = ((random_tensor(shape[1:2], "contiguous", device, dtype, generator) for _ in "ab")
                        if affine else (None, None))
        return (x, scale, shift, num_groups, weight, bias, eps, act)

    return CheckCase(label, make_args)


def _layer_norm_case(label, shape, layout="contiguous"):
    def make_args(device, dtype, generator):
        x = random_tensor(shape, layout, device, dtype, generator)
        scale, shift = (random_tensor((shape[0], shape[2]), "contiguous", device, dtype, generator) for _ in "ab")
        return (x, scale, shift, 1e-6)

    return CheckCase(label, make_args)


def _gated_residual_case(label, shape, layout="contiguous", gate_layout="contiguous"):
    def make_args(device, dtype, generator):
        x, branch = (random_tensor(shape, layout, device, dtype, generator) for _ in "xb")
        gate = random_tensor((shape[0], shape[2]), gate_layout, device, dtype, generator)
        scale, shift = (random_tensor((shape[0], shape[2]), "contiguous", device, dtype, generator) for _ in "ab")
        return (x, branch, gate, scale, shift, 1e-6)

    return CheckCase(label, make_args)


def _group_norm_cases():
    return [
        _group_norm_case("AdaGN G8 C24 9x7 silu", (2, 24, 9, 7), 8),
        _group_norm_case("AdaGN G4 C16 channels_last", (2, 16, 6, 5), 4, "channels_last"),
        _group_norm_case("AdaIN G=C 12 sliced", (2, 12, 5, 6), 12, "sliced", affine=False, act=None, eps=1e-8),
        _group_norm_case("G3 C9 1-D spatial 37", (1, 9, 37), 3),
    ]


def _layer_norm_cases():
    return [
        _layer_norm_case("adaLN N17 C72", (2, 17, 72)),
        _layer_norm_case("adaLN N5 C200 sliced", (1, 5, 200), "sliced"),
    ]


def _gated_residual_cases():
    return [
        _gated_residual_case("gated residual N17 C72", (2, 17, 72)),
        _gated_residual_case("gated residual N5 C200 sliced", (1, 5, 200), "sliced", "sliced"),
        _gated_residual_case("gated residual N9 C33", (3, 9, 33), gate_layout="sliced"),
    ]


ADA_GROUP_NORM = register(Op(name="ada_group_norm", reference=ada_group_norm_reference,
                             allocate_output=_allocate_group_norm_output, check_cases=_group_norm_cases))
ADA_LAYER_NORM = register(Op(name="ada_layer_norm", reference=ada_layer_norm_reference,
                             allocate_output=_allocate_layer_norm_output, check_cases=_layer_norm_cases))
GATED_RESIDUAL_ADA_LAYER_NORM = register(Op(name="gated_residual_ada_layer_norm",
                                            reference=gated_residual_ada_layer_norm_reference,
                                            allocate_output=_allocate_gated_residual_outputs,
                                            check_cases=_gated_residual_cases))
# Not in OPS: the backward ops are checked through the forward ops' "bwd" direction, which runs
# them with the backend forced.
ADA_GROUP_NORM_BACKWARD = Op(name="ada_group_norm_backward", called_as="ada_group_norm's backward",
                             reference=ada_group_norm_backward_reference,
                             allocate_output=_allocate_group_norm_gradients)
ADA_LAYER_NORM_BACKWARD = Op(name="ada_layer_norm_backward", called_as="ada_layer_norm's backward",
                             reference=ada_layer_norm_backward_reference,
                             allocate_output=_allocate_layer_norm_gradients)
GATED_RESIDUAL_ADA_LAYER_NORM_BACKWARD = Op(name="gated_residual_ada_layer_norm_backward",
                                            called_as="gated_residual_ada_layer_norm's backward",
                                            reference=gated_residual_ada_layer_norm_backward_reference,
                                            allocate_output=_allocate_gated_residual_gradients)


ADA_GROUP_NORM.implement_at("triton", "fastgen.kernels.ada_norm:ada_group_norm_forward")
ADA_GROUP_NORM_BACKWARD.implement_at("triton", "fastgen.kernels.ada_norm:ada_group_norm_backward")
ADA_LAYER_NORM.implement_at("triton", "fastgen.kernels.ada_norm:ada_layer_norm_forward")
ADA_LAYER_NORM_BACKWARD.implement_at("triton", "fastgen.kernels.ada_norm:ada_layer_norm_backward")
# No CUDA kernel: under backend "cuda" the gated residual runs as under "auto" (Triton on a GPU).
GATED_RESIDUAL_ADA_LAYER_NORM.implement_at("triton", "fastgen.kernels.ada_norm:gated_residual_ada_layer_norm_forward")
GATED_RESIDUAL_ADA_LAYER_NORM_BACKWARD.implement_at(
    "triton", "fastgen.kernels.ada_norm:gated_residual_ada_layer_norm_backward")


# The CUDA kernels (csrc/ada_norm.cu) take x as (B, C, S) like the Triton ones, and plan their
# own launches: the extension says how large a float32 workspace that plan needs.


def _flat(t: torch.Tensor, output: bool = False) -> torch.Tensor:
    """(B, C, *spatial) as the (B, C, S) tensor the extension takes: the view the Triton
    kernels read too, or for an input whose spatial dims do not flatten by strides a copy."""
    return t.view(t.shape[0], t.shape[1], -1) if output else t.reshape(t.shape[0], t.shape[1], -1)


def _workspace(query: str, **args) -> Optional[torch.Tensor]:
    floats = _cuda.query(query, **args)
    device = args["x"].device
    return torch.empty(1, 1, 1, floats, device=device, dtype=torch.float32) if floats else None


def ada_group_norm_cuda(x, scale, shift, num_groups, weight, bias, eps, act, out, num_chunks=0) -> None:
    """out = ada_group_norm(x, ...) by the CUDA kernels, each group's reduction split over
    num_chunks blocks (0: as the extension plans; tests force the split path with it)."""
    if out.numel() == 0:
        return
    x_flat = _flat(x)
    workspace = _workspace("ada_group_norm_workspace", x=x_flat, num_groups=num_groups, num_chunks=num_chunks,
                           backward=False)
    _cuda.launch("ada_group_norm", x=x_flat, y=_flat(out, output=True), scale=scale, shift=shift,
                 weight=_cuda.per_channel(weight), bias=_cuda.per_channel(bias), workspace=workspace,
                 num_groups=num_groups, num_chunks=num_chunks, eps=eps, silu=act == "silu")


def ada_group_norm_backward_cuda(grad, x, scale, shift, num_groups, weight, bias, eps, act,
                                 dx, dscale, dshift, dweight, dbias, num_chunks=0) -> None:
    """The gradients of ada_group_norm by the CUDA kernels, written in place (dweight and dbias
    as the Triton backward: what weight 1 and bias 0 would get when absent)."""
    if x.numel() == 0:
        for t in (dx, dscale, dshift, dweight, dbias):
            t.zero_()
        return
    x_flat = _flat(x)
    workspace = _workspace("ada_group_norm_workspace", x=x_flat, num_groups=num_groups, num_chunks=num_chunks,
                           backward=True)
    _cuda.launch("ada_group_norm_backward", dy=_flat(grad), x=x_flat, scale=scale, shift=shift,
                 weight=_cuda.per_channel(weight), bias=_cuda.per_channel(bias), dx=_flat(dx, output=True),
                 dscale=dscale, dshift=dshift, dweight=_cuda.per_channel(dweight), dbias=_cuda.per_channel(dbias),
                 workspace=workspace, num_groups=num_groups, num_chunks=num_chunks, eps=eps, silu=act == "silu")


@ADA_GROUP_NORM.implement("cuda")
def _group_norm_cuda(x, scale, shift, num_groups, weight, bias, eps, act, *, out):
    ada_group_norm_cuda(x, scale, shift, num_groups, weight, bias, eps, act, out)


@ADA_GROUP_NORM_BACKWARD.implement("cuda")
def _group_norm_backward_cuda(grad, x, scale, shift, num_groups, weight, bias, eps, act, *, out):
    ada_group_norm_backward_cuda(grad, x, scale, shift, num_groups, weight, bias, eps, act, *out)


@ADA_LAYER_NORM.implement("cuda")
def _layer_norm_cuda(x, scale, shift, eps, *, out):
    _cuda.launch("ada_layer_norm", x=x, y=out, scale=scale, shift=shift, eps=eps)


@ADA_LAYER_NORM_BACKWARD.implement("cuda")
def _layer_norm_backward_cuda(grad, x, scale, shift, eps, *, out):
    dx, dscale, dshift = out
    if x.numel() == 0:
        for t in out:
            t.zero_()
        return
    workspace = _workspace("ada_layer_norm_backward_workspace", x=x)
    _cuda.launch("ada_layer_norm_backward", dy=grad, x=x, scale=scale, shift=shift, dx=dx, dscale=dscale,
                 dshift=dshift, workspace=workspace, eps=eps)


@define_custom_op(ADA_GROUP_NORM)
def ada_group_norm(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    act: Optional[str] = None,
) -> torch.Tensor:
    """act(GroupNorm(x) * (1 + scale) + shift), statistics per (sample, group) (module docstring)."""


@define_custom_op(ADA_GROUP_NORM_BACKWARD)
def ada_group_norm_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    act: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dscale, dshift, dweight, dbias) of ada_group_norm for the output gradient `grad`."""


@define_custom_op(ADA_LAYER_NORM)
def ada_layer_norm(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm(x) * (1 + scale[b]) + shift[b] per token (module docstring)."""


@define_custom_op(ADA_LAYER_NORM_BACKWARD)
def ada_layer_norm_backward(
    grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dscale, dshift) of ada_layer_norm for the output gradient `grad`."""


@define_custom_op(GATED_RESIDUAL_ADA_LAYER_NORM)
def gated_residual_ada_layer_norm(
    x: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, y): h = x + gate[b] * branch, y = ada_layer_norm(h, scale, shift, eps) (module docstring)."""


@define_custom_op(GATED_RESIDUAL_ADA_LAYER_NORM_BACKWARD)
def gated_residual_ada_layer_norm_backward(
    grad_h: torch.Tensor, grad_y: torch.Tensor, x: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor,
    scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dbranch, dgate, dscale, dshift) of gated_residual_ada_layer_norm for its outputs' gradients."""


def _group_norm_setup_context(ctx, inputs, output):
    x, scale, shift, num_groups, weight, bias, eps, act = inputs
    ctx.save_for_backward(x, scale, shift, weight, bias)
    ctx.options = dict(num_groups=num_groups, eps=eps, act=act)


def _group_norm_backward(ctx, grad):
    x, scale, shift, weight, bias = ctx.saved_tensors
    dx, dscale, dshift, dweight, dbias = ada_group_norm_backward(
        grad, x, scale, shift, weight=weight, bias=bias, **ctx.options)
    return (dx, dscale, dshift, None, dweight if weight is not None else None,
            dbias if bias is not None else None, None, None)


def _layer_norm_setup_context(ctx, inputs, output):
    x, scale, shift, ctx.eps = inputs
    ctx.save_for_backward(x, scale, shift)


def _layer_norm_backward(ctx, grad):
    x, scale, shift = ctx.saved_tensors
    dx, dscale, dshift = ada_layer_norm_backward(grad, x, scale, shift, ctx.eps)
    return dx, dscale, dshift, None


def _gated_residual_setup_context(ctx, inputs, output):
    *tensors, ctx.eps = inputs
    ctx.save_for_backward(*tensors)


def _gated_residual_backward(ctx, grad_h, grad_y):
    return (*gated_residual_ada_layer_norm_backward(grad_h, grad_y, *ctx.saved_tensors, ctx.eps), None)


register_autograd(ada_group_norm, _group_norm_backward, _group_norm_setup_context)
register_autograd(ada_layer_norm, _layer_norm_backward, _layer_norm_setup_context)
register_autograd(gated_residual_ada_layer_norm, _gated_residual_backward, _gated_residual_setup_context)
