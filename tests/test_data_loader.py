"""Tests of needle.data.DataLoader: order, shuffling RNG, drop_last, workers, transforms, resume."""

import numpy as np
import pytest

import needle as ndl
import needle.data.dataloader as dataloader_module
from needle.data import (
    BatchRandomCrop,
    BatchRandomFlip,
    DataLoader,
    Dataset,
    DigitsDataset,
    NDArrayDataset,
    RandomCrop,
    RandomFlipHorizontal,
)


def _ids_dataset(n=37, **kw):
    """Samples carry their own index, so batches tell which items they hold."""
    X = np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    return NDArrayDataset(X, np.arange(n), **kw)


def _collect(loader):
    return [tuple(t.numpy() for t in batch) for batch in loader]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for ba, bb in zip(a, b):
        assert len(ba) == len(bb)
        for x, y in zip(ba, bb):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y)


class _CountingDataset(NDArrayDataset):
    """Counts per-sample __getitem__ calls and batch gathers."""

    def __init__(self, *arrays, **kw):
        super().__init__(*arrays, **kw)
        self.getitem_calls = 0
        self.gather_calls = 0

    def __getitem__(self, index):
        self.getitem_calls += 1
        return super().__getitem__(index)

    def gather(self, index):
        self.gather_calls += 1
        return super().gather(index)


def test_cmu_ndarray_loader_without_shuffle():
    for batch_size in [1, 10, 100]:
        np.random.seed(0)
        ds = NDArrayDataset(np.random.rand(100, 10))
        for i, batch in enumerate(DataLoader(dataset=ds, batch_size=batch_size, shuffle=False)):
            truth = ds[i * batch_size : (i + 1) * batch_size][0].reshape((batch_size, 10))
            np.testing.assert_allclose(truth, batch[0].numpy())


def test_cmu_shuffle_sequence():
    np.random.seed(0)
    loader = iter(DataLoader(dataset=NDArrayDataset(np.arange(100)), batch_size=1,
                             shuffle=True))
    elements = np.array([next(loader)[0].numpy().item() for _ in range(10)])
    np.testing.assert_allclose(elements, [26, 86, 2, 55, 75, 93, 16, 73, 54, 95])


def test_batches_are_tensors_without_grad_or_copy():
    X, y = np.random.rand(10, 4).astype(np.float32), np.arange(10)
    batches = list(DataLoader(NDArrayDataset(X, y), batch_size=4))
    assert [b[0].shape for b in batches] == [(4, 4), (4, 4), (2, 4)]
    x0, y0 = batches[0]
    assert isinstance(x0, ndl.Tensor) and not x0.requires_grad and not y0.requires_grad
    assert x0.dtype == np.float32 and y0.dtype == np.int64
    assert np.shares_memory(x0._data, X)  # an unshuffled batch wraps a slice, no copy
    cast = next(iter(DataLoader(NDArrayDataset(X, y), batch_size=4, dtype="float32")))
    assert cast[1].dtype == np.float32 and cast[0].device == ndl.cpu()


@pytest.mark.parametrize("n,batch_size", [(37, 5), (40, 8), (3, 10), (37, 1)])
def test_every_epoch_visits_each_sample_once(n, batch_size):
    loader = DataLoader(_ids_dataset(n), batch_size=batch_size, shuffle=True)
    assert len(loader) == -(-n // batch_size)
    orders = []
    for _ in range(3):
        batches = _collect(loader)
        assert len(batches) == len(loader)
        assert all(len(b[1]) == batch_size for b in batches[:-1])
        ids = np.concatenate([b[1] for b in batches])
        np.testing.assert_array_equal(np.sort(ids), np.arange(n))
        for x, y in batches:
            np.testing.assert_array_equal(x[:, 0], y)  # fields stay aligned
        orders.append(ids)
    if n > 3:
        assert not np.array_equal(orders[0], orders[1])  # a new permutation each epoch


@pytest.mark.parametrize("shuffle", [False, True])
def test_drop_last(shuffle):
    loader = DataLoader(_ids_dataset(37), batch_size=5, shuffle=shuffle, drop_last=True)
    assert len(loader) == 7
    batches = _collect(loader)
    assert len(batches) == 7 and all(len(b[1]) == 5 for b in batches)
    ids = np.concatenate([b[1] for b in batches])
    assert len(np.unique(ids)) == 35
    assert len(DataLoader(_ids_dataset(3), batch_size=5, drop_last=True)) == 0
    assert _collect(DataLoader(_ids_dataset(3), batch_size=5, drop_last=True)) == []


def test_shuffle_is_one_permutation_per_epoch_cut_in_order():
    np.random.seed(3)
    batches = _collect(DataLoader(_ids_dataset(23), batch_size=4, shuffle=True))
    np.random.seed(3)
    perm = np.random.permutation(23)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), perm)
    np.testing.assert_array_equal(batches[1][1], perm[4:8])


def test_determinism_under_seed():
    ds = _ids_dataset(50, transforms=[RandomFlipHorizontal()])
    ds.arrays = (np.random.default_rng(0).random((50, 4, 4, 1), dtype=np.float32),
                 ds.arrays[1])

    def run():
        np.random.seed(123)
        return [_collect(DataLoader(ds, batch_size=8, shuffle=True)) for _ in range(2)]

    a, b = run(), run()
    for ea, eb in zip(a, b):
        _assert_same_batches(ea, eb)


def test_array_dataset_uses_one_gather_per_batch():
    ds = _CountingDataset(np.random.rand(30, 2), np.arange(30))
    batches = _collect(DataLoader(ds, batch_size=7, shuffle=True))
    assert ds.getitem_calls == 0 and ds.gather_calls == len(batches) == 5


def test_per_sample_transforms_follow_item_order():
    images = np.random.default_rng(1).random((12, 6, 6, 2), dtype=np.float32)
    tforms = [RandomCrop(2), RandomFlipHorizontal()]
    ds = NDArrayDataset(images, np.arange(12), transforms=tforms)
    np.random.seed(7)
    batches = _collect(DataLoader(ds, batch_size=5, shuffle=True))
    # Transcription: one permutation, then crop and flip draws sample after sample.
    np.random.seed(7)
    perm = np.random.permutation(12)
    expected = []
    for i in perm:
        img = images[i]
        sx, sy = np.random.randint(low=-2, high=3, size=2)
        pad = np.pad(img, ((2, 2), (2, 2), (0, 0)))
        img = pad[2 + sx : 8 + sx, 2 + sy : 8 + sy, :]
        if np.random.rand() < 0.5:
            img = img[:, ::-1, :]
        expected.append(img)
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), np.stack(expected))
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), perm)


def test_generic_dataset_and_collate_fn():
    class Pairs(Dataset):
        def __len__(self):
            return 7

        def __getitem__(self, i):
            return np.full(2, i, dtype=np.float32), i

    batches = _collect(DataLoader(Pairs(), batch_size=3))
    np.testing.assert_array_equal(batches[2][1], [6])
    np.testing.assert_array_equal(batches[0][0], [[0, 0], [1, 1], [2, 2]])

    def collate(samples):
        xs, ys = zip(*samples)
        return np.stack(xs) * 2, np.array(ys) + 100

    batches = _collect(DataLoader(Pairs(), batch_size=4, collate_fn=collate))
    np.testing.assert_array_equal(batches[1][1], [104, 105, 106])
    # A plain list of samples works too (per-sample access + default collation).
    plain = _collect(DataLoader([(np.ones(2), 1), (np.zeros(2), 0)], batch_size=2))
    np.testing.assert_array_equal(plain[0][1], [1, 0])


def _run_epochs(loader, seed, epochs=2, consumer_draws=False):
    np.random.seed(seed)
    out = []
    for _ in range(epochs):
        for batch in loader:
            out.append(tuple(t.numpy() for t in batch))
            if consumer_draws:  # a training step that draws (dropout) between batches
                out.append((np.random.rand(3),))
    out.append((np.random.rand(3),))  # where the global stream ends
    return out


@pytest.mark.parametrize("kind", ["plain", "batch_transforms", "sample_transforms"])
@pytest.mark.parametrize("num_workers", [1, 3])
@pytest.mark.parametrize("chunk_samples", [1, 8, 1024])
def test_num_workers_give_the_same_batches(kind, num_workers, chunk_samples, monkeypatch):
    # Small hand-off chunks make several workers interleave even on this small dataset.
    monkeypatch.setattr(dataloader_module, "_CHUNK_SAMPLES", chunk_samples)
    images = np.random.default_rng(2).random((45, 8, 8, 3), dtype=np.float32)
    labels = np.arange(45)
    tforms = [RandomCrop(2), RandomFlipHorizontal()] if kind == "sample_transforms" else None
    btforms = [BatchRandomCrop(2), BatchRandomFlip()] if kind == "batch_transforms" else None

    def loader(workers):
        return DataLoader(NDArrayDataset(images, labels, transforms=tforms), batch_size=4,
                          shuffle=True, num_workers=workers, batch_transforms=btforms)

    for draws in (False, True):
        ref = _run_epochs(loader(0), seed=5, consumer_draws=draws)
        got = _run_epochs(loader(num_workers), seed=5, consumer_draws=draws)
        _assert_same_batches(ref, got)
    if kind != "plain":  # augmentation really happened
        assert not np.array_equal(ref[0][0], images[ref[0][1]])


def test_batch_transforms_match_a_transcription():
    images = np.random.default_rng(4).random((10, 5, 5, 1), dtype=np.float32)
    loader = DataLoader(NDArrayDataset(images, np.arange(10)), batch_size=4, shuffle=True,
                        batch_transforms=[BatchRandomCrop(1), BatchRandomFlip()])
    np.random.seed(9)
    batches = _collect(loader)
    np.random.seed(9)
    perm = np.random.permutation(10)
    seed = np.random.randint(0, 2**63 - 1, dtype=np.int64)
    for k, (x, y) in enumerate(batches):
        idx = perm[4 * k : 4 * k + 4]
        np.testing.assert_array_equal(y, idx)
        rng = np.random.default_rng([int(seed), k])
        ref = BatchRandomFlip()(BatchRandomCrop(1)(images[idx], rng=rng), rng=rng)
        np.testing.assert_array_equal(x, ref)


def test_batch_transforms_on_channels_first_data_use_hwc_view():
    class CHW(NDArrayDataset):
        def to_hwc(self, batch):
            return batch.transpose(0, 2, 3, 1)

        def from_hwc(self, batch):
            return batch.transpose(0, 3, 1, 2)

    chw = np.random.default_rng(0).random((6, 3, 4, 5), dtype=np.float32)
    loader = DataLoader(CHW(chw, np.arange(6)), batch_size=6, batch_transforms=[BatchRandomFlip(1)])
    x, _ = next(iter(loader))
    np.testing.assert_array_equal(x.numpy(), chw[:, :, :, ::-1])  # W is the last axis of NCHW
    assert x.shape == (6, 3, 4, 5)


def test_digits_with_batch_transforms_and_workers():
    ds = DigitsDataset(train=False, flatten=True)
    loader = DataLoader(ds, batch_size=64, shuffle=True, num_workers=2,
                        batch_transforms=[BatchRandomCrop(1)])
    np.random.seed(0)
    batches = _collect(loader)
    assert batches[0][0].shape == (64, 64) and len(batches) == 6
    assert sum(len(b[1]) for b in batches) == 359


@pytest.mark.parametrize("kind", ["plain", "batch_transforms", "sample_transforms"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_is_bit_exact(kind, num_workers, monkeypatch):
    monkeypatch.setattr(dataloader_module, "_CHUNK_SAMPLES", 4)  # one batch per hand-off
    images = np.random.default_rng(3).random((30, 6, 6, 1), dtype=np.float32)
    tforms = [RandomCrop(1), RandomFlipHorizontal()] if kind == "sample_transforms" else None
    btforms = [BatchRandomCrop(1), BatchRandomFlip()] if kind == "batch_transforms" else None

    def make():
        return DataLoader(NDArrayDataset(images, np.arange(30), transforms=tforms),
                          batch_size=4, shuffle=True, num_workers=num_workers,
                          batch_transforms=btforms)

    np.random.seed(1)
    loader = make()
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    rng_state = np.random.get_state()
    assert state["batch_index"] == 3 and sorted(state["order"]) == list(range(30))
    rest = [tuple(t.numpy() for t in b) for b in it]
    next_epoch = _collect(loader)

    np.random.seed(999)  # the resumed run starts from an unrelated global RNG state
    resumed = make()
    resumed.load_state_dict({k: (np.array(v) if k == "order" else v) for k, v in state.items()})
    assert resumed.state_dict()["batch_index"] == 3
    np.random.set_state(rng_state)
    _assert_same_batches(rest, _collect(resumed))
    _assert_same_batches(next_epoch, _collect(resumed))  # and the following epoch continues


def test_state_dict_between_epochs_and_validation():
    loader = DataLoader(_ids_dataset(10), batch_size=3, shuffle=True)
    assert loader.state_dict()["order"].size == 0
    _collect(loader)
    state = loader.state_dict()
    assert state["order"].size == 0 and state["batch_index"] == 0
    loader.load_state_dict(state)  # "start fresh": the next epoch draws a new permutation
    np.random.seed(0)
    ids = np.concatenate([b[1] for b in _collect(loader)])
    np.random.seed(0)
    np.testing.assert_array_equal(ids, np.random.permutation(10))
    with pytest.raises(ValueError, match="permutation of the 10"):
        loader.load_state_dict({"order": np.zeros(10, int), "batch_index": 0, "seed": -1})
    with pytest.raises(ValueError, match="batch_index 9"):
        loader.load_state_dict({"order": np.arange(10), "batch_index": 9, "seed": -1})


def test_unshuffled_resume():
    loader = DataLoader(_ids_dataset(10), batch_size=3)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    fresh = DataLoader(_ids_dataset(10), batch_size=3)
    fresh.load_state_dict(state)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in _collect(fresh)]),
                                  np.arange(3, 10))


def test_worker_errors_reach_the_consumer(monkeypatch):
    class Broken(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            if i == 5:
                raise RuntimeError("sample 5 is broken")
            return np.zeros(2), i

    monkeypatch.setattr(dataloader_module, "_CHUNK_SAMPLES", 2)
    it = iter(DataLoader(Broken(), batch_size=2, num_workers=2))
    next(it)
    next(it)
    with pytest.raises(RuntimeError, match="sample 5 is broken"):
        next(it)


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        DataLoader(_ids_dataset(3), batch_size=0)
    with pytest.raises(ValueError, match="num_workers"):
        DataLoader(_ids_dataset(3), num_workers=-1)


@pytest.mark.parametrize("shuffle", [False, True])
def test_plain_array_short_path_gives_the_general_paths_batches(shuffle):
    """Plain NDArrayDatasets skip the general batch machinery; the batches are the same as
    through it (a subclass overriding gather takes the general path)."""

    class General(NDArrayDataset):
        def gather(self, index):
            return super().gather(index)

    images = np.asfortranarray(np.random.default_rng(3).random((23, 4), dtype=np.float32))
    labels = np.arange(23)
    plain = DataLoader(NDArrayDataset(images, labels), batch_size=5, shuffle=shuffle)
    general = DataLoader(General(images, labels), batch_size=5, shuffle=shuffle)
    assert plain._plain_batches() and not general._plain_batches()
    np.random.seed(4)
    fast = _collect(plain)
    np.random.seed(4)
    slow = _collect(general)
    _assert_same_batches(fast, slow)
    assert len(fast) == 5 and all(x.flags.c_contiguous for x, _ in fast)
