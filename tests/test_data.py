"""Tests of needle.data datasets: IDX/MNIST, CIFAR-10 (safe unpickling), digits, text helpers."""

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

import needle as ndl
from needle.data import (
    CIFAR10Dataset,
    Corpus,
    Dataset,
    DigitsDataset,
    MNISTDataset,
    NDArrayDataset,
    RandomCrop,
    batchify,
    get_batch,
    load_digits_arrays,
    safe_load,
)

MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


# -- IDX helpers ------------------------------------------------------------------------------
def _idx_bytes(magic, dims, payload):
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in dims)
    return header + payload


def _write_mnist(tmp_path, n=6, rows=28, cols=28, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, rows, cols), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    img_path, lbl_path = tmp_path / "images.gz", tmp_path / "labels.gz"
    img_path.write_bytes(gzip.compress(_idx_bytes(2051, (n, rows, cols), images.tobytes())))
    lbl_path.write_bytes(gzip.compress(_idx_bytes(2049, (n,), labels.tobytes())))
    return img_path, lbl_path, images, labels


class _Recorder:
    """A transform that records the shapes it sees and returns its input plus one."""

    def __init__(self):
        self.shapes = []

    def __call__(self, img):
        self.shapes.append(img.shape)
        return img + 1


# -- NDArrayDataset ---------------------------------------------------------------------------
def test_ndarray_dataset_items_and_slices():
    X, y = np.random.rand(10, 3), np.arange(10)
    ds = NDArrayDataset(X, y)
    assert len(ds) == 10 and isinstance(ds, Dataset)
    x3, y3 = ds[3]
    np.testing.assert_array_equal(x3, X[3])
    assert y3 == 3
    xs, ys = ds[2:5]
    np.testing.assert_array_equal(xs, X[2:5])
    np.testing.assert_array_equal(ys, y[2:5])
    xs, ys = ds[[4, 0, 4]]
    np.testing.assert_array_equal(ys, [4, 0, 4])
    np.testing.assert_array_equal(ds[-1][0], X[-1])
    with pytest.raises(IndexError):
        ds[10]
    with pytest.raises(ValueError, match=r"first dimension.*\(10, 3\), \(9,\)"):
        NDArrayDataset(X, np.arange(9))


def test_ndarray_dataset_transforms_apply_per_sample_in_order():
    X = np.zeros((4, 2, 2, 1), dtype=np.float32)
    rec = _Recorder()
    ds = NDArrayDataset(X, np.arange(4), transforms=[rec])
    np.testing.assert_array_equal(ds[1][0], X[1] + 1)
    xs, _ = ds[0:3]
    assert xs.shape == (3, 2, 2, 1) and rec.shapes == [(2, 2, 1)] * 4
    np.testing.assert_array_equal(xs, 1)
    assert X.max() == 0  # the dataset's own arrays are never modified


def test_base_dataset_gather_calls_getitem_per_sample():
    class Squares(Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return np.array([i, i * i]), i

    xs, ys = Squares().gather(np.array([3, 1]))
    np.testing.assert_array_equal(xs, [[3, 9], [1, 1]])
    np.testing.assert_array_equal(ys, [3, 1])
    assert Squares().apply_transforms(7) == 7


# -- MNIST ------------------------------------------------------------------------------------
def test_mnist_from_generated_idx(tmp_path):
    img_path, lbl_path, images, labels = _write_mnist(tmp_path)
    ds = MNISTDataset(str(img_path), str(lbl_path))
    assert len(ds) == 6
    x, y = ds[2]
    assert x.shape == (784,) and x.dtype == np.float32
    np.testing.assert_allclose(x, images[2].reshape(-1) / 255.0, rtol=1e-6)
    assert y == labels[2] and ds.labels.dtype == np.int64
    xs, ys = ds[1:4]
    assert xs.shape == (3, 784) and ys.shape == (3,)
    np.testing.assert_array_equal(xs[0], ds[1][0])
    assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0

    square = MNISTDataset(img_path, lbl_path, flatten=False)
    assert square[0][0].shape == (28, 28, 1)
    assert square[0:2][0].shape == (2, 28, 28, 1)


def test_mnist_transforms_see_28x28x1_and_match_cmu_order(tmp_path):
    img_path, lbl_path, images, _ = _write_mnist(tmp_path)
    rec = _Recorder()
    ds = MNISTDataset(img_path, lbl_path, transforms=[rec])
    x, _ = ds[0]
    assert rec.shapes == [(28, 28, 1)] and x.shape == (784,)
    # With a random transform, ds[i] item by item consumes the global RNG like CMU needle.
    ds = MNISTDataset(img_path, lbl_path, transforms=[RandomCrop(3)])
    np.random.seed(0)
    got = [ds[i][0] for i in range(3)]
    np.random.seed(0)
    for i in range(3):
        img = images[i].astype(np.float32)[:, :, None] / 255.0
        sx, sy = np.random.randint(low=-3, high=4, size=2)
        pad = np.pad(img, ((3, 3), (3, 3), (0, 0)))
        np.testing.assert_allclose(got[i], pad[3 + sx : 31 + sx, 3 + sy : 31 + sy].reshape(-1),
                                   rtol=1e-6)


def _bad_file_cases(tmp_path):
    """(name, image bytes, label bytes, message regex, which file is named)."""
    n = 3
    pixels = bytes(n * 28 * 28)
    labels = bytes(n)
    good_img = gzip.compress(_idx_bytes(2051, (n, 28, 28), pixels))
    good_lbl = gzip.compress(_idx_bytes(2049, (n,), labels))
    return [
        ("images with label magic", gzip.compress(_idx_bytes(2049, (n, 28, 28), pixels)),
         good_lbl, "wrong IDX magic number 2049", "images"),
        ("labels with garbage magic", good_img,
         gzip.compress(_idx_bytes(0x12345678, (n,), labels)), "wrong IDX magic number", "labels"),
        ("truncated pixels", gzip.compress(_idx_bytes(2051, (n, 28, 28), pixels[:-5])),
         good_lbl, "truncated", "images"),
        ("trailing bytes", gzip.compress(_idx_bytes(2051, (n, 28, 28), pixels + b"x")),
         good_lbl, "trailing", "images"),
        ("truncated header", gzip.compress(b"\x00\x00\x08\x03\x00"), good_lbl,
         "truncated IDX header", "images"),
        ("count mismatch", good_img, gzip.compress(_idx_bytes(2049, (n - 1,), labels[:-1])),
         "holds 3 images but .* holds 2 labels", "images"),
        ("not gzip", _idx_bytes(2051, (n, 28, 28), pixels), good_lbl, "not a gzip file",
         "images"),
        ("truncated gzip stream", good_img, good_lbl[: len(good_lbl) // 2],
         "corrupt or truncated gzip", "labels"),
    ]


@pytest.mark.parametrize("case", range(8))
def test_mnist_bad_files_raise_value_error_naming_the_file(tmp_path, case):
    name, img_bytes, lbl_bytes, message, named = _bad_file_cases(tmp_path)[case]
    img_path, lbl_path = tmp_path / "images.gz", tmp_path / "labels.gz"
    img_path.write_bytes(img_bytes)
    lbl_path.write_bytes(lbl_bytes)
    with pytest.raises(ValueError, match=message) as info:
        MNISTDataset(img_path, lbl_path)
    assert str(img_path if named == "images" else lbl_path) in str(info.value), name


@pytest.mark.skipif(not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(),
                    reason="MNIST test set not present at ../shared/data/mnist")
def test_real_mnist_test_set():
    ds = MNISTDataset(MNIST_DIR / "t10k-images-idx3-ubyte.gz",
                      MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    assert len(ds) == 10000
    assert ds.images.shape == (10000, 784) and ds.images.dtype == np.float32
    assert ds.images.min() == 0.0 and ds.images.max() == 1.0
    assert set(np.unique(ds.labels)) == set(range(10))
    # Published class counts of the MNIST test set, and its first label.
    np.testing.assert_array_equal(np.bincount(ds.labels),
                                  [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])
    assert ds[0][1] == 7


# -- CIFAR-10 ---------------------------------------------------------------------------------
def _cifar_batch(n, seed, bytes_keys=True):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).tolist()
    if bytes_keys:  # what the real (Python 2) files give with encoding="bytes"
        return {b"batch_label": b"batch", b"data": data, b"labels": labels,
                b"filenames": [b"f%d.png" % i for i in range(n)]}
    return {"data": data, "labels": labels}


def _write_cifar(folder, n=4, protocol=2, bytes_keys=True):
    folder.mkdir(exist_ok=True)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batches[name] = _cifar_batch(n, seed=i, bytes_keys=bytes_keys)
        with open(folder / name, "wb") as f:
            pickle.dump(batches[name], f, protocol=protocol)
    return batches


@pytest.mark.parametrize("protocol,bytes_keys", [(2, True), (4, False), (5, True)])
def test_cifar_from_generated_batches(tmp_path, protocol, bytes_keys):
    batches = _write_cifar(tmp_path / "cifar", protocol=protocol, bytes_keys=bytes_keys)
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    train = CIFAR10Dataset(str(tmp_path / "cifar"), train=True)
    test = CIFAR10Dataset(tmp_path / "cifar", train=False)
    assert len(train) == 20 and len(test) == 4
    X, y = train[5]  # second file, second row
    assert isinstance(X, np.ndarray) and X.shape == (3, 32, 32) and X.dtype == np.float32
    raw = batches["data_batch_2"][key("data")][1]
    np.testing.assert_allclose(X, raw.reshape(3, 32, 32) / 255.0, rtol=1e-6)
    assert y == batches["data_batch_2"][key("labels")][1]
    assert test[0:3][0].shape == (3, 3, 32, 32)
    assert 0.0 <= train.images.min() and train.images.max() <= 1.0


def test_cifar_transforms_see_hwc(tmp_path):
    _write_cifar(tmp_path / "c")
    rec = _Recorder()
    ds = CIFAR10Dataset(tmp_path / "c", train=False, transforms=[rec])
    X, _ = ds[1]
    assert rec.shapes == [(32, 32, 3)] and X.shape == (3, 32, 32)
    np.testing.assert_allclose(X, CIFAR10Dataset(tmp_path / "c", train=False)[1][0] + 1)


class _Payload:
    """Unpickling this runs ``os.system(command)``."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _EvalPayload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (eval, (f"open({str(self.path)!r}, 'w').close()",))


@pytest.mark.parametrize("payload_kind", ["os.system", "builtins.eval"])
@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar_refuses_code_carrying_pickle(tmp_path, payload_kind, protocol):
    folder = tmp_path / "evil"
    folder.mkdir()
    marker = tmp_path / "pwned"
    payload = _Payload(f"touch {marker}") if payload_kind == "os.system" \
        else _EvalPayload(marker)
    batch = {b"data": payload, b"labels": [0]}
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch, f, protocol=protocol)
    with pytest.raises(ValueError, match=r"test_batch.*refused global"):
        CIFAR10Dataset(folder, train=False)
    assert not marker.exists()
    # Control: the plain unpickler does run the payload, so the check above is meaningful.
    with open(folder / "test_batch", "rb") as f:
        pickle.load(f, encoding="bytes")
    assert marker.exists()


@pytest.mark.parametrize("content,message", [
    ([1, 2, 3], "expected a dict"),
    ({b"labels": [1]}, "needs a 'data' entry"),
    ({b"data": np.zeros((2, 3072), np.uint8)}, "needs a 'labels' entry"),
    ({b"data": np.zeros((2, 100), np.uint8), b"labels": [1, 2]}, r"shape \(n, 3072\)"),
    ({b"data": np.zeros((2, 3072), np.float64), b"labels": [1, 2]}, "uint8"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}, "2 images but labels"),
    ({b"data": np.zeros((1, 3072), np.uint8), b"labels": [12]}, "0..9"),
])
def test_cifar_malformed_batches(tmp_path, content, message):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps(content, protocol=2))
    with pytest.raises(ValueError, match=message) as info:
        CIFAR10Dataset(folder, train=False)
    assert "test_batch" in str(info.value)


def test_cifar_truncated_pickle(tmp_path):
    folder = tmp_path / "trunc"
    folder.mkdir()
    blob = pickle.dumps(_cifar_batch(2, 0), protocol=2)
    (folder / "test_batch").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="test_batch.*malformed pickle"):
        CIFAR10Dataset(folder, train=False)


def test_safe_load_reads_plain_containers(tmp_path):
    obj = {"a": [1, 2.5, "x", b"y"], "s": {1, 2}, "f": frozenset([3]), "t": (1, None, True),
           "arr": np.arange(6, dtype=np.float32).reshape(2, 3), "b": bytearray(b"z")}
    for protocol in (2, 3, 4, 5):
        path = tmp_path / f"p{protocol}"
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
        got = safe_load(path, encoding="ASCII")
        np.testing.assert_array_equal(got.pop("arr"), obj["arr"])
        assert got == {k: v for k, v in obj.items() if k != "arr"}


# -- digits -----------------------------------------------------------------------------------
def test_digits_shapes_ranges_and_split_sizes():
    train, test = DigitsDataset(train=True), DigitsDataset(train=False)
    assert (len(train), len(test)) == (1438, 359)
    x, y = train[0]
    assert x.shape == (8, 8, 1) and x.dtype == np.float32
    assert isinstance(y, np.integer) and 0 <= y <= 9
    for ds in (train, test):
        assert ds.images.shape == (len(ds), 8, 8, 1) and ds.labels.shape == (len(ds),)
        assert ds.images.min() == 0.0 and ds.images.max() == 1.0
        np.testing.assert_array_equal(ds.images * 16, np.round(ds.images * 16))
        assert set(np.unique(ds.labels)) == set(range(10))
    flat = DigitsDataset(train=False, flatten=True)
    assert flat[0][0].shape == (64,) and flat[0:4][0].shape == (4, 64)
    np.testing.assert_array_equal(flat[3][0], test[3][0].reshape(-1))


def test_digits_split_is_fixed_disjoint_and_stratified():
    raw = load_digits_arrays()
    assert raw["images"].dtype == np.uint8 and raw["images"].shape == (1797, 8, 8)
    assert raw["images"].max() == 16 and raw["labels"].dtype == np.uint8
    # First row of the UCI / scikit-learn digits file (a zero).
    np.testing.assert_array_equal(raw["images"][0, 0], [0, 0, 5, 13, 9, 1, 0, 0])
    assert raw["labels"][0] == 0
    tr, te = raw["train_index"], raw["test_index"]
    assert len(np.intersect1d(tr, te)) == 0
    np.testing.assert_array_equal(np.union1d(tr, te), np.arange(1797))
    totals = np.bincount(raw["labels"], minlength=10)
    test_counts = np.bincount(raw["labels"][te], minlength=10)
    np.testing.assert_array_equal(test_counts, np.round(0.2 * totals))
    np.testing.assert_array_equal(DigitsDataset(train=False).labels, raw["labels"][te])
    np.testing.assert_array_equal(DigitsDataset(train=False)[5][0],
                                  raw["images"][te[5]][:, :, None] / 16.0)


def test_digits_transforms_apply_per_sample():
    rec = _Recorder()
    ds = DigitsDataset(train=False, transforms=[rec], flatten=True)
    x, _ = ds[0]
    assert rec.shapes == [(8, 8, 1)] and x.shape == (64,)


# -- text -------------------------------------------------------------------------------------
def _write_corpus(tmp_path):
    (tmp_path / "train.txt").write_text(" the cat sat \n the dog \n ran far away \n")
    (tmp_path / "test.txt").write_text(" a cat ran \n the end \n")
    return tmp_path


def test_corpus_ids_and_eos(tmp_path):
    corpus = Corpus(_write_corpus(tmp_path))
    d = corpus.dictionary
    words = [d.idx2word[i] for i in corpus.train]
    assert words == ["the", "cat", "sat", "<eos>", "the", "dog", "<eos>", "ran", "far", "away",
                     "<eos>"]
    assert [d.idx2word[i] for i in corpus.test] == ["a", "cat", "ran", "<eos>", "the", "end",
                                                    "<eos>"]
    assert d.word2idx["the"] == 0 and d.word2idx["<eos>"] == 3 and len(d) == 10
    assert d.add_word("cat") == 1 and len(d) == 10
    assert d.add_word("new") == 10 and d.idx2word[10] == "new"
    short = Corpus(tmp_path, max_lines=1)
    assert len(short.train) == 4 and len(short.test) == 4


def test_batchify_and_get_batch():
    data = list(range(23))
    batches = batchify(data, 4, device=ndl.cpu(), dtype="float32")
    assert batches.shape == (5, 4) and batches.dtype == np.float32
    np.testing.assert_array_equal(batches, np.arange(20).reshape(4, 5).T)
    X, y = get_batch(batches, 1, 3)
    assert isinstance(X, ndl.Tensor) and X.shape == (3, 4) and y.shape == (12,)
    assert X.dtype == "float32" and X.device == ndl.cpu() and not X.requires_grad
    np.testing.assert_array_equal(X.numpy(), batches[1:4])
    np.testing.assert_array_equal(y.numpy(), batches[2:5].reshape(-1))
    # Near the end the window shrinks so that targets stay in range.
    X, y = get_batch(batches, 3, 3, dtype="int64")
    assert X.shape == (1, 4) and y.shape == (4,) and X.dtype == np.int64
    with pytest.raises(IndexError, match="no target row"):
        get_batch(batches, 4, 3)
