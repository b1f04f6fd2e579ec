"""Word-level language-model data (CMU needle / PyTorch word_language_model): Dictionary, Corpus,
batchify and get_batch."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..autograd import Tensor

EOS = "<eos>"


class Dictionary:
    """A two-way map between words and ids, in order of first appearance."""

    def __init__(self) -> None:
        self.word2idx: dict[str, int] = {}
        self.idx2word: list[str] = []

    def add_word(self, word: str) -> int:
        """The id of ``word``, giving it the next free id if it is new."""
        if word not in self.word2idx:
            self.word2idx[word] = len(self.idx2word)
            self.idx2word.append(word)
        return self.word2idx[word]

    def __len__(self) -> int:
        return len(self.idx2word)


class Corpus:
    """``base_dir/train.txt`` and ``base_dir/test.txt`` as lists of word ids.

    Every line becomes its whitespace-separated words followed by ``<eos>``; ``max_lines`` reads
    only the first lines of each file. One ``dictionary`` serves both splits (train first).
    """

    def __init__(self, base_dir: str | os.PathLike, max_lines: int | None = None) -> None:
        self.dictionary = Dictionary()
        self.train = self.tokenize(os.path.join(base_dir, "train.txt"), max_lines)
        self.test = self.tokenize(os.path.join(base_dir, "test.txt"), max_lines)

    def tokenize(self, path: str | os.PathLike, max_lines: int | None = None) -> list[int]:
        """The ids of the words of ``path``, with ``<eos>`` after each line, adding new words."""
        ids: list[int] = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if max_lines is not None and i >= max_lines:
                    break
                for word in line.split() + [EOS]:
                    ids.append(self.dictionary.add_word(word))
        return ids


def batchify(data: Sequence[int] | np.ndarray, batch_size: int, device: Any = None,
             dtype: Any = None) -> np.ndarray:
    """Cut a token stream into ``batch_size`` columns: a (nbatch, batch_size) NumPy array.

    ``nbatch = len(data) // batch_size``; the tail that does not fill a row is dropped. Column j
    holds ``data[j * nbatch : (j + 1) * nbatch]`` so consecutive rows continue each sequence.
    ``device`` is accepted for CMU needle compatibility; the array is moved by ``get_batch``.
    """
    if batch_size <= 0:
        raise ValueError(f"batchify: batch_size must be positive, got {batch_size}")
    nbatch = len(data) // batch_size
    flat = np.asarray(data[: nbatch * batch_size], dtype=dtype)
    return np.ascontiguousarray(flat.reshape(batch_size, nbatch).T)


def get_batch(batches: np.ndarray, i: int, bptt: int, device: Any = None, dtype: Any = None
              ) -> tuple[Tensor, Tensor]:
    """Inputs rows ``i .. i+seq_len`` and next-word targets one row later.

    ``seq_len = min(bptt, len(batches) - 1 - i)``; returns ``X`` (seq_len, batch_size) and ``y``
    (seq_len * batch_size,) Tensors (``y`` flattened row-major), no gradient.
    """
    seq_len = min(bptt, len(batches) - 1 - i)
    if seq_len <= 0:
        raise IndexError(f"get_batch: start row {i} leaves no target row in {len(batches)} rows")
    data = batches[i : i + seq_len]
    target = batches[i + 1 : i + 1 + seq_len].reshape(-1)
    return (Tensor(data, device=device, dtype=dtype, requires_grad=False),
            Tensor(target, device=device, dtype=dtype, requires_grad=False))
