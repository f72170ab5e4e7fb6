"""The install (setup.py): which cmake it builds with, which GPUs it builds for, what it tells
the user, and the build requirements it names when they are missing, through setup.py's own
functions and through pip in a scratch virtual environment (the local index only)."""
import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["setup.py", "pyproject.toml", "CMakeLists.txt", "fastgen", "kernels", "bench", "csrc"]


def _load_setup(root=ROOT):
    spec = importlib.util.spec_from_file_location("fastgen_setup", root / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # its setup() call runs only as __main__
    return module


def _script(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_a_cmake_launcher_that_fails_is_passed_over(tmp_path, monkeypatch):
    setup = _load_setup()
    # A virtual environment's PyPI `cmake` script, run inside pip's isolated build environment.
    _script(tmp_path / "venv-bin", "cmake", "echo \"ModuleNotFoundError: No module named 'cmake'\" >&2; exit 1")
    working = _script(tmp_path / "other-bin", "cmake", "echo 'cmake version 3.28.3'")
    old = _script(tmp_path / "old-bin", "cmake", "echo 'cmake version 3.10.2'")
    monkeypatch.setitem(sys.modules, "cmake", None)  # no PyPI cmake module either: import fails
    monkeypatch.setenv("PATH", str(tmp_path / "venv-bin"))
    assert setup.find_tool("cmake") is None
    monkeypatch.setenv("PATH", os.pathsep.join([str(tmp_path / "old-bin"), str(tmp_path / "other-bin")]))
    assert setup.find_tool("cmake", minimum=(3, 18)) is None  # which() gives the first, too old
    assert setup.find_tool("cmake") == str(old)
    monkeypatch.setenv("PATH", str(tmp_path / "other-bin"))
    assert setup.find_tool("cmake", minimum=(3, 18)) == str(working)


def test_a_pypi_cmake_module_serves_where_path_has_none(tmp_path, monkeypatch):
    setup = _load_setup()
    binary = _script(tmp_path / "data" / "bin", "cmake", "echo 'cmake version 4.4.5'")
    module = type(sys)("cmake")
    module.CMAKE_BIN_DIR = str(binary.parent)
    monkeypatch.setitem(sys.modules, "cmake", module)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert setup.find_tool("cmake", minimum=(3, 18)) == str(binary)


@pytest.mark.parametrize("smi, expected", [
    ("echo 9.0; echo 8.0; echo 9.0", ["90a", "80"]),
    ("echo 8.6", ["86"]),
    ("echo 'No devices were found'; exit 6", []),
    ("echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver'; exit 9", []),
    ("echo 'Field \"compute_cap\" is not a valid field to query.'; exit 2", None),
])
def test_the_default_targets_are_this_machines_gpus(smi, expected, tmp_path, monkeypatch):
    setup = _load_setup()
    _script(tmp_path, "nvidia-smi", smi)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("FASTGEN_CUDA_ARCHS", raising=False)
    assert setup.local_gpu_archs() == expected
    assert setup.cuda_archs() == ";".join(expected or [])  # "" is CMakeLists.txt's full list
    monkeypatch.setenv("FASTGEN_CUDA_ARCHS", "all")
    assert setup.cuda_archs() == ""
    monkeypatch.setenv("FASTGEN_CUDA_ARCHS", "89")
    assert setup.cuda_archs() == "89"


def test_without_a_gpu_the_extension_is_skipped_saying_how_to_build_it(tmp_path, monkeypatch):
    setup = _load_setup()
    _script(tmp_path, "nvcc", "exit 0")
    monkeypatch.setenv("PATH", str(tmp_path))  # nvcc, and no nvidia-smi
    monkeypatch.delenv("FASTGEN_SKIP_CUDA", raising=False)
    monkeypatch.delenv("FASTGEN_CUDA_ARCHS", raising=False)
    reason = setup.skip_reason()
    assert "no CUDA GPU" in reason and "FASTGEN_CUDA_ARCHS=all pip install -e ." in reason
    monkeypatch.setenv("FASTGEN_CUDA_ARCHS", "90a")  # a login node building for H100 nodes
    assert setup.skip_reason() is None
    monkeypatch.setenv("FASTGEN_SKIP_CUDA", "1")
    assert setup.skip_reason() == "FASTGEN_SKIP_CUDA is set"


def _copy_sources(target: Path) -> Path:
    target.mkdir(parents=True)
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns(
                "__pycache__", "*.so", "_C_build.json", "results"))
        else:
            shutil.copy2(source, target / name)
    return target


def test_a_skipped_build_removes_the_stale_module_an_editable_install_would_load(tmp_path, monkeypatch):
    import importlib.machinery

    source = _copy_sources(tmp_path / "src")
    setup = _load_setup(source)
    stale = source / "fastgen" / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    stale.write_bytes(b"an earlier build")
    told = []
    monkeypatch.setattr(setup, "tell", told.append)
    monkeypatch.setattr(sys, "argv", ["setup.py", "editable_wheel"])
    monkeypatch.setenv("FASTGEN_SKIP_CUDA", "1")
    assert setup.extensions() == []
    assert not stale.exists()
    record = json.loads((source / "fastgen" / "_C_build.json").read_text())
    assert record["built"] is False and "FASTGEN_SKIP_CUDA is set" in record["message"]
    assert told == [record["message"]] and f"removed fastgen/{stale.name}" in told[0]
    told.clear()
    monkeypatch.setattr(sys, "argv", ["setup.py", "egg_info"])  # metadata only: silent
    assert setup.extensions() == [] and told == []


def _scratch_venv(tmp_path: Path, *packages: str) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True, timeout=300)
    python = tmp_path / "venv" / "bin" / "python"
    if packages:
        subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True, timeout=600,
                       capture_output=True)
    return python


def _pip_install(python: Path, source: Path, tmp_path: Path, *options: str) -> subprocess.CompletedProcess:
    """pip install -e source in the scratch venv, as its user would with it activated, and an nvcc
    that fails (so a build stops at CMake's compiler check, after the tools were found)."""
    fake_cuda = tmp_path / "fake-cuda"
    _script(fake_cuda, "nvcc", "echo 'not a real nvcc' >&2; exit 1")
    environment = {**os.environ, "PATH": os.pathsep.join([str(python.parent), str(fake_cuda), os.environ["PATH"]]),
                   "FASTGEN_CUDA_ARCHS": "90a", "VIRTUAL_ENV": str(python.parent.parent)}
    environment.pop("FASTGEN_SKIP_CUDA", None)
    environment.pop("PYTHONPATH", None)
    return subprocess.run([str(python), "-m", "pip", "install", "--no-deps", *options, "-e", str(source)],
                          capture_output=True, text=True, env=environment, timeout=600)


def test_pip_builds_with_the_build_environments_cmake_beside_a_venvs_pypi_cmake(tmp_path):
    """The venv has `pip install cmake`: its launcher script is first on PATH. The isolated build
    must run a cmake that works, which then reaches the (failing) nvcc."""
    python = _scratch_venv(tmp_path, "cmake")
    result = _pip_install(python, _copy_sources(tmp_path / "src"), tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "No module named 'cmake'" not in output, output[-5000:]
    assert "fastgen: building the CUDA extension fastgen._C failed" in output, output[-5000:]
    assert "CMAKE_CUDA_COMPILER" in output or "CUDA compiler" in output, output[-5000:]


def test_pip_without_build_isolation_names_the_missing_build_requirements(tmp_path):
    python = _scratch_venv(tmp_path, "setuptools>=64", "wheel")
    result = _pip_install(python, _copy_sources(tmp_path / "src"), tmp_path, "--no-build-isolation")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "pybind11" in output and "is missing here" in output or "are missing here" in output, output[-5000:]
    assert "pip install 'cmake>=3.18' ninja pybind11" in output, output[-5000:]
