"""The command line never loses a run and answers bad input with one line: earlier runs are not
replaced silently, diverging runs stop before saving, unwritable or full folders, bad data and
bad checkpoints give one line on stderr and exit 2 (3 for a diverged run), no traceback."""

from __future__ import annotations

import copy
import errno
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

import needle as ndl
from needle.apps import reporting, trainer
from needle.checkpoint import archive
from needle.cli import EXIT_BROKEN_PIPE, EXIT_DIVERGED, EXIT_USAGE, main

from .helpers import REPO_ROOT
from .test_cli import _write_idx

FAST = ["--model", "linear", "--epochs", "1", "--batch-size", "256", "--quiet"]


def _cli(capsys, *args: str) -> tuple[int, str, list[str]]:
    """Run ``needle ARGS`` in this process: (exit status, stdout, stderr lines)."""
    capsys.readouterr()
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err.strip().splitlines()


def _one_error(capsys, *args: str, status: int = EXIT_USAGE) -> str:
    """Run ``needle ARGS``, check it fails with ``status`` and one stderr line; return it."""
    code, _, lines = _cli(capsys, *args)
    assert code == status, lines
    assert len(lines) == 1, lines
    return lines[0]


def _snapshot(folder) -> dict[str, bytes]:
    """Every file in ``folder`` with its bytes (to show that nothing changed)."""
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def _good_run(capsys, out, *extra: str) -> dict[str, bytes]:
    """A finished one-epoch run in ``out``; returns the bytes of what it wrote."""
    code, _, lines = _cli(capsys, "train", *FAST, "--out", out, *extra)
    assert code == 0, lines
    return _snapshot(out)


# -- earlier runs are not replaced silently -----------------------------------------------------
def test_training_into_an_earlier_run_is_refused_unless_overwrite_or_resume(tmp_path, capsys):
    out = tmp_path / "run"
    before = _good_run(capsys, out)
    line = _one_error(capsys, "train", *FAST, "--seed", "1", "--out", out)
    assert "already holds an earlier run" in line and "--resume" in line and "--overwrite" in line
    assert _snapshot(out) == before
    # resuming that very checkpoint into its own folder continues the run
    code, _, _ = _cli(capsys, "train", *FAST, "--epochs", "2", "--out", out,
                      "--resume", out / "checkpoint.npz")
    assert code == 0 and ndl.load(out / "checkpoint.npz")["epoch"] == 2
    # --overwrite replaces it: a fresh one-epoch run
    code, _, _ = _cli(capsys, "train", *FAST, "--seed", "1", "--out", out, "--overwrite")
    assert code == 0 and ndl.load(out / "checkpoint.npz")["epoch"] == 1


def test_resuming_another_checkpoint_into_an_earlier_run_is_refused(tmp_path, capsys):
    _good_run(capsys, tmp_path / "a")
    before = _good_run(capsys, tmp_path / "b", "--seed", "1")
    line = _one_error(capsys, "train", *FAST, "--epochs", "2", "--out", tmp_path / "b",
                      "--resume", tmp_path / "a" / "checkpoint.npz")
    assert "--overwrite" in line
    assert _snapshot(tmp_path / "b") == before


# -- options are checked up front -----------------------------------------------------------------
@pytest.mark.parametrize(("option", "value"), [
    ("--lr", "nan"), ("--lr", "inf"), ("--lr", "-inf"), ("--lr", "0"),
    ("--weight-decay", "inf"), ("--weight-decay", "nan"), ("--weight-decay", "-1"),
    ("--momentum", "nan"), ("--momentum", "1"), ("--momentum", "-0.5"),
])
def test_non_finite_or_out_of_range_options_are_refused(tmp_path, capsys, option, value):
    out = tmp_path / "run"
    line = _one_error(capsys, "train", *FAST, "--out", out, f"{option}={value}")  # Adam
    assert line.startswith(f"needle train: error: {option} must be") and value in line
    assert not out.exists()


# -- a diverging run stops and saves nothing -------------------------------------------------------
def test_diverging_run_exits_3_and_keeps_the_last_finite_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    before = _good_run(capsys, out, "--optimizer", "sgd", "--lr", "0.1")
    line = _one_error(capsys, "train", *FAST, "--optimizer", "sgd", "--epochs", "2",
                      "--lr", "1e30", "--out", out, "--resume", out / "checkpoint.npz",
                      status=EXIT_DIVERGED)
    assert "epoch 2" in line and "smaller --lr" in line and "(epoch 1) is untouched" in line
    assert _snapshot(out) == before


def test_a_first_epoch_that_diverges_saves_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    line = _one_error(capsys, "train", *FAST, "--optimizer", "sgd", "--lr", "1e30", "--out",
                      out, status=EXIT_DIVERGED)
    assert "epoch 1: the training loss became" in line and "nothing was saved" in line
    assert not (out / "checkpoint.npz").exists() and not (out / "metrics.csv").exists()


def test_a_non_finite_test_loss_is_never_saved(tmp_path, capsys, monkeypatch):
    """The last step of an epoch can break the weights after its (finite) loss was taken."""
    out = tmp_path / "run"
    before = _good_run(capsys, out)
    monkeypatch.setattr(trainer, "evaluate", lambda model, dataset: (float("nan"), 0.1))
    line = _one_error(capsys, "train", *FAST, "--epochs", "2", "--out", out,
                      "--resume", out / "checkpoint.npz", status=EXIT_DIVERGED)
    assert "the test loss became nan" in line
    assert _snapshot(out) == before


def _rewrite_checkpoint(src, dst, **changes) -> None:
    ckpt = ndl.load(src)
    ckpt.update(changes)
    ndl.save(dst, **ckpt)


def test_resuming_a_checkpoint_whose_lr_is_nan_is_refused(tmp_path, capsys):
    _good_run(capsys, tmp_path / "a")
    ckpt = ndl.load(tmp_path / "a" / "checkpoint.npz")
    optimizer = copy.deepcopy(ckpt["optimizer"])
    optimizer["hyperparams"]["lr"] = float("nan")
    _rewrite_checkpoint(tmp_path / "a" / "checkpoint.npz", tmp_path / "nan.npz",
                        optimizer=optimizer, config={**ckpt["config"], "lr": float("nan")})
    line = _one_error(capsys, "train", *FAST, "--epochs", "2", "--out", tmp_path / "b",
                      "--resume", tmp_path / "nan.npz")
    assert "optimizer lr must be a positive number, got nan" in line and "give --lr" in line
    assert not (tmp_path / "b" / "checkpoint.npz").exists()
    # an explicit --lr replaces it
    code, _, _ = _cli(capsys, "train", *FAST, "--epochs", "2", "--out", tmp_path / "b",
                      "--resume", tmp_path / "nan.npz", "--lr", "0.01")
    assert code == 0
    assert ndl.load(tmp_path / "b" / "checkpoint.npz")["optimizer"]["hyperparams"]["lr"] == 0.01


# -- resuming: the config records the hyperparameters the optimizer uses --------------------------
def _hyper_and_config(path) -> tuple[dict, dict]:
    ckpt = ndl.load(path)
    return ckpt["optimizer"]["hyperparams"], ckpt["config"]


def test_resume_applies_explicit_hyperparameters_and_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    _good_run(capsys, out, "--lr", "0.002", "--weight-decay", "0.001")
    code, printed, _ = _cli(capsys, "train", *FAST[:-1], "--epochs", "2", "--out", out,
                            "--resume", out / "checkpoint.npz", "--lr", "0.001")
    assert code == 0
    assert "resuming with lr 0.001 (checkpoint had 0.002)" in printed
    hyper, config = _hyper_and_config(out / "checkpoint.npz")
    assert hyper["lr"] == config["lr"] == 0.001
    assert hyper["weight_decay"] == config["weight_decay"] == 0.001   # not given: kept


def test_resume_without_options_keeps_the_checkpoints_hyperparameters(tmp_path, capsys):
    out = tmp_path / "run"
    _good_run(capsys, out, "--lr", "0.005", "--weight-decay", "0.003")
    code, printed, _ = _cli(capsys, "train", *FAST[:-1], "--epochs", "2", "--out", out,
                            "--resume", out / "checkpoint.npz")
    assert code == 0 and "resuming with" not in printed
    hyper, config = _hyper_and_config(out / "checkpoint.npz")
    assert hyper["lr"] == config["lr"] == 0.005
    assert hyper["weight_decay"] == config["weight_decay"] == 0.003


def test_resume_can_change_sgd_momentum_both_ways(tmp_path, capsys):
    out = tmp_path / "run"
    sgd = ["--optimizer", "sgd", "--lr", "0.1"]
    _good_run(capsys, out, *sgd, "--momentum", "0")
    for epochs, momentum in (("2", "0.5"), ("3", "0"), ("4", None)):
        given = ["--momentum", momentum] if momentum is not None else []
        code, _, lines = _cli(capsys, "train", *FAST, "--optimizer", "sgd", "--epochs", epochs,
                              "--out", out, "--resume", out / "checkpoint.npz", *given)
        assert code == 0, lines
        hyper, config = _hyper_and_config(out / "checkpoint.npz")
        assert hyper["momentum"] == config["momentum"] == float(momentum or 0)
        assert hyper["lr"] == config["lr"] == 0.1


# -- outputs that cannot be written ----------------------------------------------------------------
def test_out_that_is_a_file_or_under_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_bytes(b"mine")
    line = _one_error(capsys, "train", *FAST, "--out", tmp_path / "file")
    assert "is a file, not a folder" in line
    line = _one_error(capsys, "train", *FAST, "--out", tmp_path / "file" / "run")
    assert "is a file, not a folder" in line
    assert (tmp_path / "file").read_bytes() == b"mine"


def test_read_only_output_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    before = _good_run(capsys, out)
    os.chmod(out, 0o555)
    try:
        if os.access(out, os.W_OK):
            pytest.skip("running as root: chmod does not stop writes")
        line = _one_error(capsys, "train", *FAST, "--epochs", "2", "--out", out,
                          "--resume", out / "checkpoint.npz")
        assert "cannot write" in line
        assert _snapshot(out) == before
    finally:
        os.chmod(out, 0o755)


@pytest.mark.parametrize(("code", "words"), [
    (errno.EACCES, "permission denied"),
    (errno.EROFS, "read-only"),
    (errno.ENOSPC, "the disk is full"),
])
def test_checkpoint_that_cannot_be_written_gives_one_line(tmp_path, capsys, monkeypatch, code,
                                                          words):
    """As a read-only or full folder answers (simulated, so that it also runs as root)."""
    out = tmp_path / "run"
    before = _good_run(capsys, out)

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(archive, "_write_array", refuse)
    line = _one_error(capsys, "train", *FAST, "--epochs", "2", "--out", out,
                      "--resume", out / "checkpoint.npz")
    assert words in line and "checkpoint.npz" in line
    assert _snapshot(out) == before                       # no temporary file either


def test_full_disk_while_writing_metrics_leaves_no_temp_file(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    before = _good_run(capsys, out)

    def full(self, row):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(reporting.csv.DictWriter, "writerow", full)
    line = _one_error(capsys, "train", *FAST, "--epochs", "2", "--out", out,
                      "--resume", out / "checkpoint.npz")
    assert "metrics.csv" in line and "the disk is full" in line
    assert sorted(os.listdir(out)) == sorted(before)       # no metrics.csv.tmp
    assert (out / "metrics.csv").read_bytes() == before["metrics.csv"]
    assert ndl.load(out / "checkpoint.npz")["epoch"] == 2  # the checkpoint itself was written


def test_write_metrics_removes_its_temp_file_on_any_error(tmp_path, monkeypatch):
    path = tmp_path / "metrics.csv"
    path.write_text("earlier\n")
    monkeypatch.setattr(reporting.os, "replace",
                        lambda a, b: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError):
        reporting.write_metrics(str(path), [])
    assert os.listdir(tmp_path) == ["metrics.csv"] and path.read_text() == "earlier\n"


# -- data that cannot train ------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1])
def test_empty_training_split_is_refused(tmp_path, capsys, n):
    data = tmp_path / "mnist"
    data.mkdir()
    _write_idx(data / "t10k-images-idx3-ubyte.gz", np.zeros((n, 28, 28)))
    _write_idx(data / "t10k-labels-idx1-ubyte.gz", np.zeros(n))
    line = _one_error(capsys, "train", *FAST, "--data", f"mnist:{data}", "--out",
                      tmp_path / "run")
    assert "the training split has no images" in line


def test_mnist_labels_outside_the_classes_are_refused(tmp_path, capsys):
    data = tmp_path / "mnist"
    data.mkdir()
    _write_idx(data / "t10k-images-idx3-ubyte.gz", np.zeros((10, 28, 28)))
    _write_idx(data / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 200]))
    line = _one_error(capsys, "train", *FAST, "--data", f"mnist:{data}", "--out",
                      tmp_path / "run")
    assert "labels must lie in 0..9" in line and "200" in line


def test_a_data_file_that_cannot_be_read_gives_one_line(tmp_path, capsys, monkeypatch):
    from needle.data import mnist

    data = tmp_path / "mnist"
    data.mkdir()
    _write_idx(data / "t10k-images-idx3-ubyte.gz", np.zeros((10, 28, 28)))
    _write_idx(data / "t10k-labels-idx1-ubyte.gz", np.zeros(10))

    def unreadable(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(mnist, "open", unreadable, raising=False)
    line = _one_error(capsys, "train", *FAST, "--data", f"mnist:{data}", "--out",
                      tmp_path / "run")
    assert "t10k-images-idx3-ubyte.gz" in line and "Permission denied" in line


def _cifar_folder(folder, labels) -> None:
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": np.zeros((len(labels), 3072), np.uint8), b"labels": list(labels)}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)


@pytest.mark.parametrize("label", [1e30, 2**70, 0.7, -1, 10, float("nan"), "3"])
def test_cifar_labels_that_are_not_classes_are_refused(tmp_path, capsys, label):
    _cifar_folder(tmp_path / "cifar", [1, label, 2])
    line = _one_error(capsys, "train", *FAST, "--data", f"cifar10:{tmp_path / 'cifar'}",
                      "--out", tmp_path / "run")
    assert "data_batch_1: label 1 is" in line and "0..9" in line


# -- checkpoints that are well formed but hold bad values ------------------------------------------
@pytest.fixture
def good_checkpoint(tmp_path, capsys):
    _good_run(capsys, tmp_path / "good")
    return tmp_path / "good" / "checkpoint.npz"


@pytest.mark.parametrize(("field", "value", "words"), [
    ("rng", ("MT19937", np.zeros(3, np.uint32), 0, 0, 0.0), "RNG state"),
    ("rng", "x", "RNG state"),
    ("history", "abc", "expected a list"),
    ("history", 5, "expected a list"),
    ("history", [{"epoch": 1}], "row 0 needs"),
    ("epoch", None, "expected a count"),
    ("epoch", -1, "expected a count"),
    ("step", "7", "expected a count"),
    ("model", {"x": np.ones(3)}, "missing keys"),
    ("model", 3, "state dict"),
    ("optimizer", [], "optimizer state dict"),
    ("loader", {"order": np.arange(3)}, "batch_index"),
    ("config", {"identity": 5}, "identity"),
])
def test_checkpoint_with_a_bad_field_is_refused_naming_it(tmp_path, capsys, good_checkpoint,
                                                          field, value, words):
    bad = tmp_path / "bad.npz"
    _rewrite_checkpoint(good_checkpoint, bad, **{field: value})
    line = _one_error(capsys, "train", *FAST, "--epochs", "2", "--out", tmp_path / "b",
                      "--resume", bad)
    assert f"'{field}'" in line and words in line
    assert not (tmp_path / "b" / "checkpoint.npz").exists()


@pytest.mark.parametrize(("field", "value"), [("epoch", None), ("model", {"x": np.ones(3)}),
                                              ("config", {"identity": 5})])
def test_eval_of_a_checkpoint_with_a_bad_field_names_it(tmp_path, capsys, good_checkpoint,
                                                        field, value):
    bad = tmp_path / "bad.npz"
    _rewrite_checkpoint(good_checkpoint, bad, **{field: value})
    assert f"'{field}'" in _one_error(capsys, "eval", bad)


# -- needle info -----------------------------------------------------------------------------------
def test_info_of_a_path_under_a_file(tmp_path, capsys):
    (tmp_path / "a_file").write_bytes(b"x")
    line = _one_error(capsys, "info", tmp_path / "a_file" / "x.npz")
    assert "no such checkpoint file" in line


def test_info_into_a_closed_pipe_exits_quietly(tmp_path, capsys, good_checkpoint):
    """``needle info ckpt | head``: the reader is gone before needle writes."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "src"))
    proc = subprocess.Popen([sys.executable, "-m", "needle", "info", str(good_checkpoint)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()                                    # before needle has even imported
    err = proc.stderr.read()
    proc.stderr.close()
    assert (proc.wait(timeout=120), err) == (EXIT_BROKEN_PIPE, b"")
