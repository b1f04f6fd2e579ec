"""Data sources by name: ``digits``, ``mnist:DIR``, ``cifar10:DIR``, as NHWC train/test arrays."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..data import CIFAR10Dataset, DigitsDataset, MNISTDataset, NDArrayDataset

DATA_HELP = "digits (bundled), mnist:DIR (gzip IDX files) or cifar10:DIR (python batches)"


class DataSourceError(ValueError):
    """A data spec that cannot be used: unknown name, missing folder or files."""


@dataclass
class DataSplit:
    """Train and test sets as NHWC float32 images and int64 labels."""

    spec: str
    train: NDArrayDataset
    test: NDArrayDataset
    image_shape: tuple[int, int, int]
    num_classes: int
    note: str = ""


_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _nhwc(images: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    return np.ascontiguousarray(images.reshape(len(images), *shape), dtype=np.float32)


def _split(images: np.ndarray, labels: np.ndarray, fraction: float = 0.8) -> tuple:
    """A fixed, seeded split (RandomState(0)), so the same folder always gives the same sets."""
    order = np.random.RandomState(0).permutation(len(images))
    cut = int(len(images) * fraction)
    return (images[order[:cut]], labels[order[:cut]]), (images[order[cut:]], labels[order[cut:]])


def _load_mnist(folder: str) -> DataSplit:
    present = {k: all(os.path.isfile(os.path.join(folder, f)) for f in files)
               for k, files in _MNIST_FILES.items()}
    if not any(present.values()):
        wanted = ", ".join(f for files in _MNIST_FILES.values() for f in files)
        raise DataSourceError(f"mnist:{folder}: no MNIST files found (expected {wanted})")
    sets = {k: MNISTDataset(os.path.join(folder, _MNIST_FILES[k][0]),
                            os.path.join(folder, _MNIST_FILES[k][1]), flatten=False)
            for k, ok in present.items() if ok}
    shape = next(iter(sets.values())).image_shape
    note = ""
    if len(sets) == 2:
        train = (sets["train"].images, sets["train"].labels)
        test = (sets["test"].images, sets["test"].labels)
    else:
        only = next(iter(sets))
        train, test = _split(sets[only].images, sets[only].labels)
        note = (f"mnist:{folder}: only the {only} files are present; training on a fixed 80% of "
                "them and testing on the other 20%")
    return DataSplit(f"mnist:{folder}", NDArrayDataset(_nhwc(train[0], shape), train[1]),
                     NDArrayDataset(_nhwc(test[0], shape), test[1]), shape, 10, note)


def _load_cifar(folder: str) -> DataSplit:
    try:
        sets = [CIFAR10Dataset(folder, train=flag) for flag in (True, False)]
    except (OSError, ValueError) as exc:
        raise DataSourceError(f"cifar10:{folder}: {exc}") from None
    arrays = []
    for ds in sets:
        images = np.transpose(ds.images.reshape(len(ds.images), 3, 32, 32), (0, 2, 3, 1))
        arrays.append(NDArrayDataset(np.ascontiguousarray(images, dtype=np.float32),
                                     ds.labels.astype(np.int64)))
    return DataSplit(f"cifar10:{folder}", arrays[0], arrays[1], (32, 32, 3), 10)


def _check_split(split: DataSplit) -> DataSplit:
    """Refuse splits that cannot train or test: no images, or labels outside the classes."""
    for which, ds in (("training", split.train), ("test", split.test)):
        if len(ds) == 0:
            raise DataSourceError(f"{split.spec}: the {which} split has no images (train "
                                  f"{len(split.train)}, test {len(split.test)}); needle needs "
                                  "at least one of each")
        labels = ds.arrays[1]
        if labels.min() < 0 or labels.max() >= split.num_classes:
            raise DataSourceError(f"{split.spec}: {which} labels must lie in "
                                  f"0..{split.num_classes - 1}, found "
                                  f"{labels.min()}..{labels.max()}")
    return split


def load_data(spec: str) -> DataSplit:
    """Resolve a data spec (see ``DATA_HELP``) into train/test sets (each non-empty)."""
    name, _, folder = spec.partition(":")
    if name == "digits" and not folder:
        train, test = DigitsDataset(train=True), DigitsDataset(train=False)
        return DataSplit("digits", NDArrayDataset(train.images, train.labels),
                         NDArrayDataset(test.images, test.labels), (8, 8, 1), 10)
    if name in ("mnist", "cifar10"):
        if not folder:
            raise DataSourceError(f"{name}: give the folder as {name}:DIR")
        if not os.path.isdir(folder):
            raise DataSourceError(f"{spec}: folder {folder!r} does not exist")
        return _check_split(_load_mnist(folder) if name == "mnist" else _load_cifar(folder))
    raise DataSourceError(f"unknown data {spec!r}; use {DATA_HELP}")
