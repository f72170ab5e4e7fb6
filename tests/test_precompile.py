"""`fastgen precompile`: a cache built without a GPU holds exactly the keys the workload's launches
look up, survives being moved to another directory, is refused by another Triton, and can be
keyed for another Python's wheel of the same Triton."""
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import archive_with_manifest

from fastgen import precompile

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the gpu tests compile the real kernels")

# Two small families: an autotuned-free elementwise one and one with a split reduction.
OPS = ["pixel_unshuffle_channel_avg", "trms2d"]


def _fastgen(*args, env=None, check=True):
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environment.update(env or {})
    result = subprocess.run([sys.executable, "-m", "fastgen.cli", *args], capture_output=True, text=True,
                            env=environment, timeout=900)
    if check:
        assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    return result


_LOOKUP_SCRIPT = """
import json, sys
from fastgen import precompile
with precompile.CompileSession() as session:
    failures = precompile.compile_items(precompile.check_items(sys.argv[1:]))
print(json.dumps(failures))
"""


def _launch_workload(cache_dir: Path) -> None:
    """The check workload of OPS in a fresh process whose Triton cache is `cache_dir`."""
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environment["TRITON_CACHE_DIR"] = str(cache_dir)
    result = subprocess.run([sys.executable, "-c", _LOOKUP_SCRIPT, *OPS], capture_output=True, text=True,
                            env=environment, timeout=900)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    assert json.loads(result.stdout.splitlines()[-1]) == []


def _entries(cache_dir: Path) -> set:
    return {path.relative_to(cache_dir) for path in cache_dir.glob("*/*")}


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    folder = tmp_path_factory.mktemp("precompile")
    path = folder / "kernels.tar.xz"
    _fastgen("precompile", "build", *[a for op in OPS for a in ("--op", op)], "--jobs", "2",
             "--cache-dir", str(folder / "built"), "--out", str(path))
    return path


def test_an_installed_archive_serves_every_lookup_of_the_workload(archive, tmp_path):
    manifest = json.load(tarfile.open(archive).extractfile("manifest.json"))
    assert manifest["arch"] == 90 and manifest["sm_count"] == 132 and manifest["ops"] == OPS
    assert manifest["variants"] > 10

    # Installed somewhere else than it was built: the group files must point there.
    cache = tmp_path / "elsewhere" / "cache"
    _fastgen("precompile", "install", str(archive), "--cache-dir", str(cache))
    installed = _entries(cache)
    groups = list(cache.glob("*/__grp__*.json"))
    assert len(groups) == manifest["variants"]
    for group in groups:
        assert all(Path(p).parent == group.parent for p in json.loads(group.read_text())["child_paths"].values())

    _launch_workload(cache)
    assert _entries(cache) == installed, "a launch missed the precompiled cache and compiled anew"

    # The lookups really go to this cache: a variant taken out of it is compiled again.
    removed = groups[0].parent
    for child in removed.iterdir():
        child.unlink()
    removed.rmdir()
    _launch_workload(cache)
    assert any(entry.parent == removed.relative_to(cache) for entry in _entries(cache))


def test_install_refuses_an_archive_for_another_triton(archive, tmp_path):
    forged = archive_with_manifest(archive, tmp_path / "forged.tar.xz", triton_key="0" * 16)
    result = _fastgen("precompile", "install", str(forged), "--cache-dir", str(tmp_path / "cache"), check=False)
    assert result.returncode == 1
    assert "every lookup would miss" in result.stderr
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def _wheel_of_installed_triton(path: Path, libtriton: bytes = None, edit: str = None) -> Path:
    """A wheel holding this Triton's Python sources and libtriton (or the bytes given), with the
    source `edit` changed by one comment line."""
    import triton

    from fastgen.precompile import _installed_libtriton

    root = Path(triton.__file__).parent
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as wheel:
        for source in root.rglob("*.py"):
            name = str(source.relative_to(root.parent))
            data = source.read_bytes() + (b"\n# edited\n" if name == edit else b"")
            wheel.writestr(name, data)
        library = _installed_libtriton()
        if libtriton is None:
            wheel.write(library, f"triton/_C/{library.name}")
        else:
            wheel.writestr("triton/_C/libtriton.so", libtriton)
    return path


def test_wheel_key_reproduces_tritons_own_key(tmp_path):
    from triton.runtime.cache import triton_key

    from fastgen.precompile import triton_key_for_wheel

    same = _wheel_of_installed_triton(tmp_path / "same.whl")
    assert triton_key_for_wheel(same) == triton_key()

    other_library = b"another build of libtriton"
    other = _wheel_of_installed_triton(tmp_path / "other.whl", libtriton=other_library)
    key = triton_key_for_wheel(other)
    assert key != triton_key()
    assert hashlib.sha256(other_library).hexdigest() in key
    assert len(key) == len(triton_key())


def test_wheel_of_another_triton_is_refused(tmp_path):
    from fastgen.precompile import triton_key_for_wheel

    edited = _wheel_of_installed_triton(tmp_path / "edited.whl", libtriton=b"x", edit="triton/runtime/jit.py")
    with pytest.raises(ValueError, match="1 of its .* Python sources differ .*triton/runtime/jit.py"):
        triton_key_for_wheel(edited)


def test_launchers_size_grids_for_the_target_gpu_while_precompiling():
    script = ("from fastgen import kernels, precompile; import torch\n"
              "before = kernels.sm_count(torch.device('cpu'))\n"
              "with precompile.CompileSession(arch=80):\n"
              "    during = kernels.sm_count(torch.device('cpu'))\n"
              "print(before, during, kernels.sm_count(torch.device('cpu')))")
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["None", "108", "None"]


def test_build_rejects_an_unknown_op(tmp_path):
    result = _fastgen("precompile", "build", "--op", "no_such_op", "--cache-dir", str(tmp_path), check=False)
    assert result.returncode == 2
    assert "unknown op(s) ['no_such_op']" in result.stderr


def test_processes_sharing_claims_compile_each_group_once(tmp_path):
    """compile_items groups the items by the label's name (op or benchmark) and dtype and compiles
    a group only where it claims it first; every failure is kept, and a line reports each group."""
    launched = []

    def item(label, fails=False):
        def launch():
            launched.append(label)
            if fails:
                raise ValueError("too much shared memory")
        return label, launch

    # As check_items orders them: case by case, each case in every dtype.
    items = [item("a [1, float32]"), item("a [2, float32]", fails=True), item("b [1, float16]"),
             item("c [1, float32]"), item("c [1, float16]"), item("c [2, float32]")]
    (tmp_path / "1").touch()  # another process has claimed group 1, "b"
    lines = []
    failures = precompile.compile_items(items, tmp_path, report=lines.append)
    assert launched == ["a [1, float32]", "a [2, float32]", "c [1, float32]", "c [2, float32]", "c [1, float16]"]
    assert failures == ["a [2, float32]: ValueError: too much shared memory"]
    assert [line.split(":")[0] for line in lines] == ["a float32", "c float32", "c float16"], lines
    assert lines[0].endswith("2 launch(es) compiled in 0.0 s, 1 FAILED"), lines
    assert sorted(path.name for path in tmp_path.iterdir()) == ["0", "1", "2", "3"]
    launched.clear()
    assert precompile.compile_items(items, tmp_path) == [] and launched == []  # every group taken
    assert len(precompile.compile_items(items)) == 1 and len(launched) == 6  # no claims: every group
