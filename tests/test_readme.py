"""The README's Python examples run as written."""

from __future__ import annotations

import re

from .helpers import REPO_ROOT


def test_readme_python_examples_run(capsys):
    text = (REPO_ROOT / "README.md").read_text()
    code = "\n".join(re.findall(r"```python\n(.*?)```", text, re.S))
    assert "st.Session()" in code
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "[10.107339]" in printed  # the lecture's example: exp(1) * (exp(1) + 1)
