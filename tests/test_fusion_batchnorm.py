"""BatchNorm in fused regions (``BatchNorm.scalar_expr``): the training-mode ``batch_norm`` op
joins the relu / residual add after it in one generated loop under ndl.jit, and gives eager's
bits (float32, float64; (B, C) and NCHW), and eager's values to float32 rounding where the
weights are float64 on float32 input (``var + eps`` then rounds in float64)."""

from __future__ import annotations

import numpy as np
import pytest

import needle as ndl  # noqa: E402
from needle.backend.numba_support import numba_module  # noqa: E402
from needle.compiler import fusion  # noqa: E402

if numba_module() is None:  # not installed, or NEEDLE_NUMBA=0: no region fusion
    pytest.skip("region fusion needs numba", allow_module_level=True)

ops = ndl.ops


@pytest.fixture(autouse=True)
def _fuse_at_once(monkeypatch):
    monkeypatch.setattr(fusion, "FUSE_AFTER_CALLS", 0)


def _block(x, weight, bias, skip):
    axes = tuple(i for i in range(len(x.shape)) if i != 1)
    mean = ops.mean(x, axes=axes, keepdims=True)
    var = ops.variance(x, axes=axes, keepdims=True)
    return ops.relu(ops.batch_norm(x, weight, bias, mean, var, axes=axes, eps=1e-5) + skip)


def _arrays(shape, dtype, param_dtype, seed=0):
    rng = np.random.default_rng(seed)
    channels = (1, shape[1]) + (1,) * (len(shape) - 2)
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    weight = rng.uniform(0.5, 1.5, channels).astype(param_dtype)
    bias = rng.standard_normal(channels).astype(param_dtype)
    skip = rng.standard_normal(shape).astype(dtype)
    return x, weight, bias, skip


def _jit_and_eager(arrays):
    tensors = [ndl.Tensor(a, requires_grad=False) for a in arrays]
    jitted = ndl.jit(_block)
    jitted(*tensors)
    fused = jitted(*tensors).numpy()  # the replay, on the fused plan
    program = jitted.lower(*tensors)
    return fused, _block(*tensors).numpy(), program


@pytest.mark.parametrize("shape", [(100, 50), (8, 6, 5, 4)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batch_norm_fuses_with_what_follows_and_matches_eager_bit_for_bit(shape, dtype):
    fused, eager, program = _jit_and_eager(_arrays(shape, dtype, dtype))
    assert any(p.startswith("region_fusion") for p in program.passes), program.passes
    assert fused.dtype == eager.dtype == dtype
    np.testing.assert_array_equal(fused, eager)


def test_channels_last_memory_matches_eager_bit_for_bit():
    """x stored NHWC behind an NCHW view (what the convolution kernels return)."""
    x, weight, bias, skip = _arrays((8, 6, 5, 4), np.float32, np.float32)
    x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    fused, eager, _ = _jit_and_eager((x, weight, bias, skip))
    np.testing.assert_array_equal(fused, eager)


def test_batch_norm_is_a_member_of_the_fused_region():
    arrays = _arrays((100, 50), np.float32, np.float32)
    tensors = [ndl.Tensor(a, requires_grad=False) for a in arrays]
    program = ndl.jit(_block).lower(*tensors)
    regions = fusion.find_regions(program)
    names = {program.steps[i].op.name for region in regions for i in region}
    assert {"batch_norm", "relu"} <= names, names


def test_float64_weights_on_float32_input_match_eager_to_rounding():
    fused, eager, _ = _jit_and_eager(_arrays((100, 50), np.float32, np.float64))
    assert fused.dtype == eager.dtype == np.float64
    np.testing.assert_allclose(fused, eager, rtol=1e-6, atol=1e-6)
