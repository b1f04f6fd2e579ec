"""The Python examples of the README and the docs run as written."""

from __future__ import annotations

import re

import pytest

from .helpers import REPO_ROOT


def _run_examples(path) -> None:
    code = "\n".join(re.findall(r"```python\n(.*?)```", path.read_text(), re.S))
    assert code.strip(), f"{path} has no python examples"
    exec(compile(code, str(path), "exec"), {})


def test_readme_python_examples_run(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing an example writes lands in the repository
    _run_examples(REPO_ROOT / "README.md")
    assert "[10.107339]" in capsys.readouterr().out  # the lecture's example: e(e + 1)


@pytest.mark.parametrize("name", ["eager.md", "jit.md", "static.md", "caffe.md",
                                  "adding_an_op.md", "profiling.md"])
def test_doc_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples may write files (a solver snapshot)
    _run_examples(REPO_ROOT / "docs" / name)


def test_export_doc_examples_run(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    _run_examples(REPO_ROOT / "docs" / "export.md")
