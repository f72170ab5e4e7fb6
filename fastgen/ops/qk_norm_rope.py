"""Query/key RMSNorm and rotary position embedding in one pass, as the attention blocks of
FLUX.1, SD3/SD3.5 and Lumina prepare q and k (`qk_norm_rope`).

`qk_norm_rope(q, k, weight_q=None, weight_k=None, cos=None, sin=None, eps=1e-6,
rope_layout="interleaved")`, q and k of shape (B, L, H, D) with any strides (views of a fused
QKV projection, `qkv.view(B, L, 3, H, D)[:, :, 0]`, are read in place); weight_q and weight_k
(D,) or None; cos and sin (L, D/2) float32 (float64 for the float64 reference) or both None.
For each token l and head h of q (and, with weight_k, of k), over the D features:

    r       = 1 / sqrt(mean_d x[d]^2 + eps)                      (eps inside the square root)
    x'[d]   = x[d] * r * weight[d]

A None weight switches the norm off for that tensor (x' = x): the norm of q and of k are
independent. Then, with cos and sin given, each pair (d1, d2) of features rotates by the angle
of its token l and pair index i:

    y[d1] = x'[d1] * cos[l, i] - x'[d2] * sin[l, i]
    y[d2] = x'[d1] * sin[l, i] + x'[d2] * cos[l, i]

where rope_layout "interleaved" pairs d1 = 2i with d2 = 2i + 1 (FLUX.1, HunyuanDiT: diffusers'
`apply_rotary_emb(..., use_real_unbind_dim=-1)`) and "rotate_half" pairs d1 = i with
d2 = i + D/2 (diffusers' `use_real_unbind_dim=-2`, the GPT-NeoX / Lumina convention). Without
cos and sin y = x'. RoPE needs an even D; the norm alone takes any D >= 1. Norm only (SD3.5's
qk norm) and RoPE only are the same op with the other part None.

The tables hold each pair's angle once, (L, D/2), where diffusers' `get_1d_rotary_pos_embed(...,
use_real=True)` repeats every angle to (L, D): `rope_tables_from_diffusers` takes such a pair
of full tables and returns the op's. They stay float32 whatever q's dtype: a bfloat16 angle
table would misplace tokens far along the sequence.

Statistics and the rotation are float32 (float64 for float64 inputs) whatever the input dtype,
with the weights (any float dtype: a float32 weight under bfloat16 activations is read as is)
converted to it; y is rounded to q's dtype once, at the end (diffusers rounds the normalized x
to the weight's dtype before the rotation). The outputs (q_out, k_out) are new contiguous
tensors of q's shape and dtype. NaN and infinities propagate through these formulas as through
the eager reference, which evaluates them in the order written.

Writing into a joint sequence. Joint attention (FLUX.1's double-stream blocks, SD3's MMDiT)
concatenates the text and image tokens of q and k along L after normalizing each stream with
its own weights. `qk_norm_rope(..., out_q=joint_q[:, text_len:], out_k=joint_k[:, text_len:])`
writes the results straight into those slices of preallocated buffers (views of any strides)
and returns them, so the concatenation costs no pass of its own. Without autograd this is the
op `qk_norm_rope_out`, which mutates only out_q and out_k; when a gradient is needed the
functional op runs and its results are copied into the slices, so autograd tracks the write.
out_q and out_k must not overlap q or k.

Backward, per row with g = dy rotated back (the transpose of the rotation: sin negated):

    dx         = r * (g * weight - xhat * mean_d(g * weight * xhat)),   xhat = x * r
    dweight[d] = sum over (b, l, h) of g[d] * xhat[d]

and dx = g for a tensor without norm. cos and sin are position constants: they receive no
gradient.

Precision of dx and dweight. dx subtracts xhat * mean_d(g * weight * xhat) from g * weight,
and the two nearly cancel where one feature holds most of the row's norm (at D = 1 they
differ by the factor eps / (x^2 + eps)). So dx is within the dtype's tolerance of its terms'
sizes, r * (|g * weight| + |xhat| * mean_d |g * weight * xhat|), with |g| the rotated-back
sizes |dy_1| |cos| + |dy_2| |sin|, and dweight within it of sum |g * xhat|, not of their
values (measured in float32: at D = 1 with x 0.018, dx -0.463666 where float64 gives
-0.463696, the terms 665 times the value; at D = 2, -1.09742 for -1.09739). The eager
formulas in float32 round the same way. The backward is an op of its own (`qk_norm_rope_backward`) so the fast backward is
one graph node under torch.compile; r is recomputed there from x. Its dweight of a tensor
without norm is empty (0,). The backward op has no autograd formula itself: first-order
gradients only.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from fastgen import _cuda
from fastgen.ops.registry import (CheckCase, Op, check_float_tensor, check_number, check_same_dtype_and_device,
                                  define_custom_op, random_tensor, register, register_autograd)

ROPE_LAYOUTS = ("interleaved", "rotate_half")
# One row's D features live in registers in the kernels.
MAX_HEAD_DIM = 2048
TABLE_DTYPES = (torch.float32, torch.float64)


def _check_heads(op_name: str, name: str, tensor, q: torch.Tensor) -> None:
    check_float_tensor(op_name, name, tensor)
    if tuple(tensor.shape) != tuple(q.shape):
        raise ValueError(f"{op_name}: {name} must have q's shape (B, L, H, D) = {tuple(q.shape)}, "
                         f"got {tuple(tensor.shape)}")
    check_same_dtype_and_device(op_name, name, tensor, q, "q")


def _check_inputs(op_name: str, q, k, weight_q, weight_k, cos, sin, eps, rope_layout) -> None:
    check_float_tensor(op_name, "q", q)
    if q.dim() != 4:
        raise ValueError(f"{op_name}: q must be 4-D (B, L, H, D), got shape {tuple(q.shape)}")
    head_dim = q.shape[3]
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"{op_name}: head dim D must be between 1 and {MAX_HEAD_DIM}, got {head_dim}")
    _check_heads(op_name, "k", k, q)
    for name, weight in (("weight_q", weight_q), ("weight_k", weight_k)):
        if weight is None:
            continue
        check_float_tensor(op_name, name, weight)
        if tuple(weight.shape) != (head_dim,):
            raise ValueError(f"{op_name}: {name} must have shape (D,) = {(head_dim,)}, got {tuple(weight.shape)}")
        if weight.device != q.device:
            raise ValueError(f"{op_name}: {name} is on {weight.device} but q is on {q.device}")
    if (cos is None) != (sin is None):
        raise ValueError(f"{op_name}: cos and sin must be given together, got "
                         f"{'cos' if sin is None else 'sin'} alone")
    if cos is not None:
        if head_dim % 2:
            raise ValueError(f"{op_name}: RoPE pairs the features, so head dim D must be even, got {head_dim}")
        table_shape = (q.shape[1], head_dim // 2)
        for name, table in (("cos", cos), ("sin", sin)):
            if not isinstance(table, torch.Tensor):
                raise TypeError(f"{op_name}: {name} must be a torch.Tensor or None, got {type(table).__name__}")
            if table.dtype not in TABLE_DTYPES:
                raise TypeError(f"{op_name}: {name} must be float32 (or float64), got {table.dtype}")
            if tuple(table.shape) != table_shape:
                raise ValueError(f"{op_name}: {name} must have shape (L, D/2) = {table_shape}, "
                                 f"got {tuple(table.shape)}")
            if table.device != q.device:
                raise ValueError(f"{op_name}: {name} is on {table.device} but q is on {q.device}")
    check_number(op_name, "eps", eps, positive=True)
    if rope_layout not in ROPE_LAYOUTS:
        raise ValueError(f"{op_name}: rope_layout must be one of {', '.join(ROPE_LAYOUTS)}, got {rope_layout!r}")


def _check_out(op_name: str, out_q, out_k, q: torch.Tensor) -> None:
    for name, out in (("out_q", out_q), ("out_k", out_k)):
        _check_heads(op_name, name, out, q)


def _fresh_like(q: torch.Tensor) -> torch.Tensor:
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def _allocate_output(q, k, weight_q=None, weight_k=None, cos=None, sin=None, eps=1e-6, rope_layout="interleaved"):
    _check_inputs("qk_norm_rope", q, k, weight_q, weight_k, cos, sin, eps, rope_layout)
    return _fresh_like(q), _fresh_like(q)


def _weight_gradient(weight: Optional[torch.Tensor], q: torch.Tensor) -> torch.Tensor:
    """(D,) in the weight's dtype, or (0,) for a tensor without norm."""
    if weight is None:
        return torch.empty(0, dtype=q.dtype, device=q.device)
    return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)


def _allocate_gradients(grad_q, grad_k, q, k, weight_q=None, weight_k=None, cos=None, sin=None, eps=1e-6,
                        rope_layout="interleaved"):
    op_name = "qk_norm_rope_backward"
    _check_inputs(op_name, q, k, weight_q, weight_k, cos, sin, eps, rope_layout)
    _check_heads(op_name, "grad_q", grad_q, q)
    _check_heads(op_name, "grad_k", grad_k, q)
    return _fresh_like(q), _fresh_like(q), _weight_gradient(weight_q, q), _weight_gradient(weight_k, q)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """x' of the module docstring in the compute dtype."""
    x = x.to(_compute_dtype(x.dtype))
    if weight is None:
        return x
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight.to(x.dtype)


def _rotate(x: torch.Tensor, cos, sin, rope_layout: str) -> torch.Tensor:
    """The pair rotation of the module docstring on x (B, L, H, D) in its dtype; the tables
    are constants (detached: no gradient)."""
    if cos is None:
        return x
    cos, sin = (table.detach().to(x.dtype)[None, :, None, :] for table in (cos, sin))
    if rope_layout == "interleaved":
        first, second = x.unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack((first * cos - second * sin, first * sin + second * cos), dim=-1).flatten(-2)
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)


def qk_norm_rope_reference(q, k, weight_q=None, weight_k=None, cos=None, sin=None, eps=1e-6,
                           rope_layout="interleaved"):
    """The norm, then the rotation, as separate eager ops in float32 (float64 for float64 q)."""
    _check_inputs("qk_norm_rope", q, k, weight_q, weight_k, cos, sin, eps, rope_layout)
    return tuple(_rotate(_rms_norm(x, weight, eps), cos, sin, rope_layout).to(q.dtype)
                 for x, weight in ((q, weight_q), (k, weight_k)))


def _backward_one(grad, x, weight, cos, sin, eps, rope_layout) -> tuple:
    dtype, compute = x.dtype, _compute_dtype(x.dtype)
    # The transpose of a rotation is the rotation by the opposite angle.
    g = _rotate(grad.to(compute), cos, None if sin is None else -sin, rope_layout)
    if weight is None:
        return g.to(dtype), _weight_gradient(None, x)
    x = x.to(compute)
    rstd = torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    xhat = x * rstd
    scaled = g * weight.to(compute)
    dx = rstd * (scaled - xhat * (scaled * xhat).mean(-1, keepdim=True))
    return dx.to(dtype), (g * xhat).sum((0, 1, 2)).to(weight.dtype)


def qk_norm_rope_backward_reference(grad_q, grad_k, q, k, weight_q=None, weight_k=None, cos=None, sin=None,
                                    eps=1e-6, rope_layout="interleaved"):
    """(dq, dk, dweight_q, dweight_k): the backward formulas of the module docstring in eager
    PyTorch."""
    _allocate_gradients(grad_q, grad_k, q, k, weight_q, weight_k, cos, sin, eps, rope_layout)
    dq, dweight_q = _backward_one(grad_q, q, weight_q, cos, sin, eps, rope_layout)
    dk, dweight_k = _backward_one(grad_k, k, weight_k, cos, sin, eps, rope_layout)
    return dq, dk, dweight_q, dweight_k


def rope_tables_from_diffusers(freqs_cos: torch.Tensor, freqs_sin: torch.Tensor,
                               rope_layout: str = "interleaved") -> tuple:
    """The op's (L, D/2) float32 cos and sin from diffusers' full (L, D) tables, which repeat
    each pair's value at both of its features: `get_1d_rotary_pos_embed(..., use_real=True)`
    with repeat_interleave_real=True for "interleaved" (FLUX.1's FluxPosEmbed concatenates
    such tables along D) or False for "rotate_half"."""
    if rope_layout not in ROPE_LAYOUTS:
        raise ValueError(f"rope_tables_from_diffusers: rope_layout must be one of {', '.join(ROPE_LAYOUTS)}, "
                         f"got {rope_layout!r}")
    tables = []
    for name, full in (("freqs_cos", freqs_cos), ("freqs_sin", freqs_sin)):
        if full.dim() != 2 or full.shape[1] % 2:
            raise ValueError(f"rope_tables_from_diffusers: {name} must be (L, D) with D even, got {tuple(full.shape)}")
        half = full[:, ::2] if rope_layout == "interleaved" else full[:, :full.shape[1] // 2]
        tables.append(half.float().contiguous())
    return tuple(tables)


def random_rope_tables(length: int, head_dim: int, device, generator: torch.Generator) -> tuple:
    """(cos, sin) float32 (length, head_dim / 2) of angles drawn uniformly in [0, 2 pi)."""
    angles = torch.rand(length, head_dim // 2, generator=generator, dtype=torch.float64) * (2 * math.pi)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def _check_case(label, batch, length, heads, head_dim, norms=(True, True), rope_layout: Optional[str] = "interleaved",
                layout="contiguous"):
    def make_args(device, dtype, generator):
        shape = (batch, length, heads, head_dim)
        if layout == "fused qkv":
            qkv = random_tensor((batch, length, 3, heads, head_dim), "contiguous", device, dtype, generator)
            q, k = qkv[:, :, 0], qkv[:, :, 1]
        else:
            q, k = (random_tensor(shape, layout, device, dtype, generator) for _ in "qk")
        # RMSNorm weights sit near 1 in trained models; 1 + noise keeps every feature in play.
        weight_q, weight_k = (1 + 0.5 * random_tensor((head_dim,), "contiguous", device, dtype, generator)
                              if present else None for present in norms)
        cos, sin = (None, None) if rope_layout is None else random_rope_tables(length, head_dim, device, generator)
        return (q, k, weight_q, weight_k, cos, sin, 1e-6, rope_layout or "interleaved")

    return CheckCase(label, make_args)


def _check_cases():
    return [
        _check_case("FLUX-like D128 interleaved, both norms", 2, 5, 3, 128),
        _check_case("SD3.5-like D64 norm only", 2, 7, 3, 64, rope_layout=None),
        _check_case("fused qkv view D32 interleaved", 2, 6, 2, 32, layout="fused qkv"),
        _check_case("Lumina-like D48 rotate_half", 1, 6, 2, 48, rope_layout="rotate_half"),
        _check_case("RoPE only D16 sliced", 2, 5, 2, 16, norms=(False, False), layout="sliced"),
        _check_case("odd D33 q norm only", 1, 4, 3, 33, norms=(True, False), rope_layout=None),
    ]


QK_NORM_ROPE = register(Op(name="qk_norm_rope", reference=qk_norm_rope_reference,
                           allocate_output=_allocate_output, check_cases=_check_cases))
# Not in OPS, like the other backward ops: checked through qk_norm_rope's fwd+bwd runs and by
# tests/test_qk_norm_rope.py, which drives its Triton and CUDA implementations directly.
QK_NORM_ROPE_BACKWARD = Op(name="qk_norm_rope_backward", called_as="qk_norm_rope's backward",
                           reference=qk_norm_rope_backward_reference,
                           allocate_output=_allocate_gradients)

QK_NORM_ROPE.implement_at("triton", "fastgen.kernels.qk_norm_rope:qk_norm_rope_forward")
QK_NORM_ROPE_BACKWARD.implement_at("triton", "fastgen.kernels.qk_norm_rope:qk_norm_rope_backward")


# The CUDA kernels (csrc/qk_norm_rope.cu) run one tensor per launch and read the weight and the
# tables as float32: converted here, once per call (D and L x D/2 values).
def _float32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.float()


@QK_NORM_ROPE.implement("cuda")
def _forward_cuda(q, k, weight_q, weight_k, cos, sin, eps, rope_layout, *, out):
    tables = dict(cos=_float32(cos), sin=_float32(sin), interleaved=rope_layout == "interleaved", eps=eps)
    for x, weight, y in ((q, weight_q, out[0]), (k, weight_k, out[1])):
        _cuda.launch("qk_norm_rope_forward", x=x, weight=_float32(weight), y=y, **tables)


@QK_NORM_ROPE_BACKWARD.implement("cuda")
def _backward_cuda(grad_q, grad_k, q, k, weight_q, weight_k, cos, sin, eps, rope_layout, *, out):
    tables = dict(cos=_float32(cos), sin=_float32(sin), interleaved=rope_layout == "interleaved", eps=eps)
    dq, dk, dweight_q, dweight_k = out
    for grad, x, weight, dx, dweight in ((grad_q, q, weight_q, dq, dweight_q), (grad_k, k, weight_k, dk, dweight_k)):
        partial = None
        if weight is not None:
            rows = _cuda.query("qk_norm_rope_backward_rows", x=x)
            partial = torch.empty(rows, x.shape[-1], dtype=torch.float32, device=x.device)
        _cuda.launch("qk_norm_rope_backward", dy=grad, x=x, weight=_float32(weight), dx=dx, partial=partial, **tables)
        if weight is not None:
            dweight.copy_(partial.sum(0))


@define_custom_op(QK_NORM_ROPE)
def _qk_norm_rope(
    q: torch.Tensor, k: torch.Tensor,
    weight_q: Optional[torch.Tensor] = None, weight_k: Optional[torch.Tensor] = None,
    cos: Optional[torch.Tensor] = None, sin: Optional[torch.Tensor] = None,
    eps: float = 1e-6, rope_layout: str = "interleaved",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_out, k_out): RMSNorm then RoPE of q and k (see the module docstring)."""


@define_custom_op(QK_NORM_ROPE_BACKWARD)
def qk_norm_rope_backward(
    grad_q: torch.Tensor, grad_k: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
    weight_q: Optional[torch.Tensor] = None, weight_k: Optional[torch.Tensor] = None,
    cos: Optional[torch.Tensor] = None, sin: Optional[torch.Tensor] = None,
    eps: float = 1e-6, rope_layout: str = "interleaved",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dweight_q, dweight_k) of qk_norm_rope for the output gradients."""


def _setup_context(ctx, inputs, output):
    q, k, weight_q, weight_k, cos, sin, ctx.eps, ctx.rope_layout = inputs
    ctx.save_for_backward(q, k, weight_q, weight_k, cos, sin)


def _backward(ctx, grad_q, grad_k):
    q, k, weight_q, weight_k, cos, sin = ctx.saved_tensors
    dq, dk, dweight_q, dweight_k = qk_norm_rope_backward(grad_q, grad_k, q, k, weight_q, weight_k, cos, sin,
                                                         ctx.eps, ctx.rope_layout)
    return (dq, dk, dweight_q if weight_q is not None else None, dweight_k if weight_k is not None else None,
            None, None, None, None)


register_autograd(_qk_norm_rope, _backward, _setup_context)


def _fake_out(q, k, weight_q, weight_k, cos, sin, eps, rope_layout, out_q, out_k) -> None:
    _check_inputs("qk_norm_rope", q, k, weight_q, weight_k, cos, sin, eps, rope_layout)
    _check_out("qk_norm_rope", out_q, out_k, q)


@torch.library.custom_op("fastgen::qk_norm_rope_out", mutates_args=("out_q", "out_k"))
def qk_norm_rope_out(
    q: torch.Tensor, k: torch.Tensor,
    weight_q: Optional[torch.Tensor], weight_k: Optional[torch.Tensor],
    cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
    eps: float, rope_layout: str, out_q: torch.Tensor, out_k: torch.Tensor,
) -> None:
    """qk_norm_rope written into out_q and out_k (views of any strides), under the backend
    qk_norm_rope would run; no autograd (see the module docstring)."""
    _fake_out(q, k, weight_q, weight_k, cos, sin, eps, rope_layout, out_q, out_k)
    args = (q, k, weight_q, weight_k, cos, sin, eps, rope_layout)
    implementation = QK_NORM_ROPE.select(q)
    if implementation is not None:
        implementation.run(*args, out=(out_q, out_k))
        return
    for out, result in zip((out_q, out_k), qk_norm_rope_reference(*args)):
        out.copy_(result)


qk_norm_rope_out.register_fake(_fake_out)


def _needs_gradient(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, weight_q: Optional[torch.Tensor] = None,
                 weight_k: Optional[torch.Tensor] = None, cos: Optional[torch.Tensor] = None,
                 sin: Optional[torch.Tensor] = None, eps: float = 1e-6, rope_layout: str = "interleaved", *,
                 out_q: Optional[torch.Tensor] = None, out_k: Optional[torch.Tensor] = None) -> tuple:
    """(q_out, k_out): RMSNorm then RoPE of q and k (see the module docstring); with out_q and
    out_k, written into them and returned. `torch.ops.fastgen.qk_norm_rope` and
    `torch.ops.fastgen.qk_norm_rope_out`."""
    args = (q, k, weight_q, weight_k, cos, sin, eps, rope_layout)
    if out_q is None and out_k is None:
        return _qk_norm_rope(*args)
    if out_q is None or out_k is None:
        raise ValueError(f"qk_norm_rope: out_q and out_k must be given together, got "
                         f"{'out_q' if out_k is None else 'out_k'} alone")
    if _needs_gradient(q, k, weight_q, weight_k):
        results = _qk_norm_rope(*args)
        _check_out("qk_norm_rope", out_q, out_k, q)
        for out, result in zip((out_q, out_k), results):
            # out_k, a view of the joint buffer taken before out_q's write made that buffer
            # require grad, reads as a leaf that requires grad (and copy_ refuses it) until its
            # grad_fn is rebuilt from the buffer's, which reading grad_fn does.
            _ = out.grad_fn
            out.copy_(result)
    else:
        qk_norm_rope_out(*args, out_q, out_k)
    return out_q, out_k
