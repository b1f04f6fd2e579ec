"""DistributedSampler: each rank's share of a dataset's indices (PyTorch's semantics)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from .comm import communicator


class DistributedSampler:
    """The indices of ``dataset`` that rank ``rank`` of ``num_replicas`` reads in an epoch.

    ``DistributedSampler(dataset, num_replicas=None, rank=None, shuffle=True, seed=0,
    drop_last=False)``; ``num_replicas`` and ``rank`` default to the process group's.
    Every rank gets ``len(sampler)`` indices, disjoint between ranks: with ``shuffle`` a
    permutation of all indices that depends on ``seed + epoch`` only (the same on every rank;
    call :meth:`set_epoch` before each epoch to reshuffle), else ``0 .. n-1``. Without
    ``drop_last`` the list is padded with its own first indices up to a multiple of
    ``num_replicas``; with it, the tail is dropped. Rank r takes every ``num_replicas``-th
    index starting at r. Use it as ``DataLoader(dataset, batch_size, sampler=sampler)``.
    """

    def __init__(self, dataset: Any, num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False) -> None:
        if num_replicas is None or rank is None:
            comm = communicator()
            num_replicas = comm.size if num_replicas is None else num_replicas
            rank = comm.rank if rank is None else rank
        if int(num_replicas) < 1:
            raise ValueError(f"DistributedSampler: num_replicas must be >= 1, got {num_replicas}")
        if not 0 <= int(rank) < int(num_replicas):
            raise ValueError(f"DistributedSampler: rank must be in [0, {num_replicas - 1}], "
                             f"got {rank}")
        self.dataset = dataset
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        n = len(dataset)
        if self.drop_last and n % self.num_replicas:
            self.num_samples = math.ceil((n - self.num_replicas) / self.num_replicas)
        else:
            self.num_samples = math.ceil(n / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Shuffle differently in epoch ``epoch`` (the same way on every rank)."""
        self.epoch = int(epoch)

    def permutation(self) -> np.ndarray:
        """The epoch's order of all indices (every rank computes the same one)."""
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        return np.random.default_rng(self.seed + self.epoch).permutation(n).astype(np.int64)

    def indices(self) -> np.ndarray:
        """This rank's indices for the current epoch."""
        order = self.permutation()
        if self.drop_last:
            order = order[: self.total_size]
        elif self.total_size > len(order) and len(order) > 0:
            order = np.resize(order, self.total_size)  # repeats from the start
        return order[self.rank: self.total_size: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.num_samples


__all__ = ["DistributedSampler"]
