"""The package's layout: its modules import one another without a cycle, function-level imports
included, so any of them can be imported first and a change in one never needs a workaround in
another; and an op family is its own files, found by name, so adding one edits nothing else."""
import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The folders installed as fastgen's packages (setup.py's package_dir), and the module built
# from other sources than a .py file: setup.py's CUDA extension.
PACKAGE_DIRS = {"fastgen": "fastgen", "fastgen.kernels": "kernels", "fastgen.bench": "bench"}
EXTENSION_MODULES = {"fastgen._C"}


def _package_modules() -> dict:
    modules = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in (ROOT / folder).glob("**/*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            modules[".".join((package, *parts))] = path
    return modules


def _imported_modules(path: Path, modules: set) -> set:
    """The project's modules that `path` imports anywhere in it. `from package import name`
    imports the module package.name when there is one, and otherwise the package itself."""
    named = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & modules
            named.update(submodules or {node.module})
    imported = set()
    for name in named:
        while name and name not in modules:  # `import a.b.c` of an attribute path: its module
            name = name.rpartition(".")[0]
        if name:
            imported.add(name)
    return imported


def _cycles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, lowest, stack, on_stack, components = {}, {}, [], set(), []

    def visit(module):
        index[module] = lowest[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph[module]:
            if imported not in index:
                visit(imported)
                lowest[module] = min(lowest[module], lowest[imported])
            elif imported in on_stack:
                lowest[module] = min(lowest[module], index[imported])
        if lowest[module] == index[module]:
            component = set()
            while module not in component:
                component.add(stack.pop())
            on_stack.difference_update(component)
            if len(component) > 1:
                components.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    return components


def test_no_module_imports_itself_through_others():
    modules = _package_modules()
    known = set(modules) | EXTENSION_MODULES
    graph = {name: _imported_modules(path, known) - {name} for name, path in modules.items()}
    graph.update({name: set() for name in EXTENSION_MODULES})
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_document_a_file_cites_is_in_the_repository():
    """A source file that sends the reader to a document (a specification, a design note) sends
    them nowhere unless the repository holds it: the project states what it relies on itself."""
    folders = ("fastgen", "kernels", "csrc", "bench", "tests", ".ci")
    files = [path for folder in folders for path in (ROOT / folder).glob("**/*") if path.is_file()
             and "results" not in path.relative_to(ROOT).parts] + [p for p in ROOT.iterdir() if p.is_file()]
    sources = [path for path in files if path.suffix in (".py", ".cu", ".h", ".cpp", ".sh", ".toml", ".md", "")]
    documents = {path.name for path in files if path.suffix == ".md"}
    missing = {(str(path.relative_to(ROOT)), name) for path in sources
               for name in re.findall(r"\b([A-Z][A-Z_]*\.md)\b", path.read_text(errors="replace"))
               if name not in documents}
    assert not missing, sorted(missing)


# The worked example of CONTRIBUTING.md: "### path" headings, each followed by the file's code block.
_EXAMPLE_FILE = re.compile(r"^### ((?:fastgen/ops|kernels|bench|tests)/\w+\.py)\n.*?^```python\n(.*?)^```$",
                           re.MULTILINE | re.DOTALL)

# Run in a copy of the package holding the example family: each place that discovers families
# finds it, and its check cases pass through every backend it registers.
_DISCOVERY_CHECK = """
import torch
import fastgen, fastgen.bench, fastgen.profile
from fastgen.check import check_op
from fastgen.ops.registry import FAST_BACKENDS
assert fastgen.__file__.startswith(ROOT), fastgen.__file__
assert "square" in fastgen.__all__ and callable(fastgen.square)
op = fastgen.OPS["square"]
results = [r for backend in FAST_BACKENDS for r in check_op(op, backend, torch.device("cpu"))]
assert results and all(r.status == "ok" for r in results), results
x = torch.randn(4, 5)
assert torch.equal(torch.ops.fastgen.square(x), x * x)
assert [b.name for b in fastgen.bench.benchmarks(quick=True) if b.name == "square"] == ["square"]
assert fastgen.profile.op_families()["square"] == "square"
assert fastgen.profile.kernel_families()["_square_kernel"] == "square"
print("checked", len(results), "cases")
"""


def test_a_new_op_family_is_its_five_files(tmp_path):
    """CONTRIBUTING.md's example family, written into a copy of the package, is found by the
    op registry, the public names, `fastgen check`, the benchmark suite and `fastgen profile`,
    and its own tests pass: no list elsewhere needs the family's name."""
    example = dict(_EXAMPLE_FILE.findall((ROOT / "CONTRIBUTING.md").read_text()))
    assert sorted(example) == ["bench/ops_square.py", "fastgen/ops/square.py", "kernels/square.py",
                               "tests/test_square.py"]
    # The package as installed (kernels/ as fastgen/kernels, ...), and the tests' conftest.
    installed = {folder: package.replace(".", "/") for package, folder in PACKAGE_DIRS.items()}
    for folder, target in installed.items():
        shutil.copytree(ROOT / folder, tmp_path / target, ignore=shutil.ignore_patterns("__pycache__", "*.so", "results"))
    shutil.copytree(ROOT / "tests", tmp_path / "tests", ignore=shutil.ignore_patterns("__pycache__", "test_*.py"))
    for relative, text in example.items():
        folder, rest = relative.split("/", 1)
        target = tmp_path / installed.get(folder, folder) / rest
        assert not target.exists(), f"{relative} exists already"
        target.write_text(text)

    # The copy comes first on the path, before the installed fastgen.
    environment = {**os.environ, "PYTHONPATH": str(tmp_path), "TRITON_INTERPRET": "1"}
    check = subprocess.run([sys.executable, "-c", f"ROOT = {str(tmp_path)!r}\n" + _DISCOVERY_CHECK],
                           cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600)
    assert check.returncode == 0, check.stderr[-4000:]
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_square.py"],
                           cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600)
    assert tests.returncode == 0 and "5 passed" in tests.stdout, tests.stdout[-4000:] + tests.stderr[-4000:]
