"""The bundled UCI 8x8 handwritten digits (1,797 images, CC BY 4.0) with a fixed 80/20 split."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np

from .datasets import ImageDataset

DIGITS_PATH = os.path.join(os.path.dirname(__file__), "assets", "digits.npz")


def load_digits_arrays(path: str | os.PathLike = DIGITS_PATH) -> dict[str, np.ndarray]:
    """The raw bundle: ``images`` uint8 (1797, 8, 8) in 0..16, ``labels`` uint8 (1797,),
    ``train_index`` / ``test_index`` (a stratified, seeded 80/20 split; see assets/README.md)."""
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in ("images", "labels", "train_index", "test_index")}


class DigitsDataset(ImageDataset):
    """Small handwritten digits that ship with needle, for tests and tutorials without downloads.

    ``DigitsDataset(train=True)`` has 1,438 items, ``train=False`` 359 (each class split 80/20).
    ``ds[i] -> (image, label)``: image float32 8 x 8 x 1 in [0, 1] (pixel count / 16), label an
    int64 in 0..9; with ``flatten=True`` the image is (64,) for MLPs (transforms still see
    8 x 8 x 1). ``ds.images`` (N, 8, 8, 1) and ``ds.labels`` (N,) are the whole arrays.

    >>> ds = DigitsDataset(train=False)
    >>> len(ds), ds[0][0].shape
    (359, (8, 8, 1))
    """

    image_shape = (8, 8, 1)

    def __init__(self, train: bool = True,
                 transforms: Sequence[Callable] | Callable | None = None,
                 flatten: bool = False) -> None:
        raw = load_digits_arrays()
        index = raw["train_index"] if train else raw["test_index"]
        X = raw["images"][index].astype(np.float32) / np.float32(16.0)
        self.train = train
        self.flatten = flatten
        self._images = X.reshape(len(X), *self.image_shape)
        X = X.reshape(len(X), -1) if flatten else self._images
        super().__init__(X, raw["labels"][index].astype(np.int64), transforms=transforms)

    @property
    def images(self) -> np.ndarray:
        """All images, (N, 8, 8, 1) float32 (whatever ``flatten`` says)."""
        return self._images

