"""CIFAR-10 from the python-version batch files (``data_batch_1..5``, ``test_batch``)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import numpy as np

from .datasets import ImageDataset
from .safe_pickle import safe_load

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)


def _field(batch: dict, key: str, name: str):
    """``batch[b"key"]`` (Python 2 files read with encoding="bytes") or ``batch["key"]``."""
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise ValueError(f"{name}: a CIFAR-10 batch needs a {key!r} entry, found keys "
                     f"{sorted(map(str, batch))}")


def load_cifar_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (uint8 images (n, 3, 32, 32), int64 labels (n,)), loaded without
    executing code (see ``safe_pickle``); ValueError naming the file when the content is wrong."""
    name = os.fspath(path)
    batch = safe_load(path, encoding="bytes")
    if not isinstance(batch, dict):
        raise ValueError(f"{name}: expected a dict with 'data' and 'labels', got "
                         f"{type(batch).__name__}")
    data = _field(batch, "data", name)
    labels = _field(batch, "labels", name)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32:
        what = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) \
            else type(data).__name__
        raise ValueError(f"{name}: 'data' must be a uint8 array of shape (n, 3072), got {what}")
    labels = _check_labels(labels, len(data), name)
    return data.reshape(-1, 3, 32, 32), labels


def _is_class(value: object) -> bool:
    """Whether one label is a class number 0..9: an integer, or an integral float (3.0)."""
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, np.integer)):
        return bool(0 <= value <= 9)
    if isinstance(value, (float, np.floating)):
        return math.isfinite(value) and float(value).is_integer() and bool(0 <= value <= 9)
    return False


def _check_labels(labels: object, count: int, name: str) -> np.ndarray:
    """The labels as int64 after checking each is a class number 0..9 (ValueError naming the
    file and the first bad label otherwise: 0.7 must not silently become class 0, nor 1e30 or
    2**70 overflow)."""
    if isinstance(labels, np.ndarray):
        if labels.ndim != 1:
            raise ValueError(f"{name}: {count} images but labels of shape {labels.shape}")
        if labels.dtype.kind not in "iuf":
            raise ValueError(f"{name}: 'labels' must be integers 0..9, got a {labels.dtype} "
                             "array")
        values = labels.tolist()
    elif isinstance(labels, (list, tuple)):
        values = list(labels)
    else:
        raise ValueError(f"{name}: 'labels' must be a list of integers 0..9, got "
                         f"{type(labels).__name__}")
    if len(values) != count:
        raise ValueError(f"{name}: {count} images but labels of shape ({len(values)},)")
    for i, value in enumerate(values):
        if not _is_class(value):
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
            raise ValueError(f"{name}: label {i} is {shown}; labels must be integers in 0..9")
    return np.array([int(v) for v in values], dtype=np.int64)


class CIFAR10Dataset(ImageDataset):
    """CIFAR-10: ``ds[i] -> (X, y)`` with X float32 (3, 32, 32) in [0, 1], y an int64 label.

    ``base_folder`` holds the python-version files: ``data_batch_1`` .. ``data_batch_5`` when
    ``train`` (50,000 images), else ``test_batch`` (10,000). Transforms see 32 x 32 x 3 (the
    loader transposes for them). ``p`` is accepted for compatibility with CMU needle and unused.
    """

    def __init__(self, base_folder: str | os.PathLike, train: bool, p: float | None = 0.5,
                 transforms: Sequence[Callable] | Callable | None = None) -> None:
        self.p = p
        self.train = train
        files = TRAIN_FILES if train else TEST_FILES
        parts = [load_cifar_batch(os.path.join(base_folder, f)) for f in files]
        X = np.concatenate([x for x, _ in parts]).astype(np.float32) / np.float32(255.0)
        y = np.concatenate([y for _, y in parts])
        super().__init__(X, y, transforms=transforms)

    def to_hwc(self, batch: np.ndarray) -> np.ndarray:
        return batch.transpose(0, 2, 3, 1)

    def from_hwc(self, batch: np.ndarray) -> np.ndarray:
        return batch.transpose(0, 3, 1, 2)
