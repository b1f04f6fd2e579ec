"""What the command line tells a person: ``needle info`` summaries, --arrays and --verify, help
texts with defaults, --version, the final line of ``train``, curves.png and TensorBoard files."""

from __future__ import annotations

import io
import os
import re
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import needle as ndl
from needle._version import __version__
from needle.apps import reporting
from needle.cli import EXIT_USAGE, main

from .helpers import REPO_ROOT

# a linear model on the bundled digits (8x8 images, 10 classes): 64 * 10 + 10 parameters
FAST = ["--model", "linear", "--batch-size", "256", "--optimizer", "sgd", "--lr", "0.1",
        "--momentum", "0.5", "--weight-decay", "0.001", "--quiet"]
LINEAR_PARAMS = 64 * 10 + 10


def _cli(capsys, *args: object) -> tuple[int, str, list[str]]:
    """Run ``needle ARGS`` in this process: (exit status, stdout, stderr lines)."""
    capsys.readouterr()
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err.strip().splitlines()


def _help(capsys, *args: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def _best(history: list[dict]) -> dict:
    """The row of the highest test accuracy, the earliest of equals."""
    top = max(r["test_acc"] for r in history)
    return next(r for r in history if r["test_acc"] == top)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A linear model trained 2 epochs on the digits, then resumed to 3."""
    out = tmp_path_factory.mktemp("ux") / "run"
    assert main(["train", *FAST, "--epochs", "2", "--out", str(out)]) == 0
    assert main(["train", *FAST, "--epochs", "3", "--resume", str(out / "checkpoint.npz"),
                 "--out", str(out)]) == 0
    return out / "checkpoint.npz"


# -- needle info -----------------------------------------------------------------------------------
def test_info_shows_model_data_optimizer_epochs_accuracy_and_file(run, capsys):
    status, out, err = _cli(capsys, "info", run)
    assert status == 0 and err == []
    ckpt = ndl.load(run)
    history, info = ckpt["history"], ndl.checkpoint_info(run)
    last, best = history[-1], _best(history)
    assert len(out.splitlines()) <= 10  # a summary, not one line per array
    assert "model/net" not in out and "array(s)" not in out
    assert f"linear for 8x8x1 images, 10 classes: {LINEAR_PARAMS:,} parameters " \
           f"({LINEAR_PARAMS * 4:,} bytes)" in out
    assert "digits (batch size 256, no augmentation, seed 0)" in out
    assert "sgd: lr 0.1, weight decay 0.001, momentum 0.5" in out
    assert re.search(r"trained +3 epochs \(\d+ steps; eager mode; resumed at epoch 2\)", out)
    assert f"last {last['test_acc']:.4f} (epoch 3), best {best['test_acc']:.4f} " \
           f"(epoch {best['epoch']})" in out
    assert f"needle-checkpoint v1, written by needle {__version__}" in out
    assert f"{info['num_arrays']} arrays" in out and f"({info['array_bytes']:,} bytes)" in out


def test_info_arrays_lists_every_array(run, capsys):
    status, out, _ = _cli(capsys, "info", run, "--arrays")
    assert status == 0
    arrays = ndl.checkpoint_info(run)["arrays"]
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("    ")]
    assert listed == [a["name"] for a in arrays]


def test_info_of_a_checkpoint_not_from_train_summarizes_its_items(tmp_path, capsys):
    path = tmp_path / "plain.npz"
    ndl.save(path, weights={"w": np.ones((2, 3), np.float32)}, epoch=3,
             settings={"a": 1, "b": [1, 2]})
    status, out, _ = _cli(capsys, "info", path)
    assert status == 0
    assert "epoch: int 3" in out and "settings: dict of 2 entries" in out
    assert "weights/w" not in out  # arrays only with --arrays
    assert "weights/w" in _cli(capsys, "info", path, "--arrays")[1]


def _rewrite_arrays(path, change: dict) -> None:
    """Replace the values of some arrays in place, keeping their shape, dtype and a valid zip
    (so only the SHA-256 in the metadata can tell)."""
    with zipfile.ZipFile(path) as archive:
        members = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for info, data in members:
            name = info.filename.removesuffix(".npy")
            if name in change:
                array = np.load(io.BytesIO(data))
                buffer = io.BytesIO()
                np.save(buffer, change[name](array))
                data = buffer.getvalue()
            archive.writestr(info, data)


def test_info_verify_reports_ok(run, capsys):
    status, out, err = _cli(capsys, "info", run, "--verify")
    total = ndl.checkpoint_info(run)["num_arrays"]
    assert status == 0 and err == []
    assert out.splitlines()[-1] == f"checksums: OK, all {total} arrays match their SHA-256"


def test_info_verify_names_every_bad_array_and_exits_2(run, tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(run.read_bytes())
    info = ndl.checkpoint_info(run)
    weight, bias = (a["name"] for a in info["arrays"][:2])  # the model's first two arrays
    _rewrite_arrays(bad, {weight: lambda a: a + 1, bias: lambda a: a * 0 - 1})
    with pytest.raises(ndl.CheckpointError, match="checksum mismatch"):
        ndl.load(bad)
    status, out, err = _cli(capsys, "info", bad, "--verify", "--arrays")
    assert status == EXIT_USAGE
    assert len(err) == 1 and err[0].startswith("needle info: error: ")
    assert f"2 of {info['num_arrays']} arrays fail verification: {weight} (SHA-256 " \
           f"mismatch), {bias} (SHA-256 mismatch)" in err[0]
    marked = [line.split()[0] for line in out.splitlines() if "BAD:" in line]
    assert marked == [weight, bias]
    assert "linear for 8x8x1 images" in out  # the summary still comes first


# -- help, version, no command ---------------------------------------------------------------------
def test_help_of_every_subcommand_shows_defaults(capsys):
    text = " ".join(_help(capsys, "train").split())  # argparse wraps lines
    for default in ("(default: mlp-resnet)", "(default: digits)", "(default: 10)",
                    "(default: 64)", "(default: adam)", "(default: 0.002;",
                    "(default: 0.0001;", "(default: 0.9;", "(default: runs/train)",
                    "(default: eager)", "(default: 0)"):
        assert default in text, default
    assert "--tensorboard DIR" in text and "needle[tensorboard]" in text
    assert "(default: 256)" in " ".join(_help(capsys, "eval").split())
    assert "--verify" in _help(capsys, "info")
    for command in ("train", "eval", "info"):
        page = _help(capsys, command)
        assert "default: None" not in page and "default: False" not in page


def test_version_prints_needle_and_its_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"needle {__version__}\n"


def test_needle_alone_prints_the_help_and_exits_0(capsys):
    status, out, err = _cli(capsys)
    assert status == 0 and err == []
    assert out.startswith("usage: needle") and all(c in out for c in ("train", "eval", "info"))


# -- the final line of train -----------------------------------------------------------------------
def test_final_line_reports_the_best_epoch_and_the_last(tmp_path, capsys):
    out = tmp_path / "run"
    status, printed, _ = _cli(capsys, "train", *FAST, "--epochs", "3", "--out", out)
    assert status == 0
    history = ndl.load(out / "checkpoint.npz")["history"]
    best = _best(history)
    assert printed.strip() == (
        f"final test accuracy: {history[-1]['test_acc']:.4f} (best {best['test_acc']:.4f} at "
        f"epoch {best['epoch']}; linear on digits, 3 epochs; checkpoint "
        f"{out / 'checkpoint.npz'})")


def test_resume_with_fewer_epochs_says_there_is_nothing_to_train(run, tmp_path):
    before = run.read_bytes()
    result = subprocess.run(
        [sys.executable, "-m", "needle", "train", *FAST, "--epochs", "1", "--resume", str(run),
         "--out", str(run.parent)], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == \
        "the checkpoint already has 3 epochs; --epochs 1 asks for fewer: nothing to train"
    assert run.read_bytes() == before


def test_resume_with_as_many_epochs_says_no_more(run, capsys):
    status, printed, _ = _cli(capsys, "train", *FAST, "--epochs", "3", "--resume", run,
                              "--out", run.parent)
    assert status == 0
    assert printed.strip() == \
        "the checkpoint already has 3 epochs; --epochs 3 asks for no more: nothing to train"


# -- curves.png ------------------------------------------------------------------------------------
def _vertical_lines(ax) -> list[float]:
    return [line.get_xdata()[0] for line in ax.get_lines()
            if len(line.get_xdata()) == 2 and line.get_xdata()[0] == line.get_xdata()[1]]


def test_curves_have_whole_epochs_a_log_loss_axis_a_title_the_resume_and_best(
        tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    drawn = []

    def record(*args, **kwargs):
        drawn.append(draw(*args, **kwargs))
        return drawn[-1]

    draw = reporting.curves_figure
    monkeypatch.setattr(reporting, "curves_figure", record)
    out = tmp_path / "run"
    assert main(["train", *FAST, "--epochs", "2", "--out", str(out)]) == 0
    assert main(["train", *FAST, "--epochs", "4", "--resume", str(out / "checkpoint.npz"),
                 "--out", str(out)]) == 0
    assert len(drawn) == 4 and (out / "curves.png").stat().st_size > 1000
    fig = drawn[-1]
    ax_loss, ax_acc = fig.axes
    title = " ".join(text.get_text() for text in fig.texts)
    assert "linear" in title and "digits" in title and "sgd" in title and "lr 0.1" in title
    assert ax_loss.get_yscale() == "log" and ax_acc.get_yscale() == "linear"
    for ax in (ax_loss, ax_acc):
        ticks = ax.get_xticks()
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks
        assert _vertical_lines(ax) == [2]  # resumed after epoch 2
    assert _vertical_lines(drawn[0].axes[0]) == []  # not resumed (yet)
    best = _best(ndl.load(out / "checkpoint.npz")["history"])
    stars = [line for line in ax_acc.get_lines() if line.get_marker() == "*"]
    assert len(stars) == 1
    assert list(stars[0].get_xdata()) == [best["epoch"]]
    assert list(stars[0].get_ydata()) == [best["test_acc"]]


def test_without_matplotlib_training_says_so_and_writes_no_curves(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    out = tmp_path / "run"
    status, printed, _ = _cli(capsys, "train", *FAST[:-1], "--epochs", "1", "--out", out)
    assert status == 0
    assert "matplotlib is not installed" in printed and "needle[plot]" in printed
    assert not (out / "curves.png").exists() and (out / "metrics.csv").exists()


# -- TensorBoard -----------------------------------------------------------------------------------
def test_tensorboard_without_the_extra_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import tensorboardX fails
    status, printed, err = _cli(capsys, "train", *FAST, "--epochs", "1", "--out",
                                tmp_path / "run", "--tensorboard", tmp_path / "tb")
    assert status == EXIT_USAGE and printed == ""
    assert len(err) == 1 and "pip install 'needle[tensorboard]'" in err[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "tb").exists()


def _events(folder) -> list:
    """Every event in the TFRecord files of ``folder`` (files in name order), with
    tensorboardX's protobuf classes: records are (u64 length, u32 crc, data, u32 crc)."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(folder.iterdir()):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i:i + 8])
            events.append(event_pb2.Event.FromString(data[i + 12:i + 12 + length]))
            i += 12 + length + 4
    return events


def test_tensorboard_writes_the_scalars_of_every_epoch(tmp_path):
    pytest.importorskip("tensorboardX")
    out, board = tmp_path / "run", tmp_path / "tb"
    assert main(["train", *FAST, "--epochs", "2", "--out", str(out),
                 "--tensorboard", str(board)]) == 0
    assert main(["train", *FAST, "--epochs", "3", "--resume", str(out / "checkpoint.npz"),
                 "--out", str(out), "--tensorboard", str(board)]) == 0
    events = _events(board)
    scalars = {(value.tag, event.step): value.simple_value
               for event in events for value in event.summary.value}
    history = ndl.load(out / "checkpoint.npz")["history"]
    expected = {}
    for row in history:
        for tag, key in (("loss/train", "train_loss"), ("loss/test", "test_loss"),
                         ("accuracy/train", "train_acc"), ("accuracy/test", "test_acc")):
            expected[tag, row["epoch"]] = np.float32(row[key])
        expected["lr", row["epoch"]] = np.float32(0.1)
    assert scalars == expected
    # the resumed run tells TensorBoard to drop what it retrains (from epoch 3 on)
    starts = [event.step for event in events if event.HasField("session_log")]
    assert starts == [1, 3]


def test_tensorboard_runs_started_in_the_same_second_keep_their_own_files(tmp_path):
    pytest.importorskip("tensorboardX")
    row = {"epoch": 1, "train_loss": 1.0, "test_loss": 1.0, "train_acc": 0.5, "test_acc": 0.5}
    for epoch in (1, 2, 3):  # far less than a second apart
        writer = reporting.TensorBoardWriter(str(tmp_path), purge_step=epoch)
        writer.write({**row, "epoch": epoch}, lr=0.1)
        writer.close()
    assert len(list(tmp_path.iterdir())) == 3
    steps = [event.step for event in _events(tmp_path) if event.summary.value]
    assert steps == [1] * 5 + [2] * 5 + [3] * 5
