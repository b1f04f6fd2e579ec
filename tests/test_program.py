"""Programs as data: export, save, load where the model code is absent, run in every mode."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import needle as ndl
import needle.nn as nn
import needle.static as st
from needle.apps.models import MLPResNet, ResidualCNN, build_model
from needle.checkpoint import CheckpointError
from needle.program import ProgramError

from .helpers import damaged_copies, sum_loss_step
from .models import LSTMLanguageModel, TransformerLanguageModel


def _eval(model: nn.Module) -> nn.Module:
    model.eval()
    return model


def _models():
    rng = np.random.default_rng(0)
    images = rng.standard_normal((6, 8, 8, 1)).astype(np.float32)
    ids = rng.integers(0, 13, (5, 6))
    return {
        "mlp-resnet": (lambda: MLPResNet(64, hidden=16, num_blocks=2),
                       rng.standard_normal((6, 64)).astype(np.float32), True),
        "cnn": (lambda: build_model("cnn", (8, 8, 1), 10), images, True),
        "residual-cnn": (lambda: ResidualCNN(1), images, True),
        # (seq, batch) ids: the batch is not the first axis, so the shapes stay fixed
        "lstm-lm": (LSTMLanguageModel, ids, False),
        "transformer-lm": (TransformerLanguageModel, ids, True),
    }


@pytest.mark.parametrize("name", list(_models()))
def test_round_trip_is_bit_for_bit_at_another_batch_size(name, tmp_path):
    make, example, dynamic = _models()[name]
    np.random.seed(1)
    model = _eval(make())
    prog = ndl.export(model, example, dynamic_batch=dynamic)
    prog.save(tmp_path / "model.npz")
    loaded = ndl.load_program(tmp_path / "model.npz")
    other = np.concatenate([example, example[:3]]) if dynamic else example
    expected = model(ndl.Tensor(other, requires_grad=False)).numpy()
    np.testing.assert_array_equal(loaded(other).numpy(), expected)


def test_a_fresh_process_without_the_model_code_runs_the_program(tmp_path):
    np.random.seed(0)
    model = _eval(TransformerLanguageModel())
    ids = np.random.default_rng(1).integers(0, 13, (4, 6))
    ndl.export(model, ids).save(tmp_path / "lm.npz")
    np.save(tmp_path / "ids.npy", np.concatenate([ids, ids]))
    expected = model(ndl.Tensor(np.concatenate([ids, ids]), requires_grad=False)).numpy()
    script = ("import sys, numpy as np, needle as ndl\n"
              "prog = ndl.load_program(sys.argv[1])\n"
              "np.save(sys.argv[3], prog(np.load(sys.argv[2])).numpy())\n")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "lm.npz"),
                    str(tmp_path / "ids.npy"), str(tmp_path / "out.npy")], check=True,
                   cwd=tmp_path, timeout=120)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)


def test_the_program_runs_in_a_session_and_under_the_jit():
    np.random.seed(0)
    model = _eval(MLPResNet(64, hidden=16, num_blocks=1))
    x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    prog = ndl.export(model, x)
    expected = model(ndl.Tensor(x, requires_grad=False)).numpy()
    with st.Graph():
        p = st.placeholder((None, 64))
        np.testing.assert_array_equal(st.Session().run(prog(p), {p: x}), expected)
    np.testing.assert_array_equal(ndl.jit(prog)(ndl.Tensor(x)).numpy(), expected)


def test_print_shows_the_ir_with_an_unknown_batch():
    prog = ndl.export(lambda x: (x * 2.0).relu().sum(axes=(1,)),
                      np.ones((3, 4), np.float32))
    text = str(prog)
    assert "x0:f32[?,4]" in text
    assert "mul_scalar[scalar=2.0] x0" in text
    assert text.splitlines()[-1].startswith("  in (")


def test_a_module_exported_in_eval_mode_runs_in_eval_mode(tmp_path):
    np.random.seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.BatchNorm1d(4))
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    model(ndl.Tensor(x))  # running statistics move away from their initial values
    model.eval()
    ndl.export(model, x).save(tmp_path / "m.npz")
    model.train()  # the saved program keeps the mode it was exported in
    loaded = ndl.load_program(tmp_path / "m.npz")
    np.testing.assert_array_equal(loaded(x).numpy(), loaded(x).numpy())
    model.eval()
    np.testing.assert_array_equal(loaded(x).numpy(), model(ndl.Tensor(x)).numpy())
    assert loaded.spec["training"] is False


def test_a_training_step_is_refused_naming_its_effects():
    model = nn.Linear(3, 1)
    opt = ndl.optim.SGD(model.parameters(), lr=0.1)

    step = sum_loss_step(model, opt)

    with pytest.raises(ProgramError, match="apply_updates .* cannot be exported"):
        ndl.export(step, np.ones((2, 3), np.float32))


def test_an_attribute_that_depends_on_the_batch_is_refused():
    with pytest.raises(ProgramError, match="depends on the batch size"):
        ndl.export(lambda x: x.sum(axes=(0,)) / float(x.shape[0]),
                   np.ones((4, 3), np.float32))


# -- bad files: one clear error each, nothing executed -------------------------------------------
def _saved(tmp_path):
    prog = ndl.export(lambda x: (x @ ndl.Tensor(np.eye(3, dtype=np.float32))).relu(),
                      np.ones((2, 3), np.float32))
    path = tmp_path / "p.npz"
    prog.save(path)
    return prog, path


def _rewrite(tmp_path, spec_change) -> str:
    prog, _ = _saved(tmp_path)
    spec = json.loads(json.dumps(prog.spec))
    spec_change(spec)
    path = tmp_path / "bad.npz"
    ndl.save(path, program={**spec, "arrays": prog.arrays})
    return path


def test_unknown_op_is_named(tmp_path):
    path = _rewrite(tmp_path, lambda s: s["nodes"][0].update(op="frobnicate"))
    with pytest.raises(ProgramError, match="unknown op 'frobnicate'"):
        ndl.load_program(path)


def test_newer_format_version_is_refused(tmp_path):
    path = _rewrite(tmp_path, lambda s: s.update(version=99))
    with pytest.raises(ProgramError, match="newer than this needle"):
        ndl.load_program(path)


def test_a_cycle_or_missing_input_is_named(tmp_path):
    def cycle(spec):
        spec["nodes"][0]["inputs"] = [spec["nodes"][-1]["id"]]

    with pytest.raises(ProgramError, match="not defined before it"):
        ndl.load_program(_rewrite(tmp_path, cycle))
    with pytest.raises(ProgramError, match="not defined before it"):
        ndl.load_program(_rewrite(tmp_path, lambda s: s["nodes"][0].update(inputs=[999])))


def test_a_shape_that_disagrees_is_named(tmp_path):
    def wrong_shape(spec):
        spec["nodes"][0]["shape"] = [None, 7]

    with pytest.raises(ProgramError, match="disagrees with the stored"):
        ndl.load_program(_rewrite(tmp_path, wrong_shape))


def test_missing_array_is_named(tmp_path):
    prog, _ = _saved(tmp_path)
    path = tmp_path / "noarray.npz"
    ndl.save(path, program={**prog.spec, "arrays": {}})
    with pytest.raises(ProgramError, match="is missing"):
        ndl.load_program(path)


def test_truncated_file_and_hash_mismatch_are_refused(tmp_path):
    _, path = _saved(tmp_path)
    cut, flipped = damaged_copies(path, tmp_path)
    with pytest.raises(CheckpointError):
        ndl.load_program(cut)
    with pytest.raises(CheckpointError, match="(?i)sha-256|hash|corrupt"):
        ndl.load_program(flipped)


def test_a_checkpoint_is_not_a_program(tmp_path):
    ndl.save(tmp_path / "ckpt.npz", weights=np.ones(3))
    with pytest.raises(ProgramError, match="not a needle program"):
        ndl.load_program(tmp_path / "ckpt.npz")


def test_a_saved_program_holds_only_json_and_npy_members(tmp_path):
    # the file is data: JSON metadata and .npy arrays, no pickle, nothing importable
    _, path = _saved(tmp_path)
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    assert all(n.endswith((".npy", ".json")) for n in names), names


def test_numpy_scalar_attributes_keep_their_dtype(tmp_path):
    """``x * np.float64(c)`` and ``x * c`` round differently on float32 data (NEP 50): a
    loaded program must apply the same kind of scalar (it wrote Python floats before)."""
    c = np.float64(2.0) / np.sqrt(np.pi)

    def fn(x):
        return ndl.exp(x) * c + np.float32(0.1) * x

    x = np.random.default_rng(3).standard_normal((64, 7)).astype(np.float32)
    prog = ndl.export(fn, x)
    prog.save(tmp_path / "p.npz")
    loaded = ndl.load_program(tmp_path / "p.npz")
    expected = fn(ndl.Tensor(x)).numpy()
    got = loaded(x).numpy()
    assert got.dtype == expected.dtype
    assert np.array_equal(got, expected)
