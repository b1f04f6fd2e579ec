"""DataLoader: batches of Tensors from a dataset, with shuffling, background prefetch and resume.

RNG contract (what makes runs reproducible under ``np.random.seed``):

* Each ``__iter__`` of a shuffling loader makes exactly one ``np.random.permutation(len(dataset))``
  call, in the calling thread, and cuts it into consecutive batches.
* Per-sample ``dataset.transforms`` draw from NumPy's global RNG (CMU semantics). They always run
  in the consumer's thread when a batch is requested, in sample order, so their draws interleave
  with the training loop's draws exactly as with ``num_workers=0``.
* ``batch_transforms`` draw from a private generator per batch,
  ``np.random.default_rng([epoch_seed, batch_number])``, where ``epoch_seed`` is one
  ``np.random.randint`` call made right after the permutation (only when there are batch
  transforms). A batch therefore does not depend on which thread builds it or when.

With ``num_workers > 0``, ``num_workers`` threads build batches ahead (the gather, the
collation and the batch transforms; NumPy releases the GIL while copying) and hand them over in
chunks of at least 1,024 samples, each thread keeping at most ``prefetch_factor`` chunks ready.
The batches are identical to ``num_workers=0``. Datasets with per-sample ``transforms`` are not
prefetched (see above). A custom dataset whose ``__getitem__`` draws from the global RNG is,
as with PyTorch workers, not reproducible with ``num_workers > 0``: use ``transforms`` or
``batch_transforms`` for randomness.

Resume: ``state_dict()`` holds the current epoch's sample order, the number of batches already
yielded and the epoch seed; after ``load_state_dict(state)`` the next ``__iter__`` continues that
epoch with the next batch, bit for bit, drawing nothing. Per-sample transforms draw from the
global RNG, so save ``np.random.get_state()`` beside the loader state to resume those exactly.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from ..autograd import Tensor, new_leaf
from ..backend import Device, cpu
from .collate import default_collate
from .datasets import Dataset, NDArrayDataset, batch_index

# Worker threads hand batches over in chunks of at least this many samples.
_CHUNK_SAMPLES = 1024
# How long closing an iterator waits for its worker threads to finish the chunk in hand.
_JOIN_SECONDS = 1.0


class DataLoader:
    """Iterate over ``dataset`` in batches, each a tuple of Tensors (``requires_grad=False``).

    ``DataLoader(dataset, batch_size=1, shuffle=False, drop_last=False, collate_fn=None,
    num_workers=0, batch_transforms=None, device=None, dtype=None, prefetch_factor=2,
    sampler=None)``

    * ``sampler``: an iterable of dataset indices with a ``len`` (``needle.distributed.
      DistributedSampler``) giving each epoch's order instead of ``shuffle``.

    * Array-backed datasets (``NDArrayDataset``, MNIST, CIFAR-10, digits) without per-sample
      transforms build a batch with one vectorized gather per array; an unshuffled batch is a
      slice, so its Tensors may share memory with the dataset (they are not copied).
    * ``collate_fn(samples) -> tuple of arrays`` makes the loader fetch ``dataset[i]`` one by one
      and collate them itself (the default stacks each field).
    * ``batch_transforms``: callables ``t(batch, rng=generator)`` applied in order to the first
      array of each batch, seen as N x H x W x C (through the dataset's ``to_hwc`` /
      ``from_hwc``), e.g. ``[BatchRandomCrop(4), BatchRandomFlip()]`` for CIFAR-10.
    * ``device`` / ``dtype``: where the Tensors live and what dtype every field is cast to
      (None: the CPU, no copy; the arrays' own dtypes).

    >>> from needle.data import NDArrayDataset
    >>> loader = DataLoader(NDArrayDataset(np.zeros((10, 3)), np.arange(10)), batch_size=4)
    >>> len(loader), [x.shape for x in next(iter(loader))]
    (3, [(4, 3), (4,)])
    """

    def __init__(self, dataset: Any, batch_size: int = 1, shuffle: bool = False,
                 drop_last: bool = False, collate_fn: Callable | None = None,
                 num_workers: int = 0, batch_transforms: Sequence[Callable] | None = None,
                 device: Device | None = None, dtype: Any = None,
                 prefetch_factor: int = 2, sampler: Any = None) -> None:
        if int(batch_size) < 1:
            raise ValueError(f"DataLoader: batch_size must be >= 1, got {batch_size}")
        if int(num_workers) < 0:
            raise ValueError(f"DataLoader: num_workers must be >= 0, got {num_workers}")
        if int(prefetch_factor) < 1:
            raise ValueError(f"DataLoader: prefetch_factor must be >= 1, got {prefetch_factor}")
        if sampler is not None and shuffle:
            raise ValueError("DataLoader: give either a sampler or shuffle=True, not both (the "
                             "sampler decides the order)")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.collate_fn = collate_fn
        self.num_workers = int(num_workers)
        self.prefetch_factor = int(prefetch_factor)
        self.batch_transforms = list(batch_transforms) if batch_transforms else []
        self.device = device
        self.dtype = dtype
        #: iterable of dataset indices giving each epoch's order (a DistributedSampler), or None
        self.sampler = sampler
        # NOTE: the loader refers to its iterator weakly, so an iterator abandoned mid-epoch
        # (a ``break``) is freed at once and stops its worker threads; the epoch's position
        # stays in ``_progress`` for ``state_dict``
        self._iterator: weakref.ref | None = None
        self._progress: _Progress | None = None
        self._resume: dict | None = None

    def __len__(self) -> int:
        n = len(self.dataset) if self.sampler is None else len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _close_iterator(self) -> None:
        """Stop the current epoch's iterator (its worker threads), if it is still alive."""
        it = self._iterator() if self._iterator is not None else None
        if it is not None:
            it.close()
        self._iterator = None

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        self._close_iterator()
        if self._resume is not None:
            state, self._resume = self._resume, None
            order = state["order"] if self.shuffle or self.sampler is not None else None
            start, seed = state["batch_index"], state["seed"]
        else:
            # The RNG draws of an epoch, all here in the caller's thread, in this order.
            order = np.random.permutation(len(self.dataset)) if self.shuffle else None
            if self.sampler is not None:  # the sampler's indices (it draws nothing global)
                order = np.fromiter(iter(self.sampler), dtype=np.int64)
            seed = int(np.random.randint(0, 2**63 - 1, dtype=np.int64)) \
                if self.batch_transforms else -1
            start = 0
        it = _EpochIterator(self, order, start, seed)
        self._iterator = weakref.ref(it)
        self._progress = it.progress
        return it

    # -- resume ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The loader's position: ``{"order", "batch_index", "seed"}``.

        ``order`` is the current epoch's sample order (int64; empty when no epoch is in
        progress), ``batch_index`` the number of batches already yielded in it, ``seed`` the
        epoch seed of the batch transforms (-1 without them). Plain ints and an array, so it can
        be saved with ``np.savez``.
        """
        if self._resume is not None:
            return {k: (v.copy() if isinstance(v, np.ndarray) else v)
                    for k, v in self._resume.items()}
        it = self._progress
        if it is None or it.batch_index >= it.num_batches:
            return {"order": np.zeros(0, dtype=np.int64), "batch_index": 0, "seed": -1}
        order = it.order if it.order is not None else np.arange(len(self.dataset))
        return {"order": np.array(order, dtype=np.int64), "batch_index": it.batch_index,
                "seed": it.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next ``__iter__`` continue the epoch saved in ``state`` (see
        ``state_dict``); a state with an empty order means "start a fresh epoch"."""
        order = np.asarray(state["order"], dtype=np.int64)
        batch, seed = int(state["batch_index"]), int(state["seed"])
        if order.size == 0:
            self._resume = None
            return
        n = len(self.dataset)
        if self.sampler is not None:  # the sampler's indices: repeats allowed
            if order.shape != (len(self.sampler),) or order.min() < 0 or order.max() >= n:
                raise ValueError(f"DataLoader.load_state_dict: 'order' must hold "
                                 f"{len(self.sampler)} indices of the {n} dataset items, got "
                                 f"shape {order.shape}")
        elif order.shape != (n,) or not np.array_equal(np.sort(order), np.arange(n)):
            raise ValueError(f"DataLoader.load_state_dict: 'order' must be a permutation of the "
                             f"{n} dataset items, got shape {order.shape}")
        if not 0 <= batch <= len(self):
            raise ValueError(f"DataLoader.load_state_dict: batch_index {batch} outside "
                             f"0..{len(self)}")
        if self.batch_transforms and seed < 0:
            raise ValueError("DataLoader.load_state_dict: this loader has batch transforms but "
                             "the state has no epoch seed")
        self._close_iterator()
        self._progress = None
        self._resume = {"order": order, "batch_index": batch, "seed": seed}

    # -- building one batch ------------------------------------------------------------------
    def _prefetchable(self) -> bool:
        """Whether threads may build batches: not when per-sample transforms draw from the
        global RNG (their draws must stay in the consumer's thread, in order)."""
        return self.num_workers > 0 and not getattr(self.dataset, "transforms", None)

    def _plain_batches(self) -> bool:
        """Whether a batch is nothing but the dataset's gathered rows as CPU Tensors (an
        NDArrayDataset with no transforms of any kind, no collate_fn, dtype or device): such
        batches take a short path (see ``_EpochIterator.__next__``)."""
        ds = self.dataset
        return (isinstance(ds, NDArrayDataset) and type(ds).gather is NDArrayDataset.gather
                and not ds.transforms and self.collate_fn is None and not self.batch_transforms
                and self.dtype is None and (self.device is None or self.device == cpu()))

    def _to_tensors(self, batch: tuple) -> tuple[Tensor, ...]:
        """Wrap each array as a Tensor without copying (on the CPU, dtype unchanged)."""
        dtype, device = self.dtype, self.device
        on_cpu = device is None or device == cpu()
        out = []
        for x in batch:
            if isinstance(x, Tensor):
                out.append(x)
                continue
            x = np.ascontiguousarray(x)
            if dtype is not None:
                x = x.astype(dtype, copy=False)
            out.append(Tensor.make_const(x) if on_cpu
                       else Tensor(x, device=device, requires_grad=False))
        return tuple(out)


class _EpochPlan:
    """What builds the batches of one epoch: the dataset, the sample order and the epoch seed.

    Worker threads hold only this object (not the loader or the iterator), so an abandoned
    iterator is garbage-collected and stops its workers.
    """

    def __init__(self, loader: DataLoader, order: np.ndarray | None, seed: int) -> None:
        self.dataset = loader.dataset
        self.batch_size = loader.batch_size
        self.collate_fn = loader.collate_fn
        self.batch_transforms = loader.batch_transforms
        self.order = order
        self.seed = seed

    def positions(self, k: int) -> slice | np.ndarray:
        """The dataset items of batch ``k``: a slice in natural order, else a piece of order."""
        start = k * self.batch_size
        n = len(self.dataset) if self.order is None else len(self.order)
        stop = min(start + self.batch_size, n)
        return slice(start, stop) if self.order is None else self.order[start:stop]

    def fetch(self, index: slice | np.ndarray) -> tuple:
        """The raw batch: one ``gather`` for our datasets, else per-sample access + collate."""
        dataset = self.dataset
        if self.collate_fn is None and isinstance(dataset, Dataset):
            return tuple(dataset.gather(index))
        index = batch_index(index, len(dataset))
        positions = range(len(dataset))[index] if isinstance(index, slice) else index
        samples = [dataset[int(i)] for i in positions]
        collate = self.collate_fn or default_collate
        batch = collate(samples)
        return tuple(batch) if isinstance(batch, tuple | list) else (batch,)

    def produce(self, k: int) -> tuple:
        """Batch number ``k`` of the epoch as NumPy arrays. Touches no global RNG when the
        dataset has no per-sample transforms, so worker threads may run it."""
        return self._transformed(self.fetch(self.positions(k)), k)

    def produce_many(self, first: int, stop: int) -> list[tuple]:
        """Batches ``first .. stop - 1``, gathered at once where the dataset allows it.

        For our array datasets one gather per array covers all the batches, and each batch is a
        run of its rows (a view, so a batch kept alive keeps its chunk alive): one call instead
        of one per batch, which is what lets worker threads outrun the consumer. Other datasets
        go batch by batch. (A chunk that raises is redone batch by batch by the worker, so the
        error surfaces at the batch that caused it.)
        """
        if stop - first < 2 or self.collate_fn is not None or not isinstance(self.dataset,
                                                                              Dataset):
            return [self.produce(k) for k in range(first, stop)]
        start = first * self.batch_size
        n = len(self.dataset) if self.order is None else len(self.order)
        end = min(stop * self.batch_size, n)
        index = slice(start, end) if self.order is None else self.order[start:end]
        arrays = self.dataset.gather(index)
        batches = []
        for k in range(first, stop):
            rows = slice((k - first) * self.batch_size, min((k + 1 - first) * self.batch_size,
                                                            end - start))
            batches.append(self._transformed(tuple(a[rows] for a in arrays), k))
        return batches

    def _transformed(self, batch: tuple, k: int) -> tuple:
        """``batch`` (number ``k``) after the batch transforms, drawing from its own generator."""
        if self.batch_transforms:
            rng = np.random.default_rng([self.seed, k])
            to_hwc = getattr(self.dataset, "to_hwc", None)
            from_hwc = getattr(self.dataset, "from_hwc", None)
            x = to_hwc(batch[0]) if to_hwc else batch[0]
            for t in self.batch_transforms:
                x = t(x, rng=rng)
            x = from_hwc(x) if from_hwc else x
            batch = (np.ascontiguousarray(x), *batch[1:])
        return batch


class _Prefetcher:
    """Worker threads that build batches ``start, start + 1, ...`` ahead of the consumer.

    Batches travel in chunks of ``chunk`` consecutive batches (one queue hand-off costs about
    as much as gathering a small batch). Worker w builds chunks ``w, w + W, ...`` into its own
    bounded queue, so the consumer reads chunk j from queue ``j % W`` and gets batches in order
    without sorting. A worker stops after an error (handed to the consumer, in batch order) or
    when ``close`` is called.
    """

    def __init__(self, produce: Callable[[int, int], list], start: int, stop: int, workers: int,
                 depth: int, chunk: int) -> None:
        self._start = start
        self._chunk = chunk
        self._stop_event = threading.Event()
        self._queues: list[queue.Queue] = [queue.Queue(maxsize=depth) for _ in range(workers)]
        self._current: list = []  # the chunk being consumed: (ok, batch or error) pairs
        self._threads = [
            threading.Thread(target=self._work, args=(produce, start, stop, w, workers, q),
                             name=f"needle-data-{w}", daemon=True)
            for w, q in enumerate(self._queues)]
        for t in self._threads:
            t.start()

    def _work(self, produce: Callable[[int, int], list], start: int, stop: int, w: int,
              workers: int, out: queue.Queue) -> None:
        first_chunk = start + w * self._chunk
        for chunk_start in range(first_chunk, stop, workers * self._chunk):
            if self._stop_event.is_set():
                return
            chunk_stop = min(chunk_start + self._chunk, stop)
            try:
                items = [(True, batch) for batch in produce(chunk_start, chunk_stop)]
            except BaseException:  # noqa: BLE001 - re-raised in the consumer
                items = []  # one by one, so the batches before the failing one still arrive
                for k in range(chunk_start, chunk_stop):
                    try:
                        items.append((True, produce(k, k + 1)[0]))
                    except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
                        items.append((False, exc))
                        out.put(items)
                        return
            out.put(items)

    def get(self, k: int) -> tuple:
        """Batch ``k`` (batches must be asked for in order)."""
        offset = k - self._start
        if offset % self._chunk == 0:
            j = offset // self._chunk
            self._current = self._queues[j % len(self._queues)].get()
            self._current.reverse()  # pop() from the end hands batches out in order
        ok, value = self._current.pop()
        if not ok:
            raise value
        return value

    def close(self, wait: float = _JOIN_SECONDS) -> None:
        """Stop the workers: each finishes the chunk in hand, and ``close`` waits for that
        (at most ``wait`` seconds in all), so no thread outlives its iterator for long."""
        self._stop_event.set()
        self._current = []
        # Free the queues so that a worker blocked in put() can finish and stop.
        for q in self._queues:
            with contextlib.suppress(queue.Empty):
                while True:
                    q.get_nowait()
        deadline = time.monotonic() + wait
        current = threading.current_thread()
        for t in self._threads:
            if t is not current:  # a garbage collection may run this in a worker
                t.join(max(0.0, deadline - time.monotonic()))


class _Progress:
    """Where an epoch stands (what ``DataLoader.state_dict`` saves); outlives its iterator."""

    __slots__ = ("order", "seed", "batch_index", "num_batches")

    def __init__(self, order: np.ndarray | None, seed: int, start: int, num_batches: int) -> None:
        self.order = order
        self.seed = seed
        self.batch_index = start  # batches already yielded in this epoch
        self.num_batches = num_batches


class _EpochIterator:
    """One pass over the data: yields batches ``batch_index, batch_index + 1, ...`` in order.

    Only the for loop (or whoever called ``iter``) holds it: when it is dropped before the
    end of the epoch, ``__del__`` stops its worker threads.
    """

    def __init__(self, loader: DataLoader, order: np.ndarray | None, start: int,
                 seed: int) -> None:
        self.loader = loader
        self.progress = _Progress(order, seed, start, len(loader))
        self.num_batches = self.progress.num_batches
        self._plan = _EpochPlan(loader, order, seed)
        self._plain = loader._plain_batches()
        self._cpu = cpu()
        self._prefetcher = None
        if loader._prefetchable() and start < self.num_batches:
            chunk = max(1, -(-_CHUNK_SAMPLES // loader.batch_size))
            self._prefetcher = _Prefetcher(self._plan.produce_many, start, self.num_batches,
                                           loader.num_workers, loader.prefetch_factor, chunk)

    def __iter__(self) -> _EpochIterator:
        return self

    @property
    def batch_index(self) -> int:
        """Batches already yielded in this epoch."""
        return self.progress.batch_index

    def __next__(self) -> tuple[Tensor, ...]:
        progress = self.progress
        k = progress.batch_index
        if k >= self.num_batches:
            self.close()
            raise StopIteration
        if self._plain and self._prefetcher is None:
            # NDArrayDataset.gather's rows wrapped as Tensors, nothing else: the same batches
            # as produce() and _to_tensors at about two thirds of their per-batch cost (the
            # batch is sliced or taken here, as gather does, without its checks)
            rows = self._plan.positions(k)
            progress.batch_index = k + 1
            arrays = self.loader.dataset.arrays
            batch: list | tuple = [a[rows] for a in arrays] if isinstance(rows, slice) else \
                [a.take(rows, axis=0) for a in arrays]
            return tuple([new_leaf(Tensor, np.ascontiguousarray(a), device=self._cpu)
                          for a in batch])
        if self._prefetcher is None:
            batch = self._plan.produce(k)
        else:
            try:
                batch = self._prefetcher.get(k)
            except BaseException:
                # Stop the workers; a retry rebuilds batch k in this thread.
                self.close()
                raise
        progress.batch_index = k + 1
        return self.loader._to_tensors(batch)

    def close(self) -> None:
        """Stop the worker threads and drop prefetched batches."""
        prefetcher, self._prefetcher = self._prefetcher, None
        if prefetcher is not None:
            prefetcher.close()

    def __del__(self) -> None:
        # At interpreter shutdown the queue machinery may already be gone.
        with contextlib.suppress(Exception):
            self.close()
