"""The torch-free CUDA extension fastgen._C and its Python side fastgen._cuda.

Without a GPU: the module must import wherever it could be built (a missing module next to
an nvcc is a failed build, not a skip, unless the install says it skipped it), report no
device, refuse to launch with a clear RuntimeError, and reject bad arguments with a
ValueError naming the argument.
With a GPU (marker `gpu`): both shortcut ops against eager PyTorch over dtypes, factors,
layouts, residuals and scales, on NaN-poisoned outputs.
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import FAKE_PTR, fake_tensor_arg
from fastgen import _cuda
from fastgen.check import check_op
from fastgen.ops.registry import OPS

has_cuda = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not has_cuda, reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def C(cuda_extension):
    return cuda_extension


arg = fake_tensor_arg


# ---------------------------------------------------------------------------------------
# Everywhere


def test_module_imports_and_reports_its_build(C):
    info = C.build_info()
    assert isinstance(info["cuda_runtime_version"], int) and info["cuda_runtime_version"] >= 11000
    assert "sm_" in info["archs"] and "compute_" in info["archs"]
    assert _cuda.build_info() == info


def test_device_count_never_throws(C):
    count = C.cuda_device_count()
    assert isinstance(count, int) and count >= 0
    if has_cuda:
        assert count == torch.cuda.device_count()
    elif not os.path.exists("/dev/nvidiactl"):
        assert count == 0
    if count == 0:
        assert "no CUDA device" in _cuda.available()


@pytest.mark.parametrize("op, x, y", [
    ("pixel_unshuffle_channel_avg", (2, 4, 8, 8), (2, 8, 4, 4)),
    ("channel_dup_pixel_shuffle", (2, 8, 4, 4), (2, 4, 8, 8)),
])
def test_call_without_device_raises(C, op, x, y):
    if C.cuda_device_count() > 0:
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="no CUDA device available"):
        getattr(C, op)(arg(x), arg(y), None, 2, 1.0, 0)


UNSHUFFLE_BAD = [
    # (x, y, residual, factor, the argument the message must name)
    (arg((2, 4, 8, 8), "float64"), arg((2, 8, 4, 4)), None, 2, "x"),
    (arg((2, 4, 8, 8)), arg((2, 8, 4, 4), "int8"), None, 2, "y"),
    (arg((2, 4, 8, 8), "uint8"), arg((2, 8, 4, 4), "uint8"), None, 2, "x"),  # bytes, not floats
    (arg((2, 4, 8, 8)), arg((2, 8, 4, 4), "float16"), None, 2, "y"),
    (arg((2, 4, 8, 8)), arg((2, 8, 4, 4)), arg((2, 8, 4, 4), "bfloat16"), 2, "residual"),
    (arg((2, 4, 8, 8)), arg((2, 8, 4, 4)), arg((2, 8, 4, 5)), 2, "residual"),
    (arg((2, 4, 8, 9)), arg((2, 8, 4, 4)), None, 2, "x"),     # W not divisible by f
    (arg((2, 4, 8, 8)), arg((2, 8, 4, 3)), None, 2, "y"),     # wrong spatial size
    (arg((2, 4, 8, 8)), arg((3, 8, 4, 4)), None, 2, "y"),     # wrong batch
    (arg((2, 4, 8, 8)), arg((2, 5, 4, 4)), None, 2, "y"),     # 5 does not divide 16
    (arg((2, 4, 8, 8)), arg((2, 8, 4, 4)), None, 0, "factor"),
    (arg((2, 0, 8, 8)), arg((2, 8, 4, 4)), None, 2, "x"),     # no channels
    ((FAKE_PTR, "float32", (2, 4, 8), (64, 8, 1)), arg((2, 8, 4, 4)), None, 2, "x"),
    ([FAKE_PTR, "float32", (2, 4, 8, 8), (256, 64, 8, 1)], arg((2, 8, 4, 4)), None, 2, "x"),
    ((FAKE_PTR, 32, (2, 4, 8, 8), (256, 64, 8, 1)), arg((2, 8, 4, 4)), None, 2, "x"),
    ((-1, "float32", (2, 4, 8, 8), (256, 64, 8, 1)), arg((2, 8, 4, 4)), None, 2, "x"),
    ((FAKE_PTR, "float32", (2, 4, 8, 8), (256, 64, 8, 1.0)), arg((2, 8, 4, 4)), None, 2, "x"),
    (arg((2, 4, 8, 8)), (FAKE_PTR, "float32", (2, 8, 4, 4), (0, 16, 4, 1)), None, 2, "y"),
]

DUP_BAD = [
    (arg((2, 8, 4, 4), "float64"), arg((2, 4, 8, 8)), None, 2, "x"),
    (arg((2, 8, 4, 4)), arg((2, 4, 8, 8), "bfloat16"), None, 2, "y"),
    (arg((2, 8, 4, 4)), arg((2, 4, 8, 8)), arg((2, 4, 8, 8), "half"), 2, "residual"),
    (arg((2, 8, 4, 4)), arg((2, 4, 8, 8)), arg((2, 4, 8, 7)), 2, "residual"),
    (arg((2, 8, 4, 4)), arg((2, 4, 8, 6)), None, 2, "y"),     # wrong spatial size
    (arg((2, 8, 4, 4)), arg((2, 3, 8, 8)), None, 2, "y"),     # 3*4 not a multiple of 8
    (arg((2, 8, 4, 4)), arg((2, 4, 8, 8)), None, -1, "factor"),
]


@pytest.mark.parametrize("op, case", [("pixel_unshuffle_channel_avg", c) for c in UNSHUFFLE_BAD]
                         + [("channel_dup_pixel_shuffle", c) for c in DUP_BAD])
def test_bad_arguments_raise_value_error_naming_them(C, op, case):
    x, y, residual, factor, name = case
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        getattr(C, op)(x, y, residual, factor, 1.0, 0)


@pytest.mark.cuda_emulation
def test_entry_points_take_arguments_by_position_or_name(emulated_extension):
    """bindings.cpp's bind(): one argument per launcher parameter, positional or by its name,
    the stream last; every case fails before a launch (the pointers are fake)."""
    C, x, y = emulated_extension, arg((2, 4, 8, 8)), arg((2, 8, 4, 4))
    assert C.pixel_unshuffle_channel_avg.__doc__.startswith(
        "pixel_unshuffle_channel_avg(x: tensor, y: tensor, residual: tensor | None, factor: int, scale: float, "
        "stream: int) -> None")
    unshuffle = C.pixel_unshuffle_channel_avg
    with pytest.raises(TypeError, match="missing argument 'stream'"):
        unshuffle(x, y, None, 2, scale=1.0)
    with pytest.raises(TypeError, match="unexpected argument 'z'"):
        unshuffle(x, y, None, 2, scale=1.0, stream=0, z=1)
    with pytest.raises(TypeError, match="two values for argument 'x'"):
        unshuffle(x, y, None, 2, 1.0, 0, x=x)
    with pytest.raises(TypeError, match="takes 6 arguments, got 7"):
        unshuffle(x, y, None, 2, 1.0, 0, 0)
    with pytest.raises(ValueError, match="^scale: expected a float, got str"):
        unshuffle(x, y, None, 2, scale="1", stream=0)
    with pytest.raises(ValueError, match="^factor: expected an int, got float"):
        unshuffle(x, y, residual=None, factor=2.0, scale=1.0, stream=0)
    with pytest.raises(ValueError, match="^residual: expected a tuple"):
        unshuffle(x, y, [], 2, 1.0, 0)
    with pytest.raises(ValueError, match="^stream: expected an int"):
        unshuffle(x, y, None, 0, 1.0, stream=None)


def test_tensor_arg_rejects_what_the_kernels_cannot_take():
    with pytest.raises(ValueError, match="x: expected at most 4 dims"):
        _cuda.tensor_arg(torch.zeros(1, 2, 3, 4, 5), "x")
    with pytest.raises(ValueError, match="idx: expected an int64 vector"):
        _cuda.tensor_arg(torch.zeros(2, 3, dtype=torch.int64), "idx")
    with pytest.raises(ValueError, match="dtype must be"):
        _cuda.tensor_arg(torch.zeros(1, 1, 2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="expected a CUDA tensor"):
        _cuda.tensor_arg(torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="expected a torch.Tensor"):
        _cuda.tensor_arg([[1.0]])


def test_load_explains_how_to_build_when_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(_cuda, "_module", None)
    monkeypatch.setattr(_cuda, "_import_error", ImportError("No module named 'fastgen._C'"))
    monkeypatch.setattr(_cuda, "_BUILD_RECORD", tmp_path / "none.json")  # an install from before the record
    with pytest.raises(RuntimeError, match="not built.*nvcc.*login node.*FASTGEN_CUDA_ARCHS=90a"):
        _cuda.load()
    assert "not built" in _cuda.available()
    assert _cuda.build_info() is None and _cuda.build_record() is None
    # The install's own reason, where it skipped the extension.
    (tmp_path / "_C_build.json").write_text(json.dumps({"built": False, "reason": "FASTGEN_SKIP_CUDA is set"}))
    monkeypatch.setattr(_cuda, "_BUILD_RECORD", tmp_path / "_C_build.json")
    assert _cuda.available() == ("the CUDA extension fastgen._C is not built: the install skipped it: "
                                 "FASTGEN_SKIP_CUDA is set")


# ---------------------------------------------------------------------------------------
# GPU: against eager PyTorch

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _layout(t, kind):
    """t's values in the memory layout `kind`."""
    if kind == "contiguous":
        return t.contiguous()
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    # A non-contiguous view inside a bigger NaN-poisoned buffer, every stride unusual.
    B, C, H, W = t.shape
    big = torch.full((B + 1, C + 2, H + 3, 2 * W + 1), float("nan"), dtype=t.dtype,
                     device=t.device)
    view = big[1:, 2:, 3:, 1::2]
    view.copy_(t)
    return view


def _poisoned_output(shape, dtype, kind):
    y = _layout(torch.full(shape, float("nan"), dtype=dtype, device="cuda"), kind)
    return y, (y._base if y._base is not None else y)


def _unshuffle_ref(x, f, out_channels, scale, residual):
    B, C, H, W = x.shape
    g = C * f * f // out_channels
    u = F.pixel_unshuffle(x.double(), f).view(B, out_channels, g, H // f, W // f)
    y = u.mean(2) * (scale * g)
    return y if residual is None else y + residual.double()


def _dup_ref(x, f, out_channels, scale, residual):
    r = out_channels * f * f // x.shape[1]
    y = F.pixel_shuffle(x.double().repeat_interleave(r, dim=1), f) * scale
    return y if residual is None else y + residual.double()


def _call(op, x, y, residual, f, scale):
    _cuda.launch(op, x=x, y=y, residual=residual, factor=f, scale=scale)


def _check(y, buffer, ref, exact=False):
    tol = 0.0 if exact else TOL[y.dtype]
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)
    # Everything around a strided output must still be NaN: nothing written out of bounds.
    outside = torch.ones_like(buffer, dtype=torch.bool)
    offset = y.storage_offset() - buffer.storage_offset()
    outside.as_strided(y.shape, y.stride(), offset).fill_(False)
    assert buffer[outside].isnan().all()


# (factor, x channels, out channels, H, W of the smaller side), odd sizes so no block divides
# them.
UNSHUFFLE_SHAPES = [(1, 6, 3, 5, 7), (1, 6, 1, 3, 33), (2, 6, 24, 6, 10), (2, 6, 8, 34, 6),
                    (2, 3, 3, 6, 130), (4, 3, 12, 8, 12), (4, 2, 1, 4, 8)]
DUP_SHAPES = [(1, 3, 6, 5, 7), (1, 1, 4, 3, 33), (2, 24, 6, 6, 10), (2, 8, 6, 34, 6),
              (2, 3, 3, 6, 130), (4, 12, 3, 8, 12), (4, 1, 2, 4, 8)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", UNSHUFFLE_SHAPES, ids=str)
@pytest.mark.parametrize("x_layout, y_layout, r_layout", [
    ("contiguous", "contiguous", None), ("channels_last", "contiguous", None),
    ("sliced", "channels_last", None), ("contiguous", "sliced", "channels_last"),
    ("channels_last", "channels_last", "sliced"), ("sliced", "sliced", "contiguous")])
@pytest.mark.parametrize("scale", ["mean", 0.37])
@pytest.mark.gpu
@requires_cuda
def test_pixel_unshuffle_channel_avg_matches_eager(C, dtype, shape, x_layout, y_layout,
                                                   r_layout, scale):
    f, Cx, O, H, W = shape
    scale = 1.0 / (Cx * f * f // O) if scale == "mean" else scale
    x = _layout(torch.randn(2, Cx, H * f, W * f, device="cuda").to(dtype), x_layout)
    y, buffer = _poisoned_output((2, O, H, W), dtype, y_layout)
    residual = None if r_layout is None else _layout(
        torch.randn(2, O, H, W, device="cuda").to(dtype), r_layout)
    _call("pixel_unshuffle_channel_avg", x, y, residual, f, scale)
    _check(y, buffer, _unshuffle_ref(x, f, O, scale, residual))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", DUP_SHAPES, ids=str)
@pytest.mark.parametrize("x_layout, y_layout, r_layout", [
    ("contiguous", "contiguous", None), ("channels_last", "contiguous", None),
    ("sliced", "channels_last", None), ("contiguous", "sliced", "channels_last"),
    ("channels_last", "channels_last", "sliced"), ("sliced", "sliced", "contiguous")])
@pytest.mark.parametrize("scale", [1.0, 0.37])
@pytest.mark.gpu
@requires_cuda
def test_channel_dup_pixel_shuffle_matches_eager(C, dtype, shape, x_layout, y_layout,
                                                 r_layout, scale):
    f, Cx, O, H, W = shape
    x = _layout(torch.randn(2, Cx, H, W, device="cuda").to(dtype), x_layout)
    y, buffer = _poisoned_output((2, O, H * f, W * f), dtype, y_layout)
    residual = None if r_layout is None else _layout(
        torch.randn(2, O, H * f, W * f, device="cuda").to(dtype), r_layout)
    _call("channel_dup_pixel_shuffle", x, y, residual, f, scale)
    # Pure duplication is a copy: it must be bit exact.
    _check(y, buffer, _dup_ref(x, f, O, scale, residual),
           exact=residual is None and scale == 1.0)


@pytest.mark.gpu
@requires_cuda
def test_each_op_is_the_adjoint_of_the_other(C):
    # With scale 1, <unshuffle_sum(a), b> = <a, dup_shuffle(b)>: the backward of each op.
    f, Cx, O = 2, 6, 8
    a = torch.randn(3, Cx, 10, 14, device="cuda")
    b = torch.randn(3, O, 5, 7, device="cuda")
    ua = torch.empty_like(b)
    db = torch.empty_like(a)
    _call("pixel_unshuffle_channel_avg", a, ua, None, f, 1.0)
    _call("channel_dup_pixel_shuffle", b, db, None, f, 1.0)
    lhs, rhs = (ua.double() * b.double()).sum(), (a.double() * db.double()).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=1e-4)


@pytest.mark.gpu
@requires_cuda
def test_more_than_2_to_the_31_elements(C):
    # int64 indexing: the tail beyond 2^31 elements must be written and correct.
    shape = (1, 1, 1 << 16, (1 << 15) + 3)
    need = 2 * 2 * shape[2] * shape[3] + (1 << 30)
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip("not enough free GPU memory for two 4 GiB tensors")
    x = torch.randn(shape, device="cuda", dtype=torch.float16)
    y = torch.full_like(x, float("nan"))
    for op in ("pixel_unshuffle_channel_avg", "channel_dup_pixel_shuffle"):
        y.fill_(float("nan"))
        _call(op, x, y, None, 1, 1.0)
        assert torch.equal(y, x)
    del x, y
    torch.cuda.empty_cache()


@pytest.mark.gpu
@requires_cuda
def test_tensor_arg_and_stream_handle_on_cuda():
    t = torch.empty(2, 3, 4, 5, device="cuda", dtype=torch.bfloat16).permute(0, 2, 3, 1)
    assert _cuda.tensor_arg(t) == (t.data_ptr(), "bfloat16", (2, 4, 5, 3), t.stride())
    v = t[:, 0, 0, :]  # lower ranks get trailing size-1 dims
    assert _cuda.tensor_arg(v) == (v.data_ptr(), "bfloat16", (2, 3, 1, 1), (*v.stride(), 1, 1))
    i = torch.arange(6, device="cuda")[::2]
    assert _cuda.tensor_arg(i) == (i.data_ptr(), 3, 2)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        assert _cuda.stream_handle() == s.cuda_stream
    assert _cuda.available() is None


# ---------------------------------------------------------------------------------------
# Under the CPU emulation of CUDA (tests/cuda_emulation): every op's CUDA kernels executed


@pytest.mark.cuda_emulation
@pytest.mark.parametrize("name", sorted(name for name, op in OPS.items() if "cuda" in op.implementations))
def test_fastgen_check_passes_for_every_cuda_implementation(name, generator):
    """`fastgen check`'s cases, forward and backward, with the cuda backend forced: the kernels
    run on CPU tensors under the emulation, against the float64 reference."""
    seed = int(torch.randint(0, 2**31, (1,), generator=generator))
    results = check_op(OPS[name], "cuda", torch.device("cpu"), seed)
    failures = [f"{r.case} {r.dtype} {r.direction}: {r.detail}" for r in results if r.status != "ok"]
    assert results and not failures, "\n".join(failures)
