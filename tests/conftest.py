"""Test setup: without a CUDA GPU the Triton kernels run under the interpreter on CPU tensors,
and tests marked `gpu` are skipped with the reason. Tests marked `cuda_emulation` run the CUDA
backend on CPU tensors: csrc/ compiled as host C++ against tests/cuda_emulation, which executes
each block's threads concurrently (see its cuda_runtime.h). Also the fixtures every op family's
CUDA tests share: the built extension, and fake tensor arguments for its argument checks."""
import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

# The Triton kernels sit in the repository's top-level kernels/ (installed as fastgen.kernels).
# `python -m pytest` puts the working directory first on sys.path, where that folder would be
# imported as the `kernels` package transformers depends on (diffusers imports transformers when
# it loads a model class): the tests take fastgen from its installation, not from the root. A
# copy laid out as installed (tests/test_layout.py's scratch family) has no such folder and is
# imported from its root.
_REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
if (_REPOSITORY_ROOT / "kernels").is_dir():
    sys.path[:] = [entry for entry in sys.path if Path(entry or os.curdir).resolve() != _REPOSITORY_ROOT]

import torch  # noqa: E402

# Before anything imports triton: triton.jit reads this when a kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (README: -n auto) the workers share the cores: each takes its share for
# torch's intra-op threads instead of all of them, which would oversubscribe the machine.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def _launch_patches_language_once() -> None:
    """Triton's interpreter replaces triton.language's builtins with interpreted ones for each
    launch, and again at every call of a @triton.jit helper inside the kernel (inspect.getmembers
    over three modules, ~0.3 ms a call, left in place until the launch ends): a quarter of an
    interpreted filtered_lrelu backward, whose helpers run per tap. Inside a launch whose kernel
    module, or a helper already called in it, sees every language module the helper's does, the
    helper's patching changes nothing, so the helper runs without it; outside a launch, or for
    the first helper of a launch to see another module (triton's own tl.sum and tl.zeros see
    triton.language.core, the kernels' modules triton.language), it runs triton's own call. An
    interpreter whose helper call is not that patching, the rewrite and the call (another
    triton version) is left as it is."""
    import inspect

    from triton.runtime import interpreter

    helper_call = getattr(getattr(interpreter, "InterpretedFunction", None), "__call__", None)
    try:
        helper_source = inspect.getsource(helper_call)
    except (TypeError, OSError):
        return
    if not (all(hasattr(interpreter, name) for name in ("GridExecutor", "InterpreterError", "tl", "_patch_lang"))
            and "_patch_lang(self.fn)" in helper_source and "fn = self.rewrite()" in helper_source):
        return
    languages = (interpreter.tl, interpreter.tl.core)
    running = threading.local()  # .launches: the language modules each running launch patched
    # function -> the language modules its module sees at its first call. The interpreter's
    # rewrite may add triton.language to a module later (triton's own helpers); a set smaller
    # than the module's errs toward triton's own call, which patches no less.
    languages_of = {}

    def launches() -> list:
        if not hasattr(running, "launches"):
            running.launches = []
        return running.launches

    def seen_languages(fn) -> frozenset:
        if fn not in languages_of:
            languages_of[fn] = frozenset(id(value) for value in fn.__globals__.values()
                                         if any(value is language for language in languages))
        return languages_of[fn]

    launch = interpreter.GridExecutor.__call__
    helper = interpreter.InterpretedFunction.__call__

    def launch_with_record(self, *args, **kwargs):
        launches().append(seen_languages(self.fn))
        try:
            return launch(self, *args, **kwargs)
        finally:
            launches().pop()

    def helper_without_repatching(self, *args, **kwargs):
        if not launches():
            return helper(self, *args, **kwargs)
        if not seen_languages(self.fn) <= launches()[-1]:
            # The helper's patching stays until the launch ends: later helpers seeing the same
            # modules need none.
            launches()[-1] |= seen_languages(self.fn)
            return helper(self, *args, **kwargs)
        try:
            return self.rewrite()(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e

    interpreter.GridExecutor.__call__ = launch_with_record
    interpreter.InterpretedFunction.__call__ = helper_without_repatching


def _bfloat16_conversion_rounds_to_nearest_even() -> None:
    """Triton's interpreter converts float32 to bfloat16 by dropping the low 16 bits of the
    mantissa (its cast calls its bit conversion without a rounding mode): 0.16112 stores as
    0.160156. A GPU's conversion, the kernels' explicit casts and the implicit one of a store
    alike, rounds to nearest even, as torch does (0.161133), so the interpreter converts through
    torch: a bfloat16 result under the interpreter is then the GPU's, not a unit in the last
    place nearer zero in about half the elements. A float64 the interpreter converts as if its
    bits were an integer; torch converts it through float32, rounding twice (no kernel here
    converts float64 to bfloat16). Other conversions stay the interpreter's: integers to
    bfloat16, explicit rounding modes, bfloat16 arithmetic. An interpreter without that cast
    (another triton version) is left as it is."""
    import numpy as np
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    cast = getattr(builder, "cast_impl", None)
    if cast is None or not hasattr(interpreter, "TensorHandle"):
        return
    tl = interpreter.tl

    def cast_rounding_bfloat16_to_nearest_even(self, src, dst_type):
        if not (dst_type.scalar == tl.bfloat16 and src.dtype.scalar in (tl.float16, tl.float32, tl.float64)):
            return cast(self, src, dst_type)
        rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
        return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)

    builder.cast_impl = cast_rounding_bfloat16_to_nearest_even


if os.environ.get("TRITON_INTERPRET") == "1":
    _launch_patches_language_once()
    _bfloat16_conversion_rounds_to_nearest_even()

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from session_report import progress, pytest_terminal_summary  # noqa: E402,F401 (a fixture and a hook)

# The fuzz test's (tests/test_fuzz.py) hypothesis profiles, picked by FASTGEN_FUZZ: "ci", the
# default, draws 3 cases per (op, backend, dtype, direction), about two minutes in all on two CPU
# cores; "deep" draws 10,000 per op and backend, which test_fuzz divides among its dtypes and
# directions. Neither is derandomized: every run draws fresh cases,
# and a failure prints its minimal example and the blob that replays it. An example can take
# seconds under the Triton interpreter, and the emulated CUDA backend is a per-test fixture.
# FASTGEN_FUZZ_EXAMPLES=N sets the cases per test of either profile (a quick look at one op's
# excluded classes: FASTGEN_FUZZ=deep FASTGEN_FUZZ_EXAMPLES=50 pytest -m fuzz -k "[bias_act-").
_FUZZ_EXAMPLES = os.environ.get("FASTGEN_FUZZ_EXAMPLES")
_FUZZ_SETTINGS = dict(deadline=None, print_blob=True,
                      suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                             HealthCheck.filter_too_much, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=int(_FUZZ_EXAMPLES or 3), **_FUZZ_SETTINGS)
settings.register_profile("deep", max_examples=int(_FUZZ_EXAMPLES or 10_000), **_FUZZ_SETTINGS)


def pytest_addoption(parser):
    parser.addoption("--gpu-smoke", action="store_true",
                     help="of each test, only the first case of every (dtype, backend, op) it is "
                          "parametrized over: every kernel runs at least once in every dtype, in a "
                          "fraction of the time")


def _smoke_key(item) -> tuple:
    """The test, and the dtypes, backends and op names among its parameters."""
    from fastgen.ops.registry import BACKENDS, OPS

    callspec = getattr(item, "callspec", None)
    values = list(callspec.params.values()) if callspec is not None else []
    dtypes = sorted(str(v) for v in values if isinstance(v, torch.dtype))
    names = sorted(v for v in values if isinstance(v, str) and (v in BACKENDS or v in OPS))
    return item.nodeid.split("[")[0], tuple(dtypes), tuple(names)


def _smoke_selection(config, items) -> None:
    seen, kept, dropped = set(), [], []
    for item in items:
        key = _smoke_key(item)
        (dropped if key in seen else kept).append(item)
        seen.add(key)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def _deselect_compile_check(config, items) -> None:
    """The whole compile check (tests/test_compiles_for_hopper.py) compiles every Triton kernel
    for two GPUs: many CPU-minutes, left to `pytest -m compile_check` (CI's own step)."""
    if "compile_check" in (config.option.markexpr or ""):
        return
    kept = [item for item in items if "compile_check" not in item.keywords]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if "compile_check" in item.keywords])
        items[:] = kept


def pytest_collection_modifyitems(config, items):
    _deselect_compile_check(config, items)
    if config.getoption("--gpu-smoke"):
        _smoke_selection(config, items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _cuda_backend_on_cpu(request):
    if request.node.get_closest_marker("cuda_emulation") is not None:
        request.getfixturevalue("emulated_cuda")


@pytest.fixture
def generator():
    """A fresh seed every run, printed so that a failure (pytest shows captured output) replays
    with FASTGEN_TEST_SEED=<seed>."""
    seed = int(os.environ.get("FASTGEN_TEST_SEED") or torch.seed() % (2**63))
    print(f"generator seed: {seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def kernel_runs(monkeypatch):
    """kernel_runs(op, backend="triton"): a list that gets the first argument's shape of every
    run of the op's implementation under that backend from then on, for tests asserting that a
    model or an accelerated module actually reaches the fast kernel."""

    def count(op, backend="triton"):
        runs, implementation = [], op.implementations[backend]

        def counting(*args, out):
            runs.append(tuple(args[0].shape))
            implementation.run(*args, out=out)

        monkeypatch.setitem(op.implementations, backend, dataclasses.replace(implementation, target=counting))
        return runs

    return count


def _find_nvcc():
    # The same places setup.py looks.
    candidates = [shutil.which("nvcc")]
    candidates += [os.path.join(os.environ[v], "bin", "nvcc")
                   for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    candidates.append("/usr/local/cuda/bin/nvcc")
    return next((p for p in candidates if p and os.path.isfile(p)), None)


@pytest.fixture(scope="session")
def cuda_extension():
    """fastgen._C. Skipped where the install chose not to build it (FASTGEN_SKIP_CUDA, no nvcc,
    or no GPU to build for, as its record says); where nvcc exists but the module does not
    import otherwise, the install failed to build it: that fails the test instead."""
    from fastgen import _cuda

    try:
        return _cuda.load()
    except RuntimeError as e:
        reason = str(e)
    record = _cuda.build_record()
    if record is not None and not record["built"]:
        pytest.skip(f"fastgen._C not built: the install skipped it: {record['reason']}")
    if os.environ.get("FASTGEN_SKIP_CUDA", "") not in ("", "0"):
        pytest.skip("fastgen._C not built: FASTGEN_SKIP_CUDA is set")
    nvcc = _find_nvcc()
    if nvcc is None:
        pytest.skip("fastgen._C not built: no nvcc on this machine")
    pytest.fail(f"nvcc is at {nvcc} but fastgen._C does not import, so the install failed to "
                f"build it (reinstall with pip install -v --no-build-isolation -e .): {reason}")


# A host address that is never dereferenced: calls with it must fail before any launch.
FAKE_PTR = 1 << 20


def fake_tensor_arg(sizes, dtype="float32", ptr=FAKE_PTR, strides=None):
    """The extension's tensor tuple for a contiguous (or `strides`) tensor at a fake address."""
    if strides is None:
        strides, acc = [], 1
        for s in reversed(sizes):
            strides.insert(0, acc)
            acc *= s
    return (ptr, dtype, tuple(sizes), tuple(strides))


def assert_as_accurate_as_the_reference(actual, reference, exact, what):
    """A fast path's float32 result against float64: no further off than twice the float32
    reference, plus 1e-5 and 1e-4 of the largest exact value. A model gradient can be
    ill-conditioned in float32 (AdaIN over a nearly constant channel, StyleGAN2's minibatch
    stddev of two nearly equal features, a bias gradient cancelling to 1e-3 of the others):
    the reference is then off as much as the kernels, in either direction, and comparing the
    two float32 results fails a correct kernel."""
    exact = exact.double()
    error = (actual.double() - exact).abs().max().item()
    reference_error = (reference.double() - exact).abs().max().item()
    allowed = 2 * reference_error + 1e-5 + 1e-4 * exact.abs().max().item()
    assert error <= allowed, f"{what}: off by {error:.3g} from float64, the reference by {reference_error:.3g}"


CPU = torch.device("cpu")
# The floating dtypes the ops take, and the layouts of an op test's 4-D inputs (random_tensor's).
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = ("contiguous", "channels_last", "sliced")
# The (device, backend) parameter of the CUDA kernels run under the emulation on CPU tensors.
EMULATED_CUDA = pytest.param(CPU, "cuda", id="cpu-cuda-emulated", marks=pytest.mark.cuda_emulation)
# The (device, backend) parameters of an op family with Triton and CUDA kernels: the Triton
# kernels under the interpreter here, both backends on a GPU, and the CUDA kernels emulated.
DEVICES_AND_BACKENDS = [pytest.param(CPU, "triton", id="cpu-triton-interpreter"),
                        *(pytest.param(torch.device("cuda"), backend, id=f"cuda-{backend}", marks=pytest.mark.gpu)
                          for backend in ("triton", "cuda")),
                        EMULATED_CUDA]


def assert_compiles_as_one_graph(function, x: torch.Tensor) -> None:
    """function(x) compiles with fullgraph=True (aot_eager) and equals the eager call, both on
    the Triton kernels."""
    import fastgen

    with fastgen.use_backend("triton"):
        expected = function(x)
        actual = torch.compile(function, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(actual, expected)


def clear_error_test(cases: list):
    """A test, parametrized over `cases`, that each (call, error, message) raises `error` with a
    message matching `message`."""
    @pytest.mark.parametrize("call, error, message", cases)
    def test(call, error, message):
        with pytest.raises(error, match=message):
            call()

    return test


@pytest.fixture(scope="session")
def emulated_extension():
    from cuda_emulation import build

    reason = build.missing_tools()
    if reason is not None:
        if _find_nvcc() is not None:
            pytest.fail(f"nvcc is here but the CUDA emulation cannot be built: {reason}")
        pytest.skip(f"CUDA emulation not built: {reason}")
    return build.build(Path(tempfile.gettempdir()) / "fastgen-cuda-emulation")


@pytest.fixture
def emulated_cuda(emulated_extension, monkeypatch):
    """The "cuda" backend, for this test, runs csrc/'s kernels under the emulation on CPU tensors."""
    from fastgen import _cuda, check
    from fastgen.ops import registry

    monkeypatch.setattr(_cuda, "_module", emulated_extension)
    monkeypatch.setattr(_cuda, "_checked_device", True)
    monkeypatch.setattr(_cuda, "_no_device_reason", None)
    monkeypatch.setattr(_cuda, "_DEVICE_TYPE", "cpu")  # the emulated kernels dereference host memory
    monkeypatch.setattr(_cuda, "stream_handle", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    real_reason = registry.backend_unavailable_reason

    def reason(backend, device):
        return None if backend == "cuda" and device.type == "cpu" else real_reason(backend, device)

    monkeypatch.setattr(registry, "backend_unavailable_reason", reason)
    monkeypatch.setattr(check, "backend_unavailable_reason", reason)
    return emulated_extension


def archive_with_manifest(source: Path, target: Path, **changes) -> Path:
    """A copy of a `fastgen precompile build --out` archive with manifest fields changed."""
    import io
    import json
    import tarfile

    with tarfile.open(source) as original, tarfile.open(target, "w:xz") as copy:
        for member in original.getmembers():
            data = original.extractfile(member) if member.isfile() else None
            if member.name == "manifest.json":
                encoded = json.dumps({**json.load(data), **changes}).encode()
                member.size = len(encoded)
                data = io.BytesIO(encoded)
            copy.addfile(member, data)
    return target
