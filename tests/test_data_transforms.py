"""Tests of needle.data transforms: exact RNG calls, equality with a direct NumPy transcription."""

import numpy as np
import pytest

from needle.data import (
    BatchRandomCrop,
    BatchRandomFlip,
    Compose,
    Normalize,
    RandomCrop,
    RandomFlipHorizontal,
)


def _image(shape=(7, 5, 3), seed=0):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def _next_draws(n=4):
    """A few draws that tell where the global RNG stream stands."""
    return np.random.rand(n)


def _reference_crop(img, padding, shift_x, shift_y):
    """CMU needle's RandomCrop body, transcribed."""
    H, W, _ = img.shape
    img_pad = np.pad(img, ((padding, padding), (padding, padding), (0, 0)), mode="constant")
    return img_pad[padding + shift_x : padding + shift_x + H,
                   padding + shift_y : padding + shift_y + W, :]


@pytest.mark.parametrize("p", [0.0, 0.3, 0.5, 1.0])
def test_flip_draws_exactly_one_rand_per_call(p):
    img = _image()
    for seed in range(20):
        np.random.seed(seed)
        out = RandomFlipHorizontal(p)(img)
        after = _next_draws()
        np.random.seed(seed)
        draw = np.random.rand()
        expected = img[:, ::-1, :] if draw < p else img
        np.testing.assert_array_equal(out, expected)
        np.testing.assert_array_equal(after, _next_draws())


def test_flip_flips_width_axis():
    img = _image()
    np.testing.assert_array_equal(RandomFlipHorizontal(1.0)(img), img[:, ::-1, :])
    np.testing.assert_array_equal(RandomFlipHorizontal(0.0)(img), img)


@pytest.mark.parametrize("padding", [0, 1, 3, 4])
def test_crop_matches_reference_and_draws_one_randint(padding):
    img = _image((6, 9, 2))
    for seed in range(30):
        np.random.seed(seed)
        out = RandomCrop(padding)(img)
        after = _next_draws()
        np.random.seed(seed)
        shift_x, shift_y = np.random.randint(low=-padding, high=padding + 1, size=2)
        expected = _reference_crop(img, padding, shift_x, shift_y)
        assert out.shape == img.shape and out.dtype == img.dtype
        np.testing.assert_array_equal(out, expected)
        np.testing.assert_array_equal(after, _next_draws())


def test_crop_shifts_the_window_with_zero_fill():
    # Independent of the slicing formula: out[i, j] = img[i + shift_x, j + shift_y], or 0 outside.
    img = np.arange(1, 17, dtype=np.float32).reshape(4, 4, 1)
    seen = set()
    for seed in range(40):
        np.random.seed(seed)
        sx, sy = np.random.randint(low=-2, high=3, size=2)
        seen.add((int(sx), int(sy)))
        np.random.seed(seed)
        out = RandomCrop(2)(img)
        for i in range(4):
            for j in range(4):
                r, c = i + sx, j + sy
                assert out[i, j, 0] == (img[r, c, 0] if 0 <= r < 4 and 0 <= c < 4 else 0)
    assert len(seen) > 10


def test_per_sample_transforms_accept_a_generator():
    img = _image()
    out = RandomCrop(3)(img, rng=np.random.default_rng(5))
    sx, sy = np.random.default_rng(5).integers(-3, 4, size=2)
    np.testing.assert_array_equal(out, _reference_crop(img, 3, sx, sy))
    flipped = RandomFlipHorizontal(0.5)(img, rng=np.random.default_rng(5))
    draw = np.random.default_rng(5).random()
    np.testing.assert_array_equal(flipped, img[:, ::-1] if draw < 0.5 else img)


def test_transforms_reject_wrong_rank():
    with pytest.raises(ValueError, match="RandomCrop.*H x W x C"):
        RandomCrop(2)(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="BatchRandomFlip.*N x H x W x C"):
        BatchRandomFlip()(np.zeros((4, 4, 1)))


@pytest.mark.parametrize("padding", [0, 2, 4])
def test_batch_crop_equals_per_sample_crop_with_same_shifts(padding):
    batch = _image((9, 8, 6, 3), seed=1)
    batch.flags.writeable = False  # the batch transform must not write into its input
    out = BatchRandomCrop(padding)(batch, rng=np.random.default_rng(3))
    shifts = np.random.default_rng(3).integers(-padding, padding + 1, size=(9, 2))
    expected = np.stack([_reference_crop(b, padding, *s) for b, s in zip(batch, shifts)])
    assert out.shape == batch.shape and out.dtype == batch.dtype
    np.testing.assert_array_equal(out, expected)


def test_batch_crop_with_global_rng_makes_one_randint_call():
    batch = _image((5, 6, 6, 1))
    np.random.seed(11)
    out = BatchRandomCrop(3)(batch)
    after = _next_draws()
    np.random.seed(11)
    shifts = np.random.randint(low=-3, high=4, size=(5, 2))
    expected = np.stack([_reference_crop(b, 3, *s) for b, s in zip(batch, shifts)])
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(after, _next_draws())


def test_batch_flip_equals_per_sample_flip_with_same_draws():
    batch = _image((16, 4, 5, 3))
    batch.flags.writeable = False
    out = BatchRandomFlip(0.5)(batch, rng=np.random.default_rng(9))
    draws = np.random.default_rng(9).random(16)
    assert 0 < (draws < 0.5).sum() < 16  # both branches exercised
    expected = np.stack([b[:, ::-1] if d < 0.5 else b for b, d in zip(batch, draws)])
    np.testing.assert_array_equal(out, expected)
    np.random.seed(2)
    out = BatchRandomFlip(0.5)(batch)
    np.random.seed(2)
    draws = np.random.rand(16)
    expected = np.stack([b[:, ::-1] if d < 0.5 else b for b, d in zip(batch, draws)])
    np.testing.assert_array_equal(out, expected)


def test_normalize_per_channel_keeps_float32():
    img = _image((4, 4, 3))
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 2.0]
    out = Normalize(mean, std)(img)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, (img - np.array(mean)) / np.array(std), rtol=1e-6)
    batch = _image((2, 4, 4, 3))
    np.testing.assert_allclose(Normalize(mean, std)(batch)[1], Normalize(mean, std)(batch[1]))
    with pytest.raises(ValueError, match="non-zero"):
        Normalize(0.0, [1.0, 0.0])


def test_compose_applies_in_order_and_forwards_rng():
    img = _image((6, 6, 1))
    np.random.seed(4)
    out = Compose([RandomCrop(2), RandomFlipHorizontal()])(img)
    np.random.seed(4)
    ref = RandomFlipHorizontal()(RandomCrop(2)(img))
    np.testing.assert_array_equal(out, ref)
    batch = _image((3, 6, 6, 1))
    out = Compose([BatchRandomCrop(2), BatchRandomFlip()])(batch, rng=np.random.default_rng(1))
    rng = np.random.default_rng(1)
    ref = BatchRandomFlip()(BatchRandomCrop(2)(batch, rng=rng), rng=rng)
    np.testing.assert_array_equal(out, ref)


def test_batch_transforms_reuse_buffers_safely():
    # Same padded shape from different paddings, different contents and batch sizes in a row:
    # every call must still equal the transcription (reused work buffers leak nothing).
    rng = np.random.default_rng(0)
    for shape, padding in [((4, 6, 6, 2), 3), ((4, 8, 8, 2), 2), ((4, 6, 6, 2), 3),
                           ((3, 6, 6, 2), 3), ((4, 6, 6, 2), 3)]:
        batch = rng.random(shape, dtype=np.float32) + 1.0  # no zeros of its own
        out = BatchRandomCrop(padding)(batch, rng=np.random.default_rng(1))
        shifts = np.random.default_rng(1).integers(-padding, padding + 1, size=(shape[0], 2))
        expected = np.stack([_reference_crop(b, padding, *s) for b, s in zip(batch, shifts)])
        np.testing.assert_array_equal(out, expected)
        flipped = BatchRandomFlip()(batch, rng=np.random.default_rng(2))
        draws = np.random.default_rng(2).random(shape[0])
        np.testing.assert_array_equal(
            flipped, np.stack([b[:, ::-1] if d < 0.5 else b for b, d in zip(batch, draws)]))
