"""Data files cannot make needle decompress or allocate without bound: gzip MNIST files are read
only as far as their IDX header promises, and promises above a sane maximum are refused."""

from __future__ import annotations

import gzip
import tracemalloc
import zlib

import pytest

from needle.cli import main
from needle.data import mnist
from needle.data.mnist import IDX_LABELS_MAGIC, MAX_IDX_BYTES, read_idx


def _idx_header(magic: int, dims: tuple[int, ...]) -> bytes:
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)


def _gzip_stream(path, header: bytes, payload_bytes: int, chunk: int = 1 << 20) -> None:
    """``header`` then ``payload_bytes`` zeros, gzip-compressed without building them in memory."""
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9) as f:
        f.write(header)
        zeros = bytes(chunk)
        for start in range(0, payload_bytes, chunk):
            f.write(zeros[: min(chunk, payload_bytes - start)])


def test_a_small_gzip_that_expands_far_past_its_header_is_not_expanded(tmp_path):
    """3 labels promised, 64 MB of zeros behind them (a 64 KB file): refused as trailing
    data after reading 4 bytes of it, not after inflating all 64 MB."""
    path = tmp_path / "labels.gz"
    _gzip_stream(path, _idx_header(IDX_LABELS_MAGIC, (3,)), 64 << 20)
    assert path.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="trailing bytes") as info:
            read_idx(path, IDX_LABELS_MAGIC)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(path) in str(info.value)
    assert peak < 4 << 20, f"peak {peak / 2**20:.1f} MiB while reading a 3-label file"


def test_a_header_promising_more_than_the_maximum_is_refused_before_reading(tmp_path):
    """A 6 GB promise (7.65 M images of 28 x 28) in a tiny file."""
    path = tmp_path / "images.gz"
    path.write_bytes(gzip.compress(_idx_header(2051, (7_650_000, 28, 28)) + bytes(1000)))
    with pytest.raises(ValueError, match=r"declares 7650000 x 28 x 28 = 5997600000 bytes, "
                                         r"more than needle reads") as info:
        read_idx(path, 2051)
    assert str(path) in str(info.value)
    assert MAX_IDX_BYTES >= 700_000_000   # room for EMNIST's largest file (about 0.55 GB)


def test_the_maximum_can_be_raised(tmp_path, monkeypatch):
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(_idx_header(IDX_LABELS_MAGIC, (100,)) + bytes(100)))
    monkeypatch.setattr(mnist, "MAX_IDX_BYTES", 50)
    with pytest.raises(ValueError, match="more than needle reads from one file"):
        read_idx(path, IDX_LABELS_MAGIC)
    monkeypatch.setattr(mnist, "MAX_IDX_BYTES", 100)
    assert read_idx(path, IDX_LABELS_MAGIC).shape == (100,)


def test_corrupt_data_behind_a_valid_header_is_still_caught(tmp_path):
    path = tmp_path / "labels.gz"
    blob = bytearray(gzip.compress(_idx_header(IDX_LABELS_MAGIC, (3,)) + bytes(3)))
    blob[-8] ^= 0xFF                                       # the gzip trailer's CRC-32
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="corrupt or truncated gzip"):
        read_idx(path, IDX_LABELS_MAGIC)
    assert zlib.crc32(bytes(3)) != 0                       # (the CRC really was changed)


def test_training_on_a_gzip_bomb_gives_one_line(tmp_path, capsys):
    folder = tmp_path / "mnist"
    folder.mkdir()
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(_idx_header(2051, (7_650_000, 28, 28))))
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(_idx_header(IDX_LABELS_MAGIC, (7_650_000,))))
    assert main(["train", "--data", f"mnist:{folder}", "--out", str(tmp_path / "run")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "more than needle reads" in lines[0]
