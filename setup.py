"""Build script: the package layout, and the CUDA extension fastgen._C built through CMake.

Metadata lives in pyproject.toml. The extension is built only when nvcc is found (PATH,
CUDA_HOME, CUDA_PATH, /usr/local/cuda/bin); without it the pure-Python package installs and
the Triton and reference implementations still work. Environment:
  FASTGEN_SKIP_CUDA=1      install without the extension even where nvcc exists
  FASTGEN_CUDA_ARCHS=90a   SASS targets, ';' or ',' separated (default 80;86;89;90a + PTX)
  FASTGEN_PYTHON=python3.12  build the extension for that interpreter's headers and ABI instead
                           of this one's (fastgen precompile extension uses it)
  MAX_JOBS=N               parallel compile jobs (default: all available cores)
A failed CUDA build fails the install: a broken kernel must not be hidden.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent

# Top-level source dirs shipped inside the one import name `fastgen`; a top-level package
# called `kernels` or `bench` must never be installed (another `kernels` package exists).
MAPPED_DIRS = {"fastgen.kernels": "kernels", "fastgen.bench": "bench"}


def discover_packages():
    packages = ["fastgen"] + ["fastgen." + p for p in find_packages(str(ROOT / "fastgen"))]
    package_dir = {"fastgen": "fastgen"}
    for name, src in MAPPED_DIRS.items():
        if not (ROOT / src / "__init__.py").is_file():
            continue
        # bench/results holds data, never code.
        subpackages = find_packages(str(ROOT / src), exclude=["results", "results.*"])
        packages += [name] + [f"{name}.{p}" for p in subpackages]
        package_dir[name] = src
    return packages, package_dir


def find_nvcc():
    """Returns (path to nvcc or None, the places looked in)."""
    candidates = [("PATH", shutil.which("nvcc"))]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append((f"${var}/bin", os.path.join(os.environ[var], "bin", "nvcc")))
    candidates.append(("/usr/local/cuda/bin", "/usr/local/cuda/bin/nvcc"))
    for _, path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path, [where for where, _ in candidates]
    return None, [where for where, _ in candidates]


def find_tool(name):
    """cmake or ninja from PATH, else from its PyPI package (as an isolated build has it)."""
    path = shutil.which(name)
    if path:
        return path
    try:
        module = __import__(name)
        bin_dir = getattr(module, "BIN_DIR", None) or getattr(module, "CMAKE_BIN_DIR", None)
    except ImportError:
        return None
    candidate = os.path.join(bin_dir, name) if bin_dir else None
    return candidate if candidate and os.path.isfile(candidate) else None


def build_jobs():
    if os.environ.get("MAX_JOBS", "").isdigit() and int(os.environ["MAX_JOBS"]) > 0:
        return int(os.environ["MAX_JOBS"])
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def cuda_plan():
    """(nvcc path, None) when the extension should be built, else (None, reason)."""
    tail = ("installing without the CUDA extension fastgen._C; "
            "the Triton and reference implementations still work")
    if os.environ.get("FASTGEN_SKIP_CUDA", "") not in ("", "0"):
        return None, f"fastgen: FASTGEN_SKIP_CUDA is set: {tail}"
    nvcc, looked = find_nvcc()
    if nvcc is None:
        return None, f"fastgen: nvcc not found (looked in {', '.join(looked)}): {tail}"
    return nvcc, None


class CMakeBuild(build_ext):
    """Builds fastgen._C by configuring and building CMakeLists.txt with Ninja."""

    def build_extension(self, ext):
        nvcc = ext.nvcc
        cmake, ninja = find_tool("cmake"), find_tool("ninja")
        missing = [name for name, path in (("cmake", cmake), ("ninja", ninja)) if path is None]
        if missing:
            raise RuntimeError(
                f"fastgen: nvcc is at {nvcc} but {' and '.join(missing)} not found, so the CUDA "
                f"extension cannot be built; pip install {' '.join(missing)} (or set "
                "FASTGEN_SKIP_CUDA=1 to install without it)")
        import pybind11  # a build requirement; only needed when building the extension

        # setuptools copies the result into the source tree for an editable install.
        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        python = os.environ.get("FASTGEN_PYTHON") or sys.executable
        if python != sys.executable:
            suffix = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))"],
                                    capture_output=True, text=True, check=True).stdout.strip()
            ext_path = ext_path.with_name("_C" + suffix)
        ext_path.parent.mkdir(parents=True, exist_ok=True)
        build_dir = Path(self.build_temp).resolve() / "cmake"
        self._drop_stale_cache(build_dir)
        jobs = build_jobs()
        cu_files = max(1, len(list((ROOT / "csrc").glob("*.cu"))))
        archs = os.environ.get("FASTGEN_CUDA_ARCHS", "").strip()
        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={python}",
            f"-DFASTGEN_OUTPUT_DIR={ext_path.parent}",
            f"-DFASTGEN_EXT_SUFFIX={ext_path.name[len('_C'):]}",
            # Files compile in parallel under Ninja; the arch targets of a file share the rest.
            f"-DFASTGEN_NVCC_THREADS={max(1, jobs // cu_files)}",
        ]
        # -U drops a value cached by an earlier configure, so CMakeLists.txt's default applies.
        configure.append(f"-DFASTGEN_CUDA_ARCHS={archs}" if archs else "-UFASTGEN_CUDA_ARCHS")
        build = [cmake, "--build", str(build_dir), "--parallel", str(jobs)]

        start = time.monotonic()
        for cmd in (configure, build):
            print("fastgen: " + " ".join(cmd), flush=True)
            # Output goes straight through: pip shows it on failure (and always with -v).
            result = subprocess.run(cmd, cwd=ROOT)
            if result.returncode != 0:
                raise RuntimeError(
                    f"fastgen: building the CUDA extension fastgen._C failed ({cmd[0]} exited "
                    f"{result.returncode}; its output is above). Fix the error, or set "
                    "FASTGEN_SKIP_CUDA=1 to install without the extension.")
        if not ext_path.is_file():
            raise RuntimeError(f"fastgen: CMake finished but {ext_path} was not produced")
        print(f"fastgen: built fastgen._C in {time.monotonic() - start:.0f} s", flush=True)

    @staticmethod
    def _drop_stale_cache(build_dir):
        # A build dir copied from another checkout points CMake at the wrong sources.
        cache = build_dir / "CMakeCache.txt"
        if not cache.is_file():
            return
        for line in cache.read_text(errors="replace").splitlines():
            if line.startswith("CMAKE_HOME_DIRECTORY:INTERNAL="):
                if Path(line.split("=", 1)[1]).resolve() != ROOT:
                    shutil.rmtree(build_dir)
                return


def extensions():
    nvcc, reason = cuda_plan()
    if nvcc is None:
        # Metadata-only hooks run setup.py too; say it once, where the build happens.
        if not {"egg_info", "dist_info"} & set(sys.argv[1:]):
            print(reason, file=sys.stderr, flush=True)
        return []
    ext = Extension("fastgen._C", sources=[])
    ext.nvcc = nvcc
    return [ext]


packages, package_dir = discover_packages()
setup(
    packages=packages,
    package_dir=package_dir,
    include_package_data=False,
    # The measured "auto" backend order (fastgen bench order --write); absent until a GPU run.
    package_data={"fastgen.ops": ["backend_order.json"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
