"""Per-position subexpressions hoisted out of fused regions' loops (compiler/hoisting.py,
``fusion.HOIST_LAST_AXIS``): a BatchNorm's per-channel ``weight / sqrt(var + eps)`` is
computed once per channel, on channels-last memory (NCHW views), in (B, C) matrices, in one
call, in prange blocks and on needle's threads, and the results keep the bits of the loop
without hoisting and of eager."""

from __future__ import annotations

import numpy as np
import pytest

import needle as ndl
from needle import ops
from needle.backend import cpu_threads, parallel_loops
from needle.backend.numba_support import numba_module

pytest.importorskip("numba")
if numba_module() is None:  # NEEDLE_NUMBA=0 turns region fusion off
    pytest.skip("region fusion needs numba (NEEDLE_NUMBA=0)", allow_module_level=True)
from needle.compiler import fusion, hoisting  # noqa: E402


@pytest.fixture(autouse=True)
def _fuse_at_once(monkeypatch):
    monkeypatch.setattr(fusion, "FUSE_AFTER_CALLS", 0)


def _regions(jitted):
    entry = [e for group in jitted._cache.values() for e in group][-1]
    executable = entry.plan.executable
    plan = getattr(executable, "current", executable)
    return [s.op for s in plan.program.steps if s.op.name == "fused_region"]


def _bits(a):
    return a.view({1: np.uint8, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def _run(f, args, monkeypatch, hoist):
    """The jitted ``f`` (its regions compiled with hoisting on or off) and its replay."""
    with monkeypatch.context() as m:
        m.setattr(fusion, "HOIST_LAST_AXIS", hoist)
        jitted = ndl.jit(f)
        jitted(*args)
        return jitted, jitted(*args)


def _element_loop(source):
    return source[source.index("for i0 in range"):]


def _bn_relu(x, weight, bias, mean, var):
    x = ops.permute(x, (0, 3, 1, 2))  # NHWC memory behind an NCHW view, as convs return
    return ops.relu(ops.batch_norm(x, weight, bias, mean, var, axes=(0, 2, 3), eps=1e-5))


def _bn_arrays(rng, shape, dtype=np.float32):
    n, c, h, w = shape
    x = rng.standard_normal((n, h, w, c)).astype(dtype)
    specials = np.array([np.nan, np.inf, -np.inf, -0.0])
    x.reshape(-1)[::97] = specials[np.arange(x.reshape(-1)[::97].size) % 4]
    params = [rng.uniform(0.5, 1.5, (1, c, 1, 1)).astype(dtype) for _ in range(4)]
    return [ndl.Tensor(a) for a in (x, *params)]


@pytest.mark.parametrize("shape", [(3, 16, 5, 7), (2, 3, 9, 4)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_channels_last_batch_norm_relu_hoisted_keeps_the_bits(monkeypatch, shape, dtype):
    args = _bn_arrays(np.random.default_rng(0), shape, dtype)
    results = {}
    for hoist in (True, False):
        jitted, got = _run(_bn_relu, args, monkeypatch, hoist)
        (region,) = _regions(jitted)
        source = region._by_order[(0, 2, 3, 1)].source  # the loop in NHWC order ran
        assert ("sqrt" not in _element_loop(source) and "hp_" in source) == hoist
        results[hoist] = got.numpy()
    eager = _bn_relu(*args).numpy()
    np.testing.assert_array_equal(_bits(results[True]), _bits(results[False]))
    np.testing.assert_array_equal(_bits(results[True]), _bits(eager))
    assert results[True].strides == results[False].strides  # NHWC memory kept


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batch_norm_on_rows_hoisted_keeps_the_bits(monkeypatch, dtype):
    # BatchNorm1d on (B, C) in C order, (C,) and (1, C) operands, a residual add, 2 outputs
    def f(x, weight, bias, mean, var, skip):
        t = ops.batch_norm(x, weight, bias, mean, var, axes=(0,), eps=1e-5)
        return ops.relu(t + skip), t

    rng = np.random.default_rng(4)
    arrays = [rng.standard_normal((37, 50)), rng.uniform(0.5, 1.5, 50), rng.standard_normal(50),
              rng.standard_normal((1, 50)), rng.uniform(0.5, 1.5, (1, 50)),
              rng.standard_normal((37, 50))]
    arrays[0].reshape(-1)[::41] = np.nan
    tensors = [ndl.Tensor(a.astype(dtype)) for a in arrays]
    results = {}
    for hoist in (True, False):
        jitted, got = _run(f, tensors, monkeypatch, hoist)
        (region,) = _regions(jitted)
        assert ("sqrt" not in _element_loop(region.kernel.source)) == hoist
        results[hoist] = [o.numpy() for o in got]
    eager = [o.numpy() for o in f(*tensors)]
    for h, n, e in zip(results[True], results[False], eager):
        np.testing.assert_array_equal(_bits(h), _bits(n))
        np.testing.assert_array_equal(_bits(h), _bits(e))


def _two_outputs(x, weight, bias, mean, var, s, y):
    t = ops.batch_norm(ops.permute(x, (0, 3, 1, 2)), weight, bias, mean, var, axes=(0, 2, 3),
                       eps=1e-5) * s
    return ops.relu(t) - ops.permute(y, (0, 3, 1, 2)), t * 0.5


def test_hoisted_loops_in_prange_blocks_and_on_threads_keep_the_bits(monkeypatch):
    rng = np.random.default_rng(2)
    x, *params = _bn_arrays(rng, (7, 29, 13, 11))
    s = ndl.Tensor(np.array(1.5, np.float32))
    y = ndl.Tensor(rng.standard_normal((7, 13, 11, 29)).astype(np.float32))
    args = (x, *params, s, y)
    monkeypatch.setattr(fusion, "PRANGE_MIN_ELEMENTS", 1 << 12)
    monkeypatch.setattr(fusion, "PRANGE_BLOCK_ELEMENTS", 1 << 10)
    monkeypatch.setattr(fusion, "SPLIT_MIN_ELEMENTS", 1 << 12)
    monkeypatch.setattr(fusion, "BLOCK_ELEMENTS", 1 << 11)
    monkeypatch.setattr(cpu_threads, "NUM_THREADS", 2)
    jitted = ndl.jit(_two_outputs)
    got = [o.numpy() for o in jitted(*args)]
    (region,) = _regions(jitted)
    assert region.compute == region.in_blocks
    (blocks,) = region._blocks_by_order.values()  # the given-outputs loop the blocks ran
    assert blocks is not None and blocks.signatures
    if parallel_loops.parallel_threads() > 0:
        assert any(fn is not None and fn.signatures for fn in region._prange_by_cut.values())
    with monkeypatch.context() as m:
        m.setattr(parallel_loops, "tbb_layer", lambda: False)  # needle's threads
        chunks = [o.numpy() for o in jitted(*args)]
        m.setattr(cpu_threads, "NUM_THREADS", 1)
        whole = [o.numpy() for o in jitted(*args)]  # one call
    _, plain = _run(_two_outputs, args, monkeypatch, False)
    eager = [o.numpy() for o in _two_outputs(*args)]
    for k in range(2):
        for other in (chunks[k], whole[k], plain[k].numpy(), eager[k]):
            np.testing.assert_array_equal(_bits(got[k]), _bits(other))
    sources = [k.source for key, k in fusion._cache.items() if "given outputs" in key]
    assert any("hp_" in src and "sqrt" not in _element_loop(src) for src in sources)


def test_hoist_splits_members_into_per_position_and_per_element_statements():
    exprs = ["x1 * x2 + k0",  # per position only: a whole member
             "x0 * (t0 * (k1 / np.sqrt(x1 + k0)))",  # (t0 * ...) per position
             "np.maximum(t1, x2) if t1 > x1 else t0"]
    column, element, arrays = hoisting.hoist(exprs, {"x1"}, {"x2", "k0", "k1"},
                                             ["o0[i0, i1,] = t2"])
    assert column == ["t0 = x1 * x2 + k0", "h0 = t0 * (k1 / np.sqrt(x1 + k0))"]
    assert element == ["t1 = x0 * h0", "t2 = np.maximum(t1, x2) if t1 > x1 else t0"]
    assert arrays == ["h0", "t0", "x1"]


# -- random graphs with per-channel and scalar operands ---------------------------------------
BINARY = [lambda a, b: a + b, lambda a, b: a - b, lambda a, b: a * b,
          lambda a, b: a / (b * b + 1.0), lambda a, b: ops.maximum(a, b),
          lambda a, b: ops.where(ops.compare(a, b, "gt"), a, b)]
UNARY = [lambda a: ops.relu(a), lambda a: -a, lambda a: a * 0.75 + 0.25, lambda a: a**2,
         lambda a: ops.sqrt(ops.abs(a)), lambda a: a / 2,
         lambda a: a * ops.astype(ops.compare_scalar(a, 0.1, "le"), a.dtype)]


def _graph(*inputs, program, channels_last):
    """The ops of ``program`` over the inputs; the first five: x (full size) and a BatchNorm's
    weight, bias, mean and variance (per channel)."""
    values = [ops.permute(v, (0, 3, 1, 2)) if channels_last and len(v.shape) == 4
              and v.shape[-1] == 6 else v for v in inputs]
    full, stats = values[0].shape, values[1:5]
    axes = (0, 2, 3) if channels_last else (0,)
    first = len(values)
    for item in program:
        if item[0] == "n":  # BatchNorm of the latest full-size value
            last = [v for v in values if v.shape == full][-1]
            values.append(ops.batch_norm(last, *stats, axes=axes, eps=1e-5))
        elif item[0] == "u":
            values.append(UNARY[item[1]](values[item[2] % len(values)]))
        else:
            values.append(BINARY[item[1]](values[item[2] % len(values)],
                                          values[item[3] % len(values)]))
    return [values[-1], values[max(first, len(values) - 2)]]


def test_random_graphs_hoisted_equal_not_hoisted_and_eager(monkeypatch):
    hypothesis = pytest.importorskip("hypothesis")
    hst = pytest.importorskip("hypothesis.strategies")
    hoisted_sources: list[str] = []
    real = fusion._compile

    def recording(key, structure, signature, given_outputs=False):
        kernel = real(key, structure, signature, given_outputs)
        hoisted_sources.append(kernel.source)
        return kernel

    monkeypatch.setattr(fusion, "_compile", recording)

    @hst.composite
    def graphs(draw):
        dtype = draw(hst.sampled_from([np.float32, np.float64]))
        channels_last = draw(hst.booleans())
        options = ([(1, 6, 1, 1), (6, 1, 1), (), "full"] if channels_last
                   else [(6,), (1, 6), (), "full"])
        others = [draw(hst.sampled_from(options)) for _ in range(draw(hst.integers(1, 3)))]
        program = []
        for _ in range(draw(hst.integers(2, 6))):
            if draw(hst.integers(0, 3)) == 0:
                program.append(("n",))
            elif draw(hst.booleans()):
                program.append(("u", draw(hst.integers(0, len(UNARY) - 1)),
                                draw(hst.integers(0, 99))))
            else:
                program.append(("b", draw(hst.integers(0, len(BINARY) - 1)),
                                draw(hst.integers(0, 99)), draw(hst.integers(0, 99))))
        return dtype, channels_last, others, program

    @hypothesis.settings(max_examples=12, deadline=None, derandomize=True,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(graphs(), hst.integers(0, 2**16))
    def check(graph, seed):
        dtype, channels_last, others, program = graph
        rng = np.random.default_rng(seed)
        full = (3, 7, 5, 6) if channels_last else (9, 6)  # NHWC memory, or (B, C)
        stat = (1, 6, 1, 1) if channels_last else (6,)
        arrays = [rng.standard_normal(full)] + [rng.uniform(0.5, 1.5, stat) for _ in range(4)]
        arrays += [rng.standard_normal(full if s == "full" else s) for s in others]
        tensors = [ndl.Tensor(a.astype(dtype)) for a in arrays]

        def f(*inputs):
            return _graph(*inputs, program=program, channels_last=channels_last)

        outs = {}
        for hoist in (True, False):
            _, got = _run(f, tensors, monkeypatch, hoist)
            outs[hoist] = [o.numpy() for o in got]
        eager = [o.numpy() for o in f(*tensors)]
        for h, n, e in zip(outs[True], outs[False], eager):
            np.testing.assert_array_equal(_bits(h), _bits(n))
            np.testing.assert_array_equal(_bits(h), _bits(e))

    check()
    assert any("hp_" in source for source in hoisted_sources)  # some graphs hoisted
