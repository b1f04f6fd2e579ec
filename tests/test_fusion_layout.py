"""Fused regions over channels-last memory (NHWC behind an NCHW view, as the convolution
kernels return): the loop runs in the memory order of its lead input, results equal eager's
bit for bit and keep the inputs' layout; other layouts still give eager's results."""

from __future__ import annotations

import numpy as np
import pytest

import needle as ndl
from needle import ops
from needle.backend.numba_support import numba_module

pytest.importorskip("numba")
if numba_module() is None:  # NEEDLE_NUMBA=0 turns region fusion off
    pytest.skip("region fusion needs numba (NEEDLE_NUMBA=0)", allow_module_level=True)
from needle.compiler import fusion  # noqa: E402


@pytest.fixture(autouse=True)
def _fuse_at_once(monkeypatch):
    monkeypatch.setattr(fusion, "FUSE_AFTER_CALLS", 0)


def _regions(jitted):
    entry = [e for group in jitted._cache.values() for e in group][-1]
    return [s.op for s in entry.plan.executable.current.program.steps
            if s.op.name == "fused_region"]


def _nhwc(rng, shape):
    n, c, h, w = shape
    return ndl.Tensor(rng.standard_normal((n, h, w, c)).astype(np.float32))


def _axis_order(array):
    """Axes from the largest stride to the smallest: the memory order."""
    return tuple(np.argsort([-abs(s) for s in array.strides], kind="stable"))


def test_a_region_on_channels_last_views_loops_in_memory_order():
    rng = np.random.default_rng(0)

    def f(x, y, b):
        x, y = ops.permute(x, (0, 3, 1, 2)), ops.permute(y, (0, 3, 1, 2))
        return ops.relu(x * 2.0 + b) + y

    jitted = ndl.jit(f)
    shape = (4, 6, 5, 3)
    x, y = _nhwc(rng, shape), _nhwc(rng, shape)
    b = ndl.Tensor(rng.standard_normal((1, 6, 1, 1)).astype(np.float32))
    want = f(x, y, b).numpy()
    for _ in range(2):
        got = jitted(x, y, b).numpy()
        np.testing.assert_array_equal(got, want)
    assert _axis_order(got) == (0, 2, 3, 1)  # NHWC memory, as its inputs
    (region,) = _regions(jitted)
    assert list(region._by_order) == [(0, 2, 3, 1)]


def test_a_region_writing_into_a_dead_channels_last_input():
    rng = np.random.default_rng(1)

    def f(x):
        u = ops.exp(ops.permute(x, (0, 3, 1, 2)))  # big: a NumPy call, NHWC out, owned
        return ops.relu(u * 3.0 - 4.0) * 0.5

    jitted = ndl.jit(f)
    x = _nhwc(rng, (2, 8, 6, 6))
    want = f(x).numpy()
    for _ in range(2):
        np.testing.assert_array_equal(jitted(x).numpy(), want)
    (region,) = _regions(jitted)
    assert region.structure[4] != (None,)  # stored into u's array
    assert list(region._by_order) == [(0, 2, 3, 1)]


def test_mixed_and_unorderable_layouts_still_give_eager_results():
    rng = np.random.default_rng(2)

    def mixed(x, y):  # lead channels-last, the other input in C order
        return ops.relu(ops.permute(x, (0, 3, 1, 2)) * y) + y

    def sliced(x, y):  # every other row of a channels-last view: no order is contiguous
        return ops.relu(ops.permute(x, (0, 3, 1, 2))[:, :, ::2, :] * 2.0 - 1.0) * 0.5 + y

    x = _nhwc(rng, (2, 4, 6, 5))
    for fn, y_shape in ((mixed, (2, 4, 6, 5)), (sliced, (2, 4, 3, 5))):
        y = ndl.Tensor(rng.standard_normal(y_shape).astype(np.float32))
        jitted = ndl.jit(fn)
        want = fn(x, y).numpy()
        for _ in range(2):
            np.testing.assert_array_equal(jitted(x, y).numpy(), want)
        assert _regions(jitted), fn.__name__
