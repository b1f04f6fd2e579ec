"""Declared graphs saved and loaded as data (``Graph.save`` / ``st.load_graph``): inference and
training graphs round-trip bit for bit, training continues in a fresh process that has none of
the model code, and bad files are refused with one error before anything is built."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import needle as ndl
import needle.nn as nn
import needle.static as st
from needle.apps.models import MLPResNet
from needle.checkpoint import CheckpointError
from needle.program import GraphReader, GraphWriter, ProgramError

from .helpers import damaged_copies

SRC_DIR = Path(ndl.__file__).resolve().parent.parent


# -- inference graphs ------------------------------------------------------------------------------
def _inference_graph():
    np.random.seed(3)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    with st.Graph() as g:
        x = st.placeholder((None, 6), name="x")
        scale = st.Variable(np.float32(1.5) * np.ones(4, np.float32), name="scale")
        shift = st.constant(np.arange(4, dtype=np.float32), name="shift")
        y = ndl.ops.logsoftmax(model(x) * scale + shift)
    return g, x, y


def test_an_inference_graph_round_trips_bit_for_bit(tmp_path):
    g, x, y = _inference_graph()
    g.save(tmp_path / "inf.npz", names={"x": x, "y": y})
    loaded = st.load_graph(tmp_path / "inf.npz")
    feed = np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)
    expected = st.Session(g).run(y, {x: feed})
    got = st.Session(loaded).run(loaded.get("y"), {loaded.get("x"): feed})
    assert np.array_equal(got, expected)
    # the placeholder keeps its unknown batch size; leaves keep their names
    assert loaded.get("x").shape == (None, 6)
    assert np.array_equal(loaded.get("scale").initial_value, np.full(4, 1.5, np.float32))
    assert [c.name for c in loaded.constants] == ["shift"]


def test_get_names_what_is_known_when_a_name_is_not(tmp_path):
    g, x, y = _inference_graph()
    assert g.get("x") is x and g.get("scale") is g.variables[0]
    g.save(tmp_path / "inf.npz", names={"logits": y})
    loaded = st.load_graph(tmp_path / "inf.npz")
    assert loaded.get("logits").shape == (None, 4)
    with pytest.raises(KeyError, match=r"no node named 'nope'.*logits.*x.*scale"):
        loaded.get("nope")


# -- training graphs -------------------------------------------------------------------------------
_BATCH = 16


def _training_graph(optimizer: str):
    """MLP-ResNet (dropout 0, BatchNorm in training mode) with a Session train op."""
    np.random.seed(7)
    model = MLPResNet(784, hidden=64, num_blocks=2, drop_prob=0.0)
    with st.Graph() as g:
        x = st.placeholder((None, 784), name="x")
        y = st.placeholder((None,), dtype="int64", name="y")
        loss = nn.SoftmaxLoss()(model(x), y)
        opt = (ndl.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if optimizer == "sgd"
               else ndl.optim.Adam(model.parameters(), lr=1e-3))
        train = opt.minimize(loss)
    names = {"x": x, "y": y, "loss": loss, "train": train}
    names.update({f"param{i}": p for i, p in enumerate(model.parameters())})
    names.update({f"buffer{i}": b for i, b in enumerate(model.buffers())})
    return g, model, names


def _data(steps: int):
    rng = np.random.default_rng(1)
    return (rng.standard_normal((steps, _BATCH, 784)).astype(np.float32),
            rng.integers(0, 10, (steps, _BATCH)))


_CONTINUE = """
import sys
import needle as ndl
import needle.static as st

data = ndl.load(sys.argv[1])
for path, out in zip(sys.argv[2::2], sys.argv[3::2]):
    g = st.load_graph(path)
    sess = st.Session(g)
    train, x, y = g.get("train"), g.get("x"), g.get("y")
    for images, labels in zip(data["images"], data["labels"]):
        sess.run(train, {x: images, y: labels})
    ndl.save(out, variables=sess.variables())
"""


def test_training_continues_bit_for_bit_in_a_fresh_process_without_the_model_code(tmp_path):
    images, labels = _data(40)
    ndl.save(tmp_path / "data.npz", images=images[20:], labels=labels[20:])
    expected, args = {}, []
    for optimizer in ("sgd", "adam"):
        g, model, names = _training_graph(optimizer)
        sess = st.Session(g)
        train, x, y = names["train"], names["x"], names["y"]
        for i in range(20):
            sess.run(train, {x: images[i], y: labels[i]})
        path = tmp_path / f"{optimizer}.npz"
        g.save(path, session=sess, names=names)
        for i in range(20, 40):  # the reference: 40 steps in this process
            sess.run(train, {x: images[i], y: labels[i]})
        expected[optimizer] = {k: v.numpy() for k, v in names.items()
                               if k.startswith(("param", "buffer"))}
        args += [str(path), str(tmp_path / f"{optimizer}_out.npz")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC_DIR),
                                                        os.environ.get("PYTHONPATH", "")])}
    # the child imports needle only: the model and training code live in this file
    subprocess.run([sys.executable, "-c", _CONTINUE, str(tmp_path / "data.npz"), *args],
                   env=env, check=True, timeout=120, cwd=tmp_path)
    for optimizer in ("sgd", "adam"):
        got = ndl.load(tmp_path / f"{optimizer}_out.npz")["variables"]
        want = expected[optimizer]
        assert set(want) <= set(got)
        assert len([k for k in want if k.startswith("buffer")]) == 2 * 2 * 2
        different = [k for k in want if not np.array_equal(got[k], want[k])]
        assert different == [], f"{optimizer}: {different}"


def test_a_loaded_training_graph_holds_the_optimizer_state(tmp_path):
    images, labels = _data(3)
    g, _, names = _training_graph("adam")
    sess = st.Session(g)
    for i in range(3):
        sess.run(names["train"], {names["x"]: images[i], names["y"]: labels[i]})
    g.save(tmp_path / "adam.npz", session=sess, names=names)
    loaded = st.load_graph(tmp_path / "adam.npz")
    (train,) = [n for n in loaded.effect_nodes() if n.op.name == "apply_updates"]
    opt = train.op.optimizer
    original = names["train"].inputs[0].op.optimizer  # group(apply_updates, *stores)
    assert type(opt) is ndl.optim.Adam and opt.step_count == original.step_count == 3
    assert all(np.array_equal(a["m"], b["m"]) and np.array_equal(a["v"], b["v"])
               for a, b in zip(opt.state_dict()["state"].values(),
                               original.state_dict()["state"].values()))
    # parameters are trainable Variables now, running statistics Variables that are not
    trainable = [v.name for v in loaded.variables if v.trainable]
    assert trainable == [f"param{i}" for i in range(len(trainable))]
    assert all(loaded.get(f"buffer{i}").trainable is False for i in range(8))


def test_batchnorm_running_statistics_continue_identically(tmp_path):
    np.random.seed(0)
    bn = nn.BatchNorm1d(5)
    with st.Graph() as g:
        x = st.placeholder((None, 5), name="x")
        y = bn(x)
        y = st.with_dependencies(st.state_updates(y), y)  # a forward run updates the stats
    feeds = np.random.default_rng(2).standard_normal((6, 4, 5)).astype(np.float32)
    sess = st.Session(g)
    for f in feeds[:3]:
        sess.run(y, {x: f})
    g.save(tmp_path / "bn.npz", session=sess,
           names={"x": x, "y": y, "mean": bn.running_mean, "var": bn.running_var})
    loaded = st.load_graph(tmp_path / "bn.npz")
    s2 = st.Session(loaded)
    for f in feeds[3:]:
        a = sess.run(y, {x: f})
        b = s2.run(loaded.get("y"), {loaded.get("x"): f})
        assert np.array_equal(a, b)
    values = s2.variables()
    assert np.array_equal(values["mean"], bn.running_mean.numpy())
    assert np.array_equal(values["var"], bn.running_var.numpy())
    assert not np.array_equal(values["mean"], np.zeros(5, np.float32))


def test_saving_without_a_session_keeps_initial_values(tmp_path):
    with st.Graph() as g:
        v = st.Variable(np.array([1.0, 2.0], np.float32), name="v")
        step = st.assign_add(v, np.array([10.0, 10.0], np.float32))
    sess = st.Session(g)
    sess.run(step)
    g.save(tmp_path / "initial.npz")
    g.save(tmp_path / "current.npz", session=sess)
    initial = st.Session(st.load_graph(tmp_path / "initial.npz")).variables()["v"]
    current = st.Session(st.load_graph(tmp_path / "current.npz")).variables()["v"]
    assert np.array_equal(initial, [1.0, 2.0]) and np.array_equal(current, [11.0, 12.0])


def test_assign_group_and_print_round_trip(tmp_path, capsys):
    with st.Graph() as g:
        counter = st.Variable(np.zeros(2, np.float32), name="counter")
        total = st.Variable(np.zeros(2, np.float32), name="total")
        x = st.placeholder((2,), name="x")
        shown = st.print_(x * 2.0, message="twice: ")
        step = st.group(st.assign_add(counter, np.ones(2, np.float32)),
                        st.assign(total, shown + total))
    g.save(tmp_path / "ops.npz", names={"step": step, "x": x})
    loaded = st.load_graph(tmp_path / "ops.npz")
    assert capsys.readouterr().out == ""  # loading runs nothing
    sess = st.Session(loaded)
    for value in ([1.0, 2.0], [3.0, 4.0]):
        assert sess.run(loaded.get("step"), {loaded.get("x"): np.array(value, np.float32)}) \
            is None
    values = sess.variables()
    assert np.array_equal(values["counter"], [2.0, 2.0])
    assert np.array_equal(values["total"], [8.0, 12.0])
    assert capsys.readouterr().out.count("twice: ") == 2


def test_cond_and_while_loop_with_registered_op_bodies_round_trip_and_train(tmp_path):
    with st.Graph() as g:
        x = st.placeholder((3,), name="x")
        w = st.Variable(np.array([0.5, -0.2, 0.3], np.float32), name="w")
        c = st.cond(ndl.ops.summation(x) > 0, lambda: ndl.ops.exp(x * w),
                    lambda: st.cond(ndl.ops.summation(w) > 100, lambda: x - w,
                                    lambda: x * 3.0))
        _, v = st.while_loop(lambda i, v: i < 3, lambda i, v: [i + 1, v * w + x],
                             [st.constant(np.float32(0)), x], maximum_iterations=4)
        loss = ndl.ops.summation(v * c)
        train = ndl.optim.SGD([w], lr=0.01, momentum=0.5).minimize(loss)
    feeds = [np.array(f, np.float32) for f in ([1, 2, 3], [-1, -2, 0.5], [0.1, 0.2, -0.1])]
    sess = st.Session(g)
    sess.run(train, {x: feeds[0]})
    g.save(tmp_path / "flow.npz", sess, names={"x": x, "c": c, "loss": loss, "train": train})
    loaded = st.load_graph(tmp_path / "flow.npz")
    s2 = st.Session(loaded)
    x2, fetches = loaded.get("x"), [loaded.get("c"), loaded.get("loss")]
    for f in feeds:
        for a, b in zip(sess.run([c, loss], {x: f}), s2.run(fetches, {x2: f})):
            assert np.array_equal(a, b)
        sess.run(train, {x: f})
        s2.run(loaded.get("train"), {x2: f})
    assert np.array_equal(sess.variables()["w"], s2.variables()["w"])


def test_a_branch_with_python_code_is_refused_naming_it(tmp_path):
    class Twice(ndl.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            return a * 2

        @staticmethod
        def backward(ctx, out_grad):
            return out_grad * 2

    with st.Graph() as g:
        x = st.placeholder((2,), name="x")
        y = st.cond(ndl.ops.summation(x) > 0, lambda: Twice.apply(x), lambda: x)
    with pytest.raises(ProgramError, match=r"Twice.*test_graph_save.py:\d+\): op "
                                          r"'function:Twice' .*Python code, not a registered"):
        g.save(tmp_path / "code.npz", names={"y": y})
    assert not (tmp_path / "code.npz").exists()


def test_an_unknown_optimizer_class_is_refused_when_saving(tmp_path):
    class MySGD(ndl.optim.SGD):
        pass

    with st.Graph() as g:
        w = st.Variable(np.ones(3, np.float32), name="w")
        MySGD([w], lr=0.1).minimize(ndl.ops.summation(w * w))
    with pytest.raises(ProgramError, match="optimizer .*MySGD.* is not one a graph file can "
                                           "name"):
        g.save(tmp_path / "opt.npz")


# -- incremental writing and reading (what a remote Session ships) ---------------------------------
def test_the_writer_sends_only_new_nodes_and_the_reader_extends_its_graph():
    with st.Graph():
        x = st.placeholder((None, 2), name="x")
        w = st.Variable(np.array([[1.0], [2.0]], np.float32), name="w")
        y = x @ w
    writer, reader = GraphWriter(), GraphReader()
    delta, arrays = writer.add([y], {"y": y})
    reader.add(json.loads(json.dumps(delta)), arrays)  # the delta is JSON
    assert sorted(n["kind"] for n in delta["nodes"]) == ["op", "placeholder", "variable"]
    with st.Graph():
        z = ndl.ops.relu(y) + 1.0
    delta2, arrays2 = writer.add([z, y], {"z": z})
    assert [n["op"] for n in delta2["nodes"]] == ["relu", "add_scalar"]
    assert delta2["nodes"][0]["inputs"] == [writer.id_of(y)]
    assert writer.add([z])[0]["nodes"] == []
    reader.add(delta2, arrays2)
    assert reader.node(writer.id_of(y)) is reader.names["y"]
    assert set(reader.initial_values) == {"w"}
    feed = np.array([[1.0, -1.0], [0.5, 0.5]], np.float32)
    got = st.Session(reader.graph).run(reader.names["z"], {reader.node(writer.id_of(x)): feed})
    assert np.array_equal(got, np.maximum(feed @ [[1.0], [2.0]], 0) + 1.0)
    with pytest.raises(KeyError, match="has not been written"):
        writer.id_of(st.constant(np.float32(1)))
    # a bad delta is refused whole: nothing of it is built
    nodes_before = len(reader.graph.nodes())
    with st.Graph():
        bad_delta, bad_arrays = writer.add([ndl.ops.exp(z) * 2.0])
    bad_delta["nodes"][1]["op"] = "frobnicate"
    with pytest.raises(ProgramError, match="unknown op 'frobnicate'"):
        reader.add(bad_delta, bad_arrays)
    assert len(reader.graph.nodes()) == nodes_before


def test_an_optimizer_over_graph_variables_trains_them():
    # (an optimizer over four or more Variables used to fail: they have no arrays of their own)
    rng = np.random.default_rng(4)
    values = [rng.standard_normal(3).astype(np.float32) for _ in range(4)]
    with st.Graph() as g:
        ws = [st.Variable(v, name=f"w{i}") for i, v in enumerate(values)]
        loss = ndl.ops.summation(ws[0] * ws[1] + ws[2] * ws[3])
        train = ndl.optim.SGD(ws, lr=0.5).minimize(loss)
    sess = st.Session(g)
    sess.run(train)
    got = sess.variables()
    grads = [values[1], values[0], values[3], values[2]]
    for i, (v, grad) in enumerate(zip(values, grads)):
        np.testing.assert_allclose(got[f"w{i}"], v - 0.5 * grad, rtol=1e-6)


# -- bad files: one clear error each, nothing built ------------------------------------------------
def _saved_training_graph(tmp_path):
    with st.Graph() as g:
        x = st.placeholder((None, 3), name="x")
        w = st.Variable(np.ones((3, 2), np.float32), name="w")
        y = ndl.ops.relu(x @ w)
        train = ndl.optim.SGD([w], lr=0.1, momentum=0.9).minimize(ndl.ops.summation(y))
    path = tmp_path / "g.npz"
    g.save(path, names={"x": x, "y": y, "train": train})
    return path


def _rewrite(tmp_path, change) -> Path:
    data = ndl.load(_saved_training_graph(tmp_path))["graph"]
    arrays = data.pop("arrays")
    spec = json.loads(json.dumps(data))
    change(spec)
    path = tmp_path / "bad.npz"
    ndl.save(path, graph={**spec, "arrays": arrays})
    return path


def _op_node(spec, name):
    return next(n for n in spec["nodes"] if n.get("op") == name)


def test_an_unknown_op_is_named(tmp_path):
    path = _rewrite(tmp_path, lambda s: _op_node(s, "relu").update(op="frobnicate"))
    with pytest.raises(ProgramError, match="unknown op 'frobnicate'"):
        st.load_graph(path)


def test_a_newer_format_version_is_refused(tmp_path):
    with pytest.raises(ProgramError, match="newer than this needle"):
        st.load_graph(_rewrite(tmp_path, lambda s: s.update(version=99)))


def test_a_cycle_and_a_missing_input_are_named(tmp_path):
    def cycle(spec):
        _op_node(spec, "matmul")["inputs"][1] = _op_node(spec, "relu")["id"]

    with pytest.raises(ProgramError, match="not defined before it"):
        st.load_graph(_rewrite(tmp_path, cycle))
    with pytest.raises(ProgramError, match=r"inputs \[999\] are not defined"):
        st.load_graph(_rewrite(tmp_path, lambda s: _op_node(s, "relu").update(inputs=[999])))


def test_a_stored_shape_that_the_shape_rule_disagrees_with_is_named(tmp_path):
    path = _rewrite(tmp_path, lambda s: _op_node(s, "matmul").update(shape=[None, 7]))
    with pytest.raises(ProgramError, match=r"matmul\): shape \(None, 2\) disagrees with the "
                                           r"stored \(None, 7\)"):
        st.load_graph(path)


def test_an_unknown_optimizer_name_is_refused_without_importing_anything(tmp_path):
    def rename(spec):
        spec["optimizers"][0]["class"] = "os.system"

    with pytest.raises(ProgramError, match=r"unknown optimizer 'os.system' \(known: SGD, Adam"):
        st.load_graph(_rewrite(tmp_path, rename))


def test_every_problem_is_listed_in_one_error(tmp_path):
    def several(spec):
        _op_node(spec, "relu").update(op="frobnicate")
        spec["optimizers"][0]["class"] = "Nadam"

    with pytest.raises(ProgramError, match="frobnicate.*Nadam"):
        st.load_graph(_rewrite(tmp_path, several))


def test_a_truncated_archive_and_a_hash_mismatch_are_checkpoint_errors(tmp_path):
    cut, flipped = damaged_copies(_saved_training_graph(tmp_path), tmp_path)
    with pytest.raises(CheckpointError):
        st.load_graph(cut)
    with pytest.raises(CheckpointError, match="(?i)sha-256|hash|corrupt"):
        st.load_graph(flipped)


def test_a_program_or_a_checkpoint_is_not_a_graph(tmp_path):
    ndl.save(tmp_path / "ckpt.npz", weights=np.ones(3))
    with pytest.raises(ProgramError, match="not a needle graph"):
        st.load_graph(tmp_path / "ckpt.npz")
    ndl.export(lambda a: a * 2, np.ones((2, 2), np.float32)).save(tmp_path / "prog.npz")
    with pytest.raises(ProgramError, match="ndl.load_program"):
        st.load_graph(tmp_path / "prog.npz")
    saved = _saved_training_graph(tmp_path)
    with zipfile.ZipFile(saved) as archive:  # data only: JSON and .npy members
        assert all(n.endswith((".npy", ".json")) for n in archive.namelist())
