"""The op contract: backend selection, fake shapes, torch.compile tracing, opcheck, fastgen check."""
import os
import re
import subprocess
import sys

import pytest
import torch

import fastgen
from fastgen import check
from fastgen.ops import FUNCTIONS
from fastgen.ops.registry import OPS, BackendUnavailable, Implementation, Op, use_backend
from fastgen.ops.shortcut import (
    CHANNEL_DUP_PIXEL_SHUFFLE,
    PIXEL_UNSHUFFLE_CHANNEL_AVG,
    channel_dup_pixel_shuffle,
    pixel_unshuffle_channel_avg,
)

# Why the CUDA backend cannot run CPU tensors on a machine without a GPU.
NO_CUDA_HERE = "sees no CUDA device|is not built"


def test_every_op_is_a_registered_torch_op_exported_under_its_name():
    assert {family.__name__.rpartition(".")[2] for family in fastgen.ops.FAMILIES} >= {
        "ada_norm", "bias_act", "cross_attention", "filtered_lrelu", "linear_attention", "rms_norm_2d", "shortcut",
        "upfirdn2d", "vq"}
    assert len(OPS) >= 12
    for name in OPS:
        assert hasattr(torch.ops.fastgen, name)
        assert getattr(fastgen, name) is fastgen.ops.FUNCTIONS[name] and name in fastgen.__all__


def test_use_backend_nests_and_restores():
    assert fastgen.current_backend() == "auto"
    with use_backend("triton"):
        with use_backend("reference"):
            assert fastgen.current_backend() == "reference"
        assert fastgen.current_backend() == "triton"
    assert fastgen.current_backend() == "auto"
    with pytest.raises(ValueError, match="backend must be one of auto, reference, triton, cuda; got 'cudnn'"):
        with use_backend("cudnn"):
            pass


def test_fastgen_backend_environment_variable():
    code = "import fastgen; print(fastgen.current_backend())"
    env = dict(os.environ, FASTGEN_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"
    env["FASTGEN_BACKEND"] = "fastest"
    code = ("import fastgen, torch\n"
            "try:\n    fastgen.trms2d(torch.ones(1, 2, 2, 2))\n"
            "except ValueError as exc:\n    print(exc)")
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert bad.stdout.strip() == "FASTGEN_BACKEND must be one of auto, reference, triton, cuda; got 'fastest'", \
        "import fastgen works; the first op call says what is wrong"
    cli = subprocess.run([sys.executable, "-m", "fastgen.cli", "info"], env=env, capture_output=True, text=True)
    assert cli.returncode == 2 and cli.stdout == ""
    assert cli.stderr == "fastgen: FASTGEN_BACKEND must be one of auto, reference, triton, cuda; got 'fastest'\n"


def test_selection_on_cpu(monkeypatch):
    x = torch.randn(1, 4, 4, 4)
    op = PIXEL_UNSHUFFLE_CHANNEL_AVG
    assert op.select(x, "auto") is None, "auto runs the reference on CPU tensors"
    assert op.select(x, "reference") is None
    assert op.select(x, "triton").backend == "triton"  # the interpreter is on in the tests
    with pytest.raises(BackendUnavailable, match=f"backend 'cuda' was requested but .*({NO_CUDA_HERE})"):
        op.select(x, "cuda")
    with pytest.raises(BackendUnavailable, match="triton kernels support float32, float16, bfloat16, not torch.float64"):
        op.select(x.double(), "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="only under TRITON_INTERPRET=1"):
        op.select(x, "triton")


def test_requesting_a_backend_the_op_lacks_falls_back_to_auto():
    only_triton = Op("only_triton", reference=lambda x: x, allocate_output=torch.empty_like)
    only_triton.implement("triton")(lambda x, *, out: out.copy_(x))
    assert only_triton.select(torch.ones(2), "cuda") is None


def test_explicit_backend_runs_that_implementation(monkeypatch):
    calls = []
    triton_run = PIXEL_UNSHUFFLE_CHANNEL_AVG.implementations["triton"].run

    def counting_run(*args, out):
        calls.append(args[0].shape)
        triton_run(*args, out=out)

    monkeypatch.setitem(PIXEL_UNSHUFFLE_CHANNEL_AVG.implementations, "triton", Implementation("triton", counting_run))
    x = torch.randn(1, 4, 4, 4)
    pixel_unshuffle_channel_avg(x, 2, 8)
    assert calls == []
    with use_backend("triton"):
        pixel_unshuffle_channel_avg(x, 2, 8)
    assert calls == [x.shape]


def test_backward_uses_the_forward_backend(monkeypatch):
    """.backward() called after the use_backend block still runs the forward's backend."""
    calls = []
    triton_run = CHANNEL_DUP_PIXEL_SHUFFLE.implementations["triton"].run

    def counting_run(*args, out):
        calls.append("adjoint")
        triton_run(*args, out=out)

    monkeypatch.setitem(CHANNEL_DUP_PIXEL_SHUFFLE.implementations, "triton", Implementation("triton", counting_run))
    x = torch.randn(1, 4, 4, 4, requires_grad=True)
    with use_backend("triton"):
        y = pixel_unshuffle_channel_avg(x, 2, 8)
    y.backward(torch.randn_like(y))
    assert calls == ["adjoint"]


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_fake_gives_shape_dtype_and_layout(layout):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 8, 6, 4, dtype=torch.bfloat16).contiguous(memory_format=layout)
        down = torch.ops.fastgen.pixel_unshuffle_channel_avg(x, 2, 16)
        up = torch.ops.fastgen.channel_dup_pixel_shuffle(x, 2, 4)
    assert down.shape == (2, 16, 3, 2) and up.shape == (2, 4, 12, 8)
    assert down.dtype == up.dtype == torch.bfloat16
    assert down.is_contiguous(memory_format=layout) and up.is_contiguous(memory_format=layout)


def test_fake_rejects_bad_shapes_while_tracing():
    # Dynamo wraps the fake's ValueError in its own error type; the message must survive.
    with pytest.raises(Exception, match="must be a multiple of out_channels=5"):
        torch.compile(lambda x: pixel_unshuffle_channel_avg(x, 2, 5), backend="eager", fullgraph=True)(
            torch.randn(1, 4, 4, 4))


# One test per op, so parallel test workers share the slow ones.
@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(backend, name, generator):
    """torch.library.opcheck: schema and fake tensor (the shapes each case's arguments give) on
    every check case; autograd registration and AOT dispatch on the case with the smallest first
    argument. AOT dispatch traces the forward and backward with dynamic shapes and compares them
    with eager, which checks the registration (out= functionalization, the backward's graph),
    not the case: on filtered_lrelu's largest case it takes 18 s, on its smallest 0.3 s."""
    with use_backend(backend):
        op = OPS[name]
        cases = [case.make_args(torch.device("cpu"), torch.float32, generator) for case in op.check_cases()]
        smallest = min(range(len(cases)), key=lambda number: cases[number][0].numel())
        for number, args in enumerate(cases):
            if op.differentiable:
                args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                             for a in args)
            utils = "ALL" if number == smallest else ("test_schema", "test_faketensor")
            torch.library.opcheck(getattr(torch.ops.fastgen, name), args, test_utils=utils)


def _decoder_tail(x, branch):
    """A DC-AE-like snippet: encode shortcut, arithmetic between, decode shortcut."""
    latent = pixel_unshuffle_channel_avg(x, 2, 16, branch)
    return channel_dup_pixel_shuffle(torch.tanh(latent) * 2.0, 2, 8, residual=x)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_torch_compile_fullgraph_forward_and_backward(backend, generator):
    """The custom ops trace without a graph break (fullgraph=True) and the compiled forward and
    backward agree with eager."""
    x = torch.randn(2, 8, 8, 8, generator=generator, requires_grad=True)
    branch = torch.randn(2, 16, 4, 4, generator=generator, requires_grad=True)
    with use_backend(backend):
        expected = _decoder_tail(x, branch)
        expected_grads = torch.autograd.grad(expected.square().sum(), (x, branch))
        compiled = torch.compile(_decoder_tail, backend="aot_eager", fullgraph=True)
        actual = compiled(x, branch)
        actual_grads = torch.autograd.grad(actual.square().sum(), (x, branch))
    torch.testing.assert_close(actual, expected)
    for a, e in zip(actual_grads, expected_grads):
        torch.testing.assert_close(a, e)


def test_torch_compile_inductor_on_cpu(generator):
    x = torch.randn(1, 8, 4, 4, generator=generator)
    branch = torch.randn(1, 16, 2, 2, generator=generator)
    compiled = torch.compile(_decoder_tail, fullgraph=True)
    torch.testing.assert_close(compiled(x, branch), _decoder_tail(x, branch))


def test_every_op_has_a_triton_implementation():
    assert [name for name, op in OPS.items() if "triton" not in op.implementations] == []


@pytest.mark.parametrize("name", sorted(OPS))
def test_check_passes_for_every_triton_implementation_here(name):
    results = check.run_checks(torch.device("cpu"), backends=("triton",), op_names=[name])
    assert results and all(r.status == "ok" for r in results), check.summarize(results)
    assert {r.direction for r in results} == ({"fwd", "bwd"} if OPS[name].differentiable else {"fwd"})


def test_check_reports_an_unwritten_element_and_wrong_math(monkeypatch):
    triton_run = PIXEL_UNSHUFFLE_CHANNEL_AVG.implementations["triton"].run

    def forgets_last_element(*args, out):
        triton_run(*args, out=out)
        out[-1, -1, -1, -1] = float("nan")  # as if never written over the poison

    def off_by_a_bit(*args, out):
        triton_run(*args, out=out)
        out.mul_(1.01)

    for broken in (forgets_last_element, off_by_a_bit):
        monkeypatch.setitem(PIXEL_UNSHUFFLE_CHANNEL_AVG.implementations, "triton", Implementation("triton", broken))
        results = check.run_checks(torch.device("cpu"), backends=("triton",), op_names=["pixel_unshuffle_channel_avg"])
        failed = [r for r in results if r.status == "FAIL" and r.direction == "fwd"]
        assert failed, f"{broken.__name__} was not caught"
        assert "elements off" in failed[0].detail


def test_mismatch_widens_to_twice_the_same_dtype_reference_error_and_no_further():
    expected = torch.tensor([2.0, 100.0, -3.0], dtype=torch.float64)
    reference = (expected + torch.tensor([0.0, 5e-4, 0.0], dtype=torch.float64)).float()  # its worst error 5e-4
    within = (expected + torch.tensor([9e-4, 0.0, 0.0], dtype=torch.float64)).float()
    beyond = (expected + torch.tensor([0.0, 0.0, 1.1e-3], dtype=torch.float64)).float()
    assert check.mismatch(within, expected)[1], "9e-4 on 2.0 is outside float32's own tolerance"
    assert check.mismatch(within, expected, reference)[1] == ""
    assert "at (2,)" in check.mismatch(beyond, expected, reference)[1]
    overflowed = torch.tensor([2.0, float("inf"), -3.0])
    assert check.mismatch(within, expected, overflowed)[1], "an overflowing reference must not widen anything"


def test_mismatch_applies_rtol_to_the_magnitude_of_cancelling_terms():
    expected = torch.tensor([1e-3, 5.0], dtype=torch.float64)  # 1e-3 = 100.001 - 100.0
    magnitude = torch.tensor([200.0, 1.0], dtype=torch.float64)
    rounded = (expected + torch.tensor([1.5e-4, 0.0], dtype=torch.float64)).float()  # 7.5e-7 of 200
    assert check.mismatch(rounded, expected)[1], "1.5e-4 on 1e-3 is outside float32's own tolerance"
    assert check.mismatch(rounded, expected, magnitude=magnitude)[1] == ""
    dropped_term = (expected + torch.tensor([0.0, 1.0], dtype=torch.float64)).float()
    assert "at (1,)" in check.mismatch(dropped_term, expected, magnitude=magnitude)[1], \
        "a magnitude below |expected| must not widen anything"


def test_check_skips_cuda_here_with_the_reason():
    results = check.run_checks(torch.device("cpu"), backends=("cuda",))
    assert results and all(r.status == "skipped" for r in results)
    assert re.search(NO_CUDA_HERE, results[0].detail)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_every_public_op_has_its_signature_and_math_in_help(name):
    """help() and IDEs show the arguments, their defaults and the math, not a wrapper's
    (*args, **kwargs) or torch's CustomOpDef class."""
    import inspect
    import pydoc

    function = FUNCTIONS[name]
    parameters = inspect.signature(function).parameters
    assert parameters and not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters.values()), name
    text = pydoc.render_doc(function)
    assert "CustomOpDef" not in text and all(p in text for p in parameters), text[:500]
    assert len(function.__doc__) > 200, function.__doc__  # more than the one-line pointer


def _internal_ops():
    """The Op objects of fastgen.ops that `register` keeps out of OPS (extra outputs, backwards)."""
    import importlib
    import pkgutil

    import fastgen.ops

    found = {}
    for info in pkgutil.iter_modules(fastgen.ops.__path__):
        module = importlib.import_module(f"fastgen.ops.{info.name}")
        found.update({value.name: value for value in vars(module).values()
                      if isinstance(value, Op) and value.name not in OPS})
    return found


def test_messages_name_the_public_op_the_user_called(monkeypatch):
    internal = _internal_ops()
    assert {"cross_attention_forward", "cross_attention_backward", "trms2d_backward"} <= set(internal)
    for name, op in internal.items():
        assert op.called_as is not None, f"{name} would show users a name they never called"
        assert op.called_as.split("'s ")[0] in OPS, f"{name}.called_as {op.called_as!r} is no public op"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(BackendUnavailable, match=r"^fastgen\.cross_attention: backend 'triton' was requested"):
        with use_backend("triton"):
            fastgen.cross_attention(q, q, q)
    with pytest.raises(BackendUnavailable, match=r"^fastgen\.cross_attention's backward: backend 'triton'"):
        internal["cross_attention_backward"].select(q, "triton")
