"""Build script: the package layout, and the CUDA extension fastgen._C built through CMake.

Metadata lives in pyproject.toml. The extension is built when nvcc is found (PATH, CUDA_HOME,
CUDA_PATH, /usr/local/cuda/bin), by default for the GPUs of this machine only (nvidia-smi's
compute capabilities, 9.0 as 90a); on a machine without a GPU it is not built unless
FASTGEN_CUDA_ARCHS names the targets, and the install says how. Without nvcc the pure-Python
package installs and the Triton and reference implementations still work. Environment:
  FASTGEN_SKIP_CUDA=1      install without the extension even where nvcc exists
  FASTGEN_CUDA_ARCHS=90a   SASS targets, ';' or ',' separated; "all" is 80;86;89;90a + PTX (CI
                           and wheels: a login node without a GPU building for GPU nodes)
  FASTGEN_PYTHON=python3.12  build the extension for that interpreter's headers and ABI instead
                           of this one's (fastgen precompile extension uses it)
  MAX_JOBS=N               parallel compile jobs (default: all available cores)
The build needs cmake >= 3.18, ninja and pybind11: the [build-system] requirements, which pip
installs in its isolated build environment; with --no-build-isolation they must be installed
(a missing one is named, with the command that installs it). The CMake build directory stays
in build/ between installs, so a reinstall recompiles only what changed. What the install did
(built for which targets in how long, or why not) goes to the terminal, past pip's quiet
output, and to fastgen/_C_build.json, which `fastgen info` reads. A failed CUDA build fails the
install: a broken kernel must not be hidden.
"""

import importlib
import importlib.machinery
import json
import os
import re
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
# What the install did about fastgen._C, beside the module (fastgen/_cuda.py reads it).
BUILD_RECORD = "_C_build.json"
BUILD_TOOLS_HINT = "pip install 'cmake>=3.18' ninja pybind11"


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


def tool_version(path):
    """(major, minor) that `path --version` reports, or None where it does not run."""
    try:
        done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"(\d+)\.(\d+)", done.stdout)
    return (int(found.group(1)), int(found.group(2))) if done.returncode == 0 and found else None


def find_tool(name, minimum=(0, 0)):
    """A `name` (cmake, ninja) that runs and reports at least version `minimum`: PATH's, else
    its PyPI package's binary. A PyPI package's launcher script on PATH is passed over where it
    fails: a virtual environment's `cmake` script cannot import its module inside pip's isolated
    build environment."""
    candidates = [shutil.which(name)]
    try:
        module = importlib.import_module(name)
        bin_dir = getattr(module, "BIN_DIR", None) or getattr(module, "CMAKE_BIN_DIR", None)
        candidates.append(os.path.join(bin_dir, name) if bin_dir else None)
    except ImportError:
        pass
    for path in candidates:
        version = tool_version(path) if path else None
        if version is not None and version >= minimum:
            return path
    return None


def build_jobs():
    if os.environ.get("MAX_JOBS", "").isdigit() and int(os.environ["MAX_JOBS"]) > 0:
        return int(os.environ["MAX_JOBS"])
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def local_gpu_archs():
    """SASS targets for this machine's GPUs from nvidia-smi's compute capabilities (9.0 as 90a,
    what the kernels are built for on Hopper): [] where nvidia-smi is missing or sees no GPU;
    None where it cannot tell (a driver too old for the compute_cap query)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        done = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    if done.returncode != 0:
        return None if "compute_cap" in done.stdout + done.stderr else []
    archs = []
    for capability in done.stdout.split():
        arch = capability.replace(".", "") + ("a" if capability == "9.0" else "")
        if arch not in archs:
            archs.append(arch)
    return archs


def skip_reason():
    """Why fastgen._C is not built here, or None to build it."""
    if os.environ.get("FASTGEN_SKIP_CUDA", "") not in ("", "0"):
        return "FASTGEN_SKIP_CUDA is set"
    nvcc, looked = find_nvcc()
    if nvcc is None:
        return f"nvcc not found (looked in {', '.join(looked)})"
    if os.environ.get("FASTGEN_CUDA_ARCHS", "").strip() or local_gpu_archs() != []:
        return None
    return ("this machine has no CUDA GPU to build it for (compiling it for every GPU takes minutes); to run "
            "the CUDA kernels on GPU machines (a cluster's GPU nodes), install there, or here with "
            "FASTGEN_CUDA_ARCHS=90a for H100s or FASTGEN_CUDA_ARCHS=all for sm_80 to sm_90a: "
            "FASTGEN_CUDA_ARCHS=all pip install -e .")


def cuda_archs():
    """The FASTGEN_CUDA_ARCHS value for CMake: the variable's, this machine's GPUs' where it is
    unset, "" (CMakeLists.txt's full list) for "all" or GPUs nvidia-smi cannot describe."""
    archs = os.environ.get("FASTGEN_CUDA_ARCHS", "").strip()
    if archs:
        return "" if archs == "all" else archs
    return ";".join(local_gpu_archs() or [])


def tell(message):
    """Shows a build message to the user without pip's -v (pip keeps a build's output to itself
    unless it fails): on the terminal where there is one, else on stderr, which pip logs."""
    try:
        with open("/dev/tty", "w") as terminal:
            terminal.write("\n" + message + "\n")  # pip's "Building ... " line has no end yet
        return
    except OSError:
        pass
    print(message, file=sys.stderr, flush=True)


def write_build_record(folders, **record):
    for folder in folders:
        Path(folder, BUILD_RECORD).write_text(json.dumps(record, indent=1) + "\n")


class CMakeBuild(build_ext):
    """Builds fastgen._C by configuring and building CMakeLists.txt with Ninja."""

    def build_extension(self, ext):
        nvcc = ext.nvcc
        cmake, ninja = find_tool("cmake", minimum=(3, 18)), find_tool("ninja")
        try:
            import pybind11
        except ImportError:
            pybind11 = None
        missing = [name for name, found in (("cmake >= 3.18", cmake), ("ninja", ninja), ("pybind11", pybind11))
                   if found is None]
        if missing:
            raise RuntimeError(
                f"fastgen: nvcc is at {nvcc}, but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                "missing here, so the CUDA extension fastgen._C cannot be built. pip installs them itself "
                "(they are fastgen's [build-system] requirements) unless --no-build-isolation is given; with "
                f"it, install them first: {BUILD_TOOLS_HINT}. Or set FASTGEN_SKIP_CUDA=1 to install "
                "without the extension.")

        # setuptools copies the result into the source tree for an editable install.
        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        python = os.environ.get("FASTGEN_PYTHON") or sys.executable
        if python != sys.executable:
            suffix = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))"],
                                    capture_output=True, text=True, check=True).stdout.strip()
            ext_path = ext_path.with_name("_C" + suffix)
        ext_path.parent.mkdir(parents=True, exist_ok=True)
        # Not build_temp, a new temporary directory per pip install: kept here, the object files
        # of unchanged sources are reused by the next install.
        build_dir = ROOT / "build" / ("cmake" + ext_path.name[len("_C"):].rsplit(".", 1)[0])
        self._drop_stale_cache(build_dir)
        jobs = build_jobs()
        cu_files = max(1, len(list((ROOT / "csrc").glob("*.cu"))))
        archs = cuda_archs()
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
        tell(f"fastgen: building the CUDA extension fastgen._C with {nvcc} (FASTGEN_SKIP_CUDA=1 skips it)")
        output = "".join(self._run(cmd) for cmd in (configure, build))
        if not ext_path.is_file():
            raise RuntimeError(f"fastgen: CMake finished but {ext_path} was not produced")
        targets = re.search(r"fastgen: CUDA targets (\S+)", output)
        targets = targets.group(1) if targets else "unknown targets"
        seconds = time.monotonic() - start
        # Ninja names each source it compiles: "Building CUDA object .../csrc/vq.cu.o".
        compiled = sorted(set(re.findall(r"Building \w+ object \S*?(\w+\.(?:cu|cpp))\.o", output)))
        message = (f"fastgen: built the CUDA extension fastgen._C for {targets} in {seconds:.0f} s, compiling "
                   + (", ".join(compiled) if compiled else "nothing (its sources are unchanged)"))
        tell(message)
        # An editable install imports the module from the source tree, a wheel from beside it.
        folders = {ext_path.parent} | ({ROOT / "fastgen"} if self.editable_mode else set())
        write_build_record(folders, built=True, reason=None, targets=targets, seconds=round(seconds, 1),
                           compiled=compiled, message=message)

    @staticmethod
    def _run(cmd):
        """Runs a CMake step, its output going to pip's log, Ninja's progress lines ([3/14] ...)
        to the user as they come; returns the output. A failure raises, its output in pip's report."""
        print("fastgen: " + " ".join(cmd), flush=True)
        process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in process.stdout:
            lines.append(line)
            print(line, end="", flush=True)
            if re.match(r"\[\d+/\d+\] ", line):
                tell(f"fastgen: {line.rstrip()}")
        if process.wait() != 0:
            raise RuntimeError(
                f"fastgen: building the CUDA extension fastgen._C failed ({cmd[0]} exited "
                f"{process.returncode}; its output is above). Fix the error, or set "
                "FASTGEN_SKIP_CUDA=1 to install without the extension.")
        return "".join(lines)

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
    reason = skip_reason()
    if reason is None:
        ext = Extension("fastgen._C", sources=[])
        ext.nvcc = find_nvcc()[0]
        return [ext]
    # Metadata-only hooks run setup.py too; say it once, where the build happens.
    if not {"egg_info", "dist_info"} & set(sys.argv[1:]):
        message = ("fastgen: installing without the CUDA extension fastgen._C (the Triton and reference "
                   f"implementations work without it): {reason}")
        # An editable install would otherwise go on importing the module of an earlier build.
        stale = [ROOT / "fastgen" / f"_C{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES]
        for module in [path for path in stale if path.is_file()]:
            module.unlink()
            message += f"; removed {module.relative_to(ROOT)}, an earlier build's"
        tell(message)
        write_build_record([ROOT / "fastgen"], built=False, reason=reason, targets=None, seconds=None, compiled=[],
                           message=message)
    return []


if __name__ == "__main__":  # setuptools runs it so; tests import its functions
    packages, package_dir = discover_packages()
    setup(
        packages=packages,
        package_dir=package_dir,
        include_package_data=False,
        # The measured "auto" backend order (fastgen bench order --write); absent until a GPU run.
        package_data={"fastgen.ops": ["backend_order.json"], "fastgen": [BUILD_RECORD]},
        ext_modules=extensions(),
        cmdclass={"build_ext": CMakeBuild},
        zip_safe=False,
    )
