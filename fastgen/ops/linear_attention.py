"""ReLU linear attention, as in SANA's Linear DiT, EfficientViT's LiteMLA and DC-AE.

`linear_attention(q, k, v, eps=1e-15)`: q of shape (B, Nq, H, D), k and v of shape
(B, Nkv, H, D) (Nq = Nkv for self-attention), D <= 128, any strides. With phi = ReLU and, for
each batch b and head h,

    S  = sum_n phi(k_n)^T v_n            a D x D matrix (k_n, v_n: row n of head (b, h))
    z  = sum_n phi(k_n)                  a D-vector
    out_n = phi(q_n) S / (phi(q_n) . z + eps)

Instead of normalising an Nq x Nkv score matrix, every query reads the same small state
(S, z), so the cost is O(N D^2). A query row whose phi(q_n) is all zero (every entry <= 0)
gets 0 / eps = 0, as in the SANA formulation. S, z and all arithmetic are float32 (float64
for float64 inputs); out has q's dtype and shape, contiguous.

NaN and Inf propagate as in the eager reference: phi keeps a NaN, as F.relu does, so a NaN in
q_n makes out_n NaN, one in k every output of its head (through z), one in v the column of out
it feeds. An infinity meets the zero features of phi as in the reference's matmuls, where
0 * inf is NaN: an inf in v_nj makes S_ij NaN where k_ni <= 0 (+-inf where k_ni > 0), and an
infinite S_ij makes out_nj NaN where q_ni <= 0, so dden_n, dz and every dk of the head at
k > 0 NaN too. The backward zeroes the gradient of phi only where its input is <= 0 and
passes it at a NaN, as F.relu's backward does: a NaN in q_n makes dq_n NaN wherever q_n is
not <= 0.

Backward, for an output gradient g, with den_n = phi(q_n) . z + eps:

    dnum_n = g_n / den_n                 dden_n = -(g_n . out_n) / den_n
    dS = sum_n phi(q_n)^T dnum_n         dz = sum_n dden_n phi(q_n)
    dq_n = dnum_n S^T + dden_n z         then 0 where q_n <= 0
    dk_n = v_n dS^T + dz                 then 0 where k_n <= 0
    dv_n = phi(k_n) dS

Precision of dq and dk. dq_n = (sum_j g_nj S_ij - z_i (g_n . out_n)) / den_n and dk_n = sum_m
phi(q_m) ((g_m . v_n) - (g_m . out_m)) / den_m subtract two sums that cancel where a head's
keys are few (with one key out_n = v and both are 0 up to eps). So dq and dk are within the
dtype's tolerance of their terms' sizes, (sum_j |g_nj| Sabs_ij + z_i (|g_n| . outabs_n)) /
den_n and sum_m phi(q_m) (|g_m| . |v_n| + |g_m| . outabs_m) / den_m with Sabs = sum_n
phi(k_n)^T |v_n| and outabs_n = phi(q_n) Sabs / den_n, not of their values (measured: 2 keys in
float32, dq 1.5e-5 where float64 gives 4e-11; 1 key and a v element of 2.5e9 in bfloat16, dk
1536 where float64 gives -5e-6). dv has no such subtraction.

The backward is an op of its own, `linear_attention_backward(grad, q, k, v, eps) -> (dq, dk,
dv)`, so that the fast backward is one graph node under torch.compile. It has no autograd
formula itself: linear_attention supports first-order gradients only (SANA trains without
gradients of gradients).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastgen import _cuda
from fastgen.ops.registry import (CheckCase, Op, check_attention_inputs, check_companion, check_number, define_custom_op,
                                  random_tensor, register, register_autograd)

MAX_HEAD_DIM = 128


def _check_inputs(op_name: str, q, k, v, eps) -> None:
    check_attention_inputs(op_name, q, k, v, MAX_HEAD_DIM, "(B, N, H, D)")
    check_number(op_name, "eps", eps, positive=True)


def _allocate_output(q, k, v, eps=1e-15):
    _check_inputs("linear_attention", q, k, v, eps)
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def _check_backward_inputs(grad, q, k, v, eps) -> None:
    _check_inputs("linear_attention_backward", q, k, v, eps)
    check_companion("linear_attention_backward", "grad", grad, q, tuple(q.shape), "of q", "q")


def _allocate_gradients(grad, q, k, v, eps=1e-15):
    _check_backward_inputs(grad, q, k, v, eps)
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def linear_attention_reference(q, k, v, eps=1e-15):
    """SANA's eager formulation (diffusers' SanaLinearAttnProcessor2_0): ReLU on q and k, V
    padded with a row of ones so that one matmul gives S and z together, a second matmul with
    phi(q), then division by the last row (the denominator)."""
    _check_inputs("linear_attention", q, k, v, eps)
    compute = _compute_dtype(q.dtype)
    phi_q = F.relu(q).to(compute).permute(0, 2, 3, 1)  # (B, H, D, Nq)
    phi_k = F.relu(k).to(compute).transpose(1, 2)  # (B, H, Nkv, D)
    v_with_ones = F.pad(v.to(compute).permute(0, 2, 3, 1), (0, 0, 0, 1), value=1.0)  # (B, H, D+1, Nkv)
    state = v_with_ones @ phi_k  # (B, H, D+1, D): S^T on top, z as the last row
    projected = state @ phi_q  # (B, H, D+1, Nq)
    out = projected[:, :, :-1] / (projected[:, :, -1:] + eps)
    return out.permute(0, 3, 1, 2).to(q.dtype)


def linear_attention_backward_reference(grad, q, k, v, eps=1e-15):
    """The backward formulas of the module docstring in eager PyTorch, (B, H, N, D) layout."""
    _check_backward_inputs(grad, q, k, v, eps)
    compute = _compute_dtype(q.dtype)
    q_, k_, v_, grad_ = (t.to(compute).transpose(1, 2) for t in (q, k, v, grad))
    phi_q, phi_k = F.relu(q_), F.relu(k_)
    state = phi_k.mT @ v_
    normalizer = phi_k.sum(-2, keepdim=True)  # (B, H, 1, D)
    denominator = (phi_q * normalizer).sum(-1, keepdim=True) + eps
    out = (phi_q @ state) / denominator
    dnumerator = grad_ / denominator
    ddenominator = -(grad_ * out).sum(-1, keepdim=True) / denominator
    dq = torch.where(q_ <= 0, 0.0, dnumerator @ state.mT + ddenominator * normalizer)
    dstate = phi_q.mT @ dnumerator
    dnormalizer = (ddenominator * phi_q).sum(-2, keepdim=True)
    dk = torch.where(k_ <= 0, 0.0, v_ @ dstate.mT + dnormalizer)
    dv = phi_k @ dstate
    return tuple(t.transpose(1, 2).to(q.dtype) for t in (dq, dk, dv))


def fused_qkv(batch: int, tokens: int, heads: int, head_dim: int, device, dtype, generator) -> tuple:
    """q, k, v as the models pass them: views into one (B, N, 3, H, D) projection output."""
    qkv = random_tensor((batch, tokens, 3, heads, head_dim), "contiguous", device, dtype, generator)
    return qkv.unbind(2)


def _self_attention_case(label, batch, tokens, heads, head_dim):
    def make_args(device, dtype, generator):
        return (*fused_qkv(batch, tokens, heads, head_dim, device, dtype, generator), 1e-15)

    return CheckCase(label, make_args)


def _cross_case(label, batch, q_tokens, kv_tokens, heads, head_dim, layout):
    def make_args(device, dtype, generator):
        q = random_tensor((batch, q_tokens, heads, head_dim), layout, device, dtype, generator)
        k, v = (random_tensor((batch, kv_tokens, heads, head_dim), layout, device, dtype, generator) for _ in "kv")
        return (q, k, v, 1e-6)

    return CheckCase(label, make_args)


def _check_cases():
    return [
        _self_attention_case("SANA-like fused qkv D32 N37", 2, 37, 3, 32),
        _self_attention_case("fused qkv D16 N70", 1, 70, 2, 16),
        # D = 8 would test the padding too, but its gradients are too ill-conditioned for the
        # float32 tolerance that `fastgen check` applies (the unit tests cover D = 8).
        _cross_case("D12 sliced Nq9 Nkv48", 2, 9, 48, 2, 12, "sliced"),
        _cross_case("D72 Nq11 Nkv24", 1, 11, 24, 2, 72, "contiguous"),
        _self_attention_case("fused qkv D128 N19", 1, 19, 1, 128),
    ]


LINEAR_ATTENTION = register(Op(name="linear_attention", reference=linear_attention_reference,
                               allocate_output=_allocate_output, check_cases=_check_cases))
# Not in OPS: `fastgen check` and the contract tests drive ops with one output. The backward is
# checked through linear_attention's "bwd" direction, which runs it with the backend forced.
LINEAR_ATTENTION_BACKWARD = Op(name="linear_attention_backward", called_as="linear_attention's backward",
                               reference=linear_attention_backward_reference,
                               allocate_output=_allocate_gradients)


LINEAR_ATTENTION.implement_at("triton", "fastgen.kernels.linear_attention:linear_attention_forward")
LINEAR_ATTENTION_BACKWARD.implement_at("triton", "fastgen.kernels.linear_attention:linear_attention_backward")


@LINEAR_ATTENTION.implement("cuda")
def _forward_cuda(q, k, v, eps, *, out):
    head_dim = k.shape[-1]
    slots = _cuda.query("linear_attention_partials", k=k)
    partials = torch.empty(1, 1, slots, head_dim * head_dim + head_dim, dtype=torch.float32, device=q.device)
    _cuda.launch("linear_attention_forward", q=q, k=k, v=v, out=out, partials=partials, eps=eps)


@define_custom_op(LINEAR_ATTENTION)
def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-15) -> torch.Tensor:
    """out = relu(q) S / (relu(q) . z + eps) with S, z summed over relu(k), v (module docstring)."""


@define_custom_op(LINEAR_ATTENTION_BACKWARD)
def linear_attention_backward(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-15
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of linear_attention for the output gradient `grad`."""


def _setup_context(ctx, inputs, output):
    q, k, v, eps = inputs
    ctx.save_for_backward(q, k, v)
    ctx.eps = eps


def _backward(ctx, grad):
    q, k, v = ctx.saved_tensors
    dq, dk, dv = linear_attention_backward(grad, q, k, v, ctx.eps)
    return dq, dk, dv, None


register_autograd(linear_attention, _backward, _setup_context)
