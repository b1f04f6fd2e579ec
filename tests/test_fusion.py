"""Region fusion (compiler/fusion.py): fused programs compute what the unfused ones do.

Random elementwise graphs (broadcasting, float32/float64) under ndl.jit with fusion on and off
and eagerly: bit-identical where only exactly rounded ops are involved, to 1e-6 relative where
exp/log/tanh run as C library calls; every model of needle.apps.models trained a few steps
under ndl.jit, and an MLP in a Session, equal with fusion on and off; unknown shapes left
alone; the kernel cache bounded; reads before a state write stay before it.
"""

from __future__ import annotations

import numpy as np
import pytest

from needle.backend.numba_support import numba_module

pytest.importorskip("numba")
if numba_module() is None:  # NEEDLE_NUMBA=0 turns region fusion off
    pytest.skip("region fusion needs numba (NEEDLE_NUMBA=0)", allow_module_level=True)

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as hst  # noqa: E402

import needle as ndl  # noqa: E402
import needle.nn as nn  # noqa: E402
import needle.static as st  # noqa: E402
from needle.apps.models import MODEL_NAMES, build_model  # noqa: E402
from needle.apps.trainer import make_train_step  # noqa: E402
from needle.compiler import fusion  # noqa: E402
from needle.core.interpret import build_program  # noqa: E402

ops = ndl.ops


@pytest.fixture(autouse=True)
def _fuse_at_once(monkeypatch):
    """Plans fuse on their first call here (by default only once called 50 times)."""
    monkeypatch.setattr(fusion, "FUSE_AFTER_CALLS", 0)

# -- random elementwise graphs -------------------------------------------------------------------
#: (name, function of two tensors, exact: rounds as NumPy does bit for bit)
BINARY = [
    ("add", lambda a, b: a + b, True),
    ("sub", lambda a, b: a - b, True),
    ("mul", lambda a, b: a * b, True),
    ("div", lambda a, b: a / (b * b + 1.0), True),
    ("maximum", lambda a, b: ops.maximum(a, b), True),
    ("where", lambda a, b: ops.where(ops.compare(a, b, "gt"), a, b), True),
]
UNARY = [
    ("relu", lambda a: ops.relu(a), True),
    ("neg", lambda a: -a, True),
    ("scale", lambda a: a * 0.75 + 0.25, True),
    ("square", lambda a: a**2, True),
    ("abs_sqrt", lambda a: ops.sqrt(ops.abs(a)), True),
    ("halve", lambda a: a / 2, True),
    ("mask", lambda a: a * ops.astype(ops.compare_scalar(a, 0.1, "le"), a.dtype), True),
    ("tanh", lambda a: ops.tanh(a), False),
    ("sigmoid", lambda a: ops.sigmoid(a), False),
    ("exp", lambda a: ops.exp(ops.tanh(a)), False),
    ("log", lambda a: ops.log(a * a + 1.0), False),
]
#: input shapes that broadcast to (3, 4)
SHAPES = [(3, 4), (1, 4), (4,), (3, 1), (1, 1)]


@hst.composite
def graphs(draw):
    dtype = draw(hst.sampled_from([np.float32, np.float64]))
    shapes = [draw(hst.sampled_from(SHAPES)) for _ in range(draw(hst.integers(2, 3)))]
    shapes[0] = (3, 4)  # the loop shape
    program = []
    for _ in range(draw(hst.integers(2, 7))):
        if draw(hst.booleans()):
            program.append(("u", draw(hst.integers(0, len(UNARY) - 1)), draw(hst.integers(0, 99))))
        else:
            program.append(("b", draw(hst.integers(0, len(BINARY) - 1)),
                            draw(hst.integers(0, 99)), draw(hst.integers(0, 99))))
    return dtype, shapes, program


def _graph_fn(program):
    def fn(*inputs):
        values = list(inputs)
        for item in program:
            if item[0] == "u":
                values.append(UNARY[item[1]][1](values[item[2] % len(values)]))
            else:
                values.append(BINARY[item[1]][1](values[item[2] % len(values)],
                                                 values[item[3] % len(values)]))
        return values[len(inputs):][-2:]
    return fn


def _exact(program) -> bool:
    return all((UNARY if item[0] == "u" else BINARY)[item[1]][2] for item in program)


def _run_jit(fn, arrays, monkeypatch, enabled: bool):
    monkeypatch.setenv("NEEDLE_FUSION", "1" if enabled else "0")
    jitted = ndl.jit(fn)
    tensors = [ndl.Tensor(a, requires_grad=False) for a in arrays]
    jitted(*tensors)
    out = jitted(*tensors)  # the replay
    out = out if isinstance(out, list | tuple) else [out]
    return [o.numpy() for o in out], jitted.lower(*tensors)


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(graphs(), hst.integers(0, 2**16))
def test_random_elementwise_graphs_fused_equal_unfused_and_eager(monkeypatch, graph, seed):
    dtype, shapes, program = graph
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(s).astype(dtype) for s in shapes]
    fn = _graph_fn(program)
    fused, lowered = _run_jit(fn, arrays, monkeypatch, True)
    plain, _ = _run_jit(fn, arrays, monkeypatch, False)
    eager = [o.numpy() for o in fn(*[ndl.Tensor(a, requires_grad=False) for a in arrays])]
    for f, p, e in zip(fused, plain, eager):
        assert f.dtype == p.dtype == e.dtype and f.shape == p.shape == e.shape
        np.testing.assert_array_equal(p, e)
        if _exact(program):  # same operations in the same order: the same bits
            np.testing.assert_array_equal(f, p)
        else:
            # last-bit differences of tanh/exp/log, grown by later ops (cancellation)
            np.testing.assert_allclose(f, p, rtol=1e-6 if dtype == np.float64 else 2e-6,
                                       atol=1e-6)


def test_a_chain_fuses_into_one_loop_with_identical_results(monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    c = rng.uniform(0.9, 1.1, (1, 64)).astype(np.float32)

    def chain(x, c):
        y = x
        for i in range(10):
            y = ops.relu(y * c + c) if i % 2 else ops.relu(y + c) * c
        return y

    fused, program = _run_jit(chain, [x, c], monkeypatch, True)
    plain, _ = _run_jit(chain, [x, c], monkeypatch, False)
    np.testing.assert_array_equal(fused[0], plain[0])
    passes = program.passes
    assert "region_fusion (1 regions; 1 steps run)" in passes, passes
    assert len(program.steps) == 30  # lower() keeps the plain ops (ONNX export reads them)


def test_values_read_outside_a_region_are_its_outputs(monkeypatch):
    """A region's intermediate read by a matmul is stored; the rest stay in registers."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((4, 4)).astype(np.float32)

    def fn(a):
        h = ops.relu(a * 2.0 + 1.0)
        return ops.tanh(h @ a) * h - h

    fused, program = _run_jit(fn, [a], monkeypatch, True)
    plain, _ = _run_jit(fn, [a], monkeypatch, False)
    np.testing.assert_allclose(fused[0], plain[0], rtol=2e-6, atol=1e-6)  # tanh: C library
    monkeypatch.setenv("NEEDLE_FUSION", "1")
    copy, regions = fusion.fused_copy(program)
    assert regions == 2
    names = [s.op.name for s in copy.steps]
    assert names == ["fused_region", "matmul", "fused_region"], names


# -- models --------------------------------------------------------------------------------------
def _train_jit(name: str, monkeypatch, enabled: bool, steps: int = 3):
    monkeypatch.setenv("NEEDLE_FUSION", "1" if enabled else "0")
    image_shape = (8, 8, 3) if name == "cnn" else (6, 6, 1)
    np.random.seed(0)
    model = build_model(name, image_shape, 5)
    # NOTE: SGD, not Adam: Adam divides by sqrt(v), so a last-bit difference (exp in the loss's
    # gradient is a C library call in the loop) in a near-zero gradient moves a weight by lr
    opt = ndl.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    step = ndl.jit(make_train_step(model, nn.SoftmaxLoss(), opt))
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        images = rng.standard_normal((16, *image_shape)).astype(np.float32)
        if name != "cnn":
            images = images.reshape(16, -1)
        labels = rng.integers(0, 5, 16)
        np.random.seed(1)  # Dropout's masks: the same draws in both runs
        args = (ndl.Tensor(images, requires_grad=False), ndl.Tensor(labels))
        loss, _ = step(*args)
        losses.append(float(loss.numpy()))
    return losses, [p.numpy() for p in model.parameters()], step.lower(*args)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_trains_the_same_under_jit_with_and_without_fusion(monkeypatch, name):
    fused_losses, fused_params, program = _train_jit(name, monkeypatch, True)
    plain_losses, plain_params, _ = _train_jit(name, monkeypatch, False)
    np.testing.assert_allclose(fused_losses, plain_losses, rtol=1e-5, atol=1e-6)
    for f, p in zip(fused_params, plain_params):
        np.testing.assert_allclose(f, p, rtol=1e-4, atol=1e-5)
    if name == "mlp-resnet":  # ReLU/Dropout/mask chains of the step became loops
        assert any(p.startswith("region_fusion") for p in program.passes), program.passes


def _train_session(monkeypatch, enabled: bool, batch: tuple = (16, 20)):
    monkeypatch.setenv("NEEDLE_FUSION", "1" if enabled else "0")
    np.random.seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 32),
                          nn.Tanh(), nn.Linear(32, 4))
    rng = np.random.default_rng(3)
    with st.Graph():
        x = st.placeholder(batch, name="x")
        y = st.placeholder(batch[:1], dtype="int64", name="y")
        loss = nn.SoftmaxLoss()(model(x), y)
        train = st.minimize(ndl.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), loss)
        sess = st.Session()
        losses = []
        for _ in range(3):
            np.random.seed(2)
            images = rng.standard_normal((16, 20)).astype(np.float32)
            labels = rng.integers(0, 4, 16)
            losses.append(float(sess.run([train, loss], {x: images, y: labels})[1]))
        runner = next(iter(sess._runners.values()))
    return losses, [p.numpy() for p in model.parameters()], runner


def test_a_session_trains_the_same_with_and_without_fusion(monkeypatch):
    fused_losses, fused_params, runner = _train_session(monkeypatch, True)
    plain_losses, plain_params, _ = _train_session(monkeypatch, False)
    np.testing.assert_allclose(fused_losses, plain_losses, rtol=1e-6, atol=1e-6)
    for f, p in zip(fused_params, plain_params):
        np.testing.assert_allclose(f, p, rtol=1e-5, atol=1e-6)
    assert runner is not None
    assert any(s.op.name == "fused_region" for s in runner.compiled.program.steps)
    assert not any(s.op.name == "fused_region" for s in runner.program.steps)  # (run_metadata)


# -- what is left alone ------------------------------------------------------------------------
def test_regions_with_unknown_shapes_are_left_alone():
    with st.Graph():
        x = st.placeholder((None, 4), name="x")
        y = ops.relu(x * 2.0 + 1.0) * x
        program = build_program([y], lambda n: n.op is None)
        assert fusion.find_regions(program) == []
        assert fusion.fused_copy(program) == (program, 0)
        sess = st.Session()
        data = np.arange(8, dtype=np.float32).reshape(2, 4) - 3
        np.testing.assert_array_equal(sess.run(y, {x: data}),
                                      np.maximum(data * 2 + 1, 0) * data)


def test_integer_values_are_left_alone(monkeypatch):
    a = np.arange(12, dtype=np.int64).reshape(3, 4)
    out, program = _run_jit(lambda t: (t * 2 + 1) * t, [a], monkeypatch, True)
    np.testing.assert_array_equal(out[0], (a * 2 + 1) * a)
    assert fusion.fused_copy(program)[1] == 0


def test_fusion_can_be_turned_off(monkeypatch):
    a = np.ones((3, 4), np.float32)
    _, program = _run_jit(lambda t: ops.relu(t * 2.0 + 1.0), [a], monkeypatch, False)
    assert not any(p.startswith("region_fusion") for p in program.passes)
    assert fusion.fused_copy(program) == (program, 0)


def test_reads_before_a_state_write_see_the_old_value(monkeypatch):
    """A region is sealed at an assign: ``doubled`` (read before the write) must not join the
    region of ``after`` (which needs the write's result), or it would read the new value."""
    for enabled in (True, False):
        monkeypatch.setenv("NEEDLE_FUSION", "1" if enabled else "0")
        with st.Graph():
            v = st.Variable(np.full((2, 3), 2.0, np.float32), name="v")
            doubled = v * 2.0
            update = st.assign(v, v * 3.0)
            after = (doubled + 1.0) * update
            sess = st.Session()
            got = sess.run([after, update])
        np.testing.assert_array_equal(got[1], np.full((2, 3), 6.0, np.float32))
        np.testing.assert_array_equal(got[0], np.full((2, 3), (2.0 * 2 + 1) * 6.0, np.float32))


def test_python_scalars_round_as_numpy_does(monkeypatch):
    """Scalars are cast to the array's dtype (NumPy's weak scalars): float32 stays float32 in
    every step, so the loop gives NumPy's bits, not a float64 computation rounded once."""
    a = np.random.default_rng(5).standard_normal((64, 64)).astype(np.float32)

    def fn(t):
        return ((t * 0.1 + 0.3) / 3.0 - 0.7) * 1.1

    fused, program = _run_jit(fn, [a], monkeypatch, True)
    np.testing.assert_array_equal(fused[0], ((a * 0.1 + 0.3) / 3.0 - 0.7) * 1.1)
    assert fused[0].dtype == np.float32
    assert any(p.startswith("region_fusion") for p in program.passes)


def test_the_kernel_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(fusion, "CACHE_SIZE", 3)
    fusion.clear_cache()
    monkeypatch.setenv("NEEDLE_FUSION", "1")
    for k in range(5):  # five region structures (different scalars)
        a = np.ones((2, 3), np.float32)
        out, _ = _run_jit(lambda t, k=k: ops.relu(t * float(k + 2)) + 1.0, [a], monkeypatch,
                          True)
        np.testing.assert_array_equal(out[0], np.maximum(a * (k + 2), 0) + 1)
        assert fusion.cache_info()["size"] <= 3
    assert fusion.cache_info() == {"size": 3, "max_size": 3}


def test_a_kernel_refuses_inputs_of_another_shape():
    """The generated guard: a wrong shape is an error, never an out-of-bounds read."""
    with st.Graph():
        x = st.placeholder((2, 3), name="x")
        y = ops.relu(x * 2.0) + 1.0
        program = build_program([y], lambda n: n.op is None)
    copy, regions = fusion.fused_copy(program)
    assert regions == 1
    (step,) = copy.steps
    with pytest.raises(ValueError, match=r"inputs of shapes \(4, 3\), expected \(2, 3\)"):
        step.op.compute(np.ones((4, 3), np.float32))


def test_a_region_writes_its_result_into_a_dead_input(monkeypatch):
    """tanh of 10,000 elements stays a NumPy call (faster than a scalar loop); the region after
    it stores its result into tanh's array, which nothing reads afterwards."""
    rng = np.random.default_rng(2)
    a = rng.standard_normal((100, 100)).astype(np.float32)

    def fn(a):
        return ops.tanh(ops.relu(a * 2.0) + 1.0) * 3.0 - 0.5

    fused, program = _run_jit(fn, [a], monkeypatch, True)
    plain, _ = _run_jit(fn, [a], monkeypatch, False)
    np.testing.assert_array_equal(fused[0], plain[0])  # tanh is NumPy's in both
    monkeypatch.setenv("NEEDLE_FUSION", "1")
    copy, regions = fusion.fused_copy(program)
    assert [s.op.name for s in copy.steps] == ["fused_region", "tanh", "fused_region"]
    first, _, last = copy.steps
    assert first.op.structure[4] == (None,)  # its input is the caller's array: never written
    assert last.op.structure[4] == (0,)
    assert "o0 = a0" in last.op.kernel.source


def test_plans_fuse_once_they_are_hot(monkeypatch):
    """Regions compile at a plan's FUSE_AFTER_CALLS-th call: a plan run a few times never
    pays numba's compile time."""
    monkeypatch.setattr(fusion, "FUSE_AFTER_CALLS", 3)
    monkeypatch.setenv("NEEDLE_FUSION", "1")
    a = ndl.Tensor(np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), requires_grad=False)
    jitted = ndl.jit(lambda t: ops.relu(t * 2.0 + 0.5) * t)
    expected = np.maximum(a.numpy() * 2 + 0.5, 0) * a.numpy()
    for call in range(1, 5):
        np.testing.assert_array_equal(jitted(a).numpy(), expected)
        fused = any(p.startswith("region_fusion") for p in jitted.lower(a).passes)
        assert fused == (call >= 3), call


def test_strided_inputs_and_scalar_inputs(monkeypatch):
    """A transposed view (not C-contiguous) and a 0-d value feed a region: numba compiles
    that layout too, and the 0-d value arrives as a scalar."""
    rng = np.random.default_rng(4)
    a = rng.standard_normal((5, 3)).astype(np.float64)
    b = rng.standard_normal((3, 5)).astype(np.float64)

    def fn(a, b):
        s = ops.summation(b)  # 0-d
        return ops.relu(ops.transpose(a) * 2.0 + b) * s - s

    fused, program = _run_jit(fn, [a, b], monkeypatch, True)
    plain, _ = _run_jit(fn, [a, b], monkeypatch, False)
    np.testing.assert_array_equal(fused[0], plain[0])
    monkeypatch.setenv("NEEDLE_FUSION", "1")
    copy, regions = fusion.fused_copy(program)
    assert regions == 1 and "fused_region" in [s.op.name for s in copy.steps]
