"""ReLU, its adjoint, the bias add, the blocked column sums and large fused regions as numba
prange loops over blocks fixed by the shape (kernels/numba_parallel_elementwise.py,
threaded_elementwise.py, column_sums.py, compiler/fusion.py): the prange loops must run where
numba's TBB layer does, and give bit for bit what the path without them gives
(``parallel_threads()`` 0: the serial loops, or needle's threads), on shapes whose blocks are
uneven."""

from __future__ import annotations

import numpy as np
import pytest

import needle as ndl
from needle import ops
from needle.backend import cpu_threads, parallel_loops
from needle.backend.numba_support import numba_module

from .helpers import loops_that_ran

pytest.importorskip("numba")
if numba_module() is None:
    pytest.skip("the prange loops need numba (NEEDLE_NUMBA=0)", allow_module_level=True)
from needle.compiler import fusion  # noqa: E402
from needle.kernels import column_sums, threaded_elementwise  # noqa: E402

_SPECIAL = [0.0, -0.0, 1.0, -1.0, np.nan, -np.nan, np.inf, -np.inf, 1e-45, -1e-45]


@pytest.fixture(autouse=True)
def _two_threads_small_blocks(monkeypatch):
    """Two threads, and prange from 2**12 elements in blocks of 2**10 (the defaults need
    1 MB arrays); skip where numba's parallel loops do not run on TBB."""
    monkeypatch.setattr(cpu_threads, "NUM_THREADS", 2)
    if not parallel_loops.parallel_threads():
        pytest.skip("numba's parallel loops are off here (NEEDLE_PARALLEL_LOOPS=0, or no TBB)")
    monkeypatch.setattr(threaded_elementwise, "PRANGE_MIN_ELEMENTS", 1 << 12)
    monkeypatch.setattr(threaded_elementwise, "PRANGE_BLOCK_ELEMENTS", 1 << 10)
    monkeypatch.setattr(fusion, "PRANGE_MIN_ELEMENTS", 1 << 12)
    monkeypatch.setattr(fusion, "PRANGE_BLOCK_ELEMENTS", 1 << 10)
    monkeypatch.setattr(fusion, "FUSE_AFTER_CALLS", 0)


@pytest.fixture
def prange_calls(monkeypatch):
    """Names of the prange loops that ran (through the NumbaLoops latches)."""
    return loops_that_ran(monkeypatch, threaded_elementwise._parallel_loops,
                          column_sums._parallel_loops)


def _no_prange(monkeypatch) -> None:
    monkeypatch.setattr(parallel_loops, "tbb_layer", lambda: False)
    assert parallel_loops.parallel_threads() == 0


def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).view(np.uint8)


def _with_specials(rng: np.random.Generator, shape: tuple, dtype=np.float32) -> np.ndarray:
    x = rng.standard_normal(shape).astype(dtype)
    flat = x.reshape(-1)
    flat[rng.choice(flat.size, 10 * len(_SPECIAL), replace=False)] = np.tile(
        np.array(_SPECIAL, dtype), 10)
    return x


def _both_ways(fn, monkeypatch, threads_path: bool = True):
    """fn() with the prange loops, then without them: on one thread (the serial loops) and,
    with ``threads_path``, on needle's two threads (blocks drawn by them)."""
    got = fn()
    with monkeypatch.context() as m:
        _no_prange(m)
        serial = []
        for threads in (1, 2) if threads_path else (1,):
            m.setattr(cpu_threads, "NUM_THREADS", threads)
            serial.append(fn())
    return got, serial


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_and_relu_grad_same_bits_as_the_serial_loops(dtype, monkeypatch, prange_calls):
    # 50141 values (above MIN_ELEMENTS) in memory order: 49 uneven blocks
    rng = np.random.default_rng(0)
    a = _with_specials(rng, (7, 13, 19, 29), dtype).transpose(0, 3, 1, 2)  # NCHW view
    g = _with_specials(rng, (7, 13, 19, 29), dtype).transpose(0, 3, 1, 2)
    got, serial = _both_ways(lambda: (threaded_elementwise.relu(a),
                                      threaded_elementwise.relu_grad(a, g)), monkeypatch)
    assert prange_calls == ["_relu_blocks", "_relu_grad_blocks"]
    from needle.kernels import numba_parallel_elementwise as parallel
    assert parallel.relu.signatures and parallel.relu_grad.signatures
    for want in serial:
        for x, w in zip(got, want):
            np.testing.assert_array_equal(_bits(x), _bits(w))
            assert x.strides == a.strides  # the input's layout kept
    np.testing.assert_array_equal(_bits(got[0]), _bits(np.maximum(a, dtype(0))))


@pytest.mark.parametrize("small_shape", [(7, 29, 1, 1), (1, 29, 1, 1), (7, 29, 13, 1)])
def test_relu_grad_of_a_broadcast_gradient_same_bits(small_shape, monkeypatch, prange_calls):
    """The global average pool's gradient (broadcast over H, W; along N too for (1, C, 1, 1))
    read from its small array in prange blocks of N."""
    rng = np.random.default_rng(1)
    a = _with_specials(rng, (7, 13, 19, 29)).transpose(0, 3, 1, 2)
    g = np.broadcast_to(rng.standard_normal(small_shape).astype(np.float32), a.shape)
    got, serial = _both_ways(lambda: threaded_elementwise.relu_grad(a, g), monkeypatch)
    assert prange_calls == ["_relu_grad_rows_blocks"]
    for want in serial:
        np.testing.assert_array_equal(_bits(got), _bits(want))
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(_bits(got), _bits((a > 0).astype(np.float32) * g))


def test_bias_add_same_bits(monkeypatch, prange_calls):
    rng = np.random.default_rng(2)
    xm = _with_specials(rng, (1001, 37))  # 37037 values: 36 uneven blocks of rows
    b = rng.standard_normal(37).astype(np.float32)
    got, serial = _both_ways(lambda: threaded_elementwise.add_row(xm, b), monkeypatch)
    assert prange_calls == ["_add_row_blocks"]
    for want in serial:
        np.testing.assert_array_equal(_bits(got), _bits(want))
    np.testing.assert_array_equal(_bits(got), _bits(xm + b))


@pytest.mark.parametrize("shape", [(20001, 13), (4099, 64)])
def test_blocked_column_sums_same_bits(shape, monkeypatch, prange_calls):
    monkeypatch.setattr(column_sums, "SPLIT_MIN_ELEMENTS", 1 << 14)
    monkeypatch.setattr(column_sums, "BLOCK_ELEMENTS", 1 << 13)
    monkeypatch.setattr(column_sums, "THREADS_MIN_ELEMENTS", 1 << 16)
    m = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    got, serial = _both_ways(lambda: column_sums.blocked_column_sums(m), monkeypatch)
    assert prange_calls == ["_column_block_sums"]
    assert got is not None and got.dtype == np.float32
    for want in serial:
        np.testing.assert_array_equal(_bits(got), _bits(want))
    ref = m.astype(np.float64).sum(axis=0)
    assert np.all(np.abs(got - ref) <= np.spacing(np.abs(ref).astype(np.float32)))


def test_a_loop_numba_cannot_compile_leaves_the_serial_path(monkeypatch, prange_calls):
    monkeypatch.setattr(threaded_elementwise._parallel_loops, "failed", ["forced"])
    a = _with_specials(np.random.default_rng(4), (50000,))
    np.testing.assert_array_equal(_bits(threaded_elementwise.relu(a)),
                                  _bits(np.maximum(a, np.float32(0))))
    assert not prange_calls


# -- fused regions --------------------------------------------------------------------------------
def _region_fn(x, b, s, y):
    """A region with a broadcast input (b: not cut into blocks), a 0-d input (s) and two
    outputs (t is read outside the region)."""
    t = ops.permute(x, (0, 3, 1, 2)) * s + b
    return ops.relu(t) - y, t * 0.5


@pytest.fixture
def prange_compiles(monkeypatch):
    compiled: list[tuple] = []
    real = fusion._compile_prange

    def counting(kernel, cut, num_outputs, signature):
        compiled.append(cut)
        return real(kernel, cut, num_outputs, signature)

    monkeypatch.setattr(fusion, "_compile_prange", counting)
    return compiled


def _regions(jitted):
    entry = [e for group in jitted._cache.values() for e in group][-1]
    executable = entry.plan.executable
    plan = getattr(executable, "current", executable)
    return [s.op for s in plan.program.steps if s.op.name == "fused_region"]


def test_fused_region_in_prange_blocks_same_bits(monkeypatch, prange_compiles):
    rng = np.random.default_rng(5)
    # (7, 13, 11, 29) NHWC memory seen as NCHW: 29029 values, 28 uneven blocks of rows
    x = ndl.Tensor(_with_specials(rng, (7, 13, 11, 29)))
    b = ndl.Tensor(rng.standard_normal((1, 29, 1, 1)).astype(np.float32))
    s = ndl.Tensor(np.array(1.5, np.float32))
    y = ndl.Tensor(rng.standard_normal((7, 29, 13, 11)).astype(np.float32))
    jitted = ndl.jit(_region_fn)
    got = [o.numpy() for o in jitted(x, b, s, y)]
    (region,) = _regions(jitted)
    assert region.compute == region.in_blocks
    assert prange_compiles == [(True, False, False, True)]  # x and y cut, b and s whole
    got_again = [o.numpy() for o in jitted(x, b, s, y)]
    assert len(prange_compiles) == 1  # compiled once
    with monkeypatch.context() as m:
        _no_prange(m)
        chunks = [o.numpy() for o in jitted(x, b, s, y)]  # needle's threads
        m.setattr(cpu_threads, "NUM_THREADS", 1)
        whole = [o.numpy() for o in jitted(x, b, s, y)]  # the one-call loop
    eager = [o.numpy() for o in _region_fn(x, b, s, y)]
    for k in range(2):
        for other in (got_again[k], chunks[k], whole[k], eager[k]):
            np.testing.assert_array_equal(_bits(got[k]), _bits(other))
        assert got[k].strides == whole[k].strides


def test_fused_region_writing_into_a_dead_input_in_prange_blocks(monkeypatch, prange_compiles):
    def f(x):
        u = ops.exp(ops.permute(x, (0, 3, 1, 2)))  # a NumPy call: an array the plan owns
        return ops.relu(u * 3.0 - 4.0) * 0.5

    x = ndl.Tensor(np.random.default_rng(6).standard_normal((9, 20, 20, 6)).astype(np.float32))
    jitted = ndl.jit(f)
    want = f(x).numpy()
    for _ in range(2):
        np.testing.assert_array_equal(_bits(jitted(x).numpy()), _bits(want))
    (region,) = _regions(jitted)
    assert region.structure[4] != (None,)  # stored into u's array
    assert prange_compiles == [(True,)]
