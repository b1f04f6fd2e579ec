"""The command line: training end to end, outputs, bit-for-bit resume, crashes, bad input."""

from __future__ import annotations

import csv
import gzip
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import needle as ndl
from needle.cli import main

from .helpers import REPO_ROOT


def _run_cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m needle ARGS`` in ``cwd`` (a test's own directory: the default --out,
    runs/train, must not be one a user's earlier run left in the checkout)."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "src"))
    return subprocess.run([sys.executable, "-m", "needle", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=cwd)


def _write_idx(path, array: np.ndarray) -> None:
    magic = {1: 0x0801, 3: 0x0803}[array.ndim]
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _synthetic_mnist(folder, n_train=600, n_test=200) -> None:
    """A learnable MNIST-format folder: each class lights a different 4x4 block, plus noise."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28))
        for i, c in enumerate(labels):
            r, col = divmod(int(c), 5)
            images[i, 4 + 10 * r: 8 + 10 * r, 2 + 5 * col: 6 + 5 * col] = 255
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)


def _metrics(out) -> list[dict]:
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_train_on_bundled_digits_writes_outputs_and_learns(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--epochs", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "epoch 4/4" in printed and "final test accuracy" in printed
    rows = _metrics(out)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[-1]["test_acc"]) >= 0.93
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert (out / "checkpoint.npz").is_file()
    try:
        import matplotlib  # noqa: F401

        assert (out / "curves.png").stat().st_size > 1000
    except ImportError:
        assert "matplotlib is not installed" in printed


def test_default_training_reaches_95_percent_in_under_60_seconds(tmp_path, capsys):
    start = time.perf_counter()
    assert main(["train", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    elapsed = time.perf_counter() - start
    final = float(_metrics(tmp_path / "run")[-1]["test_acc"])
    assert final >= 0.95, f"default run reached {final:.4f}"
    assert elapsed < 60
    assert capsys.readouterr().out.count("\n") == 1  # --quiet: only the final line


def test_train_on_generated_mnist_folder_and_eval(tmp_path, capsys):
    data = tmp_path / "mnist"
    data.mkdir()
    _synthetic_mnist(data)
    out = tmp_path / "run"
    assert main(["train", "--data", f"mnist:{data}", "--model", "linear", "--epochs", "3",
                 "--optimizer", "sgd", "--lr", "0.1", "--out", str(out), "--quiet"]) == 0
    assert float(_metrics(out)[-1]["test_acc"]) >= 0.9
    capsys.readouterr()
    assert main(["eval", str(out / "checkpoint.npz")]) == 0
    line = capsys.readouterr().out
    assert "linear on mnist:" in line and "200 test examples" in line
    assert main(["info", str(out / "checkpoint.npz")]) == 0
    assert "needle-checkpoint" in capsys.readouterr().out


def test_resume_is_bit_for_bit_through_the_command_line(tmp_path):
    common = ["--epochs", "4", "--model", "mlp-resnet", "--optimizer", "adamw", "--augment",
              "--quiet"]
    assert main(["train", *common, "--out", str(tmp_path / "straight")]) == 0
    part = ["train", *common[2:], "--out", str(tmp_path / "part")]
    assert main([*part, "--epochs", "2"]) == 0
    assert main(["train", *common, "--resume", str(tmp_path / "part" / "checkpoint.npz"),
                 "--out", str(tmp_path / "resumed")]) == 0
    straight = ndl.load(tmp_path / "straight" / "checkpoint.npz")
    resumed = ndl.load(tmp_path / "resumed" / "checkpoint.npz")
    for key, value in straight["model"].items():
        np.testing.assert_array_equal(resumed["model"][key], value, err_msg=key)
    for index, state in straight["optimizer"]["state"].items():
        for name, value in state.items():
            np.testing.assert_array_equal(resumed["optimizer"]["state"][index][name], value)
    assert resumed["epoch"] == 4 and resumed["step"] == straight["step"]
    assert [r["test_loss"] for r in resumed["history"]] == \
        [r["test_loss"] for r in straight["history"]]


def test_sigkill_during_training_leaves_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "run"
    rng = np.random.default_rng(0)
    last_epoch = 0
    for attempt in range(3):
        resume = ["--resume", str(out / "checkpoint.npz")] if attempt else []
        proc = subprocess.Popen(
            [sys.executable, "-m", "needle", "train", "--model", "linear", "--epochs", "100000",
             "--batch-size", "512", "--out", str(out), "--quiet", *resume],
            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT / "src")),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while (not (out / "checkpoint.npz").exists() or attempt and ndl.checkpoint_info(
                out / "checkpoint.npz")["items"]["epoch"]["value"] <= last_epoch) \
                and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.2, 0.8))  # checkpoints are written many times a second
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = ndl.load(out / "checkpoint.npz")
        assert ckpt["epoch"] >= max(last_epoch, 1)
        assert ckpt["epoch"] == len(ckpt["history"])
        last_epoch = ckpt["epoch"]


@pytest.mark.parametrize(("args", "message"), [
    (["train", "--model", "resnet9000"], "invalid choice: 'resnet9000'"),
    (["train", "--data", "imagenet"], "unknown data 'imagenet'"),
    (["train", "--data", "mnist:/definitely/not/here"], "does not exist"),
    (["train", "--data", "mnist:{tmp}"], "no MNIST files found"),
    (["train", "--data", "cifar10:{tmp}"], "cifar10:"),
    (["train", "--epochs", "0"], "--epochs must be positive"),
    (["eval", "{tmp}/missing.npz"], "missing.npz"),
    (["info", "{tmp}/garbage.npz"], "garbage.npz"),
    (["train", "--resume", "{tmp}/garbage.npz", "--epochs", "1", "--out", "{tmp}/o"],
     "garbage.npz"),
])
def test_bad_input_gets_one_line_and_exit_status_2(tmp_path, args, message):
    (tmp_path / "garbage.npz").write_bytes(b"this is not a checkpoint")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = _run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_resume_from_a_checkpoint_of_another_model_is_refused(tmp_path):
    assert main(["train", "--model", "linear", "--epochs", "1", "--out", str(tmp_path / "a"),
                 "--quiet"]) == 0
    result = _run_cli("train", "--model", "mlp-resnet", "--epochs", "2", "--resume",
                      str(tmp_path / "a" / "checkpoint.npz"), "--out", str(tmp_path / "b"),
                      cwd=tmp_path)
    assert result.returncode == 2
    assert "different model" in result.stderr and "'linear'" in result.stderr


def test_jit_mode_trains_the_same_model_as_eager(tmp_path):
    # SGD: Adam would magnify the float noise in the zero gradient of a Linear bias that
    # feeds a BatchNorm (the JIT's buffer reuse changes NumPy's summation rounding)
    for mode in ("eager", "jit"):
        assert main(["train", "--epochs", "2", "--mode", mode, "--optimizer", "sgd",
                     "--lr", "0.05", "--out", str(tmp_path / mode), "--quiet"]) == 0
    eager = ndl.load(tmp_path / "eager" / "checkpoint.npz")["model"]
    jitted = ndl.load(tmp_path / "jit" / "checkpoint.npz")["model"]
    for key, value in eager.items():
        np.testing.assert_allclose(jitted[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


def test_train_cnn_with_augmentation_on_a_generated_cifar10_folder(tmp_path, capsys):
    from .test_data import _write_cifar

    _write_cifar(tmp_path / "cifar", n=16)
    out = tmp_path / "run"
    assert main(["train", "--data", f"cifar10:{tmp_path / 'cifar'}", "--model", "cnn",
                 "--epochs", "1", "--batch-size", "32", "--augment", "--out", str(out),
                 "--quiet"]) == 0
    rows = _metrics(out)
    assert len(rows) == 1 and 0.0 <= float(rows[0]["test_acc"]) <= 1.0
    assert np.isfinite(float(rows[0]["train_loss"]))
    capsys.readouterr()
    assert main(["eval", str(out / "checkpoint.npz")]) == 0
    assert "cnn on cifar10:" in capsys.readouterr().out
