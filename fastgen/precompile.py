"""`fastgen precompile`: compile, on a machine without a GPU, every Triton kernel variant that a
workload will launch on a GPU, into a Triton cache the GPU machine then reads instead of
compiling; and build the CUDA extension for another Python.

Why. A Triton kernel compiles on its first launch with each new specialization: about 0.65 s
of CPU for sm_90 per variant, and fastgen's checks and benchmarks launch hundreds of variants.
A deployment warms its caches ahead of time so that its first call does not stall on the
compiler; a short GPU session spends its minutes measuring instead of compiling.

How. A stand-in driver reports the target GPU (compute capability and SM count) and every
Triton launch becomes compile-only (Triton's warm-up path): the kernel is compiled and stored
in the Triton cache, nothing runs, outputs stay zero. Autotuned kernels compile every
configuration their pruning keeps, as the GPU's autotuner would. Launchers that size their
grids from the SM count see the target's (`fastgen.kernels.compile_target_sm_count`), since a
split count can reach a kernel's specialization. A launch that needs more shared memory than
the target's block limit fails, as it would on the GPU.

Workloads (`--workload`, repeatable): `check` launches what `fastgen check` launches (every
op's check cases, forward and backward, in every dtype the Triton implementation takes);
`bench-quick` and `bench` launch the op benchmarks' cases (of `fastgen bench --quick`, or all
of them) under the Triton backend. Model benchmarks are left out: their eager layers would
run on this CPU at full size.

The cache key. Triton looks a compiled kernel up by a hash of `triton_key()` (its version and
hashes of its Python sources and of its libtriton shared library), the kernel's source, the
backend (target, ptxas version), the launch options and the specialization (argument dtypes,
16-byte alignment, integers equal to 1, constexprs). For the same Triton version under
another Python only libtriton differs, so `--triton-wheel` (that Python's wheel of the same
Triton) puts the wheel's libtriton hash in the key in place of ours, after checking that every
Python source in the wheel is the one installed here.

The archive. `build --out X.tar.xz` writes the cache with a manifest (Triton version and key,
target, workloads, variant count). The cache's group files (`__grp__*.json`) name their
members by absolute path, so `install` unpacks into the cache directory it is given and
rewrites those paths; it refuses an archive made for another Triton (exit 1), since every
lookup would miss.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

# The shared memory a block may opt in to, per compute capability. A launch past it raises
# OutOfResources on the GPU; the autotuner skips such configs, so only a launch left with none
# that fits fails there, and here.
SHARED_MEMORY_BY_ARCH = {90: 232448, 80: 166912, 86: 101376, 89: 101376}  # H100, A100, RTX 30, L4 / RTX 40
SM_COUNT_BY_ARCH = {90: 132, 80: 108, 86: 84, 89: 58}  # H100 SXM / H200, A100, RTX 3090, L4
WORKLOADS = ("check", "bench-quick", "bench")
MANIFEST = "manifest.json"
CACHE_FOLDER = "cache"


class TritonInternalsChanged(RuntimeError):
    """This Triton's internals no longer fit the compile-only driver."""


def _triton_internals():
    try:
        from triton.backends.compiler import GPUTarget
        from triton.backends.driver import DriverBase
        from triton.backends.nvidia.driver import ty_to_cpp
        from triton.runtime import autotuner, jit
        from triton.runtime import cache as triton_cache
        from triton.runtime import driver as active_driver
        from triton.runtime.errors import OutOfResources
    except ImportError as error:
        raise TritonInternalsChanged(str(error)) from error
    return GPUTarget, DriverBase, ty_to_cpp, autotuner, jit, triton_cache, active_driver, OutOfResources


class CompileSession:
    """While active (`with session:`), every Triton launch compiles for `arch` and runs nothing.

    `compiled` holds the names of the kernels compiled; `variants`, when not None, maps
    (kernel name, options) to (PTX, shared memory bytes) of each compiled variant, for reports."""

    def __init__(self, arch: int = 90, shared_memory: Optional[int] = None, sm_count: Optional[int] = None,
                 triton_key: Optional[str] = None, keep_ptx: bool = False):
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            raise RuntimeError("fastgen precompile compiles for a GPU: unset TRITON_INTERPRET first "
                               "(triton.jit reads it when the kernel modules are imported)")
        self.arch = arch
        self.shared_memory = SHARED_MEMORY_BY_ARCH[arch] if shared_memory is None else shared_memory
        self.sm_count = SM_COUNT_BY_ARCH[arch] if sm_count is None else sm_count
        self.triton_key = triton_key
        self.compiled: set = set()
        self.variants: Optional[dict] = {} if keep_ptx else None
        self._exit_stack: Optional[contextlib.ExitStack] = None

    def _driver(self):
        GPUTarget, DriverBase, ty_to_cpp, *_ = _triton_internals()
        target = GPUTarget("cuda", self.arch, 32)

        class CompileOnlyDriver(DriverBase):
            """Just enough of a driver for JITFunction.run(warmup=True): target, device, stream."""

            def __init__(self):  # the real driver loads libcuda; nothing to load here
                pass

            @classmethod
            def is_active(cls):
                return True

            def get_current_target(self):
                return target

            def get_current_device(self):
                return 0

            def get_current_stream(self, device=None):
                return 0

            def get_active_torch_device(self):
                return torch.device("cpu")

            def map_python_to_cpp_type(self, ty):
                return ty_to_cpp(ty)

            def get_benchmarker(self):
                raise RuntimeError("compile-only driver: nothing is timed")

            def get_device_interface(self):
                return torch.cuda

            def get_empty_cache_for_benchmark(self):
                raise RuntimeError("compile-only driver: nothing is timed")

            def clear_cache(self, cache):
                pass

        return CompileOnlyDriver()

    def __enter__(self) -> "CompileSession":
        from fastgen import kernels
        from fastgen.kernels import LAUNCH_OPTIONS
        from fastgen.ops import registry

        _, _, _, autotuner, jit, triton_cache, active_driver, OutOfResources = _triton_internals()
        session = self
        launch = jit.JITFunction.run

        def compile_only(self, *args, grid, warmup, **kwargs):
            kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
            session.compiled.add(self.fn.__name__)
            shared = kernel.metadata.shared
            if session.variants is not None:
                dtypes = sorted({str(a.dtype).replace("torch.", "") for a in args
                                 if isinstance(a, torch.Tensor) and a.is_floating_point()})
                options = " ".join(f"{k}={v}" for k, v in sorted(kwargs.items())
                                   if not isinstance(v, torch.Tensor) and k not in LAUNCH_OPTIONS)
                session.variants[(self.fn.__name__, f"{options} dtypes={'/'.join(dtypes)}")] = (
                    kernel.asm["ptx"], shared)
            if shared > session.shared_memory:
                raise OutOfResources(shared, session.shared_memory, f"shared memory ({self.fn.__name__})")

        def every_config(self, *args, **kwargs):
            """Every configuration the autotuner would time for these arguments (after its
            pruning); fails, as the autotuner would on the GPU, when none fits."""
            self.nargs = dict(zip(self.arg_names, args))
            try:
                configs = self.prune_configs(kwargs)
                too_large = []
                for config in configs:
                    try:
                        self.fn.run(*args, **{**kwargs, **config.all_kwargs()})
                    except OutOfResources as error:
                        too_large.append(f"{config}: {error}")
            finally:
                self.nargs = None
            if len(too_large) == len(configs):
                raise RuntimeError(f"no config fits in {session.shared_memory} bytes of shared memory: "
                                   f"{'; '.join(too_large)}")

        unavailable = registry.backend_unavailable_reason
        stack = contextlib.ExitStack()
        try:
            # Put back whatever was active, which on a machine without a GPU is no driver at all.
            stack.callback(setattr, active_driver, "_active", active_driver._active)
            active_driver.set_active(self._driver())
        except AttributeError as error:
            raise TritonInternalsChanged(str(error)) from error
        _patch(stack, jit.JITFunction, "run", compile_only)
        _patch(stack, autotuner.Autotuner, "run", every_config)
        # The Triton backend takes CPU tensors (they only supply shapes, strides and dtypes here).
        # Only the backend check is told so: the launchers must still see the interpreter off, or
        # they pick the configurations and operand types they use under it instead of the GPU's.
        _patch(stack, registry, "backend_unavailable_reason",
               lambda backend, device: None if backend == "triton" else unavailable(backend, device))
        _patch(stack, kernels, "compile_target_sm_count", self.sm_count)
        if self.triton_key is not None:
            key = self.triton_key
            _patch(stack, triton_cache, "triton_key", lambda: key)
            if hasattr(autotuner, "triton_key"):
                _patch(stack, autotuner, "triton_key", lambda: key)
        for op in registry.OPS.values():
            _patch(stack, op, "allocate_output", _zeroed(op.allocate_output))
        self._exit_stack = stack
        return self

    def __exit__(self, *exc_info) -> None:
        self._exit_stack.close()
        self._exit_stack = None


def _patch(stack: contextlib.ExitStack, owner, name: str, value) -> None:
    original = getattr(owner, name)
    setattr(owner, name, value)
    stack.callback(setattr, owner, name, original)


def _zeroed(allocate_output: Callable) -> Callable:
    """Kernels write nothing here; zeros keep index outputs valid for the eager code after them."""

    def allocate(*args):
        out = allocate_output(*args)
        for tensor in out if isinstance(out, tuple) else (out,):
            tensor.zero_()
        return out

    return allocate


def _floating_leaves(values):
    return [v.detach().requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for v in values]


def _backward_through(outputs) -> None:
    floating = [o for o in (outputs if isinstance(outputs, tuple) else (outputs,))
                if isinstance(o, torch.Tensor) and o.is_floating_point() and o.requires_grad]
    if floating:
        torch.autograd.backward(floating, [torch.ones_like(o) for o in floating])


def check_items(op_names: Optional[list] = None) -> Iterator[tuple]:
    """(label, launch) of what `fastgen check` launches on the Triton backend: each op's check
    cases in each dtype its Triton implementation takes, forward and (differentiable ops)
    backward through the registered op."""
    from fastgen.ops import registry

    unknown = set(op_names or ()) - set(registry.OPS)
    if unknown:
        raise ValueError(f"unknown op(s) {sorted(unknown)}; known: {sorted(registry.OPS)}")
    generator = torch.Generator().manual_seed(0)
    for name, op in sorted(registry.OPS.items()):
        if (op_names and name not in op_names) or "triton" not in op.implementations:
            continue
        for case in op.check_cases():
            for dtype in op.implementations["triton"].dtypes:
                args = case.make_args(torch.device("cpu"), dtype, generator)

                def launch(name=name, op=op, args=args):
                    with registry.use_backend("triton"):
                        inputs = _floating_leaves(args) if op.differentiable else list(args)
                        outputs = getattr(torch.ops.fastgen, name)(*inputs)
                        if op.differentiable:
                            _backward_through(outputs)

                yield f"{name} [{case.label}, {str(dtype).replace('torch.', '')}]", launch


def bench_items(quick: bool) -> Iterator[tuple]:
    """(label, launch) of the op benchmarks' cases under the Triton backend: what `fastgen bench`
    (--quick when `quick`) compiles for its triton rows, forward and, for fwd+bwd, backward."""
    from fastgen import bench
    from fastgen.ops import registry

    for module in bench.MODULES:
        if not module.__name__.rsplit(".", 1)[-1].startswith("ops_"):
            continue
        for benchmark in module.benchmarks(quick):
            impl = benchmark.impls.get("triton")
            if impl is None:
                continue
            for case in benchmark.cases:
                def launch(benchmark=benchmark, case=case, impl=impl):
                    inputs = case.make_inputs(torch.device("cpu"), case.dtype, 0)
                    if case.direction == "fwd+bwd":
                        inputs = dict(zip(inputs, _floating_leaves(inputs.values())))
                    with registry.use_backend("triton"):
                        outputs = impl.make(case)(**inputs)
                        if case.direction == "fwd+bwd":
                            _backward_through(outputs)

                dtype = str(case.dtype).replace("torch.", "")
                yield f"{benchmark.name} [{case.shape}, {dtype}, {case.direction}]", launch


def workload_items(workloads, op_names: Optional[list] = None) -> Iterator[tuple]:
    for workload in workloads:
        if workload == "check":
            yield from check_items(op_names)
        elif workload in ("bench", "bench-quick"):
            yield from bench_items(quick=workload == "bench-quick")
        else:
            raise ValueError(f"unknown workload {workload!r}; known: {', '.join(WORKLOADS)}")


def _group_of(item) -> str:
    """"name dtype" of a (label, launch) item: the label up to " [" and the dtype it names."""
    label = item[0]
    dtype = re.search(r"\b(float32|float16|bfloat16)\b", label)
    return label.split(" [", 1)[0] + (f" {dtype.group(1)}" if dtype else "")


def compile_items(items, claims: Optional[Path] = None, report: Optional[Callable[[str], None]] = None) -> list:
    """Launch the items inside an active CompileSession, a group at a time: the items of one op
    or benchmark (the label up to " [") in one dtype, in their order, whose launches share kernel
    variants (an op's dtypes share none; one group per op would leave a core idle behind the
    slowest op). Returns the failures ("label: error"), every one of them rather than the first.

    Processes given the same `claims` directory divide the groups as they come free: a process
    compiles a group only after claiming it (creating the file named by its number there), so no
    group is compiled twice and a process that drew long groups takes fewer. `report` gets a line
    per group compiled (its launches, seconds and failures)."""
    failures = []
    groups: dict = {}
    for item in items:
        groups.setdefault(_group_of(item), []).append(item)
    for number, (group, members) in enumerate(groups.items()):
        if claims is not None:
            try:
                os.close(os.open(Path(claims) / str(number), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:  # another process has it
                continue
        started, launches, failed = time.monotonic(), 0, len(failures)
        for label, launch in members:
            launches += 1
            try:
                launch()
            except Exception as error:
                failures.append(f"{label}: {type(error).__name__}: {str(error)[:2000]}")
        if report is not None:
            failed = len(failures) - failed
            report(f"{group}: {launches} launch(es) compiled in {time.monotonic() - started:.1f} s"
                   + (f", {failed} FAILED" if failed else ""))
    return failures


# ---- the Triton cache key of another Python's wheel ----------------------------------------

def _sha256_of(stream) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: stream.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


def _installed_libtriton() -> Path:
    import sysconfig

    import triton

    extension = sysconfig.get_config_var("EXT_SUFFIX").split(".")[-1]
    return Path(triton.__file__).parent / "_C" / f"libtriton.{extension}"


def triton_key_for_wheel(wheel: Path) -> str:
    """This Triton's cache key as the same Triton version installed from `wheel` (another
    Python's build) computes it. Raises ValueError when the wheel is another version, or any
    Python source in it differs from the one installed here."""
    import triton
    from triton.runtime.cache import triton_key

    root = Path(triton.__file__).parent
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        sources = [n for n in names if n.startswith("triton/") and n.endswith(".py")]
        differing = [n for n in sources if not (root.parent / n).is_file()
                     or hashlib.sha256((root.parent / n).read_bytes()).hexdigest()
                     != hashlib.sha256(archive.read(n)).hexdigest()]
        if differing:
            raise ValueError(f"{wheel.name} is not the triton {triton.__version__} installed here: "
                             f"{len(differing)} of its {len(sources)} Python sources differ (first {differing[0]}); "
                             f"install the wheel's Triton version here")
        libraries = [n for n in names if n.startswith("triton/_C/libtriton.") and n.endswith(".so")]
        if len(libraries) != 1:
            raise ValueError(f"{wheel.name} has {len(libraries)} triton/_C/libtriton*.so, expected one")
        with archive.open(libraries[0]) as library:
            wheel_hash = _sha256_of(library)
    with _installed_libtriton().open("rb") as library:
        local_hash = _sha256_of(library)
    key = triton_key()
    if local_hash not in key:
        raise TritonInternalsChanged("triton_key() no longer contains libtriton's sha256")
    return key.replace(local_hash, wheel_hash)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


# ---- archives ---------------------------------------------------------------------------------

def _relocate_groups(cache_dir: Path) -> int:
    """Point every group file's member paths into `cache_dir` (they are absolute paths of the
    directory the cache was built in); returns the number of groups."""
    groups = 0
    for group in cache_dir.glob("*/__grp__*.json"):
        data = json.loads(group.read_text())
        data["child_paths"] = {name: str(group.parent / Path(path).name)
                               for name, path in data.get("child_paths", {}).items()}
        group.write_text(json.dumps(data))
        groups += 1
    return groups


def count_variants(cache_dir: Path) -> int:
    """Compiled kernels in a Triton cache: one group file each."""
    return sum(1 for _ in Path(cache_dir).glob("*/__grp__*.json"))


def write_archive(cache_dir: Path, manifest: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        manifest_path = Path(scratch) / MANIFEST
        manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
        with tarfile.open(out, "w:xz") as archive:
            archive.add(manifest_path, MANIFEST)
            archive.add(cache_dir, CACHE_FOLDER)


def read_manifest(archive_path: Path) -> dict:
    with tarfile.open(archive_path) as archive:
        return json.load(archive.extractfile(MANIFEST))


def default_cache_dir() -> Path:
    if os.environ.get("TRITON_CACHE_DIR"):
        return Path(os.environ["TRITON_CACHE_DIR"])
    return Path.home() / ".triton" / "cache"


def install_archive(archive_path: Path, cache_dir: Path) -> dict:
    """Unpack a precompiled cache into `cache_dir` and point its groups there. Raises
    ValueError when the archive was made for another Triton than this one."""
    import triton
    from triton.runtime.cache import triton_key

    manifest = read_manifest(archive_path)
    here = key_digest(triton_key())
    if manifest["triton_key"] != here:
        raise ValueError(f"{archive_path} was compiled for triton {manifest['triton_version']} "
                         f"(key {manifest['triton_key']}), this is triton {triton.__version__} (key {here}): "
                         f"every lookup would miss")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as scratch, tarfile.open(archive_path) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith(CACHE_FOLDER + "/")]
        archive.extractall(scratch, members=members, filter="data")
        unpacked = Path(scratch) / CACHE_FOLDER
        for entry in unpacked.iterdir():
            target = cache_dir / entry.name
            if target.exists():
                shutil.rmtree(target)
            entry.rename(target)
    _relocate_groups(cache_dir)
    return manifest


# ---- the CUDA extension for another Python ---------------------------------------------------

def build_extension(python: str, archs: str, out_dir: Path) -> Path:
    """Build fastgen._C from this source checkout for the interpreter `python` (another
    Python's ABI) and SASS targets `archs`, into out_dir; returns the module's path."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "setup.py").is_file() or not (root / "csrc").is_dir():
        raise ValueError(f"building the extension needs fastgen's source checkout; {root} has no setup.py and csrc/")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        environment = {**os.environ, "FASTGEN_PYTHON": python, "FASTGEN_CUDA_ARCHS": archs}
        environment.pop("FASTGEN_SKIP_CUDA", None)
        subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", scratch,
                        "--build-temp", str(Path(scratch) / "build")], cwd=root, env=environment, check=True)
        built = sorted(Path(scratch, "fastgen").glob("_C*.so"))
        if len(built) != 1:
            raise RuntimeError(f"the extension build left {len(built)} modules in {scratch}/fastgen")
        target = out_dir / built[0].name
        shutil.copy2(built[0], target)
    return target


# ---- the command -----------------------------------------------------------------------------

def _build(args) -> int:
    from fastgen import sysinfo

    import triton
    from triton.runtime.cache import triton_key

    try:
        key = triton_key_for_wheel(args.triton_wheel) if args.triton_wheel else triton_key()
    except (ValueError, zipfile.BadZipFile, FileNotFoundError) as error:
        print(f"fastgen precompile: {error}", file=sys.stderr)
        return 2
    from fastgen.ops.registry import OPS

    unknown = sorted(set(args.op or ()) - set(OPS))
    if unknown:
        print(f"fastgen precompile: unknown op(s) {unknown}; known: {', '.join(sorted(OPS))}", file=sys.stderr)
        return 2
    workloads = args.workload or ["check"]
    cache_dir = Path(args.cache_dir or tempfile.mkdtemp(prefix="fastgen-precompile-")).resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    jobs = max(1, args.jobs)
    command = [sys.executable, "-m", "fastgen.precompile", "_compile", "--arch", str(args.arch),
               "--sm-count", str(args.sm_count or SM_COUNT_BY_ARCH[args.arch]), "--key", key]
    for workload in workloads:
        command += ["--workload", workload]
    for op in args.op or ():
        command += ["--op", op]
    environment = {**os.environ, "TRITON_CACHE_DIR": str(cache_dir), "TRITON_STORE_BINARY_ONLY": "1"}
    environment.pop("TRITON_INTERPRET", None)
    print(f"fastgen precompile: {', '.join(workloads)} for sm_{args.arch} ({jobs} process(es)), "
          f"triton {triton.__version__}{' keyed as ' + args.triton_wheel.name if args.triton_wheel else ''}, "
          f"into {cache_dir}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fastgen-precompile-claims-") as claims:
        workers = [subprocess.Popen(command + ["--claims", claims], env=environment) for _ in range(jobs)]
        codes = [worker.wait() for worker in workers]
    seconds = time.monotonic() - started
    variants = count_variants(cache_dir)
    print(f"fastgen precompile: {variants} kernel variants in {seconds:.0f} s", flush=True)
    if any(codes):
        print(f"fastgen precompile: {sum(c != 0 for c in codes)} of {jobs} processes failed (above)",
              file=sys.stderr)
        return 1
    if args.out:
        versions = sysinfo.versions()
        manifest = {"triton_version": triton.__version__, "triton_key": key_digest(key),
                    "keyed_for_wheel": args.triton_wheel.name if args.triton_wheel else None,
                    "arch": args.arch, "sm_count": args.sm_count or SM_COUNT_BY_ARCH[args.arch],
                    "workloads": workloads, "ops": args.op, "variants": variants,
                    "compile_seconds": round(seconds, 1), "fastgen_commit": versions["commit"],
                    "built_with_python": versions["python"]}
        write_archive(cache_dir, manifest, args.out)
        print(f"fastgen precompile: wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB)")
    return 0


def _compile(args) -> int:
    """One worker of `build`: compiles the groups of workload items it claims into TRITON_CACHE_DIR,
    a line per group on stdout."""
    try:
        with CompileSession(args.arch, sm_count=args.sm_count, triton_key=args.key):
            failures = compile_items(workload_items(args.workload, args.op), args.claims,
                                     report=lambda line: print(f"fastgen precompile: {line}", flush=True))
    except TritonInternalsChanged as error:
        print(f"fastgen precompile: this Triton's internals changed: {error}", file=sys.stderr)
        return 3
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


def _install(args) -> int:
    cache_dir = (args.cache_dir or default_cache_dir()).resolve()
    try:
        manifest = install_archive(args.archive, cache_dir)
    except ValueError as error:
        print(f"fastgen precompile install: {error}", file=sys.stderr)
        return 1
    print(f"fastgen precompile install: {manifest['variants']} kernel variants for sm_{manifest['arch']} "
          f"({', '.join(manifest['workloads'])}; triton {manifest['triton_version']}, fastgen "
          f"{manifest['fastgen_commit'][:10]}) into {cache_dir}")
    return 0


def _extension(args) -> int:
    try:
        path = build_extension(args.python, args.cuda_archs, args.out)
    except (ValueError, RuntimeError, subprocess.CalledProcessError) as error:
        print(f"fastgen precompile extension: {error}", file=sys.stderr)
        return 1
    print(f"fastgen precompile extension: {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="precompile_command", required=True, metavar="{build,install,extension}")
    build = commands.add_parser("build", help="compile a workload's Triton kernels for a GPU, without one")
    build.add_argument("--workload", action="append", choices=WORKLOADS,
                       help="what to compile for (repeatable; default check)")
    build.add_argument("--op", action="append", help="only this op's check cases (repeatable)")
    build.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_MEMORY_BY_ARCH),
                       help="compute capability (default 90: H100 / H200)")
    build.add_argument("--sm-count", type=int, help="the target GPU's SMs (default: the arch's, 132 for 90)")
    build.add_argument("--triton-wheel", type=Path, metavar="WHEEL",
                       help="key the cache for this wheel of the installed Triton version (another Python's)")
    build.add_argument("--cache-dir", type=Path, help="the Triton cache to fill (default: a new temporary one)")
    build.add_argument("--out", type=Path, metavar="ARCHIVE.tar.xz", help="then pack the cache with its manifest")
    build.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiling processes (default: cores)")
    build.set_defaults(run=_build)
    install = commands.add_parser("install", help="unpack a precompiled cache for this Triton")
    install.add_argument("archive", type=Path)
    install.add_argument("--cache-dir", type=Path, help="default $TRITON_CACHE_DIR, else ~/.triton/cache")
    install.set_defaults(run=_install)
    extension = commands.add_parser("extension", help="build the CUDA extension for another Python")
    extension.add_argument("--python", required=True, help="that Python's interpreter (its headers and ABI)")
    extension.add_argument("--cuda-archs", default="90a", help="SASS targets (default 90a)")
    extension.add_argument("--out", type=Path, required=True, help="directory for the module")
    extension.set_defaults(run=_extension)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastgen.precompile")
    commands = parser.add_subparsers(dest="command", required=True)
    worker = commands.add_parser("_compile")
    worker.add_argument("--arch", type=int, required=True, choices=sorted(SHARED_MEMORY_BY_ARCH))
    worker.add_argument("--sm-count", type=int, required=True)
    worker.add_argument("--key", required=True)
    worker.add_argument("--workload", action="append", required=True, choices=WORKLOADS)
    worker.add_argument("--op", action="append")
    worker.add_argument("--claims", type=Path, help="the directory the workers claim groups of items in")
    worker.set_defaults(run=_compile)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
