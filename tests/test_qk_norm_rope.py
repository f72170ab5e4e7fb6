"""qk_norm_rope: the Triton and CUDA kernels (the CUDA ones under the emulation) against the float64 reference (values and gradients), the
reference against its own backward formulas and against diffusers, the out= variant, non-finite
values and argument errors."""
import math
from unittest import mock

import pytest
import torch

import fastgen
from fastgen import check
from fastgen.ops.qk_norm_rope import (
    QK_NORM_ROPE,
    QK_NORM_ROPE_BACKWARD,
    qk_norm_rope,
    qk_norm_rope_backward_reference,
    qk_norm_rope_reference,
    random_rope_tables,
    rope_tables_from_diffusers,
)
from fastgen.ops.registry import random_tensor, use_backend
from conftest import fake_tensor_arg
from test_fuzz import check_at_stated_precision, non_finite_aware_mismatch

# The fast backends on CPU tensors: Triton under the interpreter, CUDA under the emulation.
BACKENDS = [pytest.param("triton", id="triton"),
            pytest.param("cuda", id="cuda-emulated", marks=pytest.mark.cuda_emulation)]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU = torch.device("cpu")
# (weight_q given, weight_k given, rope_layout or None for no RoPE)
VARIANTS = {
    "both norms, interleaved": (True, True, "interleaved"),
    "both norms, rotate_half": (True, True, "rotate_half"),
    "norm only": (True, True, None),
    "rope only, interleaved": (False, False, "interleaved"),
    "k norm only, rotate_half": (False, True, "rotate_half"),
}


def _heads(shape, view, dtype, generator):
    """q and k of shape (B, L, H, D) laid out as `view`."""
    batch, length, heads, head_dim = shape
    if view == "fused qkv":  # qkv.view(B, L, 3, H, D)[:, :, i]
        qkv = random_tensor((batch, length, 3, heads, head_dim), "contiguous", CPU, dtype, generator)
        return qkv[:, :, 0], qkv[:, :, 1]
    if view == "heads first":  # (B, H, L, D) storage seen as (B, L, H, D)
        return tuple(random_tensor((batch, heads, length, head_dim), "contiguous", CPU, dtype, generator)
                     .transpose(1, 2) for _ in "qk")
    return tuple(random_tensor(shape, view, CPU, dtype, generator) for _ in "qk")


def _args(shape, variant, dtype, generator, view="contiguous", eps=1e-6):
    norm_q, norm_k, rope_layout = VARIANTS[variant]
    q, k = _heads(shape, view, dtype, generator)
    weights = [1 + 0.5 * random_tensor(shape[3:], "contiguous", CPU, dtype, generator) if present else None
               for present in (norm_q, norm_k)]
    cos, sin = (None, None) if rope_layout is None else random_rope_tables(shape[1], shape[3], CPU, generator)
    return (q, k, *weights, cos, sin, eps, rope_layout or "interleaved")


def _check(backend, dtype, direction, args, generator):
    """The backend against the float64 reference, dx and dweight within the dtype's tolerance of
    their terms' sizes (the op's "Precision of dx and dweight": at D = 1 float32's dx is off by
    3e-5 of its value where the terms are hundreds of times the value)."""
    seed = int(torch.randint(2**62, (), generator=generator))
    return check_at_stated_precision(QK_NORM_ROPE, backend, dtype, direction, args, seed)


def _upcast(args):
    return tuple(a.detach().double() if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("view", ["contiguous", "fused qkv", "heads first", "sliced"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_the_float64_reference_forward_and_backward(backend, view, variant, dtype, generator):
    args = _args((2, 7, 3, 32), variant, dtype, generator, view)
    for direction in ("fwd", "bwd"):
        error, detail = _check(backend, dtype, direction, args, generator)
        assert not detail, detail


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [128, 80, 64, 33, 2, 1])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_at_head_dims_and_across_many_row_blocks(backend, head_dim, dtype, generator):
    """Enough rows (2 x 37 x 5) for several row blocks per backward program (Triton) and several
    rows per warp (CUDA), so the weight gradients sum partial rows; D 80 pads its 40 pairs to
    64, D 33 and 1 (norm only) leave the second half one feature short."""
    variant = "both norms, interleaved" if head_dim % 2 == 0 else "norm only"
    args = _args((2, 37, 5, head_dim), variant, dtype, generator)
    for direction in ("fwd", "bwd"):
        error, detail = _check(backend, dtype, direction, args, generator)
        assert not detail, detail


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_op_matches_the_backward_formulas(backend, generator):
    args = _args((2, 37, 5, 64), "both norms, rotate_half", torch.float32, generator)
    grads = tuple(torch.randn(args[0].shape, generator=generator) for _ in "qk")
    out = QK_NORM_ROPE_BACKWARD.allocate_output(*grads, *args)
    for tensor in out:
        tensor.fill_(float("nan"))
    QK_NORM_ROPE_BACKWARD.implementations[backend].run(*grads, *args, out=out)
    expected = qk_norm_rope_backward_reference(*_upcast(grads), *_upcast(args))
    same_dtype = qk_norm_rope_backward_reference(*grads, *args)
    for actual, wanted, reference in zip(out, expected, same_dtype):
        assert not check.mismatch(actual, wanted, reference)[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_gradients_are_deterministic(backend, generator):
    args = _args((2, 37, 5, 128), "both norms, interleaved", torch.float32, generator)
    grads = tuple(torch.randn(args[0].shape, generator=generator) for _ in "qk")
    runs = []
    for _ in range(2):
        out = QK_NORM_ROPE_BACKWARD.allocate_output(*grads, *args)
        QK_NORM_ROPE_BACKWARD.implementations[backend].run(*grads, *args, out=out)
        runs.append(out)
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_gradcheck_of_the_reference_and_of_the_op_with_its_backward_formulas(variant, generator):
    """float64 gradcheck of the eager reference (torch autograd) and of the custom op, whose
    reference backend runs the explicit backward formulas (the Triton kernels do not take
    float64; they are held to the float64 reference's autograd above)."""
    args = _args((2, 3, 2, 8), variant, torch.float64, generator)
    leaves = [i for i in range(4) if args[i] is not None]

    def function(*tensors, fn):
        full = list(args)
        for i, tensor in zip(leaves, tensors):
            full[i] = tensor
        return fn(*full)

    inputs = tuple(args[i].detach().requires_grad_() for i in leaves)
    assert torch.autograd.gradcheck(lambda *t: function(*t, fn=qk_norm_rope_reference), inputs)
    with use_backend("reference"):
        assert torch.autograd.gradcheck(lambda *t: function(*t, fn=qk_norm_rope), inputs)


def test_rope_tables_receive_no_gradient(generator):
    q, k, weight_q, weight_k, cos, sin, eps, layout = _args((1, 4, 2, 8), "both norms, interleaved",
                                                            torch.float32, generator)
    cos.requires_grad_()
    q.requires_grad_()
    for backend in ("reference", "triton"):
        with use_backend(backend):
            q_out, k_out = qk_norm_rope(q, k, weight_q, weight_k, cos, sin, eps, layout)
        (q_out.sum() + k_out.sum()).backward()
        assert cos.grad is None and q.grad is not None


@pytest.mark.parametrize("rope_layout", ["interleaved", "rotate_half"])
@pytest.mark.parametrize("norm", [True, False])
def test_reference_matches_diffusers_rms_norm_and_apply_rotary_emb(norm, rope_layout, generator):
    from diffusers.models.embeddings import apply_rotary_emb, get_1d_rotary_pos_embed
    from diffusers.models.normalization import RMSNorm

    batch, length, heads, head_dim = 2, 9, 3, 16
    q, k = (torch.randn(batch, length, heads, head_dim, generator=generator) for _ in "qk")
    norms = [RMSNorm(head_dim, eps=1e-6) for _ in "qk"]
    for module in norms:
        module.weight.data = 1 + 0.5 * torch.randn(head_dim, generator=generator)
    positions = torch.arange(length, dtype=torch.float64) * 1.5 + 3
    freqs = get_1d_rotary_pos_embed(head_dim, positions, use_real=True,
                                    repeat_interleave_real=rope_layout == "interleaved")
    unbind_dim = -1 if rope_layout == "interleaved" else -2
    with torch.no_grad():
        expected = [apply_rotary_emb(module(x) if norm else x, freqs, use_real_unbind_dim=unbind_dim, sequence_dim=1)
                    for x, module in zip((q, k), norms)]
    cos, sin = rope_tables_from_diffusers(*freqs, rope_layout)
    weights = (norms[0].weight.detach(), norms[1].weight.detach()) if norm else (None, None)
    actual = qk_norm_rope_reference(q, k, *weights, cos, sin, 1e-6, rope_layout)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)


def test_rope_tables_from_diffusers_rejects_odd_tables_and_unknown_layouts():
    with pytest.raises(ValueError, match="freqs_cos must be \\(L, D\\) with D even"):
        rope_tables_from_diffusers(torch.ones(4, 5), torch.ones(4, 5))
    with pytest.raises(ValueError, match="rope_layout must be one of interleaved, rotate_half"):
        rope_tables_from_diffusers(torch.ones(4, 6), torch.ones(4, 6), "neox")


def _joint_buffers(shape, text_len, dtype):
    """NaN-poisoned joint q and k buffers of L = text_len + shape[1] tokens, one fused (B, L, 2, H, D)
    allocation, as the joint attention's input."""
    batch, length, heads, head_dim = shape
    joint = torch.full((batch, text_len + length, 2, heads, head_dim), float("nan"), dtype=dtype)
    return joint, joint[:, :, 0], joint[:, :, 1]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_out_writes_only_its_slice_of_the_joint_buffer(backend, dtype, generator):
    shape, text_len = (2, 6, 3, 16), 5
    args = _args(shape, "both norms, interleaved", dtype, generator, "fused qkv")
    joint, joint_q, joint_k = _joint_buffers(shape, text_len, dtype)
    with use_backend(backend):
        expected = qk_norm_rope(*args)
        returned = qk_norm_rope(*args, out_q=joint_q[:, text_len:], out_k=joint_k[:, text_len:])
    assert returned[0].data_ptr() == joint_q[:, text_len:].data_ptr()
    torch.testing.assert_close(joint_q[:, text_len:], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(joint_k[:, text_len:], expected[1], rtol=0, atol=0)
    assert joint[:, :text_len].isnan().all(), "a token outside the slice was written"


def test_out_with_gradients_copies_into_the_slice_and_backpropagates(generator):
    shape, text_len = (1, 5, 2, 16), 3
    args = list(_args(shape, "both norms, rotate_half", torch.float32, generator))
    for i in range(4):
        args[i] = args[i].detach().requires_grad_()
    _, joint_q, joint_k = _joint_buffers(shape, text_len, torch.float32)
    grad = torch.randn(joint_q[:, text_len:].shape, generator=generator)
    with use_backend("triton"):
        qk_norm_rope(*args, out_q=joint_q[:, text_len:], out_k=joint_k[:, text_len:])
        (joint_q[:, text_len:] * grad).sum().backward()
        expected_grads = torch.autograd.grad((qk_norm_rope(*args)[0] * grad).sum(), args[:4])
    for leaf, expected in zip(args[:4], expected_grads):
        torch.testing.assert_close(leaf.grad, expected)


def _joint_attention_inputs(text, image, weights_text, weights_image, cos, sin):
    """FLUX.1's double-stream block: each stream normalized with its own weights, rotated by its
    rows of the joint sequence's tables, written into one joint buffer."""
    (text_q, text_k), (image_q, image_k) = text, image
    text_len = text_q.shape[1]
    batch, image_len, heads, head_dim = image_q.shape
    joint = text_q.new_empty(batch, text_len + image_len, 2, heads, head_dim)
    q, k = joint[:, :, 0], joint[:, :, 1]
    torch.ops.fastgen.qk_norm_rope_out(text_q, text_k, *weights_text, cos[:text_len], sin[:text_len], 1e-6,
                                       "interleaved", q[:, :text_len], k[:, :text_len])
    torch.ops.fastgen.qk_norm_rope_out(image_q, image_k, *weights_image, cos[text_len:], sin[text_len:], 1e-6,
                                       "interleaved", q[:, text_len:], k[:, text_len:])
    return joint


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_out_op_compiles_without_a_graph_break(backend, generator):
    text = _heads((1, 3, 2, 8), "fused qkv", torch.float32, generator)
    image = _heads((1, 5, 2, 8), "fused qkv", torch.float32, generator)
    weights_text, weights_image = ([torch.randn(8, generator=generator) for _ in "qk"] for _ in "ti")
    cos, sin = random_rope_tables(8, 8, CPU, generator)
    with use_backend(backend):
        expected = _joint_attention_inputs(text, image, weights_text, weights_image, cos, sin)
        compiled = torch.compile(_joint_attention_inputs, backend="aot_eager", fullgraph=True)
        actual = compiled(text, image, weights_text, weights_image, cos, sin)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    for stream, tokens in ((text, slice(0, 3)), (image, slice(3, 8))):
        separate = qk_norm_rope_reference(*stream, *(weights_text if tokens.start == 0 else weights_image),
                                          cos[tokens], sin[tokens])
        torch.testing.assert_close(expected[:, tokens, 0], separate[0])


def test_out_with_empty_tensors_writes_nothing(generator):
    args = _args((2, 0, 3, 16), "both norms, interleaved", torch.float32, generator)
    out_q, out_k = torch.empty(2, 0, 3, 16), torch.empty(2, 0, 3, 16)
    with use_backend("triton"):
        returned = qk_norm_rope(*args, out_q=out_q, out_k=out_k)
    assert returned[0] is out_q and returned[1] is out_k


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_values_propagate_as_in_the_reference(backend, value, dtype, generator):
    """A NaN or infinite feature of q makes its row non-finite and nothing else, forward and
    backward; NaN and infinities sit where the float64 reference has them."""
    args = list(_args((1, 4, 2, 8), "both norms, interleaved", dtype, generator))
    args[0] = args[0].clone()
    args[0][0, 1, 1, 3] = value
    with mock.patch.object(check, "mismatch", non_finite_aware_mismatch):
        for run in (check.check_forward, lambda *a: check.check_backward(*a, generator)):
            error, detail = run(QK_NORM_ROPE, backend, tuple(args))
            assert not detail, detail
    leaves = [a.detach().requires_grad_() if i < 4 else a for i, a in enumerate(args)]
    with use_backend(backend):
        q_out, k_out = qk_norm_rope(*leaves)
        torch.autograd.backward((q_out, k_out), [torch.ones(q_out.shape, dtype=dtype)] * 2)
    row = torch.zeros(q_out.shape[:3], dtype=torch.bool)
    row[0, 1, 1] = True
    dq = leaves[0].grad
    assert q_out[0, 1, 1].isnan().any() and q_out[~row].isfinite().all()
    assert dq[0, 1, 1].isnan().all() and dq[~row].isfinite().all()
    assert leaves[2].grad[3].isnan()
    assert all(t.isfinite().all() for t in (k_out, leaves[1].grad, leaves[3].grad))


def _valid():
    q = torch.randn(1, 4, 2, 8)
    return dict(q=q, k=torch.randn(1, 4, 2, 8), weight_q=torch.ones(8), weight_k=torch.ones(8),
                cos=torch.ones(4, 4), sin=torch.zeros(4, 4), eps=1e-6, rope_layout="interleaved")


BAD_ARGUMENTS = [
    (dict(q=torch.ones(1, 4, 2, 8, dtype=torch.int32)), TypeError, "q must be float32, float16, bfloat16 or float64"),
    (dict(q=torch.randn(4, 2, 8)), ValueError, r"q must be 4-D \(B, L, H, D\)"),
    (dict(q=torch.randn(1, 4, 2, 4096), k=torch.randn(1, 4, 2, 4096), weight_q=None, weight_k=None, cos=None,
          sin=None), ValueError, "head dim D must be between 1 and 2048, got 4096"),
    (dict(k=torch.randn(1, 4, 3, 8)), ValueError, r"k must have q's shape \(B, L, H, D\) = \(1, 4, 2, 8\)"),
    (dict(k=torch.randn(1, 4, 2, 8, dtype=torch.float16)), TypeError, "k dtype torch.float16 must match q dtype"),
    (dict(weight_q=torch.ones(7)), ValueError, r"weight_q must have shape \(D,\) = \(8,\), got \(7,\)"),
    (dict(weight_k=torch.ones(8, dtype=torch.int64)), TypeError, "weight_k must be float32, float16"),
    (dict(sin=None), ValueError, "cos and sin must be given together, got cos alone"),
    (dict(q=torch.randn(1, 4, 2, 7), k=torch.randn(1, 4, 2, 7), weight_q=None, weight_k=None), ValueError,
     "RoPE pairs the features, so head dim D must be even, got 7"),
    (dict(cos=torch.ones(4, 4, dtype=torch.bfloat16)), TypeError, r"cos must be float32 \(or float64\), got"),
    (dict(sin=torch.ones(5, 4)), ValueError, r"sin must have shape \(L, D/2\) = \(4, 4\), got \(5, 4\)"),
    (dict(cos=torch.ones(4, 8)), ValueError, r"cos must have shape \(L, D/2\) = \(4, 4\), got \(4, 8\)"),
    (dict(eps=0.0), ValueError, "eps must be a finite number > 0, got 0.0"),
    (dict(eps=math.inf), ValueError, "eps must be a finite number > 0, got inf"),
    (dict(rope_layout="neox"), ValueError, "rope_layout must be one of interleaved, rotate_half, got 'neox'"),
    (dict(out_q=torch.empty(1, 4, 2, 8)), ValueError, "out_q and out_k must be given together, got out_q alone"),
    (dict(out_q=torch.empty(1, 4, 2, 8), out_k=torch.empty(1, 5, 2, 8)), ValueError, "out_k must have q's shape"),
    (dict(out_q=torch.empty(1, 4, 2, 8, dtype=torch.float64), out_k=torch.empty(1, 4, 2, 8)), TypeError,
     "out_q dtype torch.float64 must match q dtype"),
]


@pytest.mark.parametrize("changes, error, message", BAD_ARGUMENTS, ids=[m for _, _, m in BAD_ARGUMENTS])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_rejects_bad_arguments_naming_them(changes, error, message, grad):
    arguments = {**_valid(), **changes}
    if grad and arguments["q"].is_floating_point():
        arguments["q"] = arguments["q"].requires_grad_()
    with pytest.raises(error, match=f"qk_norm_rope: {message}"):
        fastgen.qk_norm_rope(**arguments)


def _entry_args(x=(2, 5, 3, 8), weight=(8,), cos=(5, 4), sin=(5, 4), y=None, dtype="float32",
                weight_dtype="float32", interleaved=True, eps=1e-6):
    """qk_norm_rope_forward's extension arguments (fake pointers: the checks fail before any read)."""
    def tensor(shape, dtype="float32"):
        return None if shape is None else fake_tensor_arg(shape + (1,) * (4 - len(shape)), dtype)

    return dict(x=tensor(x, dtype), weight=tensor(weight, weight_dtype), cos=tensor(cos), sin=tensor(sin),
                y=tensor(y or x, dtype), interleaved=interleaved, eps=eps, stream=0)


@pytest.mark.parametrize("changes, name", [
    (dict(dtype="uint8"), "x"),
    (dict(weight=(7,)), "weight"),
    (dict(weight_dtype="float16"), "weight"),  # the op converts the weight to float32 first
    (dict(cos=None), "cos"),  # without sin
    (dict(cos=(5, 3)), "cos"),
    (dict(x=(2, 5, 3, 7), weight=(7,), cos=(5, 3), sin=(5, 3)), "x"),  # RoPE of an odd D
    (dict(y=(2, 5, 3, 4)), "y"),
    (dict(eps=0.0), "eps"),
])
def test_cuda_entry_point_rejects_bad_arguments_naming_them(emulated_extension, changes, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        emulated_extension.qk_norm_rope_forward(**_entry_args(**changes))


def test_cuda_backward_partial_must_match_its_plan(emulated_extension):
    rows = emulated_extension.qk_norm_rope_backward_rows(fake_tensor_arg((2, 5, 3, 8)))
    assert rows % 8 == 0 and rows >= 8  # one row of sums per warp, eight warps a block
    args = _entry_args()
    del args["y"]
    with pytest.raises(ValueError, match=r"^partial\b"):
        emulated_extension.qk_norm_rope_backward(dy=args["x"], dx=args["x"],
                                                 partial=fake_tensor_arg((rows + 8, 8, 1, 1)), **args)
    with pytest.raises(ValueError, match=r"^partial\b"):  # a weight needs partial sums
        emulated_extension.qk_norm_rope_backward(dy=args["x"], dx=args["x"], partial=None, **args)
