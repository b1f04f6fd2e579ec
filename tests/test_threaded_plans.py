"""Fused regions of compiled plans over large arrays, split into blocks of rows that needle's
threads draw (compiler/fusion.py ``FusedRegion.in_blocks``): they must give, bit for bit,
what the one-call loop and eager give, on one thread or two, for the layouts an NCHW model
makes (NHWC memory behind an NCHW view, C order), writing into a dead input too."""

from __future__ import annotations

import numpy as np
import pytest

import needle as ndl
from needle import ops
from needle.backend import cpu_threads
from needle.backend.numba_support import numba_module

pytest.importorskip("numba")
if numba_module() is None:  # NEEDLE_NUMBA=0 turns region fusion off
    pytest.skip("region fusion needs numba (NEEDLE_NUMBA=0)", allow_module_level=True)
from needle.compiler import fusion  # noqa: E402

_SPECIAL = [0.0, -0.0, 1.0, -1.0, np.nan, np.inf, -np.inf, 1e-45, -1e-45]


@pytest.fixture(autouse=True)
def _small_and_hot(monkeypatch):
    """Fuse at the first call, and split loops of 2**12 values or more into blocks of 2**10
    (the defaults need 2 MB arrays to split; the tests stay small)."""
    monkeypatch.setattr(fusion, "FUSE_AFTER_CALLS", 0)
    monkeypatch.setattr(fusion, "SPLIT_MIN_ELEMENTS", 1 << 12)
    monkeypatch.setattr(fusion, "BLOCK_ELEMENTS", 1 << 10)


@pytest.fixture
def chunk_runs(monkeypatch):
    """Counts the split passes (``run_chunks`` calls) made through fusion.py."""
    calls = []
    real = cpu_threads.run_chunks

    def counting(fn, count, parts):
        calls.append(count)
        real(fn, count, parts)

    monkeypatch.setattr(cpu_threads, "run_chunks", counting)
    return calls


def _plan(jitted):
    entry = [e for group in jitted._cache.values() for e in group][-1]
    executable = entry.plan.executable
    return getattr(executable, "current", executable)  # the fused plan where there is one


def _regions(jitted):
    return [s.op for s in _plan(jitted).program.steps if s.op.name == "fused_region"]


def _with_specials(rng, shape):
    x = rng.standard_normal(shape).astype(np.float32)
    flat = x.reshape(-1)
    flat[rng.choice(flat.size, 10 * len(_SPECIAL), replace=False)] = np.tile(
        np.array(_SPECIAL, np.float32), 10)
    return x


def _input(rng, layout):
    """A (9, 6, 20, 20) NCHW tensor: an NCHW view of NHWC memory (what nn.Conv gives) or C
    order (21600 values: 9 blocks of rows, one image each)."""
    if layout == "nhwc":
        return ndl.Tensor(_with_specials(rng, (9, 20, 20, 6))), True
    return ndl.Tensor(_with_specials(rng, (9, 6, 20, 20))), False


def _region_fn(channels_last):
    def f(x, b, y):
        if channels_last:
            x = ops.permute(x, (0, 3, 1, 2))
        t = x * 2.0 + b  # read outside the region too: a second output
        return ops.relu(t) - y, t * 0.5
    return f


def _run(f, args, threads, monkeypatch, split=True):
    monkeypatch.setattr(cpu_threads, "NUM_THREADS", threads)
    monkeypatch.setattr(fusion, "SPLIT_MIN_ELEMENTS", 1 << 12 if split else 1 << 62)
    jitted = ndl.jit(f)
    outs = [tuple(o.numpy() for o in jitted(*args)) for _ in range(2)]
    return jitted, outs[-1]


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_split_region_gives_the_one_call_loops_bits_on_any_thread_count(
        layout, monkeypatch, chunk_runs):
    rng = np.random.default_rng(0)
    x, channels_last = _input(rng, layout)
    b = ndl.Tensor(rng.standard_normal((1, 6, 1, 1)).astype(np.float32))
    y = ndl.Tensor(rng.standard_normal((9, 6, 20, 20)).astype(np.float32))
    f = _region_fn(channels_last)
    jitted_one, want = _run(f, (x, b, y), 2, monkeypatch, split=False)
    assert not chunk_runs
    (region,) = _regions(jitted_one)
    assert region.compute != region.in_blocks
    eager = f(x, b, y)
    for threads in (1, 2):
        jitted, got = _run(f, (x, b, y), threads, monkeypatch)
        (region,) = _regions(jitted)
        assert region.compute == region.in_blocks
        for g, w, e in zip(got, want, eager):
            np.testing.assert_array_equal(g.view(np.uint32), w.view(np.uint32))
            np.testing.assert_array_equal(g, e.numpy())
            assert g.strides == w.strides  # the inputs' layout kept
    assert chunk_runs == [9, 9]  # two calls on 2 threads: 9 blocks of rows (one image each)


def test_split_region_writing_into_a_dead_input(monkeypatch, chunk_runs):
    rng = np.random.default_rng(1)

    def f(x):
        u = ops.exp(ops.permute(x, (0, 3, 1, 2)))  # a NumPy call: an array the plan owns
        return ops.relu(u * 3.0 - 4.0) * 0.5

    x = ndl.Tensor(rng.standard_normal((9, 20, 20, 6)).astype(np.float32))
    monkeypatch.setattr(cpu_threads, "NUM_THREADS", 2)
    jitted = ndl.jit(f)
    want = f(x).numpy()
    for _ in range(2):
        np.testing.assert_array_equal(jitted(x).numpy(), want)
    (region,) = _regions(jitted)
    assert region.structure[4] != (None,)  # stored into u's array
    assert chunk_runs and list(region._blocks_by_order) == [(0, 2, 3, 1)]


def test_split_region_still_checks_input_shapes(monkeypatch):
    rng = np.random.default_rng(2)
    x, _ = _input(rng, "nchw")
    b = ndl.Tensor(np.ones((1, 6, 1, 1), np.float32))
    y = ndl.Tensor(np.zeros((9, 6, 20, 20), np.float32))
    jitted, _ = _run(_region_fn(False), (x, b, y), 2, monkeypatch)
    (region,) = _regions(jitted)
    small = np.zeros((9, 6, 20, 19), np.float32)
    with pytest.raises(ValueError, match="fused region"):
        region.compute(small, b.numpy(), small)
