"""The declarative front-end (needle.static): graphs, feeds, fetches, Variables, gradients,
optimizers, control flow, debugging aids, plans, DOT output and the optimizing passes."""

from __future__ import annotations

import collections
import inspect
import shutil
import warnings

import numpy as np
import pytest

import needle as ndl
import needle.nn as nn
import needle.static as st


def _line() -> int:
    """The caller's line number (to check the source line a node records)."""
    return inspect.currentframe().f_back.f_lineno


# -- graphs and lazy nodes -------------------------------------------------------------------
def test_lecture_example():
    with st.Graph():
        v1 = st.Variable(np.array([0.0], dtype=np.float32))
        v2 = ndl.ops.exp(v1)
        v3 = v2 + 1
        v4 = v2 * v3
        sess = st.Session()
        value = sess.run(v4, feed_dict={v1: np.array([1.0])})
        np.testing.assert_allclose(value, np.exp(1.0) * (np.exp(1.0) + 1), rtol=1e-6)
        # feeding a Variable replaces it for that run only
        np.testing.assert_allclose(sess.run(v4), [2.0])


def test_graph_context_sets_the_default_graph():
    outer = st.get_default_graph()
    with st.Graph() as g:
        assert st.get_default_graph() is g
        with st.Graph() as h:
            assert st.get_default_graph() is h
            x = st.placeholder((2,))
        assert st.get_default_graph() is g
        assert x in h.placeholders and x not in g.placeholders
    assert st.get_default_graph() is outer


def test_graph_tensors_know_shape_and_dtype_and_compute_nothing():
    with st.Graph():
        x = st.placeholder((None, 3), name="x")
        labels = st.placeholder((None,), dtype="int64")
        layer = nn.Linear(3, 4)
        h = ndl.ops.relu(layer(x)) * 2 - 1
        y = (h @ ndl.Tensor(np.ones((4, 2), np.float32))).sum(axes=(1,))
        for node in (h, y):
            assert node._data is None
        assert h.shape == (None, 4) and h.dtype == np.float32
        assert y.shape == (None,)
        assert labels.dtype == np.int64
        assert (x > 0).dtype == np.bool_
        with pytest.raises(RuntimeError, match="declared graph"):
            y.numpy()


@pytest.mark.parametrize(("build", "pattern"), [
    (lambda x: x @ st.placeholder((4, 5)), r"matmul.*\(None, 3\) @ \(4, 5\)"),
    (lambda x: x + st.placeholder((2, 4)), r"add.*\(None, 3\).*\(2, 4\)"),
    (lambda x: ndl.ops.reshape(st.placeholder((2, 3)), (4, 2)), r"reshape.*\(2, 3\).*\(4, 2\)"),
    (lambda x: ndl.ops.summation(x, axes=(2,)), r"summation"),
])
def test_shape_errors_are_raised_when_the_node_is_made(build, pattern):
    with st.Graph():
        x = st.placeholder((None, 3))
        with pytest.raises(ndl.ops.ShapeError, match=pattern):
            build(x)


def test_module_shape_error_names_the_module():
    with st.Graph():
        x = st.placeholder((None, 5))
        with pytest.raises(ValueError, match=r"Linear.*in_features=3.*\(None, 5\)"):
            nn.Linear(3, 2)(x)


def test_none_dims_take_any_size():
    with st.Graph():
        x = st.placeholder((None, 3))
        y = nn.Flatten()(ndl.ops.reshape(x, (None, 3, 1))) * 2
        sess = st.Session()
        for n in (1, 4, 7):
            data = np.arange(3 * n, dtype=np.float32).reshape(n, 3)
            np.testing.assert_array_equal(sess.run(y, {x: data}), data * 2)


# -- feeds, fetches, pruning -----------------------------------------------------------------
def test_unrelated_placeholder_is_not_required_and_unrelated_branch_does_not_run():
    with st.Graph():
        x = st.placeholder((None, 2), name="x")
        unrelated = st.placeholder((None, 2), name="unrelated")
        wanted = ndl.ops.exp(x) + 1
        other = ndl.ops.log(unrelated) * 5
        meta = st.RunMetadata()
        st.Session().run(wanted, feed_dict={x: np.ones((3, 2))}, run_metadata=meta)
    assert wanted.meta.name in meta.executed
    assert other.meta.name not in meta.executed
    assert len(meta.executed) == 2  # exp and add_scalar, nothing else


def test_each_needed_node_runs_once_per_run(capsys):
    with st.Graph():
        x = st.placeholder((2,))
        shared = st.print_(x * 2, "shared: ")
        a, b = shared + 1, shared * 3
        meta = st.RunMetadata()
        out = st.Session().run([a, b, a], {x: np.array([1.0, 2.0])}, run_metadata=meta)
    assert capsys.readouterr().out.count("shared: ") == 1
    assert len(meta.executed) == len(set(meta.executed)) == 4
    np.testing.assert_array_equal(out[1], [6.0, 12.0])
    np.testing.assert_array_equal(out[0], out[2])


def test_feeding_an_intermediate_tensor_cuts_off_its_ancestors():
    with st.Graph():
        x = st.placeholder((None, 2), name="x")
        hidden = ndl.ops.exp(x)
        out = hidden * 2
        meta = st.RunMetadata()
        sess = st.Session()
        value = sess.run(out, feed_dict={hidden: np.full((1, 2), 3.0)}, run_metadata=meta)
        np.testing.assert_array_equal(value, [[6.0, 6.0]])
        assert meta.executed == [out.meta.name]  # exp did not run and x was not needed
        with pytest.raises(ValueError, match=r"its shape is \(None, 2\), fed shape \(3,\)"):
            sess.run(out, feed_dict={hidden: np.ones(3)})


def test_nested_fetch_structures():
    Pair = collections.namedtuple("Pair", "first second")
    with st.Graph():
        x = st.placeholder((2,))
        counter = st.Variable(np.float32(0), name="counter")
        step = st.assign_add(counter, 1.0)
        y, z = x + 1, x * 10
        fetches = {"values": [y, (z, y)], "pair": Pair(y, z), "op": st.group(step)}
        out = st.Session().run(fetches, {x: np.array([1.0, 2.0])})
    assert set(out) == {"values", "pair", "op"}
    assert isinstance(out["values"], list) and isinstance(out["values"][1], tuple)
    np.testing.assert_array_equal(out["values"][0], [2.0, 3.0])
    np.testing.assert_array_equal(out["values"][1][0], [10.0, 20.0])
    assert isinstance(out["pair"], Pair)
    np.testing.assert_array_equal(out["pair"].second, [10.0, 20.0])
    assert out["op"] is None


def test_fetched_values_do_not_alias_graph_state():
    with st.Graph():
        v = st.Variable(np.ones(3, np.float32))
        sess = st.Session()
        got = sess.run(v)
        got[:] = 7
        np.testing.assert_array_equal(sess.run(v), np.ones(3))


def test_bad_feed_shape_names_placeholder_and_shapes_and_runs_nothing():
    with st.Graph():
        x = st.placeholder((None, 3), name="images")
        counter = st.Variable(np.float32(0))
        step = st.assign_add(counter, 1.0)
        sess = st.Session()
        msg = r"placeholder 'images': declared shape \(None, 3\), fed shape \(2, 4\)"
        with pytest.raises(ValueError, match=msg):
            sess.run([x * 2, step], feed_dict={x: np.ones((2, 4))})
        with pytest.raises(ValueError, match=r"declared shape \(None, 3\), fed shape \(3,\)"):
            sess.run(x * 2, feed_dict={x: np.ones(3)})
        assert sess.run(counter) == 0.0


def test_missing_feeds_are_all_named_in_one_error_before_anything_runs():
    with st.Graph():
        a = st.placeholder((None, 2), name="a")
        b = st.placeholder((2,), name="b")
        c = st.placeholder((2,), name="c_unneeded")
        counter = st.Variable(np.float32(0))
        step = st.assign_add(counter, 1.0)
        sess = st.Session()
        with pytest.raises(ValueError, match="not fed") as info:
            sess.run([a + b, step])
        message = str(info.value)
        assert "'a' (shape (None, 2)" in message and "'b' (shape (2,)" in message
        assert "c_unneeded" not in message
        assert sess.run(counter) == 0.0
        assert c.name == "c_unneeded"


def test_feed_dict_keys_must_be_graph_tensors():
    with st.Graph():
        x = st.placeholder((2,))
        with pytest.raises(TypeError, match="feed_dict keys"):
            st.Session().run(x * 2, feed_dict={"x": np.ones(2)})


def test_creating_nodes_between_runs_is_allowed_without_warning():
    with st.Graph():
        x = st.placeholder((2,))
        sess = st.Session()
        data = {x: np.ones(2)}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            y = x + 1
            sess.run(y, data)
            z = y * 2
            sess.run(z, data)
            w = z - 3
            np.testing.assert_array_equal(sess.run(w, data), [1.0, 1.0])


def test_a_graph_growing_inside_a_loop_gets_a_warning():
    with st.Graph():
        x = st.placeholder((2,))
        sess = st.Session()
        with pytest.warns(RuntimeWarning, match="graph keeps growing"):
            for _ in range(6):
                sess.run(x * 2, {x: np.ones(2)})


# -- Variables -------------------------------------------------------------------------------
def test_variables_persist_across_runs_and_change_only_through_assign_ops():
    with st.Graph():
        v = st.Variable(np.array([1.0, 2.0], np.float32), name="v")
        doubled = v * 2
        add = st.assign_add(v, np.array([1.0, 1.0], np.float32))
        sub = st.assign_sub(v, np.array([0.5, 0.5], np.float32))
        reset = st.assign(v, np.zeros(2, np.float32))
        sess = st.Session()
        for _ in range(3):
            np.testing.assert_array_equal(sess.run(doubled), [2.0, 4.0])
        np.testing.assert_array_equal(sess.run(add), [2.0, 3.0])
        sess.run(add)
        np.testing.assert_array_equal(sess.run(v), [3.0, 4.0])
        np.testing.assert_array_equal(sess.run(sub), [2.5, 3.5])
        np.testing.assert_array_equal(sess.run(doubled), [5.0, 7.0])
        sess.run(reset)
        np.testing.assert_array_equal(sess.run(v), [0.0, 0.0])
        # a new session starts again from the initial value
        np.testing.assert_array_equal(st.Session().run(v), [1.0, 2.0])
        with pytest.raises(TypeError, match="target must be"):
            st.assign(v * 2, 1.0)


def test_variables_round_trip_through_a_checkpoint(tmp_path):
    with st.Graph() as g:
        w = st.Variable(np.arange(6, dtype=np.float32).reshape(2, 3), name="w")
        b = st.Variable(np.zeros(3, np.float32), name="b")
        steps = st.Variable(np.int64(0), name="steps", trainable=False)
        update = st.group(st.assign_add(w, np.ones((2, 3), np.float32)),
                          st.assign(b, np.full(3, 0.5, np.float32)),
                          st.assign_add(steps, np.int64(1)))
        sess = st.Session()
        sess.run(update)
        ndl.save(tmp_path / "vars.npz", variables=sess.variables(), note="static")
        fresh = st.Session(g)
        np.testing.assert_array_equal(fresh.run(w), np.arange(6).reshape(2, 3))
        fresh.load_variables(ndl.load(tmp_path / "vars.npz")["variables"])
        for name, value in sess.variables().items():
            np.testing.assert_array_equal(fresh.variables()[name], value)
        assert fresh.run(steps) == 1
        with pytest.raises(KeyError, match="missing names"):
            fresh.load_variables({"w": np.zeros((2, 3))})
        with pytest.raises(ValueError, match=r"'b': Variable \(3,\), value \(4,\)"):
            fresh.load_variables({"b": np.zeros(4)}, strict=False)
    assert g.trainable_variables() == [w, b]


def test_variable_names_are_unique_in_a_graph():
    with st.Graph():
        a = st.Variable(np.zeros(1, np.float32), name="w")
        b = st.Variable(np.zeros(1, np.float32), name="w")
        assert (a.name, b.name) == ("w", "w_1")
        assert set(st.Session().variables()) == {"w", "w_1"}


# -- gradients and optimizers ----------------------------------------------------------------
def test_gradients_match_eager_backward():
    rng = np.random.default_rng(0)
    x_data = rng.standard_normal((4, 3)).astype(np.float32)
    w_data = rng.standard_normal((3, 2)).astype(np.float32)

    def f(x, w):
        h = ndl.ops.tanh(x @ w)
        return (h * h + ndl.ops.exp(h)).sum()

    x_e, w_e = ndl.Tensor(x_data), ndl.Tensor(w_data)
    f(x_e, w_e).backward()
    with st.Graph():
        x = st.placeholder((4, 3))
        w = st.Variable(w_data)
        loss = f(x, w)
        gx, gw = st.gradients(loss, [x, w])
        gx_value, gw_value = st.Session().run([gx, gw], {x: x_data})
    np.testing.assert_array_equal(gx_value, x_e.grad.numpy())
    np.testing.assert_array_equal(gw_value, w_e.grad.numpy())


def test_gradients_of_intermediates_second_order_and_unconnected():
    with st.Graph():
        x = st.Variable(np.array([1.5, -0.5], np.float32))
        other = st.Variable(np.ones(2, np.float32))
        h = x * x
        y = (h * x).sum()  # sum(x^3)
        dy_dh, dy_dx, unconnected = st.gradients(y, [h, x, other])
        (d2y_dx2,) = st.gradients(dy_dx, [x])
        out = st.Session().run([dy_dh, dy_dx, d2y_dx2])
    assert unconnected is None
    np.testing.assert_allclose(out[0], [1.5, -0.5])
    np.testing.assert_allclose(out[1], 3 * np.array([1.5, -0.5]) ** 2, rtol=1e-6)
    np.testing.assert_allclose(out[2], 6 * np.array([1.5, -0.5]), rtol=1e-6)


def _train_pair(make_opt, steps=4):
    """The same tiny regression trained eagerly and with a Session train op."""
    rng = np.random.default_rng(1)
    data = [(rng.standard_normal((8, 3)).astype(np.float32),
             rng.standard_normal((8, 2)).astype(np.float32)) for _ in range(steps)]
    np.random.seed(0)
    eager = nn.Linear(3, 2)
    np.random.seed(0)
    graph_model = nn.Linear(3, 2)
    opt = make_opt(eager.parameters())
    for xb, yb in data:
        opt.reset_grad()
        diff = eager(ndl.Tensor(xb, requires_grad=False)) - ndl.Tensor(yb, requires_grad=False)
        (diff * diff).mean().backward()
        opt.step()
    with st.Graph():
        x, y = st.placeholder((None, 3)), st.placeholder((None, 2))
        diff = graph_model(x) - y
        loss = (diff * diff).mean()
        train = st.minimize(make_opt(graph_model.parameters()), loss)
        sess = st.Session()
        for xb, yb in data:
            assert sess.run(train, {x: xb, y: yb}) is None
    return eager, graph_model


@pytest.mark.parametrize("make_opt", [
    lambda p: ndl.optim.SGD(p, lr=0.1),
    lambda p: ndl.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
    lambda p: ndl.optim.Adam(p, lr=0.05),
    lambda p: ndl.optim.AdamW(p, lr=0.05, weight_decay=0.1),
], ids=["sgd", "sgd-momentum-wd", "adam", "adamw"])
def test_minimize_applies_the_eager_update_rule(make_opt):
    eager, graph_model = _train_pair(make_opt)
    for a, b in zip(eager.parameters(), graph_model.parameters()):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_minimize_over_graph_variables():
    rng = np.random.default_rng(2)
    xb = rng.standard_normal((5, 3)).astype(np.float32)
    w0 = rng.standard_normal((3, 1)).astype(np.float32)
    w_eager = ndl.Tensor(w0)
    opt_eager = ndl.optim.Adam([w_eager], lr=0.1)
    for _ in range(3):
        opt_eager.reset_grad()
        ((ndl.Tensor(xb, requires_grad=False) @ w_eager) ** 2).sum().backward()
        opt_eager.step()
    with st.Graph():
        x = st.placeholder((None, 3))
        w = st.Variable(w0, name="w")
        frozen = st.Variable(np.ones((1, 1), np.float32), trainable=False)
        loss = ((x @ w * frozen) ** 2).sum()
        train = st.minimize(ndl.optim.Adam([w, frozen], lr=0.1), loss)
        sess = st.Session()
        for _ in range(3):
            sess.run(train, {x: xb})
        np.testing.assert_array_equal(sess.run(w), w_eager.numpy())
        np.testing.assert_array_equal(sess.run(frozen), [[1.0]])
        np.testing.assert_array_equal(w.initial_value, w0)  # the Variable node is untouched


def test_optimizer_minimize_builds_a_train_op_for_a_graph_loss():
    with st.Graph():
        model = nn.Linear(3, 2)
        x = st.placeholder((2, 3))
        train = ndl.optim.SGD(model.parameters(), lr=0.1).minimize(model(x).sum())
        before = model.weight.numpy().copy()
        assert st.Session().run(train, {x: np.ones((2, 3))}) is None
        assert not np.array_equal(before, model.weight.numpy())


def test_reads_in_a_run_see_values_before_the_updates_of_that_run():
    rng = np.random.default_rng(3)
    xb = rng.standard_normal((6, 3)).astype(np.float32)
    with st.Graph():
        model = nn.Linear(3, 1)
        x = st.placeholder((6, 3))
        loss = (model(x) ** 2).mean()
        train = st.minimize(ndl.optim.SGD(model.parameters(), lr=0.05), loss)
        # neither is an ancestor of the train op: they must still read the weights the run
        # started with, not the updated ones
        probe = (model.weight * 3).sum()
        view = ndl.ops.reshape(model.weight, (3,))  # a view of the parameter's array
        for optimize in (True, False):
            sess = st.Session(optimize=optimize)
            for meta in (None, st.RunMetadata()):
                before = sess.run([loss, probe, model.weight, view], {x: xb})
                during = sess.run([train, loss, probe, model.weight, view], {x: xb},
                                  run_metadata=meta)[1:]
                after = sess.run([loss, probe, model.weight, view], {x: xb})
                for a, b in zip(before, during):
                    np.testing.assert_array_equal(a, b)
                assert after[0] < before[0] and after[1] != before[1]


# -- the same module in both worlds -----------------------------------------------------------
def test_parameters_are_shared_between_eager_code_and_sessions():
    rng = np.random.default_rng(4)
    xb = rng.standard_normal((4, 3)).astype(np.float32)
    model = nn.Linear(3, 2)
    with st.Graph():
        x = st.placeholder((4, 3))
        out = model(x)
        train = st.minimize(ndl.optim.SGD(model.parameters(), lr=0.1), out.sum())
        sess = st.Session()
        eager = lambda: model(ndl.Tensor(xb, requires_grad=False)).numpy()  # noqa: E731
        np.testing.assert_array_equal(sess.run(out, {x: xb}), eager())
        # eager training is seen by the Session ...
        opt = ndl.optim.SGD(model.parameters(), lr=0.1)
        model(ndl.Tensor(xb, requires_grad=False)).sum().backward()
        opt.step()
        np.testing.assert_array_equal(sess.run(out, {x: xb}), eager())
        # ... and a Session train op updates the eager model
        before = eager()
        sess.run(train, {x: xb})
        assert not np.array_equal(before, eager())
        np.testing.assert_array_equal(sess.run(out, {x: xb}), eager())
        # load_state_dict replaces parameter arrays; the Session reads the new ones
        model.load_state_dict({k: np.zeros_like(v) for k, v in model.state_dict().items()})
        np.testing.assert_array_equal(sess.run(out, {x: xb}), np.zeros((4, 2)))


def test_eval_mode_graph_reads_current_buffers():
    bn = nn.BatchNorm1d(2)
    bn.eval()
    with st.Graph():
        x = st.placeholder((None, 2))
        out = bn(x)
        sess = st.Session()
        xb = np.array([[1.0, 2.0]], np.float32)
        np.testing.assert_allclose(sess.run(out, {x: xb}), xb / np.sqrt(1 + 1e-5), rtol=1e-6)
        bn.running_mean.data = np.array([1.0, 2.0], np.float32)  # replaces the buffer array
        np.testing.assert_array_equal(sess.run(out, {x: xb}), [[0.0, 0.0]])


def test_batchnorm_running_statistics_update_through_the_train_op_or_with_dependencies():
    rng = np.random.default_rng(5)
    batches = [rng.standard_normal((8, 3)).astype(np.float32) * 2 + 1 for _ in range(3)]
    eager_bn, trained_bn, forward_bn = nn.BatchNorm1d(3), nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    for xb in batches:
        eager_bn(ndl.Tensor(xb, requires_grad=False))
    with st.Graph():
        x = st.placeholder((8, 3))
        loss = trained_bn(x).sum()
        train = st.minimize(ndl.optim.SGD(trained_bn.parameters(), lr=0.0), loss)
        plain = forward_bn(x)
        updated = st.with_dependencies(st.state_updates(plain), plain)
        assert len(st.state_updates(plain)) == 2 and st.state_updates(updated) == []
        sess = st.Session()
        sess.run(plain, {x: batches[0]})  # a forward pass alone leaves the statistics alone
        np.testing.assert_array_equal(forward_bn.running_mean.numpy(), np.zeros(3))
        for xb in batches:
            sess.run(train, {x: xb})
            sess.run(updated, {x: xb})
    for bn in (trained_bn, forward_bn):
        np.testing.assert_array_equal(bn.running_mean.numpy(), eager_bn.running_mean.numpy())
        np.testing.assert_array_equal(bn.running_var.numpy(), eager_bn.running_var.numpy())


# -- control flow ----------------------------------------------------------------------------
def test_cond_executes_only_the_taken_branch(capsys):
    made = {}

    def branch(tag, scale):
        def build():
            made[tag] = st.print_(x * scale, f"{tag} branch: ")
            return made[tag]
        return build

    with st.Graph():
        x = st.placeholder((3,))
        out = st.cond(x.sum() > 0, branch("true", 2.0), branch("false", -1.0))
        sess = st.Session()
        for data, taken, skipped, expected in (
                (np.ones(3), "true", "false", [2.0] * 3),
                (-np.ones(3), "false", "true", [1.0] * 3)):
            meta = st.RunMetadata()
            np.testing.assert_array_equal(sess.run(out, {x: data}, run_metadata=meta), expected)
            printed = capsys.readouterr().out
            assert f"{taken} branch: " in printed and f"{skipped} branch: " not in printed
            assert made[taken].meta.name in meta.executed
            assert made[skipped].meta.name not in meta.executed
        # the fast path (no RunMetadata) runs one branch too
        sess.run(out, {x: np.ones(3)})
        assert capsys.readouterr().out.count("branch: ") == 1


def test_cond_is_differentiable():
    with st.Graph():
        flag = st.placeholder((), name="flag")
        v = st.Variable(np.array([2.0, 3.0], np.float32))
        out = st.cond(flag > 0, lambda: v * v, lambda: v * 3.0)
        (grad,) = st.gradients(out.sum(), [v])
        sess = st.Session()
        np.testing.assert_array_equal(sess.run(grad, {flag: np.float32(1)}), [4.0, 6.0])
        np.testing.assert_array_equal(sess.run(grad, {flag: np.float32(-1)}), [3.0, 3.0])
        with pytest.raises(ndl.ops.ShapeError, match="cond: output 0"):
            st.cond(flag > 0, lambda: v, lambda: v.sum())


def test_while_loop_value_and_gradient():
    with st.Graph():
        v = st.Variable(np.array([1.5], np.float32))
        i0 = st.constant(np.float32(0))
        # double v until its sum exceeds 20, counting the steps: 1.5 -> 24 in 4 steps
        n, out = st.while_loop(lambda i, a: a.sum() < 20, lambda i, a: (i + 1, a * 2),
                               [i0, v], maximum_iterations=10)
        (grad,) = st.gradients(out.sum(), [v])
        single = st.while_loop(lambda a: a.sum() < 20, lambda a: a * 2, v)
        sess = st.Session()
        n_value, out_value, grad_value = sess.run([n, out, grad])
        assert n_value == 4
        np.testing.assert_array_equal(out_value, [24.0])
        np.testing.assert_array_equal(grad_value, [16.0])
        np.testing.assert_array_equal(sess.run(single), [24.0])
        with pytest.raises(ValueError, match="body_fn returns 1 values for 2"):
            st.while_loop(lambda i, a: i < 3, lambda i, a: i + 1, [i0, v])


# -- debugging -------------------------------------------------------------------------------
def test_print_is_an_identity_that_prints_when_it_runs(capsys):
    with st.Graph():
        x = st.placeholder((2, 2))
        y = st.print_(x + 1, "x plus one: ") * 2
        (grad,) = st.gradients(y.sum(), [x])
        assert capsys.readouterr().out == ""
        out, g = st.Session().run([y, grad], {x: np.zeros((2, 2))})
    np.testing.assert_array_equal(out, np.full((2, 2), 2.0))
    np.testing.assert_array_equal(g, np.full((2, 2), 2.0))
    assert "x plus one: (2, 2) [1. 1. 1. 1.]" in capsys.readouterr().out


def test_run_error_names_node_op_shapes_and_the_users_source_line():
    with st.Graph():
        x = st.placeholder((None, 4), name="x")
        line = _line() + 1
        bad = ndl.ops.reshape(x, (3, 5))  # fine for shape (None, 4) ... until it runs
        sess = st.Session()
        for meta in (None, st.RunMetadata()):  # compiled and step-by-step executors
            with pytest.raises(RuntimeError) as info:
                sess.run(bad * 2, {x: np.ones((2, 4))}, run_metadata=meta)
            message = str(info.value)
            assert f"'{bad.meta.name}' (op reshape, created at {__file__}:{line})" in message
            assert "inputs of shapes (2, 4)" in message
            assert "cannot reshape" in message


def test_error_inside_a_module_points_at_the_user_line():
    with st.Graph():
        x = st.placeholder((None, 3, 2))
        line = _line() + 1
        out = nn.Flatten()(x)
        assert out.meta.source == f"{__file__}:{line}"


# -- plans, DOT ------------------------------------------------------------------------------
def test_plan_describes_a_run_without_running(capsys):
    with st.Graph():
        x = st.placeholder((None, 100), name="x")
        unused = st.placeholder((3,), name="unused")
        counter = st.Variable(np.float32(0))
        h = st.print_(ndl.ops.exp(x), "ran: ")
        out = (h * 2).sum(axes=(1,))
        step = st.assign_add(counter, 1.0)
        sess = st.Session()
        plan = sess.plan([out, step], {x: np.ones((8, 100))})
        assert capsys.readouterr().out == "" and sess.run(counter) == 0.0
        assert plan.ops == ["exp", "print", "mul_scalar", "summation", "assign"]
        assert plan.steps[0] == h.inputs[0].meta.name
        assert plan.missing_feeds == [] and plan.replaced_by_feeds == {"x": []}
        # exp (8 x 100 float32 = 3200 bytes), its print alias and the product are live at once
        # without the memory plan; with it the exp value is freed after mul_scalar
        assert plan.peak_bytes_without_reuse > plan.peak_bytes_with_reuse >= 3200 * 2
        fed = sess.plan(out, {h: np.ones((8, 100))})
        assert fed.replaced_by_feeds == {h.meta.name: [h.inputs[0].meta.name]}
        assert fed.ops == ["mul_scalar", "summation"]
        missing = sess.plan([out, unused * 2])
        assert missing.missing_feeds == ["x", "unused"]
        assert "missing feeds: x, unused" in str(missing)


def test_to_dot_shows_ops_shapes_and_the_pruned_part(tmp_path, monkeypatch):
    with st.Graph() as g:
        x = st.placeholder((None, 3), name="x")
        y = st.placeholder((None, 3), name="y")
        wanted = ndl.ops.exp(x) * 2
        pruned = ndl.ops.log(y)
        text = g.to_dot()
        assert text.startswith("digraph") and "exp" in text and "(None, 3) float32" in text
        highlighted = g.to_dot(wanted)
        node_line = next(ln for ln in highlighted.splitlines()
                         if f"n{id(pruned)} [" in ln)
        assert "dashed" in node_line
        exp_line = next(ln for ln in highlighted.splitlines() if f"n{id(wanted)} [" in ln)
        assert "filled" in exp_line
        fed = g.to_dot(wanted, feed_dict={wanted.inputs[0]: np.ones((1, 3))})
        assert "#ffd8a8" in next(ln for ln in fed.splitlines()
                                 if f"n{id(wanted.inputs[0])} [" in ln)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert st.dot.render(text, str(tmp_path / "g.svg")) is False
    assert not (tmp_path / "g.svg").exists()


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz dot is not installed")
def test_render_writes_svg_where_dot_exists(tmp_path):
    with st.Graph() as g:
        x = st.placeholder((2,))
        out = x + 1
    assert st.dot.render(g.to_dot(out), str(tmp_path / "g.svg"))
    assert (tmp_path / "g.svg").read_text().lstrip().startswith("<")


# -- optimizations ---------------------------------------------------------------------------
def test_constant_folding_and_cse_change_steps_not_results():
    with st.Graph():
        x = st.placeholder((None, 3), name="x")
        scale = ndl.ops.exp(st.constant(np.float32(0.5))) * 3 + 1  # folds to one constant
        a, b = ndl.ops.tanh(x), ndl.ops.tanh(x)  # CSE merges these
        out = (a + b) * scale
        data = {x: np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)}
        results = {}
        for optimize in (True, False):
            meta = st.RunMetadata()
            sess = st.Session(optimize=optimize)
            results[optimize] = sess.run(out, data, run_metadata=meta)
            plan = sess.plan(out, data)
            if optimize:
                assert [name.split("_")[0] for name in meta.executed] == ["tanh", "add",
                                                                           "multiply"]
                assert plan.nodes_before == 7 and plan.nodes_after == 3
                assert any("cse (1 steps merged)" in p for p in plan.passes)
            else:
                assert len(meta.executed) == 7 and plan.passes == ["prune"]
        np.testing.assert_array_equal(results[True], results[False])


def test_random_and_side_effect_ops_are_never_merged_or_folded(capsys):
    with st.Graph():
        c = st.constant(np.zeros((50,), np.float32))
        m1, m2 = ndl.ops.bernoulli_like(c, 0.5), ndl.ops.bernoulli_like(c, 0.5)
        p1, p2 = st.print_(c, "p"), st.print_(c, "p")
        sess = st.Session()
        v1, v2 = sess.run([m1, m2])
        assert not np.array_equal(v1, v2)
        assert not np.array_equal(v1, sess.run(m1))  # drawn again each run, not folded
        sess.run([p1, p2])
        assert capsys.readouterr().out.count("p(50,)") == 2


def test_closed_session_cannot_run():
    with st.Graph():
        x = st.Variable(np.ones(1, np.float32))
        with st.Session() as sess:
            sess.run(x)
        with pytest.raises(RuntimeError, match="closed"):
            sess.run(x)


def test_gradients_through_reductions_over_an_unknown_batch_dim():
    rng = np.random.default_rng(6)
    xb = rng.standard_normal((5, 3)).astype(np.float32)
    with st.Graph():
        x = st.placeholder((None, 3))
        layer = nn.Linear(3, 2)
        (gw,) = st.gradients(layer(x).sum(), [layer.weight])
        value = st.Session().run(gw, {x: xb})
    np.testing.assert_allclose(value, np.repeat(xb.sum(0)[:, None], 2, axis=1), rtol=1e-5)
