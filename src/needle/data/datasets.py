"""Dataset base classes: ``Dataset`` (per-sample access) and ``NDArrayDataset`` (array-backed)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .collate import default_collate

Index = int | slice | Sequence[int] | np.ndarray


def _as_transform_list(transforms: Any) -> list[Callable] | None:
    """``None``, one callable (e.g. a Compose) or a list of callables -> a list or None."""
    if transforms is None:
        return None
    if callable(transforms):
        return [transforms]
    return list(transforms)


def batch_index(index: Index, n: int) -> slice | np.ndarray:
    """Normalize a batch index for a dataset of ``n`` items: a slice stays a slice, anything else
    becomes an int64 array (a boolean mask becomes the positions it selects)."""
    if isinstance(index, slice):
        return index
    if type(index) is np.ndarray and index.dtype == np.int64 and index.ndim == 1:
        return index  # the DataLoader's own batches: nothing to check
    index = np.asarray(index)
    if index.dtype == bool:
        if index.shape != (n,):
            raise IndexError(f"boolean index of shape {index.shape} for a dataset of {n} items")
        return np.flatnonzero(index)
    if index.ndim != 1 or (index.size and index.dtype.kind not in "iu"):
        raise IndexError(f"a batch index must be a slice or a 1-d integer array, got "
                         f"{index.dtype} of shape {index.shape}")
    return index.astype(np.int64, copy=False)


class Dataset:
    """A map-style dataset: ``len(ds)`` items, ``ds[i]`` returns one sample (usually a tuple).

    ``transforms`` is a list of callables applied in order to one image by ``apply_transforms``
    (they see an H x W x C NumPy array). Subclasses define ``__getitem__`` and ``__len__``; they
    may override ``gather`` to build a whole batch faster than one ``__getitem__`` per sample.
    """

    def __init__(self, transforms: Sequence[Callable] | Callable | None = None) -> None:
        self.transforms = _as_transform_list(transforms)

    def __getitem__(self, index: int) -> Any:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def apply_transforms(self, x: np.ndarray) -> np.ndarray:
        """``x`` passed through every transform in order (unchanged without transforms)."""
        if self.transforms is not None:
            for tform in self.transforms:
                x = tform(x)
        return x

    def gather(self, index: Index) -> tuple[np.ndarray, ...]:
        """The batch of items ``index`` (slice or integer array) as a tuple of stacked arrays.

        The default calls ``self[i]`` once per item and stacks the fields (``default_collate``).
        """
        index = batch_index(index, len(self))
        positions = range(len(self))[index] if isinstance(index, slice) else index
        return default_collate([self[int(i)] for i in positions])


class NDArrayDataset(Dataset):
    """Samples are rows of arrays of equal length: ``ds[i] == (a[i], b[i], ...)``.

    ``ds[a:b]`` (or an integer array) returns the tuple ``(a[a:b], b[a:b], ...)``, shaped like a
    DataLoader batch. Without transforms a batch is one vectorized gather per array; with
    ``transforms`` (keyword) they are applied to each sample of the first array.

    Image subclasses override ``to_hwc`` / ``from_hwc`` to say how a batch of their first array
    maps to N x H x W x C (what transforms and batch transforms work on) and back.

    >>> ds = NDArrayDataset(np.zeros((5, 3)), np.arange(5))
    >>> ds[1][1], ds[1:3][0].shape
    (np.int64(1), (2, 3))
    """

    def __init__(self, *arrays: Any, transforms: Sequence[Callable] | Callable | None = None
                 ) -> None:
        super().__init__(transforms)
        if not arrays:
            raise ValueError("NDArrayDataset: needs at least one array")
        self.arrays = tuple(np.asarray(a) for a in arrays)
        lengths = [len(a) if a.ndim else -1 for a in self.arrays]
        if lengths[0] < 0 or any(n != lengths[0] for n in lengths):
            shapes = ", ".join(str(a.shape) for a in self.arrays)
            raise ValueError(f"NDArrayDataset: arrays must share their first dimension, got "
                             f"shapes {shapes}")

    def __len__(self) -> int:
        return len(self.arrays[0])

    def __getitem__(self, index: Index) -> tuple:
        if isinstance(index, int | np.integer):
            sample = tuple(a[index] for a in self.arrays)
            if self.transforms:
                first = self._transform_batch(sample[0][None])[0]
                sample = (first, *sample[1:])
            return sample
        return self.gather(index)

    def gather(self, index: Index) -> tuple[np.ndarray, ...]:
        """One fancy index (or slice) per array; per-sample transforms on the first array."""
        index = batch_index(index, len(self))
        if isinstance(index, slice):
            batch = tuple([a[index] for a in self.arrays])
        else:
            # take() along axis 0 is a little faster than fancy indexing (one row memcpy each).
            batch = tuple([a.take(index, axis=0) for a in self.arrays])
        if self.transforms:
            batch = (self._transform_batch(batch[0]), *batch[1:])
        return batch

    # -- image layout hooks ------------------------------------------------------------------
    def to_hwc(self, batch: np.ndarray) -> np.ndarray:
        """A batch of the first array as N x H x W x C (a view where possible)."""
        return batch

    def from_hwc(self, batch: np.ndarray) -> np.ndarray:
        """The inverse of ``to_hwc``: N x H x W x C back to this dataset's batch layout."""
        return batch

    def _transform_batch(self, x: np.ndarray) -> np.ndarray:
        """Apply ``transforms`` to each sample of a batch, in order (one RNG stream position per
        sample, exactly as calling ``ds[i]`` item by item would)."""
        hwc = self.to_hwc(x)
        if len(hwc) == 0:
            return x
        out = np.stack([self.apply_transforms(img) for img in hwc])
        return np.ascontiguousarray(self.from_hwc(out))


class ImageDataset(NDArrayDataset):
    """Images and integer labels held as two arrays (MNIST, digits, CIFAR-10).

    ``images`` / ``labels`` are the whole arrays. ``to_hwc`` / ``from_hwc`` convert a batch of
    the first array to N x H x W x C and back (for batch transforms): by default the images
    are stored H x W x C, or flat when ``flatten`` is set.
    """

    image_shape: tuple[int, int, int] = (1, 1, 1)
    flatten = False

    @property
    def images(self) -> np.ndarray:
        return self.arrays[0]

    @property
    def labels(self) -> np.ndarray:
        return self.arrays[1]

    def to_hwc(self, batch: np.ndarray) -> np.ndarray:
        return batch.reshape(len(batch), *self.image_shape)

    def from_hwc(self, batch: np.ndarray) -> np.ndarray:
        return batch.reshape(len(batch), -1) if self.flatten else batch
