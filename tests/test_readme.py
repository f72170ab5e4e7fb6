"""The README's examples run as written: every ```python block is executed (on the tiny configs,
in a scratch directory) unless the line above it is `<!-- readme-test: skip: REASON -->`; and the
first two ```bash blocks stay the install-and-run commands .ci/run executes."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"(?:^<!-- readme-test: skip: (?P<reason>.+?) -->\n)?^```(?P<lang>\w*)\n(?P<code>.*?)^```$",
                    re.MULTILINE | re.DOTALL)


def _blocks(language: str) -> list:
    """(line number, code, skip reason or None) of each block in `language`, in order."""
    text = README.read_text()
    return [(text.count("\n", 0, m.start("code")), m["code"], m["reason"])
            for m in _BLOCK.finditer(text) if m["lang"] == language]


PYTHON = _blocks("python")


def test_ci_commands_are_the_first_two_bash_blocks():
    commands = [code.strip() for _, code, _ in _blocks("bash")[:2]]
    assert commands == [
        "pip install torch==2.13.0 && pip install -e . && fastgen bench",
        'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q -n auto',
    ]


def test_most_examples_run():
    assert len(PYTHON) >= 4
    assert sum(reason is None for _, _, reason in PYTHON) >= 3


@pytest.mark.parametrize("line, code, skip", PYTHON, ids=[f"README.md:{line}" for line, _, _ in PYTHON])
def test_python_example(line, code, skip, tmp_path, monkeypatch):
    if skip is not None:
        pytest.skip(skip)
    monkeypatch.chdir(tmp_path)  # examples write their outputs (profiles/...) where they run
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
