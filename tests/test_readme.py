"""The README's code blocks run and print what they claim."""

import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    # Whole programs import the library; the others are fragments of them.
    blocks = [b for b in blocks if "import functorch_lite as fl" in b]
    assert len(blocks) >= 2
    for block in blocks:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, str(README), "exec"), {})
        printed = out.getvalue().split()
        if "step.stats.compiles" in block:
            assert printed[-1] == "1", printed  # the static path compiles once


def test_readme_commands_match_ci():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    test_command = re.search(
        r"^python -m pip install -e \"\.\[test,docs\]\".*$", text, re.M
    )
    assert test_command is not None
    assert test_command.group(0) in ci
    assert "python bench/retrace_vs_scan.py" in text
