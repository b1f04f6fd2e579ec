"""MNIST from gzip IDX files: a validating reader (``parse_mnist``) and ``MNISTDataset``."""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Callable, Sequence

import numpy as np

from .datasets import ImageDataset

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions (count, rows, cols)
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension (count)
_GZIP_MAGIC = b"\x1f\x8b"


def _read_gzip(path: str | os.PathLike) -> bytes:
    """The decompressed bytes of a gzip file; ValueError naming the file when it is not one."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != _GZIP_MAGIC:
        raise ValueError(f"{os.fspath(path)}: not a gzip file (starts with {raw[:2]!r}, "
                         f"expected {_GZIP_MAGIC!r}); MNIST files are gzip-compressed IDX")
    try:
        return gzip.decompress(raw)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise ValueError(f"{os.fspath(path)}: corrupt or truncated gzip data ({exc})") from None


def read_idx(path: str | os.PathLike, magic: int) -> np.ndarray:
    """An IDX file of unsigned bytes as a uint8 array of shape (count, *dims).

    Header (big-endian int32): ``magic`` (2051 images with dims rows, cols; 2049 labels), count,
    then one int32 per extra dimension. Raises ValueError naming the file for a wrong magic
    number, a short header, or a payload whose size differs from the header's promise.
    """
    name = os.fspath(path)
    data = _read_gzip(path)
    ndim = magic & 0xFF
    header = 4 * (1 + ndim)
    if len(data) < header:
        raise ValueError(f"{name}: truncated IDX header ({len(data)} bytes, need {header})")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"{name}: wrong IDX magic number {found} (0x{found:08x}), expected "
                         f"{magic} (0x{magic:08x}, {'images' if ndim == 3 else 'labels'})")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    payload = len(data) - header
    if payload != expected:
        what = "truncated" if payload < expected else "has trailing bytes"
        raise ValueError(f"{name}: {what}: {payload} data bytes, the header promises "
                         f"{' x '.join(map(str, shape))} = {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _load_pair(image_filename: str | os.PathLike, label_filename: str | os.PathLike
               ) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (count, rows, cols) and labels (count,), checked to have equal counts."""
    images = read_idx(image_filename, IDX_IMAGES_MAGIC)
    labels = read_idx(label_filename, IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise ValueError(f"{os.fspath(image_filename)} holds {len(images)} images but "
                         f"{os.fspath(label_filename)} holds {len(labels)} labels")
    return images, labels


def parse_mnist(image_filename: str | os.PathLike, label_filename: str | os.PathLike
                ) -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)``: X float32 (count, rows * cols) in [0, 1] (pixel / 255), y int64 (count,)."""
    images, labels = _load_pair(image_filename, label_filename)
    X = images.reshape(len(images), -1).astype(np.float32) / np.float32(255.0)
    return X, labels.astype(np.int64)


class MNISTDataset(ImageDataset):
    """MNIST (or any IDX image/label pair, e.g. Fashion-MNIST) from gzip IDX files.

    ``ds[i] -> (image, label)``: image float32 in [0, 1], flat (784,) as in CMU needle (or
    28 x 28 x 1 with ``flatten=False``), label an int64. Transforms see 28 x 28 x 1. ``ds[a:b]``
    returns ``(images, labels)`` shaped like a DataLoader batch. ``ds.images``, ``ds.labels`` are
    the whole arrays.
    """

    def __init__(self, image_filename: str | os.PathLike, label_filename: str | os.PathLike,
                 transforms: Sequence[Callable] | Callable | None = None,
                 flatten: bool = True) -> None:
        images, labels = _load_pair(image_filename, label_filename)
        self.image_shape = (images.shape[1], images.shape[2], 1)
        self.flatten = flatten
        X = images.astype(np.float32) / np.float32(255.0)
        X = X.reshape(len(X), -1) if flatten else X.reshape(len(X), *self.image_shape)
        super().__init__(X, labels.astype(np.int64), transforms=transforms)

