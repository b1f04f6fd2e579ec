"""needle.init: exact draws under a seed (NumPy transcriptions), bounds, gains, shapes, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import needle as ndl
import needle.init as init


def _u32(*shape):
    """needle's backend draw: ``np.random.rand(*shape).astype("float32")``."""
    return np.random.rand(*shape).astype(np.float32)


def _n32(*shape):
    return np.random.randn(*shape).astype(np.float32)


def _seeded(fn, seed=7):
    """Run ``fn`` right after ``np.random.seed(seed)``; return its value and the next draw."""
    np.random.seed(seed)
    value = fn()
    return value, np.random.rand()


# -- factories --------------------------------------------------------------------------------
def test_rand_is_one_scaled_draw():
    out, after = _seeded(lambda: init.rand(3, 4, low=-2.0, high=5.0))
    # needle's backend casts the draw to float32 first, then scales it
    expected, expected_after = _seeded(lambda: _u32(3, 4) * (5.0 - -2.0) + -2.0)
    np.testing.assert_array_equal(out.numpy(), expected)
    assert after == expected_after  # exactly one draw of the full shape
    assert out.dtype == "float32" and out.shape == (3, 4)
    assert not out.requires_grad and out.is_leaf()


def test_randn_is_one_scaled_draw():
    out, after = _seeded(lambda: init.randn(2, 5, mean=1.5, std=0.25))
    expected, expected_after = _seeded(lambda: _n32(2, 5) * 0.25 + 1.5)
    np.testing.assert_array_equal(out.numpy(), expected)
    assert after == expected_after


def test_randb_is_rand_le_p_and_bool_by_default():
    out, after = _seeded(lambda: init.randb(4, 6, p=0.3))
    expected, expected_after = _seeded(lambda: _u32(4, 6) <= 0.3)
    assert out.dtype == np.bool_
    np.testing.assert_array_equal(out.numpy(), expected)
    assert after == expected_after
    as_float, _ = _seeded(lambda: init.randb(4, 6, p=0.3, dtype="float32"))
    np.testing.assert_array_equal(as_float.numpy(), expected.astype(np.float32))


def test_float64_draws_keep_their_precision():
    out, _ = _seeded(lambda: init.rand(3, 4, low=-1.0, high=1.0, dtype="float64"))
    expected, _ = _seeded(lambda: np.random.rand(3, 4) * 2.0 + -1.0)
    np.testing.assert_array_equal(out.numpy(), expected)


def test_shape_may_be_given_as_a_tuple():
    a, _ = _seeded(lambda: init.rand((2, 3)))
    b, _ = _seeded(lambda: init.rand(2, 3))
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_dtype_and_requires_grad_options():
    x = init.randn(3, dtype="float64", requires_grad=True)
    assert x.dtype == "float64" and x.requires_grad
    # integer tensors never require a gradient
    assert not init.zeros(2, dtype="int64", requires_grad=True).requires_grad


def test_constant_ones_zeros_draw_nothing():
    state = np.random.get_state()[1].copy()
    c = init.constant(2, 3, c=2.5)
    np.testing.assert_array_equal(c.numpy(), np.full((2, 3), 2.5, np.float32))
    np.testing.assert_array_equal(init.ones(2, 2).numpy(), np.ones((2, 2), np.float32))
    np.testing.assert_array_equal(init.zeros(3).numpy(), np.zeros(3, np.float32))
    np.testing.assert_array_equal(np.random.get_state()[1], state)
    like = init.ones_like(init.zeros(2, 3, dtype="float64"))
    assert like.shape == (2, 3) and like.dtype == "float64" and like.numpy().sum() == 6
    assert init.zeros_like(c).numpy().sum() == 0


# -- one_hot ----------------------------------------------------------------------------------
def test_one_hot_rows_of_identity():
    out = init.one_hot(4, ndl.Tensor([3, 0, 2], requires_grad=False))
    np.testing.assert_array_equal(out.numpy(), np.eye(4, dtype=np.float32)[[3, 0, 2]])
    assert out.dtype == "float32" and not out.requires_grad


def test_one_hot_keeps_the_id_shape_and_accepts_whole_floats():
    ids = np.array([[1.0, 0.0], [2.0, 2.0]], dtype=np.float32)
    out = init.one_hot(3, ids, dtype="float64")
    assert out.shape == (2, 2, 3) and out.dtype == "float64"
    np.testing.assert_array_equal(out.numpy(), np.eye(3)[ids.astype(int)])
    assert init.one_hot(3, 1).shape == (3,)


@pytest.mark.parametrize("ids", [[0, 3], [-1, 0], [0.5, 1.0]])
def test_one_hot_rejects_bad_ids(ids):
    with pytest.raises(ValueError, match="one_hot"):
        init.one_hot(3, np.array(ids))


# -- initializers -----------------------------------------------------------------------------
@pytest.mark.parametrize("gain", [1.0, 2.0])
def test_xavier_uniform_transcription(gain):
    out, after = _seeded(lambda: init.xavier_uniform(6, 10, gain=gain))
    a = gain * math.sqrt(6.0 / 16)
    expected, expected_after = _seeded(lambda: _u32(6, 10) * (a - -a) + -a)
    np.testing.assert_array_equal(out.numpy(), expected)
    assert after == expected_after and out.shape == (6, 10)
    assert np.abs(out.numpy()).max() <= a


def test_xavier_normal_transcription():
    out, _ = _seeded(lambda: init.xavier_normal(6, 10, gain=1.5))
    std = 1.5 * math.sqrt(2.0 / 16)
    expected, _ = _seeded(lambda: _n32(6, 10) * std + 0.0)
    np.testing.assert_array_equal(out.numpy(), expected)


def test_kaiming_uniform_transcription():
    out, after = _seeded(lambda: init.kaiming_uniform(5, 8))
    bound = math.sqrt(2.0) * math.sqrt(3.0 / 5)
    expected, expected_after = _seeded(lambda: _u32(5, 8) * (bound - -bound) + -bound)
    np.testing.assert_array_equal(out.numpy(), expected)
    assert after == expected_after


def test_kaiming_uniform_shape_keeps_the_fan_in_bound():
    # a conv kernel (k, k, in, out) with fan_in = in * k * k
    out, _ = _seeded(lambda: init.kaiming_uniform(3 * 9, 4 * 9, shape=(3, 3, 3, 4)))
    bound = math.sqrt(2.0) * math.sqrt(3.0 / 27)
    expected, _ = _seeded(lambda: _u32(3, 3, 3, 4) * (bound - -bound) + -bound)
    assert out.shape == (3, 3, 3, 4)
    np.testing.assert_array_equal(out.numpy(), expected)
    # needle hw4's positional order (fan_in, fan_out, shape) works too
    positional, _ = _seeded(lambda: init.kaiming_uniform(27, 36, (3, 3, 3, 4)))
    np.testing.assert_array_equal(positional.numpy(), out.numpy())


def test_kaiming_normal_transcription_and_other_gains():
    out, _ = _seeded(lambda: init.kaiming_normal(5, 8))
    expected, _ = _seeded(lambda: _n32(5, 8) * (math.sqrt(2.0) / math.sqrt(5)) + 0.0)
    np.testing.assert_array_equal(out.numpy(), expected)
    tanh, _ = _seeded(lambda: init.kaiming_normal(5, 8, nonlinearity="tanh"))
    expected, _ = _seeded(lambda: _n32(5, 8) * ((5.0 / 3.0) / math.sqrt(5)) + 0.0)
    np.testing.assert_array_equal(tanh.numpy(), expected)


def test_kaiming_bounds_agree_with_torch():
    # torch's weight is (out, in) with fan_in = in: its draws must reach but not pass our bound
    torch.manual_seed(0)
    w = torch.empty(64, 50)
    torch.nn.init.kaiming_uniform_(w, nonlinearity="relu")
    bound = math.sqrt(2.0) * math.sqrt(3.0 / 50)
    assert 0.98 * bound < w.abs().max().item() <= bound
    ours = init.kaiming_uniform(50, 64).numpy()
    assert 0.98 * bound < np.abs(ours).max() <= bound


@pytest.mark.parametrize("name", ["linear", "sigmoid", "tanh", "relu", "conv2d", "selu"])
def test_calculate_gain_matches_torch(name):
    assert init.calculate_gain(name) == pytest.approx(torch.nn.init.calculate_gain(name))


def test_calculate_gain_leaky_relu_and_unknown():
    expected = torch.nn.init.calculate_gain("leaky_relu", 0.2)
    assert init.calculate_gain("leaky_relu", 0.2) == pytest.approx(expected)
    with pytest.raises(ValueError, match="unknown nonlinearity"):
        init.calculate_gain("swish")


def test_bad_fans_raise():
    with pytest.raises(ValueError, match="kaiming_uniform"):
        init.kaiming_uniform(0, 3)
