"""Image augmentation: per-sample transforms (H x W x C) and vectorized batch forms (N x H x W x C).

Per-sample transforms follow CMU needle exactly: with no ``rng`` they draw from NumPy's global
RNG, one call per image (``np.random.rand()`` for the flip, one ``np.random.randint(..., size=2)``
for the crop), so ``np.random.seed`` reproduces them.

Batch transforms take a whole batch and draw every sample's parameters in one vectorized call.
They are callables ``t(batch, rng=None)``; ``rng`` is a ``np.random.Generator`` (the DataLoader
passes one seeded per batch, which keeps worker threads and resumed epochs bit-exact) or None for
the global RNG. Batch transforms never write into their input: a batch may be a view of a dataset.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import numpy as np


class _Scratch(threading.local):
    """Per-thread work buffers that batch transforms reuse from call to call.

    NOTE: fresh memory costs a page fault per 4 KiB page (microseconds each on some VMs), and a
    batch of temporaries of a few MB each makes the allocator hand memory back and forth with
    the OS; reusing buffers made crop + flip about 4x faster here. Only internal temporaries
    live here, never an array that is returned.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple, np.ndarray] = {}

    def get(self, name: str, shape: tuple, dtype: np.dtype) -> np.ndarray:
        """A zero-initialized buffer the first time; afterwards whatever the last call left."""
        key = (name, shape, np.dtype(dtype))
        buf = self.buffers.get(key)
        if buf is None:
            if len(self.buffers) >= 8:  # shapes changed (e.g. a short last batch): start over
                self.buffers.clear()
            buf = self.buffers[key] = np.zeros(shape, dtype)
        return buf


_SCRATCH = _Scratch()


def _rand(rng: np.random.Generator | None, n: int | None = None):
    """One uniform [0, 1) draw (or ``n`` of them) from ``rng`` or NumPy's global RNG."""
    if rng is None:
        return np.random.rand() if n is None else np.random.rand(n)
    return rng.random(n)


def _randint(rng: np.random.Generator | None, low: int, high: int, size: int | tuple):
    """Integers in [low, high) from ``rng`` or NumPy's global RNG (one call either way)."""
    if rng is None:
        return np.random.randint(low=low, high=high, size=size)
    return rng.integers(low, high, size=size)


def _check_image(img: np.ndarray, who: str, ndim: int = 3) -> None:
    layout = "H x W x C" if ndim == 3 else "N x H x W x C"
    if np.ndim(img) != ndim:
        raise ValueError(f"{who}: expected a {layout} array, got shape {np.shape(img)}")


class Transform:
    """Base class: ``transform(img)`` returns the transformed image; subclasses define __call__."""

    def __call__(self, img: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class RandomFlipHorizontal(Transform):
    """Flip an H x W x C image left-right with probability ``p``: ``img[:, ::-1, :]``.

    Exactly one ``np.random.rand()`` per call, also for p = 0 or 1 (so the RNG stream does not
    depend on ``p``); flips when the draw is ``< p``.
    """

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, img: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        _check_image(img, "RandomFlipHorizontal")
        flip = _rand(rng) < self.p
        return img[:, ::-1, :] if flip else img


class RandomCrop(Transform):
    """Zero-pad H and W by ``padding`` and take the H x W window shifted by a random offset.

    One ``np.random.randint(low=-padding, high=padding + 1, size=2)`` gives ``(shift_x, shift_y)``;
    the result is ``img_pad[padding + shift_x : padding + shift_x + H,
    padding + shift_y : padding + shift_y + W, :]`` (CMU needle's reference).
    """

    def __init__(self, padding: int = 3) -> None:
        self.padding = int(padding)

    def __call__(self, img: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        _check_image(img, "RandomCrop")
        p = self.padding
        shift_x, shift_y = _randint(rng, -p, p + 1, 2)
        H, W, _ = img.shape
        img_pad = np.pad(img, ((p, p), (p, p), (0, 0)), mode="constant")
        return img_pad[p + shift_x : p + shift_x + H, p + shift_y : p + shift_y + W, :]


class Normalize(Transform):
    """Per-channel standardization ``(img - mean) / std`` over the last axis (C).

    Works on one image or a whole batch (it draws nothing), so it may be used in ``transforms``
    and ``batch_transforms`` alike. Float32 input stays float32.
    """

    def __init__(self, mean: float | Sequence[float], std: float | Sequence[float]) -> None:
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        if np.any(self.std == 0):
            raise ValueError(f"Normalize: std must be non-zero, got {self.std.tolist()}")

    def __call__(self, img: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        return ((img - self.mean) / self.std).astype(np.result_type(img.dtype, np.float32),
                                                     copy=False)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.tolist()}, std={self.std.tolist()})"


class Compose(Transform):
    """Apply transforms in order: ``Compose([RandomCrop(4), RandomFlipHorizontal()])``.

    Works for per-sample and batch transforms; a given ``rng`` is passed to each of them.
    """

    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = list(transforms)

    def __call__(self, img: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        for t in self.transforms:
            img = t(img) if rng is None else t(img, rng=rng)
        return img


class BatchRandomFlip(Transform):
    """Vectorized RandomFlipHorizontal on an N x H x W x C batch.

    One ``rand(N)`` draw; sample i is flipped (``batch[i, :, ::-1, :]``) when its draw is ``< p``.
    Returns a new array.
    """

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, batch: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        _check_image(batch, "BatchRandomFlip", ndim=4)
        flip = np.flatnonzero(_rand(rng, batch.shape[0]) < self.p)
        # Copy, then overwrite the flipped samples: never writes into the input (it may be a
        # view of the dataset). take() with reversed column indices copies whole C-vectors and
        # is faster than a negative-stride copy or np.where over the batch.
        out = batch.copy()
        m = len(flip)
        if m:
            chosen = _SCRATCH.get("flip_in", batch.shape, batch.dtype)[:m]
            flipped = _SCRATCH.get("flip_out", batch.shape, batch.dtype)[:m]
            np.take(batch, flip, axis=0, out=chosen)
            np.take(chosen, np.arange(batch.shape[2] - 1, -1, -1), axis=2, out=flipped)
            out[flip] = flipped
        return out


class BatchRandomCrop(Transform):
    """Vectorized RandomCrop on an N x H x W x C batch, one shift pair per sample.

    One ``randint(-padding, padding + 1, size=(N, 2))`` draw gives ``(shift_x, shift_y)`` per
    sample; sample i becomes ``pad(batch[i])[padding + sx : padding + sx + H,
    padding + sy : padding + sy + W, :]``, as RandomCrop does for one image.
    """

    def __init__(self, padding: int = 3) -> None:
        self.padding = int(padding)

    def __call__(self, batch: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        _check_image(batch, "BatchRandomCrop", ndim=4)
        N, H, W, C = batch.shape
        p = self.padding
        shifts = _randint(rng, -p, p + 1, (N, 2))
        # The border of the reused buffer stays zero: only the interior is ever written, and the
        # key holds the padding, so each buffer always has the same interior.
        padded = _SCRATCH.get(f"crop_pad_{p}", (N, H + 2 * p, W + 2 * p, C), batch.dtype)
        padded[:, p : p + H, p : p + W, :] = batch
        # A strided view of every window: windows[n, a, b] is padded[n, a:a+H, b:b+W, :]. One
        # fancy index then copies each sample's H x W x C block in a single pass.
        sN, sH, sW, sC = padded.strides
        windows = np.lib.stride_tricks.as_strided(
            padded, shape=(N, 2 * p + 1, 2 * p + 1, H, W, C),
            strides=(sN, sH, sW, sH, sW, sC), writeable=False)
        return windows[np.arange(N), shifts[:, 0] + p, shifts[:, 1] + p]
