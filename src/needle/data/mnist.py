"""MNIST from gzip IDX files: a validating reader (``parse_mnist``) and ``MNISTDataset``."""

from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Callable, Sequence
from typing import BinaryIO

import numpy as np

from .datasets import ImageDataset

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions (count, rows, cols)
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension (count)
_GZIP_MAGIC = b"\x1f\x8b"


#: The most decompressed IDX data needle reads from one file (1 GiB, well above EMNIST's
#: largest, about 0.55 GB): a small gzip file can claim, or expand to, any size.
MAX_IDX_BYTES = 1 << 30


def _read_exactly(stream: gzip.GzipFile, size: int) -> bytes:
    """Up to ``size`` decompressed bytes, never more (short only at the end of the data)."""
    return stream.read(size) if size > 0 else b""


def _open_gzip(path: str | os.PathLike, raw: BinaryIO) -> gzip.GzipFile:
    """A decompressing reader over ``raw``; ValueError naming the file when it is not gzip."""
    head = raw.read(2)
    if head != _GZIP_MAGIC:
        raise ValueError(f"{os.fspath(path)}: not a gzip file (starts with {head!r}, "
                         f"expected {_GZIP_MAGIC!r}); MNIST files are gzip-compressed IDX")
    raw.seek(0)
    return gzip.GzipFile(fileobj=raw, mode="rb")


def read_idx(path: str | os.PathLike, magic: int) -> np.ndarray:
    """An IDX file of unsigned bytes as a uint8 array of shape (count, *dims).

    Header (big-endian int32): ``magic`` (2051 images with dims rows, cols; 2049 labels), count,
    then one int32 per extra dimension. Raises ValueError naming the file for a wrong magic
    number, a short header, a payload whose size differs from the header's promise, or a
    promise above ``MAX_IDX_BYTES``. Decompresses only as much as the header promises (plus
    one byte to detect trailing data), so a gzip bomb never expands in memory.
    """
    name = os.fspath(path)
    ndim = magic & 0xFF
    header_size = 4 * (1 + ndim)
    try:
        with open(path, "rb") as raw, _open_gzip(path, raw) as stream:
            header = _read_exactly(stream, header_size)
            if len(header) < header_size:
                raise ValueError(f"{name}: truncated IDX header ({len(header)} bytes, need "
                                 f"{header_size})")
            found = int.from_bytes(header[:4], "big")
            if found != magic:
                raise ValueError(f"{name}: wrong IDX magic number {found} (0x{found:08x}), "
                                 f"expected {magic} (0x{magic:08x}, "
                                 f"{'images' if ndim == 3 else 'labels'})")
            shape = tuple(int.from_bytes(header[4 * i:4 * i + 4], "big")
                          for i in range(1, ndim + 1))
            expected = math.prod(shape)
            dims = " x ".join(map(str, shape))
            if expected > MAX_IDX_BYTES:
                raise ValueError(f"{name}: the IDX header declares {dims} = {expected} bytes, "
                                 f"more than needle reads from one file ({MAX_IDX_BYTES})")
            data = _read_exactly(stream, expected)
            # one byte more: trailing data, or else the end (where gzip checks its CRC)
            extra = _read_exactly(stream, 1)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise ValueError(f"{name}: corrupt or truncated gzip data ({exc})") from None
    if len(data) < expected:
        raise ValueError(f"{name}: truncated: {len(data)} data bytes, the header promises "
                         f"{dims} = {expected}")
    if extra:
        raise ValueError(f"{name}: has trailing bytes: more than the {expected} data bytes "
                         f"the header promises ({dims})")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


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

