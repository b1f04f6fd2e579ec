"""The Store op's running average (kernels/running_average.py): the compiled loop and the NumPy
formula give the same bits, on every path, and BatchNorm's running statistics follow PyTorch's."""

from __future__ import annotations

import numpy as np
import pytest

import needle as ndl
import needle.nn as nn
from needle.kernels import running_average as ra


def _reference(target: np.ndarray, value: np.ndarray, momentum: float) -> np.ndarray:
    """An independent transcription: the two products and the sum, each rounded to the
    target's dtype (NumPy's scalar rules: Python floats take the array's dtype)."""
    dtype = target.dtype
    keep, take = np.asarray(1.0 - momentum, dtype), np.asarray(momentum, value.dtype)
    return ((target * keep).astype(dtype) + (value * take)).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("momentum", [0.1, 0.01, 0.3])
def test_compiled_and_numpy_paths_same_bits(dtype, momentum, monkeypatch):
    rng = np.random.default_rng(0)
    compiled = rng.standard_normal(257).astype(dtype)
    plain, reference = compiled.copy(), compiled.copy()
    for _ in range(30):
        value = (rng.standard_normal(257) * 10).astype(dtype)
        ra.running_average(compiled, value, momentum)
        reference = _reference(reference, value, momentum)
        with monkeypatch.context() as m:  # the NumPy formula (numba absent or failed)
            m.setitem(ra._factors, (np.dtype(dtype), momentum), ())
            ra.running_average(plain, value, momentum)
    assert np.array_equal(compiled, reference) and np.array_equal(plain, reference)


def test_loop_runs_where_numba_is():
    pytest.importorskip("numba")
    if ra.numba_module() is None:
        pytest.skip("numba turned off (NEEDLE_NUMBA=0)")
    ra.running_average(np.zeros(3, np.float32), np.ones(3, np.float32), 0.25)
    assert ra._factors[(np.dtype(np.float32), 0.25)][0] is not None


@pytest.mark.parametrize("case", ["mixed_dtype", "strided", "matrix", "float16"])
def test_other_arrays_take_the_numpy_formula(case):
    rng = np.random.default_rng(1)
    target = rng.standard_normal((4, 6)).astype(np.float32)
    value = rng.standard_normal((4, 6)).astype(np.float32)
    if case == "mixed_dtype":
        target, value = target[0], value[0].astype(np.float64)
    elif case == "strided":
        target, value = target[:, 0], value[:, 1]
    elif case == "float16":
        target, value = target[0].astype(np.float16), value[0].astype(np.float16)
    expected = _reference(target.copy(), value, 0.1)
    ra.running_average(target, value, 0.1)
    assert target.dtype == expected.dtype and np.array_equal(target, expected)


def test_store_writes_reshaped_value_in_place():
    buffer = ndl.Tensor(np.full(6, 2.0, np.float32))
    array = buffer.numpy()
    ndl.ops.store(ndl.Tensor(np.arange(6, dtype=np.float32).reshape(2, 3)), target=buffer,
                  momentum=0.5)
    assert np.array_equal(buffer.numpy(), (np.float32(2.0) * np.float32(0.5)
                                           + np.arange(6, dtype=np.float32) * np.float32(0.5)))
    assert buffer.numpy() is array or np.shares_memory(buffer.numpy(), array)


@pytest.mark.parametrize("jitted", [False, True])
def test_batchnorm_running_statistics_follow_torch(jitted):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    bn, ref = nn.BatchNorm1d(7, momentum=0.1), torch.nn.BatchNorm1d(7, momentum=0.1)

    def step(x):
        return bn(x)

    run = ndl.jit(step) if jitted else step
    running_var = np.ones(7)
    for _ in range(20):
        x = (rng.standard_normal((16, 7)) * 3 + 1).astype(np.float32)
        run(ndl.Tensor(x))
        ref(torch.from_numpy(x))
        running_var = 0.9 * running_var + 0.1 * x.astype(np.float64).var(axis=0)
    np.testing.assert_allclose(bn.running_mean.numpy(), ref.running_mean.numpy(), rtol=1e-5,
                               atol=1e-6)
    # needle keeps the biased batch variance (see BatchNorm1d's docstring), PyTorch the
    # unbiased one: checked against a float64 transcription instead
    np.testing.assert_allclose(bn.running_var.numpy(), running_var, rtol=1e-5)
