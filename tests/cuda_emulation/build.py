"""Build fastgen._C from csrc/ as host C++ against the CPU emulation in cuda_runtime.h here.

The .cu sources are copied with the two constructs plain C++ cannot parse rewritten: a kernel
launch `kernel<<<grid, block, shared, stream>>>(args)` becomes
`::emulation::launch(kernel, grid, block, shared, stream)(args)`, and
`extern __shared__ T name[];` becomes a pointer to the launch's dynamic shared memory.
Everything else (the kernels, the launchers' validation, bindings.cpp) compiles unchanged. The
module is cached by a hash of its sources and flags, so a session builds it at most once.
"""
from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
SHIM = Path(__file__).resolve().parent

_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^;{}()]*?>)?)\s*<<<(.*?)>>>\s*\(", re.S)
_DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+([\w:]+)\s+(\w+)\s*\[\s*\]\s*;")


def emulated_source(text: str) -> str:
    text = _LAUNCH.sub(lambda m: f"::emulation::launch({m.group(1)}, {m.group(2)})(", text)
    return _DYNAMIC_SHARED.sub(lambda m: f"{m.group(1)}* {m.group(2)} = ::emulation::dynamic_shared<{m.group(1)}>();",
                               text)


def cuda_include_dir() -> Path | None:
    """Where cuda_fp16.h lives (the half types and vector types are used as they are)."""
    candidates = [Path(os.environ[v]) / "include" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent / "include")
    candidates += [Path("/usr/local/cuda/include")] + sorted(Path("/usr/local").glob("cuda-*/include"), reverse=True)
    return next((c for c in candidates if (c / "cuda_fp16.h").is_file()), None)


def missing_tools() -> str | None:
    """Why the emulated module cannot be built here, or None."""
    if shutil.which("g++") is None:
        return "no g++"
    if cuda_include_dir() is None:
        return "no CUDA headers (cuda_fp16.h) found"
    if importlib.util.find_spec("pybind11") is None:
        return "pybind11 is not installed"
    return None


def _compile(flags: list, target: Path) -> None:
    with tempfile.TemporaryDirectory() as work:
        units = [CSRC / "bindings.cpp"]
        for cu in sorted(CSRC.glob("*.cu")):
            unit = Path(work) / (cu.stem + ".cpp")
            unit.write_text(f'#line 1 "{cu}"\n' + emulated_source(cu.read_text()))
            units.append(unit)
        objects = [Path(work) / (unit.stem + ".o") for unit in units]
        compile_flags = [flag for flag in flags if flag != "-shared"]
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            results = list(pool.map(lambda unit, obj: subprocess.run(
                ["g++", *compile_flags, "-c", str(unit), "-o", str(obj)], capture_output=True, text=True),
                units, objects))
        failed = [result.stderr for result in results if result.returncode != 0]
        partial = target.with_suffix(".partial")
        if not failed:
            link = subprocess.run(["g++", *flags, *map(str, objects), "-o", str(partial)], capture_output=True, text=True)
            failed = [link.stderr] if link.returncode != 0 else []
        if failed:
            raise RuntimeError("building the emulated extension failed:\n" + "\n".join(failed)[-20000:])
        partial.rename(target)


def build(cache_dir: Path):
    """The emulated module, compiled into cache_dir (reused while its sources are unchanged)."""
    import pybind11

    sources = sorted(CSRC.glob("*.cu")) + [CSRC / "bindings.cpp", CSRC / "common.h", SHIM / "cuda_runtime.h"]
    flags = ["-std=c++20", "-O1", "-g0", "-shared", "-fPIC", "-pthread", "-w",
             f"-I{SHIM}", f"-I{CSRC}", f"-I{cuda_include_dir()}", f"-I{pybind11.get_include()}",
             f"-I{sysconfig.get_paths()['include']}", '-DFASTGEN_CUDA_ARCHS_STR="emulated"']
    digest = hashlib.sha256(" ".join(flags).encode())
    for path in sources:
        digest.update(path.read_bytes())
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    target = cache_dir / digest.hexdigest()[:16] / f"_C{suffix}"
    target.parent.mkdir(parents=True, exist_ok=True)
    # One process builds while parallel test workers wait for it, compiling the units on every core.
    with open(target.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            _compile(flags, target)
    spec = importlib.util.spec_from_file_location("_C", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":  # a manual build: python tests/cuda_emulation/build.py [CACHE_DIR]
    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())))
