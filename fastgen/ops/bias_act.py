"""Fused bias, activation, gain and clamp (StyleGAN2 / StyleGAN3 `bias_act`).

`bias_act(x, b=None, act="linear", alpha=None, gain=None, clamp=None, dim=1)`: for x of any
shape and strides and b a vector of x.shape[dim] entries (broadcast along every other axis),

    z = x + b
    y = clamp(gain * act(z), -clamp, clamp)          (no clamping when clamp is None)

with the activations below (act None is "linear": no activation); `alpha` is the negative slope of lrelu (ignored by the others),
and `gain` defaults per activation so that unit-variance inputs keep roughly unit-variance
outputs:

    act       act(z)                                    default gain
    linear    z                                         1
    relu      max(z, 0)                                 sqrt 2
    lrelu     z if z > 0 else alpha*z  (alpha 0.2)      sqrt 2
    tanh      tanh z                                    1
    sigmoid   1 / (1 + exp(-z))                         1
    elu       z if z >= 0 else exp(z) - 1               1
    selu      s*z if z >= 0 else s*a*(exp(z) - 1)       1   (s = 1.0507..., a = 1.6733...)
    softplus  log(1 + exp(z))                           1
    swish     z * sigmoid(z)                            sqrt 2

Backward, with dy the output gradient and m = [|gain*act(z)| <= clamp] (1 without clamp;
inclusive like torch.clamp's gradient; the y-based path below must test |y| < clamp, which
differs only where gain*act(z) is exactly +-clamp): dx = dy * gain * act'(z) * m, and
db = dx summed over every axis but `dim`. It is an op of its own,
`bias_act_backward(dy, x, b, y, ...) -> (dx, db)`, which reads either
- y, the forward's output, for linear, relu and lrelu with alpha >= 0: the sign of y * gain
  is the sign of z and |y| < clamp is m, so x need not be kept alive (as in StyleGAN); except
  that with a clamp and a 16-bit output, rounding can land an unclamped value exactly on
  +-clamp, so those layers read x instead;
- or x and b for the smooth activations, whose derivative is evaluated at z in float32 (from
  a 16-bit y it would carry that rounding).
Linear without clamp reads neither.

Second order: dx is linear in dy, so the gradient of dx with respect to dy is
bias_act_backward again; with respect to z it is dy * gain * act''(z) * m (zero for the
piecewise linear activations), computed with eager PyTorch ops; the gradient reaching db is
broadcast back along `dim` first. That covers R1 / path-length regularisation; gradients of
third order are not tested.

Arithmetic is float32 (float64 for float64 inputs); y and dx take x's dtype, db takes b's.

NaN and Inf in x and b propagate as in the eager reference and its autograd: relu and the
clamp keep a NaN, as F.relu and torch.clamp do. At a NaN z the backward takes act'(z) from
the branch torch's backward takes: relu's tests its output <= 0, so the gradient passes;
lrelu's tests z > 0, so it is scaled by alpha; the clamp's m is 0 (torch.clamp's backward
tests -clamp <= v <= clamp); the other activations' act'(z) is NaN. (For elu and selu that
is what torch's CPU backward gives in its vectorized loop; its scalar tail and its CUDA
kernel test z <= 0 and pass the gradient, so the eager reference itself varies there.)
A NaN act'(z) gives NaN even where the clamp cuts the gradient, as in the eager autograd,
whose activation backward multiplies the clamp's 0 by it.
A NaN or inf in dy is the exception: dx = dy * (gain * act'(z) * m) is NaN wherever that
factor is 0, but the eager autograd gives 0 where torch's backward selects rather than
multiplies (where the clamp cuts, and relu's z <= 0), and for swish it adds two products
(NaN at an inf dy where z <= 0, where this gives +-inf).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from fastgen import _cuda
from fastgen.ops.registry import (CheckCase, Op, check_float_tensor, check_number, check_same_dtype_and_device,
                                  define_custom_op, random_tensor, register, register_autograd)

_NAME = "bias_act"
SELU_SCALE = 1.0507009873554804934193349852946
SELU_ALPHA = 1.6732632423543772848170429916717


@dataclass(frozen=True)
class Activation:
    index: int  # the kernels' ACT constant
    default_alpha: float
    default_gain: float
    piecewise_linear: bool  # act'' = 0, and the sign of act(z) is the sign of z


ACTIVATIONS = {
    "linear": Activation(0, 0.0, 1.0, True),
    "relu": Activation(1, 0.0, math.sqrt(2), True),
    "lrelu": Activation(2, 0.2, math.sqrt(2), True),
    "tanh": Activation(3, 0.0, 1.0, False),
    "sigmoid": Activation(4, 0.0, 1.0, False),
    "elu": Activation(5, 0.0, 1.0, False),
    "selu": Activation(6, 0.0, 1.0, False),
    "softplus": Activation(7, 0.0, 1.0, False),
    "swish": Activation(8, 0.0, math.sqrt(2), False),
}


@dataclass(frozen=True)
class Params:
    """The scalar arguments with defaults filled in and `dim` made non-negative."""

    act: str
    alpha: float
    gain: float
    clamp: Optional[float]
    dim: int

    @property
    def negative_slope(self) -> float:
        """act'(z) for z <= 0 of a piecewise linear activation."""
        return {"linear": 1.0, "relu": 0.0}.get(self.act, self.alpha)

    @property
    def nan_slope(self) -> float:
        """act'(z) at a NaN z of a piecewise linear activation, as torch's backward takes it:
        F.relu's passes the gradient unless its output is <= 0 (1 at NaN), F.leaky_relu's
        scales it by alpha unless z > 0 (alpha at NaN)."""
        return self.alpha if self.act == "lrelu" else 1.0

    def derivative_source(self, dtype: torch.dtype) -> Optional[str]:
        """What the backward reads to evaluate act'(z) and the clamp mask: "y", "x" or None."""
        if ACTIVATIONS[self.act].piecewise_linear and self.negative_slope >= 0:
            if self.clamp is not None and dtype in (torch.float16, torch.bfloat16):
                return "x"
            if self.act == "linear" and self.clamp is None:
                return None
            return "y"
        return "x"


def _check_tensor(name: str, tensor, x: Optional[torch.Tensor] = None) -> None:
    check_float_tensor(_NAME, name, tensor)
    if x is not None:
        check_same_dtype_and_device(_NAME, name, tensor, x, "x")


def parse_params(x, b, act, alpha, gain, clamp, dim) -> Params:
    """Validate every argument (errors name it) and fill in the defaults."""
    _check_tensor("x", x)
    act = "linear" if act is None else act  # None is no activation, as for ada_group_norm
    if not isinstance(act, str):
        raise TypeError(f"{_NAME}: act must be one of {', '.join(ACTIVATIONS)} or None; got {type(act).__name__}")
    if act not in ACTIVATIONS:
        raise ValueError(f"{_NAME}: act must be one of {', '.join(ACTIVATIONS)}; got {act!r}")
    for name, value in (("alpha", alpha), ("gain", gain), ("clamp", clamp)):
        check_number(_NAME, name, value, allow_none=True)
    if clamp is not None and clamp < 0:
        raise ValueError(f"{_NAME}: clamp must be >= 0, got {clamp!r}")
    if not isinstance(dim, int) or isinstance(dim, bool) or not -max(x.dim(), 1) <= dim < max(x.dim(), 1):
        raise ValueError(
            f"{_NAME}: dim must be an int in [-{x.dim()}, {x.dim()}) for x of shape {tuple(x.shape)}, got {dim!r}"
        )
    dim = dim % max(x.dim(), 1)
    if b is not None:
        _check_tensor("b", b, x)
        if x.dim() == 0 or b.dim() != 1 or b.shape[0] != x.shape[dim]:
            expected = x.shape[dim] if x.dim() else "x with at least one dimension"
            raise ValueError(
                f"{_NAME}: b must be a 1-D tensor of x.shape[dim] = {expected} entries, got shape {tuple(b.shape)}"
            )
    spec = ACTIVATIONS[act]
    return Params(
        act,
        float(spec.default_alpha if alpha is None else alpha),
        float(spec.default_gain if gain is None else gain),
        None if clamp is None else float(clamp),
        dim,
    )


def _dense_like(t: torch.Tensor) -> torch.Tensor:
    """A fresh tensor of t's shape and dtype that no two indices share: in t's memory order
    (channels_last stays channels_last), except that an empty t gets a contiguous one, because
    empty_like copies an empty tensor's strides, zeros included (an expanded or channels_last
    view with a zero-size axis), and the CUDA launchers reject an output with a zero stride."""
    if t.numel() == 0:
        return torch.empty(t.shape, dtype=t.dtype, device=t.device)
    return torch.empty_like(t)


def _allocate_output(x, b=None, act="linear", alpha=None, gain=None, clamp=None, dim=1):
    parse_params(x, b, act, alpha, gain, clamp, dim)
    return _dense_like(x)


def broadcast_bias(b: torch.Tensor, ndim: int, dim: int) -> torch.Tensor:
    """b shaped to broadcast along every axis of an ndim-D tensor but `dim`."""
    return b.reshape([-1 if i == dim else 1 for i in range(ndim)])


def _activation(z: torch.Tensor, params: Params) -> torch.Tensor:
    return {
        "linear": lambda: z,
        "relu": lambda: F.relu(z),
        "lrelu": lambda: F.leaky_relu(z, params.alpha),
        "tanh": lambda: torch.tanh(z),
        "sigmoid": lambda: torch.sigmoid(z),
        "elu": lambda: F.elu(z),
        "selu": lambda: F.selu(z),
        "softplus": lambda: F.softplus(z),
        "swish": lambda: torch.sigmoid(z) * z,
    }[params.act]()


def bias_act_reference(x, b=None, act="linear", alpha=None, gain=None, clamp=None, dim=1):
    """The eager formulation: separate add, activation, multiply and clamp ops."""
    params = parse_params(x, b, act, alpha, gain, clamp, dim)
    z = x if b is None else x + broadcast_bias(b, x.dim(), params.dim)
    y = _activation(z, params)
    if params.gain != 1:
        y = y * params.gain
    if params.clamp is not None:
        y = y.clamp(-params.clamp, params.clamp)
    return y


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _pre_activation(x, b, params: Params) -> torch.Tensor:
    z = x.to(_compute_dtype(x.dtype))
    return z if b is None else z + broadcast_bias(b, x.dim(), params.dim).to(z.dtype)


def _piecewise_slope(v: torch.Tensor, params: Params) -> torch.Tensor:
    """act'(z) of a piecewise linear activation from v, a value with z's sign (z, or y * gain)."""
    return torch.where(v > 0, 1.0, torch.where(v <= 0, params.negative_slope, params.nan_slope))


def _first_derivative(z: torch.Tensor, params: Params) -> torch.Tensor:
    s = torch.sigmoid(z)
    return {
        "tanh": lambda: 1 - torch.tanh(z).square(),
        "sigmoid": lambda: s * (1 - s),
        "elu": lambda: torch.where(z > 0, 1.0, torch.exp(z)),
        "selu": lambda: torch.where(z > 0, SELU_SCALE, SELU_SCALE * SELU_ALPHA * torch.exp(z)),
        "softplus": lambda: s,
        "swish": lambda: s * (1 + z * (1 - s)),
    }.get(params.act, lambda: _piecewise_slope(z, params))()


def _second_derivative(z: torch.Tensor, params: Params) -> torch.Tensor:
    s = torch.sigmoid(z)
    return {
        "tanh": lambda: -2 * torch.tanh(z) * (1 - torch.tanh(z).square()),
        "sigmoid": lambda: s * (1 - s) * (1 - 2 * s),
        "elu": lambda: torch.where(z > 0, 0.0, torch.exp(z)),
        "selu": lambda: torch.where(z > 0, 0.0, SELU_SCALE * SELU_ALPHA * torch.exp(z)),
        "softplus": lambda: s * (1 - s),
        "swish": lambda: s * (1 - s) * (2 + z * (1 - 2 * s)),
    }.get(params.act, lambda: torch.zeros_like(z))()


def _clamp_mask(value: torch.Tensor, params: Params, from_y: bool = False):
    """m of the module docstring from gain * act(z), inclusive like torch.clamp's gradient; or
    from y, which is that value clamped, so only a strict test can tell a clamped one."""
    if params.clamp is None:
        return 1.0
    inside = value.abs() < params.clamp if from_y else value.abs() <= params.clamp
    return inside.to(value.dtype)


def reduce_to_bias(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.sum([i for i in range(t.dim()) if i != dim])


def _check_backward_inputs(dy, x, b, y, params: Params) -> None:
    _check_tensor("dy", dy)
    source = params.derivative_source(dy.dtype)
    for name, tensor in (("x", x), ("y", y)):
        if tensor is not None:
            _check_tensor(name, tensor, dy)
            if tensor.shape != dy.shape:
                raise ValueError(f"{_NAME}: {name} must have dy's shape {tuple(dy.shape)}, got {tuple(tensor.shape)}")
    if source is not None and {"x": x, "y": y}[source] is None:
        raise ValueError(f"{_NAME}: the backward of act={params.act!r} (clamp {params.clamp}) needs {source}, got None")


def _allocate_gradients(dy, x, b, y, act, alpha, gain, clamp, dim):
    params = parse_params(dy, b, act, alpha, gain, clamp, dim)
    _check_backward_inputs(dy, x, b, y, params)
    like = x if x is not None else y if y is not None else dy
    db = torch.empty(0 if b is None else b.shape[0], dtype=dy.dtype, device=dy.device)
    return _dense_like(like), db


def bias_act_backward_reference(dy, x, b, y, act, alpha, gain, clamp, dim):
    """dx and db from the module docstring's formulas, in eager PyTorch."""
    params = parse_params(dy, b, act, alpha, gain, clamp, dim)
    _check_backward_inputs(dy, x, b, y, params)
    compute = _compute_dtype(dy.dtype)
    source = params.derivative_source(dy.dtype)
    slope, mask = 1.0, 1.0
    if source == "y":
        y_ = y.to(compute)
        slope = _piecewise_slope(y_ * params.gain, params)
        mask = _clamp_mask(y_, params, from_y=True)
    elif source == "x":
        z = _pre_activation(x, b, params)
        slope = _first_derivative(z, params)
        mask = _clamp_mask(_activation(z, params) * params.gain, params)
    dx = dy.to(compute) * (params.gain * slope * mask)
    db = dy.new_empty(0) if b is None else reduce_to_bias(dx, params.dim).to(b.dtype)
    return dx.to(dy.dtype), db


def _check_case(label, shape, act, with_bias=True, alpha=None, gain=None, clamp=None, dim=1, layout="contiguous"):
    def make_args(device, dtype, generator):
        x = random_tensor(shape, layout, device, dtype, generator)
        b = random_tensor((shape[dim],), "contiguous", device, dtype, generator) if with_bias else None
        return (x, b, act, alpha, gain, clamp, dim)

    return CheckCase(label, make_args)


def _check_cases():
    return [
        _check_case("StyleGAN2 conv lrelu clamp channels_last", (2, 8, 5, 6), "lrelu", clamp=1.5,
                    layout="channels_last"),
        _check_case("mapping FC lrelu", (3, 16), "lrelu", alpha=0.1),
        _check_case("swish sliced", (2, 5, 3, 4), "swish", layout="sliced"),
        _check_case("tanh gain 2 clamp", (2, 3, 4, 5), "tanh", gain=2.0, clamp=1.2),
        _check_case("softplus dim=-1", (2, 3, 7), "softplus", dim=-1),
        _check_case("linear no bias", (2, 3, 4, 5), "linear", with_bias=False, gain=0.5),
    ]


BIAS_ACT = register(Op(name=_NAME, reference=bias_act_reference, allocate_output=_allocate_output,
                       check_cases=_check_cases))
# Not in OPS (`fastgen check` drives single-output ops); checked through bias_act's backward.
BIAS_ACT_BACKWARD = Op(name="bias_act_backward", called_as="bias_act's backward",
                       reference=bias_act_backward_reference,
                       allocate_output=_allocate_gradients)


BIAS_ACT.implement_at("triton", "fastgen.kernels.bias_act:bias_act_forward")
BIAS_ACT_BACKWARD.implement_at("triton", "fastgen.kernels.bias_act:bias_act_backward")


def _extension_view(t: torch.Tensor, dim: int):
    """(t as the 4-D view the CUDA extension takes, dim's position in it), or (None, position)
    when t's strides allow no such view: up to 4 axes get size-1 axes in front; more are merged
    around dim into (1, outer, C, inner)."""
    if t.dim() <= 4:
        view = t.reshape(1) if t.dim() == 0 else t
        pad = 4 - view.dim()
        return view[(None,) * pad], dim + pad
    try:
        return t.view(1, math.prod(t.shape[:dim]), t.shape[dim], math.prod(t.shape[dim + 1:])), 2
    except RuntimeError:
        return None, 2


def _cuda_views(out: torch.Tensor, dim: int, inputs: list):
    """(out's 4-D view, the contiguous stand-in to copy back into out or None, dim's position,
    the inputs' 4-D views): an input with more than 4 axes that no view can merge is copied;
    such an output is computed into a contiguous stand-in."""
    target, axis = _extension_view(out, dim)
    stand_in = None
    if target is None:
        stand_in = torch.empty(out.shape, dtype=out.dtype, device=out.device)
        target, axis = _extension_view(stand_in, dim)
    views = []
    for t in inputs:
        view = None if t is None else _extension_view(t, dim)[0]
        views.append(view if t is None or view is not None else _extension_view(t.contiguous(), dim)[0])
    return target, stand_in, axis, views


def _per_channel(t: Optional[torch.Tensor], axis: int):
    """A per-channel vector (b, db) as the 4-D view the kernels read it through: its entries
    along the extension view's channel axis; None stays None."""
    return None if t is None else t.view([t.shape[0] if k == axis else 1 for k in range(4)])


@BIAS_ACT.implement("cuda")
def _forward_cuda(x, b, act, alpha, gain, clamp, dim, *, out):
    """csrc/bias_act.cu's forward kernel."""
    p = parse_params(x, b, act, alpha, gain, clamp, dim)
    y, stand_in, axis, (x4,) = _cuda_views(out, p.dim, [x])
    _cuda.launch("bias_act_forward", x=x4, b=_per_channel(b, axis), y=y, dim=axis, act=p.act, alpha=p.alpha,
                 gain=p.gain, clamp=p.clamp)
    if stand_in is not None:
        out.copy_(stand_in)


@BIAS_ACT_BACKWARD.implement("cuda")
def _backward_cuda(dy, x, b, y, act, alpha, gain, clamp, dim, *, out):
    """csrc/bias_act.cu's backward kernel: dx, and db deterministically through per-block sums.
    It also serves the second order's gradient with respect to dy, which is this op again."""
    p = parse_params(dy, b, act, alpha, gain, clamp, dim)
    source = p.derivative_source(dy.dtype)
    dx, db = out
    refs = [x if source == "x" else None, y if source == "y" else None]
    dx4, stand_in, axis, (dy4, x4, y4) = _cuda_views(dx, p.dim, [dy] + refs)
    partial = None
    if b is not None:  # db's per-block sums, laid out as the extension decides
        splits = _cuda.query("bias_act_db_splits", dx=dx4, dim=axis)
        partial = torch.empty((1, 1, splits, b.shape[0]), dtype=torch.float32, device=dy.device)
    _cuda.launch("bias_act_backward", dy=dy4, x=x4, y=y4, b=_per_channel(b, axis), dx=dx4,
                 db=_per_channel(db if b is not None else None, axis), partial=partial, dim=axis, act=p.act,
                 alpha=p.alpha, gain=p.gain, clamp=p.clamp)
    if stand_in is not None:
        dx.copy_(stand_in)


@define_custom_op(BIAS_ACT)
def bias_act(
    x: torch.Tensor,
    b: Optional[torch.Tensor] = None,
    act: Optional[str] = "linear",
    alpha: Optional[float] = None,
    gain: Optional[float] = None,
    clamp: Optional[float] = None,
    dim: int = 1,
) -> torch.Tensor:
    """clamp(act(x + b) * gain, -clamp, clamp) with b broadcast along `dim` (module docstring)."""


@define_custom_op(BIAS_ACT_BACKWARD)
def bias_act_backward(
    dy: torch.Tensor,
    x: Optional[torch.Tensor],
    b: Optional[torch.Tensor],
    y: Optional[torch.Tensor],
    act: Optional[str],
    alpha: Optional[float],
    gain: Optional[float],
    clamp: Optional[float],
    dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, db) from the output gradient and whichever of x or y the activation needs."""


def _setup_context(ctx, inputs, output):
    x, b, act, alpha, gain, clamp, dim = inputs
    params = parse_params(x, b, act, alpha, gain, clamp, dim)
    source = params.derivative_source(x.dtype)
    ctx.args = (act, alpha, gain, clamp, dim)
    ctx.has_bias = b is not None
    # b is a parameter, alive anyway; the y-based backward reads only its length.
    ctx.save_for_backward(x if source == "x" else None, b, output if source == "y" else None)


def _backward(ctx, dy):
    x, b, y = ctx.saved_tensors
    dx, db = bias_act_backward(dy, x, b, y, *ctx.args)
    return dx, db if ctx.has_bias and ctx.needs_input_grad[1] else None, None, None, None, None, None


def _setup_backward_context(ctx, inputs, output):
    dy, x, b, y, act, alpha, gain, clamp, dim = inputs
    ctx.args = (act, alpha, gain, clamp, dim)
    ctx.save_for_backward(dy, x, b, y)


def _backward_of_backward(ctx, grad_dx, grad_db):
    """Gradients of (dx, db) with respect to dy, x and b (module docstring, second order)."""
    dy, x, b, y = ctx.saved_tensors
    params = parse_params(dy, b, *ctx.args)
    grad = grad_dx
    if b is not None and grad_db is not None and grad_db.numel():
        grad = grad + broadcast_bias(grad_db, dy.dim(), params.dim)
    grad_dy = grad_x = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_dy, _ = bias_act_backward(grad.to(dy.dtype), x, b, y, *ctx.args)
    smooth = not ACTIVATIONS[params.act].piecewise_linear
    if smooth and x is not None and (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
        z = _pre_activation(x, b, params)
        curvature = _second_derivative(z, params) * _clamp_mask(_activation(z, params) * params.gain, params)
        second = grad * dy * (params.gain * curvature)
        grad_x = second.to(x.dtype) if ctx.needs_input_grad[1] else None
        if b is not None and ctx.needs_input_grad[2]:
            grad_b = reduce_to_bias(second, params.dim).to(b.dtype)
    return grad_dy, grad_x, grad_b, None, None, None, None, None, None


register_autograd(bias_act, _backward, _setup_context)
register_autograd(bias_act_backward, _backward_of_backward, _setup_backward_context)
