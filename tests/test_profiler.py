"""ndl.profile(): what it records in each front-end, its table and trace, and that it changes
nothing when off (results bit for bit, no state left behind)."""

from __future__ import annotations

import collections
import json
import threading

import numpy as np
import pytest

import needle as ndl
import needle.caffe as cf
import needle.static as st
from needle import nn
from needle.core import context
from needle.core.interpret import NodeRunError

RNG = np.random.default_rng(0)
X = RNG.standard_normal((4, 8)).astype(np.float32)
W1 = RNG.standard_normal((8, 16)).astype(np.float32)
W2 = RNG.standard_normal((16, 3)).astype(np.float32)
C = RNG.standard_normal((4, 3)).astype(np.float32)


def _small_model() -> tuple[ndl.Tensor, list[ndl.Tensor]]:
    """loss = sum(relu(x @ w1) @ w2 * c); only w1 and w2 require gradients."""
    x = ndl.Tensor(X, requires_grad=False)
    c = ndl.Tensor(C, requires_grad=False)
    w1 = ndl.Tensor(W1, requires_grad=True)
    w2 = ndl.Tensor(W2, requires_grad=True)
    loss = (((x @ w1).relu() @ w2) * c).sum()
    return loss, [w1, w2]


def _counts(events, phase):
    return dict(collections.Counter(e.name for e in events if e.kind == "op"
                                    and e.phase == phase))


def test_eager_ops_and_counts_match_a_hand_count():
    with ndl.profile() as prof:
        loss, _ = _small_model()
        loss.backward()
    # forward: 2 matmuls, relu, the product with c, the sum
    assert _counts(prof.events, "forward") == {
        "matmul": 2, "relu": 1, "multiply": 1, "summation": 1}
    # backward: the ones seed; sum (over every axis) -> broadcast_to alone (the reduced axes
    # are the leading ones: broadcasting adds them back); (* c) -> one multiply (c needs
    # no gradient); @ w2 -> two adjoints (one transposed_matmul each); relu -> one relu_grad;
    # x @ w1 -> only w1's adjoint (x needs none)
    assert _counts(prof.events, "backward") == {
        "full_like": 1, "broadcast_to": 1, "multiply": 1,
        "transposed_matmul": 3, "relu_grad": 1}
    regions = [e for e in prof.events if e.kind == "region"]
    assert [(e.name, e.category) for e in regions] == [("backward", "autograd")]
    first = next(e for e in prof.events if e.name == "matmul")
    assert first.input_shapes == ((4, 8), (8, 16))
    assert first.output_shapes == ((4, 16),)
    assert first.input_dtypes == ("float32", "float32")
    assert first.bytes == 4 * 16 * 4
    assert first.category == "eager"


def test_times_are_positive_and_fit_in_the_block():
    with ndl.profile() as prof:
        for _ in range(3):
            loss, _ = _small_model()
            loss.backward()
    assert all(e.dur_ns > 0 and 0 <= e.self_ns <= e.dur_ns for e in prof.events)
    top_level = [e for e in prof.events if e.kind == "region" or e.phase == "forward"]
    assert sum(e.dur_ns for e in top_level) <= prof.wall_ns
    assert sum(e.self_ns for e in prof.events) <= prof.wall_ns
    # a region's self time is its time less the ops nested in it
    region = next(e for e in prof.events if e.name == "backward")
    inside = [e for e in prof.events if e.kind == "op" and e.phase == "backward"
              and region.start_ns <= e.start_ns <= region.start_ns + region.dur_ns]
    assert len(inside) == 7  # the backward ops of the hand count above
    assert region.self_ns == region.dur_ns - sum(e.dur_ns for e in inside)


def test_table_sorts_groups_and_limits():
    with ndl.profile() as prof:
        loss, _ = _small_model()
        loss.backward()
    by_count = prof.table(sort_by="count", limit=3).splitlines()
    assert by_count[1].split()[:2] == ["Name", "Kind"]
    rows = [line.split() for line in by_count[3:6]]
    assert rows[0][0] == "transposed_matmul" and rows[0][3] == "3"  # the 3 backward products
    assert "(6 not shown)" in by_count[-1]  # 8 op names + the backward region
    assert "wall time" in by_count[-1]
    table = prof.table(group_by="op+shape", limit=None, kind="op")
    assert "matmul ((4, 8), (8, 16))" in table
    assert "backward" not in table.split("\n", 3)[3].split()[0:1]
    assert "matmul forward" in prof.table(group_by="op+phase", limit=None)
    stats = {s.name: s for s in prof.key_averages()}
    assert stats["matmul"].count == 2 and stats["transposed_matmul"].count == 3
    assert stats["matmul"].total_ns == sum(e.dur_ns for e in prof.events if e.name == "matmul")
    with pytest.raises(ValueError, match="sort_by"):
        prof.table(sort_by="speed")
    with pytest.raises(ValueError, match="group_by"):
        prof.table(group_by="colour")


def test_chrome_trace_has_one_complete_event_per_recorded_event(tmp_path):
    with ndl.profile() as prof, ndl.profile.record("step"):
        loss, _ = _small_model()
        loss.backward()
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    trace = json.loads(path.read_text())
    complete = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(complete) == len(prof.events)
    for event in complete:
        assert {"name", "ph", "ts", "dur", "pid", "tid", "cat", "args"} <= set(event)
        assert event["dur"] > 0 and event["ts"] >= 0
    assert collections.Counter(e["name"] for e in complete) == collections.Counter(
        e.name for e in prof.events)
    # the user's region encloses every other event on the same thread
    step = next(e for e in complete if e["name"] == "step")
    assert all(step["ts"] <= e["ts"] and e["ts"] + e["dur"] <= step["ts"] + step["dur"] + 1e-3
               for e in complete)
    matmul = next(e for e in complete if e["name"] == "matmul")
    assert matmul["args"]["input_shapes"] == [[4, 8], [8, 16]]


def test_user_regions_and_source_lines():
    with ndl.profile.record("outside"):  # no profile active: nothing happens
        pass
    with ndl.profile(with_source=True) as prof, prof.region("forward pass"):
        y = ndl.Tensor(X, requires_grad=False).relu()  # this line is recorded
    assert y.shape == (4, 8)
    names = [e.name for e in prof.events]
    assert names == ["relu", "forward pass"]
    relu = prof.events[0]
    assert relu.source is not None and relu.source.startswith(__file__ + ":")
    with pytest.raises(RuntimeError, match="inside the profile"), prof.region("late"):
        pass


def test_session_steps_and_run_metadata(tmp_path):
    with st.Graph():
        x = st.placeholder((None, 8), name="x")
        w = st.Variable(W1, name="w")
        h = ndl.ops.relu(x @ w)
        y = ndl.ops.summation(h * 2.0)
        sess = st.Session()
        expected = sess.run(y, {x: X})
        with ndl.profile() as prof:
            got = sess.run(y, {x: X})
        assert np.array_equal(got, expected)
        steps = [e for e in prof.events if e.kind == "step"]
        assert [e.name for e in steps] == [s for s in sess.plan(y, {x: X}).ops]
        assert all(e.category == "session" for e in steps)
        assert [e.name for e in prof.events if e.kind == "region"] == ["Session.run"]
        untimed = st.RunMetadata()  # as in TF1: step stats only when asked for
        assert np.array_equal(sess.run(y, {x: X}, run_metadata=untimed), expected)
        meta = st.RunMetadata()
        got = sess.run(y, {x: X}, run_metadata=meta,
                       options=st.RunOptions(trace_level=st.RunOptions.FULL_TRACE))
        assert np.array_equal(got, expected)
        with pytest.raises(TypeError, match="RunOptions"):
            sess.run(y, {x: X}, run_metadata=meta, options={"trace_level": 3})
    assert untimed.step_stats == [] and untimed.executed == meta.executed
    assert untimed.peak_bytes == meta.peak_bytes > 0
    assert context.state().profiler is None  # the temporary recorder is gone
    assert list(meta.node_times) == meta.executed and len(meta.executed) == len(steps)
    assert all(t > 0 for t in meta.node_times.values())
    matmul = meta.step_stats[0]
    assert matmul.name == "matmul" and matmul.input_shapes == ((4, 8), (8, 16))
    trace = meta.chrome_trace(str(tmp_path / "timeline.json"))
    on_disk = json.loads((tmp_path / "timeline.json").read_text())
    assert on_disk == json.loads(json.dumps(trace))
    assert [e["args"]["node"] for e in on_disk["traceEvents"] if e["ph"] == "X"] \
        == meta.executed


def test_run_metadata_times_cond_branch_steps():
    with st.Graph():
        x = st.placeholder((3,), name="x")
        p = st.placeholder((), dtype="bool", name="p")
        y = st.cond(p, lambda: ndl.ops.exp(x), lambda: ndl.ops.negate(x))
        sess = st.Session()
        meta = st.RunMetadata()
        sess.run(y, {x: np.ones(3, np.float32), p: np.array(True)}, run_metadata=meta,
                 options=st.RunOptions(trace_level=st.RunOptions.SOFTWARE_TRACE))
    ops = [e.name for e in meta.step_stats]
    assert "exp" in ops and "negate" not in ops and "cond" in ops
    assert set(meta.node_times) == set(meta.executed)


def test_jit_steps_appear_in_both_phases():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    fn = ndl.jit(lambda t: model(t).sum())
    x = ndl.Tensor(X, requires_grad=False)
    fn(x).backward()  # compiled (and the gradient plan built) before profiling
    with ndl.profile() as prof:
        fn(x).backward()
    calls = [e for e in prof.events if e.name == "jit_call"]
    assert [e.phase for e in calls] == ["forward", "backward"]
    assert all(e.category == "jit" and e.kind == "op" for e in calls)
    steps = [e for e in prof.events if e.kind == "step"]
    assert all(e.category == "jit" for e in steps)
    # one event per step of the compiled program (other steps may be fused, so only these
    # are certain): the two products (nn.Linear's product and bias: one linear op), then the sum
    forward = [e.name for e in steps if e.phase == "forward"]
    assert forward.count("linear") == 2 and forward[0] == "linear"
    assert forward[-1] == "summation" and forward.count("summation") == 1
    assert any(e.name == "transposed_matmul" for e in steps if e.phase == "backward")
    # the steps of a call lie inside it
    call = calls[0]
    for e in steps:
        if e.phase == "forward":
            assert call.start_ns <= e.start_ns and e.start_ns + e.dur_ns <= \
                call.start_ns + call.dur_ns
    assert call.self_ns < call.dur_ns


def test_caffe_layers_appear_with_their_ops():
    spec = [
        {"name": "input", "type": "Input", "top": ["data", "label"],
         "shape": [[None, 8], [None]]},
        {"name": "ip1", "type": "InnerProduct", "bottom": "data", "top": "ip1",
         "num_output": 16},
        {"name": "relu1", "type": "ReLU", "bottom": "ip1", "top": "ip1"},
        {"name": "ip2", "type": "InnerProduct", "bottom": "ip1", "top": "ip2",
         "num_output": 3},
        {"name": "loss", "type": "SoftmaxWithLoss", "bottom": ["ip2", "label"],
         "top": "loss"},
    ]
    net = cf.Net(spec)
    labels = np.array([0, 1, 2, 0])
    with ndl.profile() as prof:
        net.forward(data=X, label=labels)
        net.backward()
    layers = [(e.node, e.name, e.phase) for e in prof.events if e.category == "caffe"]
    assert layers == [
        ("ip1", "InnerProduct", "forward"), ("relu1", "ReLU", "forward"),
        ("ip2", "InnerProduct", "forward"), ("loss", "SoftmaxWithLoss", "forward"),
        ("loss", "SoftmaxWithLoss", "backward"), ("ip2", "InnerProduct", "backward"),
        ("relu1", "ReLU", "backward"), ("ip1", "InnerProduct", "backward")]
    ip1 = next(e for e in prof.events if e.node == "ip1")
    assert ip1.input_shapes == ((4, 8),) and ip1.output_shapes == ((4, 16),)
    inner = [e for e in prof.events if e.kind == "op"
             and ip1.start_ns <= e.start_ns <= ip1.start_ns + ip1.dur_ns]
    assert "matmul" in {e.name for e in inner}
    assert ip1.self_ns == ip1.dur_ns - sum(e.dur_ns for e in inner)


def test_nested_profiles_and_threads():
    seen_in_thread: list = []

    def other_thread() -> None:
        ndl.Tensor(X, requires_grad=False).exp()  # not profiled: its thread has no profile
        with ndl.profile() as inner:
            ndl.Tensor(X, requires_grad=False).tanh()
        seen_in_thread.extend((e.name, e.thread) for e in inner.events)

    with ndl.profile() as outer:
        ndl.Tensor(X, requires_grad=False).relu()
        with ndl.profile() as inner:
            ndl.Tensor(X, requires_grad=False).sigmoid()
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
    assert [e.name for e in inner.events] == ["sigmoid"]
    assert [e.name for e in outer.events] == ["relu", "sigmoid"]
    assert seen_in_thread == [("tanh", worker.ident)]
    assert {e.thread for e in outer.events} == {threading.get_ident()}
    assert context.state().profiler is None


def test_errors_inside_a_profile_leave_it_consistent():
    with st.Graph():
        x = st.placeholder((None, 3), name="x")
        y = ndl.ops.reshape(x, (2, 2))
        sess = st.Session()
        with ndl.profile() as prof:
            with pytest.raises(ValueError):
                ndl.Tensor(X, requires_grad=False) @ ndl.Tensor(X, requires_grad=False)
            with pytest.raises(NodeRunError):
                sess.run(y, {x: np.ones((3, 3), np.float32)})
            ndl.Tensor(X, requires_grad=False).relu()
    recorder_frames = prof.events[-1]
    assert recorder_frames.name == "relu" and recorder_frames.self_ns == recorder_frames.dur_ns
    assert context.state().profiler is None


def test_profiling_leaves_results_bit_identical():
    def eager() -> list[np.ndarray]:
        loss, params = _small_model()
        loss.backward()
        return [loss.numpy(), *(p.grad.numpy() for p in params)]

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    fn = ndl.jit(lambda t: model(t) * 3.0 + 1.0)
    x = ndl.Tensor(X, requires_grad=False)

    def jitted() -> list[np.ndarray]:
        for p in model.parameters():
            p.grad = None
        out = fn(x)
        out.sum().backward()
        return [out.numpy(), *(p.grad.numpy() for p in model.parameters())]

    plain = eager() + jitted()
    with ndl.profile() as prof:
        profiled = eager() + jitted()
    assert prof.events
    after = eager() + jitted()
    for a, b, c in zip(plain, profiled, after):
        assert a.dtype == b.dtype and np.array_equal(a, b) and np.array_equal(a, c)
    count = len(prof.events)
    eager()
    assert len(prof.events) == count  # nothing recorded after the block
