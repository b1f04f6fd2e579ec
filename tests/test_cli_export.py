"""``needle export``: the model of a training checkpoint, in eval mode with a free batch size,
as a needle program (run by ``ndl.load_program``) or an ONNX model (run by onnxruntime),
computing what the rebuilt model computes; bad input gets one line and exit status 2."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import needle as ndl
from needle.apps.export_command import model_from_checkpoint
from needle.cli import EXIT_USAGE, main

MODELS = ("mlp-resnet", "cnn")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """One epoch of each model on the bundled digits, trained by the command line."""
    paths = {}
    for model in MODELS:
        out = tmp_path_factory.mktemp(model)
        status = main(["train", "--model", model, "--epochs", "1", "--batch-size", "256",
                       "--quiet", "--out", str(out)])
        assert status == 0
        paths[model] = str(out / "checkpoint.npz")
    return paths


def _cli(capsys, *args: object) -> tuple[int, str, list[str]]:
    capsys.readouterr()
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err.strip().splitlines()


def _one_error(capsys, *args: object) -> str:
    status, _, lines = _cli(capsys, *args)
    assert status == EXIT_USAGE, lines
    assert len(lines) == 1, lines
    return lines[0]


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(n).random((n, 8, 8, 1), dtype=np.float32)


def _eval_output(checkpoint: str, x: np.ndarray) -> np.ndarray:
    model, _, _ = model_from_checkpoint(checkpoint)  # (an eval-mode model, rebuilt)
    assert not model.training
    return model(ndl.Tensor(x)).numpy()


@pytest.mark.parametrize("model", MODELS)
def test_program_export_runs_like_the_models_eval_forward(checkpoints, tmp_path, capsys,
                                                          model):
    path = tmp_path / "model.npz"
    status, out, err = _cli(capsys, "export", checkpoints[model], "--format", "program",
                            "-o", path)
    assert status == 0, err
    assert f"exported {model}, trained 1 epoch as a needle program" in out
    program = ndl.load_program(path)
    assert program.input_names == ["images"]
    assert program.spec["training"] is False
    for n in (1, 7):  # any batch size
        x = _images(n)
        assert np.array_equal(program(x).numpy(), _eval_output(checkpoints[model], x))


@pytest.mark.parametrize("model", MODELS)
def test_onnx_export_runs_in_onnxruntime_like_the_model(checkpoints, tmp_path, capsys, model):
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "model.onnx"
    status, out, err = _cli(capsys, "export", checkpoints[model], "--format", "onnx", "-o",
                            path)
    assert status == 0, err
    assert "as an ONNX model" in out
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 7):
        x = _images(n)
        (y,) = session.run(None, {"images": x})
        expected = _eval_output(checkpoints[model], x)
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_batch_size_fixes_the_programs_batch(checkpoints, tmp_path, capsys):
    path = tmp_path / "fixed.npz"
    status, out, _ = _cli(capsys, "export", checkpoints["mlp-resnet"], "-o", path,
                          "--batch-size", 5)
    assert status == 0 and "float32[5,8,8,1]" in out
    program = ndl.load_program(path)
    x = _images(5)
    assert np.array_equal(program(x).numpy(), _eval_output(checkpoints["mlp-resnet"], x))
    with pytest.raises(ValueError, match="expected shape"):
        program(_images(6))


def test_an_existing_output_is_kept_unless_overwrite(checkpoints, tmp_path, capsys):
    path = tmp_path / "model.npz"
    path.write_bytes(b"earlier work")
    line = _one_error(capsys, "export", checkpoints["mlp-resnet"],
                      "-o", path)
    assert "already exists" in line and "--overwrite" in line
    assert path.read_bytes() == b"earlier work"
    status, _, _ = _cli(capsys, "export", checkpoints["mlp-resnet"], "-o", path, "--overwrite")
    assert status == 0
    assert ndl.load_program(path).input_names == ["images"]


def test_bad_checkpoints_and_outputs_get_one_line(checkpoints, tmp_path, capsys):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a checkpoint")
    assert "garbage.npz" in _one_error(capsys, "export", garbage, "-o", tmp_path / "a.npz")
    assert "no such checkpoint" in _one_error(capsys, "export", tmp_path / "missing.npz",
                                              "-o", tmp_path / "a.npz")
    program = tmp_path / "program.npz"  # a needle file, but not a training checkpoint
    ndl.export(lambda x: x * 2, np.ones((2, 2), np.float32)).save(program)
    assert "not a training checkpoint" in _one_error(capsys, "export", program, "-o",
                                                     tmp_path / "b.npz")
    assert "is a folder" in _one_error(capsys, "export", checkpoints["cnn"], "-o", tmp_path)
    assert "does not exist" in _one_error(capsys, "export", checkpoints["cnn"], "-o",
                                          tmp_path / "no" / "such" / "folder.npz")
    assert "must be positive" in _one_error(capsys, "export", checkpoints["cnn"], "-o",
                                            tmp_path / "c.npz", "--batch-size", 0)
    assert not (tmp_path / "a.npz").exists() and not (tmp_path / "c.npz").exists()


def test_an_unknown_format_is_a_usage_error(checkpoints, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", checkpoints["cnn"], "--format", "tflite", "-o", str(tmp_path / "x")])
    assert exit_info.value.code == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid choice: 'tflite'" in err[0]


def test_onnx_without_the_extra_says_how_to_install_it(checkpoints, tmp_path, capsys,
                                                       monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError
    line = _one_error(capsys, "export", checkpoints["cnn"], "--format", "onnx", "-o",
                      tmp_path / "m.onnx")
    assert "pip install 'needle[onnx]'" in line
    assert not (tmp_path / "m.onnx").exists()
