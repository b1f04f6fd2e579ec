"""Tests of needle's data-only checkpoints: round trips, atomic writes, refusal of bad files."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

import needle as ndl
from needle import checkpoint
from needle.checkpoint import (
    CheckpointError,
    CheckpointNotFoundError,
    checkpoint_info,
    format_info,
    load,
    rng_state,
    save,
    set_rng_state,
)
from needle.checkpoint import archive as archive_module

SRC_DIR = Path(__file__).resolve().parents[1] / "src"


# -- helpers ---------------------------------------------------------------------------------------
def assert_same(expected, actual, where="<root>"):
    """Recursive equality that also checks container types, array dtypes/shapes and key order."""
    if isinstance(expected, ndl.Tensor):
        expected = expected.numpy()
    if isinstance(expected, (np.ndarray, np.generic)):
        assert type(actual) is type(expected), where
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
        assert np.array_equal(actual, expected, equal_nan=actual.dtype.kind in "fc"), where
    elif isinstance(expected, dict):
        assert type(actual) is dict, where
        assert list(actual) == list(expected), where
        for key in expected:
            assert_same(expected[key], actual[key], f"{where}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected), where
        for i, (e, a) in enumerate(zip(expected, actual)):
            assert_same(e, a, f"{where}/{i}")
    elif isinstance(expected, float) and np.isnan(expected):
        assert type(actual) is float and np.isnan(actual), where
    else:
        assert type(actual) is type(expected) and actual == expected, where
        if isinstance(expected, float):  # keep the sign of -0.0
            assert np.copysign(1.0, actual) == np.copysign(1.0, expected), where


def temp_files(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith(".tmp"))


def rewrite_member(path: Path, name: str, data: bytes) -> None:
    """Replace one zip member's bytes, keeping the zip itself valid (so CRCs match)."""
    with zipfile.ZipFile(path) as archive:
        members = [(info, archive.read(info.filename)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for info, blob in members:
            archive.writestr(info, data if info.filename == name else blob)


def rewrite_meta(path: Path, **changes) -> None:
    with zipfile.ZipFile(path) as archive:
        meta = json.loads(archive.read("meta.json"))
    meta.update(changes)
    rewrite_member(path, "meta.json", json.dumps(meta).encode())


class MarkerPayload:
    """Unpickling this object creates ``path``: proof that a loader ran code from a file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').close()",))


def object_npy_bytes(marker: Path) -> bytes:
    buffer = io.BytesIO()
    array = np.array([MarkerPayload(marker), 1], dtype=object)
    np.lib.format.write_array(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def sample_items() -> dict:
    rng = np.random.default_rng(0)
    return {
        "model": OrderedDict([
            ("layers.0.weight", rng.standard_normal((3, 4)).astype(np.float32)),
            ("layers.0.bias", ndl.Tensor(np.arange(4, dtype=np.float32))),
            ("running_mean", rng.standard_normal(4)),                      # float64
        ]),
        "arrays": {
            "int64": np.arange(-3, 3, dtype=np.int64),
            "uint8": np.arange(250, 256, dtype=np.uint8),
            "bool": np.array([[True, False], [False, True]]),
            "zero_d": np.array(2.5, dtype=np.float32),
            "zero_d_int": np.array(7, dtype=np.int64),
            "empty": np.zeros((0, 5), dtype=np.float64),
            "empty_1d": np.array([], dtype=np.uint8),
            "fortran": np.asfortranarray(np.arange(12.0).reshape(3, 4)),
            "strided": np.arange(20, dtype=np.int64)[::3],
        },
        "optimizer": {"state": {0: {"m": np.ones(3)}, 1: {"m": np.zeros(2)}}, "step_count": 5},
        "mixed_keys": {0: "int", "0": "str", -5: [1, 2]},
        "scalars": [1, -2**70, 0.1, -0.0, float("inf"), float("-inf"), float("nan"), True, False,
                    None, "text ünïcode", np.float32(1.5), np.int64(-3), np.bool_(True),
                    np.float64(2.25), np.str_("numpy str")],
        "nested": ({"a": [(), [], {}]}, ("x", ("y",))),
        "epoch": 3,
        "lr": 1e-3,
        "note": None,
    }


# -- round trips -----------------------------------------------------------------------------------
def test_round_trip_nested_values_and_dtypes(tmp_path):
    items = sample_items()
    save(tmp_path / "ckpt.npz", **items)
    loaded = load(tmp_path / "ckpt.npz")
    assert_same(items, loaded)
    # a Tensor comes back as a NumPy array; an int dict key stays an int
    assert isinstance(loaded["model"]["layers.0.bias"], np.ndarray)
    assert list(loaded["optimizer"]["state"]) == [0, 1]


def test_numpy_integer_keys_become_int_keys(tmp_path):
    save(tmp_path / "ckpt.npz", state={np.int64(3): np.ones(2), np.uint8(1): "x"})
    loaded = load(tmp_path / "ckpt.npz")["state"]
    assert list(loaded) == [3, 1] and all(type(key) is int for key in loaded)


def test_key_order_is_preserved(tmp_path):
    items = {"z": {"b": 1, "a": 2, "c": {"y": np.ones(1), "x": np.zeros(1)}}, "a": 0}
    save(tmp_path / "ckpt.npz", **items)
    loaded = load(tmp_path / "ckpt.npz")
    assert list(loaded) == ["z", "a"]
    assert list(loaded["z"]) == ["b", "a", "c"] and list(loaded["z"]["c"]) == ["y", "x"]


def test_objects_with_state_dict_are_stored_as_their_state(tmp_path):
    class Counter:
        def __init__(self, n):
            self.n = n

        def state_dict(self):
            return {"n": self.n, "history": np.arange(self.n)}

    save(tmp_path / "ckpt.npz", counter=Counter(4), several=[Counter(1), {"c": Counter(2)}])
    loaded = load(tmp_path / "ckpt.npz")
    assert_same({"n": 4, "history": np.arange(4)}, loaded["counter"])
    assert loaded["several"][1]["c"]["n"] == 2
    info = checkpoint_info(tmp_path / "ckpt.npz")
    assert info["items"]["counter"]["state_dict_of"].endswith("Counter")


def test_saving_the_same_content_twice_gives_identical_bytes(tmp_path):
    save(tmp_path / "a.npz", **sample_items())
    save(tmp_path / "b.npz", **sample_items())
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()


def test_file_is_an_npz_with_readable_member_names(tmp_path):
    weight = np.arange(6, dtype=np.float32).reshape(2, 3)
    save(tmp_path / "ckpt.npz", model={"fc.weight": weight}, odd={"../up": np.ones(1),
                                                                  "__/up": np.zeros(1)})
    with np.load(tmp_path / "ckpt.npz", allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["model/fc.weight"], weight)
        names = npz.files
    # unsafe segments are sanitized and collisions get a suffix; the tree still maps them back
    assert not any(".." in part for name in names for part in name.split("/") if part == "..")
    assert len(set(names)) == len(names) == 4
    loaded = load(tmp_path / "ckpt.npz")
    assert_same({"../up": np.ones(1), "__/up": np.zeros(1)}, loaded["odd"])


def test_global_rng_state_round_trip(tmp_path):
    np.random.seed(1234)
    np.random.randn(1)                  # leaves a cached Gaussian: the state's float must be exact
    state = rng_state()
    assert state[3] == 1
    save(tmp_path / "ckpt.npz", rng=state)
    expected = (np.random.rand(5), np.random.randn(3), np.random.permutation(10))
    set_rng_state(load(tmp_path / "ckpt.npz")["rng"])
    actual = (np.random.rand(5), np.random.randn(3), np.random.permutation(10))
    for e, a in zip(expected, actual):
        np.testing.assert_array_equal(e, a)


def test_generator_rng_state_round_trip(tmp_path):
    generator = np.random.default_rng(7)
    generator.random(3)
    save(tmp_path / "ckpt.npz", rng=rng_state(generator))   # PCG64: 128-bit ints in the state
    expected = generator.random(4)
    restored = np.random.default_rng()
    set_rng_state(load(tmp_path / "ckpt.npz")["rng"], restored)
    np.testing.assert_array_equal(restored.random(4), expected)


def test_resumed_training_matches_uninterrupted_training(tmp_path):
    from needle import nn, optim

    def make():
        np.random.seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        return model, optim.Adam(model.parameters(), lr=0.01)

    def step(model, opt):
        x = ndl.Tensor(np.random.rand(6, 4).astype(np.float32))
        y = ndl.Tensor(np.random.randint(0, 3, size=6))
        opt.reset_grad()
        nn.SoftmaxLoss()(model(x), y).backward()
        opt.step()

    model, opt = make()
    for _ in range(3):
        step(model, opt)
    save(tmp_path / "ckpt.npz", model=model, optimizer=opt, rng=rng_state())
    for _ in range(3):
        step(model, opt)

    resumed, resumed_opt = make()
    ckpt = load(tmp_path / "ckpt.npz")
    resumed.load_state_dict(ckpt["model"])
    resumed_opt.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    for _ in range(3):
        step(resumed, resumed_opt)
    assert_same(dict(model.state_dict()), dict(resumed.state_dict()))


# -- values that cannot be saved -----------------------------------------------------------------
@pytest.mark.parametrize("value, error, words", [
    (object(), TypeError, "'bad/x' has type object"),
    (np.array([1, "a"], dtype=object), TypeError, "object arrays need pickle"),
    ({True: 1}, TypeError, "key True"),
    ({(1, 2): 1}, TypeError, "key (1, 2)"),
    (b"bytes", TypeError, "has type bytes"),
])
def test_unsupported_values_raise_before_anything_is_written(tmp_path, value, error, words):
    path = tmp_path / "ckpt.npz"
    save(path, epoch=1)
    before = path.read_bytes()
    with pytest.raises(error) as info:
        save(path, good=np.ones(3), bad={"x": value})
    assert words in str(info.value)
    assert path.read_bytes() == before and temp_files(tmp_path) == []


def test_reference_cycle_is_refused(tmp_path):
    cycle: list = [1]
    cycle.append(cycle)
    with pytest.raises(ValueError, match="contains itself"):
        save(tmp_path / "ckpt.npz", loop=cycle)


# -- atomic writes ---------------------------------------------------------------------------------
def _fail_mid_array(fileobj, array):
    fileobj.write(b"\x93NUMPY partial")
    raise OSError("No space left on device (simulated)")


@pytest.mark.parametrize("where", ["write", "fsync", "replace", "interrupt"])
def test_failed_save_keeps_previous_checkpoint_and_leaves_no_temp_file(tmp_path, monkeypatch,
                                                                       where):
    path = tmp_path / "ckpt.npz"
    save(path, weights=np.arange(10.0), epoch=1)
    before = path.read_bytes()
    if where == "write":
        monkeypatch.setattr(archive_module, "_write_array", _fail_mid_array)
        expected = OSError
    elif where == "fsync":
        monkeypatch.setattr(archive_module.os, "fsync",
                            lambda fd: (_ for _ in ()).throw(OSError("fsync failed (simulated)")))
        expected = OSError
    elif where == "replace":
        monkeypatch.setattr(archive_module.os, "replace",
                            lambda a, b: (_ for _ in ()).throw(OSError("replace failed")))
        expected = OSError
    else:
        def interrupted(fileobj, array):
            fileobj.write(b"\x93NUMPY")
            raise KeyboardInterrupt
        monkeypatch.setattr(archive_module, "_write_array", interrupted)
        expected = KeyboardInterrupt
    with pytest.raises(expected):
        save(path, weights=np.arange(1000.0), epoch=2)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert temp_files(tmp_path) == [] and os.listdir(tmp_path) == ["ckpt.npz"]
    assert load(path)["epoch"] == 1


def test_save_into_missing_directory_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save(tmp_path / "nowhere" / "ckpt.npz", x=1)


@pytest.mark.skipif(not hasattr(os, "fchmod"), reason="POSIX file modes")
def test_overwrite_keeps_the_file_mode(tmp_path):
    path = tmp_path / "ckpt.npz"
    save(path, x=1)
    os.chmod(path, 0o600)
    save(path, x=2)
    assert (os.stat(path).st_mode & 0o777) == 0o600 and load(path)["x"] == 2


_SAVER = textwrap.dedent("""
    import sys
    import numpy as np
    from needle.checkpoint import save
    path, step = sys.argv[1], int(sys.argv[2])
    big = np.empty(2_000_000, dtype=np.float64)           # 16 MB: kills land mid-write
    print("ready", flush=True)
    while True:
        big.fill(step)
        save(path, step=step, weights={"big": big, "small": np.full(100, step)})
        step += 1
""")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_during_saves_always_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "ckpt.npz"
    save(path, step=-1, weights={"big": np.full(2_000_000, -1.0), "small": np.full(100, -1)})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC_DIR),
                                                        os.environ.get("PYTHONPATH", "")])}
    chooser = random.Random(0)
    last_step = -1
    for round_ in range(5):
        child = subprocess.Popen([sys.executable, "-c", _SAVER, str(path), str(1000 * round_)],
                                 stdout=subprocess.PIPE, env=env)
        try:
            assert child.stdout.readline().strip() == b"ready"
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=chooser.uniform(0.02, 0.4))
            assert child.returncode is None, "the saver died by itself"
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
            child.stdout.close()
        ckpt = load(path)                                  # never half-written
        step = ckpt["step"]
        assert step == last_step or 1000 * round_ <= step < 1000 * (round_ + 1)
        assert (ckpt["weights"]["big"] == step).all() and (ckpt["weights"]["small"] == step).all()
        last_step = step
    # a kill can strand a temp file; it is hidden and never confused with the checkpoint
    assert all(name.startswith(".ckpt.npz.") for name in temp_files(tmp_path))


# -- files that must be refused --------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no such checkpoint file") as info:
        load(tmp_path / "absent.npz")
    assert str(tmp_path / "absent.npz") in str(info.value)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, CheckpointError)


def test_directory_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory"):
        load(tmp_path)


def test_truncated_file_is_refused_at_every_length(tmp_path):
    path = tmp_path / "ckpt.npz"
    save(path, weights=np.arange(50, dtype=np.float32), epoch=1)
    data = path.read_bytes()
    cut = tmp_path / "cut.npz"
    for length in [0, 1, 4, *range(10, len(data), 37), len(data) - 1]:
        cut.write_bytes(data[:length])
        with pytest.raises(CheckpointError) as info:
            load(cut)
        assert str(cut) in str(info.value)
        assert "truncated" in str(info.value) or "empty" in str(info.value), length


def test_flipped_bytes_raise_or_change_nothing(tmp_path):
    """Flip bytes all over the file: load either refuses it or returns exactly the saved data
    (a flip in a zip timestamp or attribute field is harmless), never a wrong value."""
    path = tmp_path / "ckpt.npz"
    items = {"weights": np.arange(64, dtype=np.float32).reshape(8, 8), "epoch": 1,
             "opt": {0: np.ones(3, np.int64)}}
    save(path, **items)
    data = path.read_bytes()
    bad = tmp_path / "bad.npz"
    refused = 0
    for position in range(0, len(data), 3):
        flipped = bytearray(data)
        flipped[position] ^= 0x5A
        bad.write_bytes(bytes(flipped))
        try:
            loaded = load(bad)
        except CheckpointError as exc:
            assert str(bad) in str(exc)
            refused += 1
        else:
            assert_same(items, loaded, f"flip at {position}")
    assert refused > len(data) // 3 // 2


def test_flipped_byte_in_array_data_is_detected(tmp_path):
    path = tmp_path / "ckpt.npz"
    save(path, weights=np.arange(1000, dtype=np.float64))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01                          # inside the weights' values
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        load(path)


def test_checksum_catches_changed_data_with_a_valid_zip(tmp_path):
    """Members rewritten with correct zip CRCs: only the SHA-256 in meta.json can tell."""
    path = tmp_path / "ckpt.npz"
    save(path, weights=np.arange(10, dtype=np.float32))
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.arange(10, dtype=np.float32)[::-1].copy())
    rewrite_member(path, "weights.npy", buffer.getvalue())
    with pytest.raises(CheckpointError, match="checksum mismatch for array 'weights'"):
        load(path)
    np.testing.assert_array_equal(load(path, verify=False)["weights"], np.arange(10)[::-1])


def test_array_with_wrong_shape_is_refused(tmp_path):
    path = tmp_path / "ckpt.npz"
    save(path, weights=np.arange(10, dtype=np.float32))
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.arange(12, dtype=np.float32))
    rewrite_member(path, "weights.npy", buffer.getvalue())
    with pytest.raises(CheckpointError, match=r"metadata says <f4 \(10,\)"):
        load(path)


@pytest.mark.parametrize("content, words", [
    (b"epoch,loss\n1,0.5\n", "not a zip"),
    (b"", "empty"),
    (b"\x93NUMPY\x01\x00", "single .npy array"),
])
def test_other_formats_are_not_needle_checkpoints(tmp_path, content, words):
    path = tmp_path / "other.npz"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a needle checkpoint") as info:
        load(path)
    assert words in str(info.value) and str(path) in str(info.value)


def test_plain_npz_is_not_a_needle_checkpoint(tmp_path):
    path = tmp_path / "plain.npz"
    np.savez(path, w=np.ones(3), b=np.zeros(2))
    with pytest.raises(CheckpointError, match=r"not a needle checkpoint: a plain \.npz"):
        load(path)


def test_pickle_file_is_refused_without_running_it(tmp_path):
    payload = pickle.dumps({"w": MarkerPayload(tmp_path / "control")})
    pickle.loads(payload)                                  # the payload really does run code
    assert (tmp_path / "control").exists()
    path = tmp_path / "legacy.pt"
    path.write_bytes(pickle.dumps({"w": MarkerPayload(tmp_path / "marker")}))
    with pytest.raises(CheckpointError, match="not a needle checkpoint: it is a Python pickle"):
        load(path)
    assert not (tmp_path / "marker").exists()


def test_zip_with_pickled_data_is_refused_without_running_it(tmp_path):
    path = tmp_path / "model.pt"                           # the layout of torch.save's files
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(MarkerPayload(tmp_path / "marker")))
        archive.writestr("archive/version", b"3\n")
    with pytest.raises(CheckpointError, match="not a needle checkpoint: a zip holding pickled"):
        load(path)
    assert not (tmp_path / "marker").exists()


def test_real_torch_file_is_not_a_needle_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "model.pt"
    torch.save({"weight": torch.ones(2, 3)}, path)
    with pytest.raises(CheckpointError, match="not a needle checkpoint"):
        load(path)


def test_npz_with_object_array_is_refused_without_running_it(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, w=np.array([MarkerPayload(tmp_path / "control"), 1], dtype=object))
    with np.load(path, allow_pickle=True) as npz:          # the payload really does run code
        npz["w"]
    assert (tmp_path / "control").exists()
    np.savez(path, w=np.array([MarkerPayload(tmp_path / "marker"), 1], dtype=object))
    with pytest.raises(CheckpointError, match="not a needle checkpoint"):
        load(path)
    assert not (tmp_path / "marker").exists()


def test_checkpoint_with_an_object_array_member_is_refused(tmp_path):
    """A forged needle checkpoint whose array member needs pickle: refused, nothing runs."""
    path = tmp_path / "forged.npz"
    save(path, model={"w": np.ones(2)})
    rewrite_member(path, "model/w.npy", object_npy_bytes(tmp_path / "marker"))
    for read in (load, lambda p: checkpoint_info(p, verify=True)):
        with pytest.raises(CheckpointError, match="refused: array 'model/w' is an object array"):
            read(path)
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("version, words", [
    (2, "format version 2 is newer than this needle reads"),
    (0, "unknown checkpoint format version 0"),
    ("1", "unknown checkpoint format version '1'"),
    (None, "unknown checkpoint format version None"),
])
def test_unknown_format_version_is_refused(tmp_path, version, words):
    path = tmp_path / "ckpt.npz"
    save(path, epoch=1)
    rewrite_meta(path, version=version)
    with pytest.raises(CheckpointError, match="version") as info:
        load(path)
    assert words in str(info.value) and str(path) in str(info.value)


def test_other_format_name_is_refused(tmp_path):
    path = tmp_path / "ckpt.npz"
    save(path, epoch=1)
    rewrite_meta(path, format="someone-else")
    with pytest.raises(CheckpointError, match="not a needle checkpoint: meta.json names"):
        load(path)


@pytest.mark.parametrize("items, words", [
    ({"type": "dict", "keys": ["a"], "values": []}, "equally long"),
    ({"type": "dict", "keys": ["a"], "values": [{"type": "int", "value": True}]}, "int entry"),
    ({"type": "dict", "keys": ["a"], "values": [{"type": "pickle"}]}, "unknown entry type"),
    ({"type": "dict", "keys": ["a"], "values": [{"type": "ndarray", "member": "a.npy"}]},
     "array entry lacks"),
])
def test_corrupted_metadata_is_refused(tmp_path, items, words):
    path = tmp_path / "ckpt.npz"
    save(path, a=1)
    rewrite_meta(path, items=items)
    with pytest.raises(CheckpointError, match="corrupted metadata") as info:
        load(path)
    assert words in str(info.value)


# -- checkpoint_info -------------------------------------------------------------------------------
def test_checkpoint_info_summarizes_without_loading(tmp_path):
    path = tmp_path / "ckpt.npz"
    save(path, model=OrderedDict([("fc.weight", np.zeros((3, 4), np.float32)),
                                  ("fc.bias", ndl.Tensor(np.zeros(4, np.float32)))]),
         epoch=7, rng=rng_state(), loss=float("nan"))
    info = checkpoint_info(path)
    assert info["format"] == checkpoint.FORMAT_NAME and info["version"] == checkpoint.FORMAT_VERSION
    assert info["writer"].startswith("needle ") and info["file_bytes"] == os.path.getsize(path)
    assert [a["name"] for a in info["arrays"]] == ["model/fc.weight", "model/fc.bias", "rng/1"]
    weight, bias, state = info["arrays"]
    assert (weight["shape"], weight["dtype"], weight["bytes"], weight["kind"]) == \
        ((3, 4), "float32", 48, "ndarray")
    assert (bias["kind"], state["dtype"], state["shape"]) == ("tensor", "uint32", (624,))
    assert info["items"]["model"] == {"type": "dict", "state_dict_of": None, "num_arrays": 2,
                                      "array_bytes": 64}
    assert info["items"]["epoch"]["value"] == 7 and info["items"]["loss"]["value"] != 0
    assert info["num_arrays"] == 3 and info["array_bytes"] == 64 + 624 * 4
    assert info["metadata"]["items"]["type"] == "dict"
    text = format_info(checkpoint_info(path, verify=True))
    assert "model/fc.weight" in text and "epoch: int 7" in text and "verified" in text
    assert "loss: float nan" in text


# -- abandoned temporary files ---------------------------------------------------------------------
_KILLED_MID_SAVE = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from needle.checkpoint import archive, save

    def die(fileobj, array):
        fileobj.write(b"\\x93NUMPY partial")
        os.kill(os.getpid(), signal.SIGKILL)

    archive._write_array = die
    save(sys.argv[1], weights=np.ones(1000))
""")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_next_save_removes_temp_files_of_saves_that_were_killed(tmp_path):
    path = tmp_path / "ckpt.npz"
    save(path, epoch=1)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC_DIR),
                                                        os.environ.get("PYTHONPATH", "")])}
    for _ in range(3):
        child = subprocess.run([sys.executable, "-c", _KILLED_MID_SAVE, str(path)], env=env)
        assert child.returncode == -signal.SIGKILL
    # each killed save first removed the file its killed predecessor left; the last one stays
    assert len(temp_files(tmp_path)) == 1
    assert load(path)["epoch"] == 1
    save(path, epoch=2)
    assert temp_files(tmp_path) == [] and os.listdir(tmp_path) == ["ckpt.npz"]
    assert load(path)["epoch"] == 2


def test_stale_temp_cleanup_spares_other_files_and_live_or_newer_saves(tmp_path):
    path = tmp_path / "ckpt.npz"
    save(path, epoch=1)
    old = 1_000_000_000  # 2001: long before this save
    mine = [".ckpt.npz.tmp", "ckpt.npz.0123456789ab.tmp", ".ckpt.npz.0123456789AB.tmp",
            ".ckpt.npz.0123456789ab.tmp.keep", ".ckpt.npz.notours12345.tmp",
            ".other.npz.0123456789ab.tmp", "notes.txt"]
    for name in mine:
        (tmp_path / name).write_bytes(b"user data")
        os.utime(tmp_path / name, (old, old))
    newer = tmp_path / ".ckpt.npz.00000000000a.tmp"        # written after the save starts
    newer.write_bytes(b"x")
    os.utime(newer, (4_000_000_000, 4_000_000_000))
    stale = tmp_path / ".ckpt.npz.00000000000b.tmp"
    stale.write_bytes(b"x" * 100)
    os.utime(stale, (old, old))
    live = tmp_path / ".ckpt.npz.00000000000c.tmp"         # a save in progress elsewhere
    live.write_bytes(b"x")
    os.utime(live, (old, old))
    fcntl = pytest.importorskip("fcntl")
    with open(live, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        save(path, epoch=2)
    assert not stale.exists()
    assert live.exists() and newer.exists()
    assert all((tmp_path / name).read_bytes() == b"user data" for name in mine)
    assert load(path)["epoch"] == 2


# -- sizes and compression: never expand or allocate more than the file holds ----------------------
def _npy_header(shape, descr="<f4") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
    return buffer.getvalue()


def test_array_declaring_more_data_than_its_member_holds_is_refused_before_allocating(tmp_path):
    """A member whose header and metadata agree on 37 GiB but which holds 40 bytes."""
    path = tmp_path / "ckpt.npz"
    save(path, weights=np.zeros(10, np.float32))
    count = 37 * 2**30 // 4
    with zipfile.ZipFile(path) as archive:
        meta = json.loads(archive.read("meta.json"))
    node = meta["items"]["values"][0]
    node["shape"], node["nbytes"] = [count], count * 4
    rewrite_member(path, "meta.json", json.dumps(meta).encode())
    rewrite_member(path, "weights.npy", _npy_header((count,)) + bytes(40))
    for read in (load, lambda p: checkpoint_info(p, verify=True)):
        with pytest.raises(CheckpointError, match="declares 39728447488 bytes of data, its "
                                                  "member holds 40"):
            read(path)


def test_member_size_larger_than_the_file_is_refused(tmp_path):
    path = tmp_path / "ckpt.npz"
    save(path, weights=np.zeros(10, np.float32))
    data = bytearray(path.read_bytes())
    # the central directory's sizes of weights.npy: compressed at +20, uncompressed at +24
    entry = data.rindex(b"PK\x01\x02")
    for offset in (20, 24):
        data[entry + offset: entry + offset + 4] = (2**31).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="weights.npy declares 2147483648 bytes, more than"):
        load(path)


@pytest.mark.parametrize("member", ["meta.json", "weights.npy"])
def test_compressed_members_are_refused_without_expanding_them(tmp_path, member):
    path = tmp_path / "ckpt.npz"
    save(path, weights=np.zeros(1000, np.float32))
    with zipfile.ZipFile(path) as archive:
        members = [(info.filename, archive.read(info.filename)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for name, blob in members:
            archive.writestr(name, blob, compress_type=zipfile.ZIP_DEFLATED if name == member
                             else zipfile.ZIP_STORED)
    with pytest.raises(CheckpointError, match=f"refused: member {member} is compressed"):
        load(path)


# -- nesting depth ---------------------------------------------------------------------------------
def _nested(depth: int, leaf=1):
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def test_nesting_up_to_the_limit_round_trips_and_deeper_is_refused_on_save(tmp_path):
    from needle.checkpoint.tree import MAX_DEPTH

    path = tmp_path / "ckpt.npz"
    save(path, x=_nested(MAX_DEPTH - 1, np.ones(2)))       # 'x' plus MAX_DEPTH - 1 lists
    assert_same(_nested(MAX_DEPTH - 1, np.ones(2)), load(path)["x"])
    save(path, epoch=1)
    with pytest.raises(ValueError, match=f"more than {MAX_DEPTH} levels deep"):
        save(path, x=_nested(MAX_DEPTH + 1))
    assert load(path) == {"epoch": 1}


def _deep_meta(depth: int) -> bytes:
    inner = '{"type": "int", "value": 1}'
    tree = '{"type": "list", "items": [' * depth + inner + "]}" * depth
    return ('{"format": "needle-checkpoint", "version": 1, "items": {"type": "dict", "keys": '
            '["a"], "values": [' + tree + "]}}").encode()


@pytest.mark.parametrize("depth", [150, 5000, 200_000])
def test_deeply_nested_metadata_is_refused_whatever_the_stack_depth(tmp_path, depth):
    path = tmp_path / "deep.npz"
    save(path, a=1)
    rewrite_member(path, "meta.json", _deep_meta(depth))

    def at_stack_depth(frames):
        return at_stack_depth(frames - 1) if frames else load(path)

    for frames in (0, 500):                                # the same answer, however deep
        with pytest.raises(CheckpointError, match="nested too deeply"):
            at_stack_depth(frames)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        checkpoint_info(path)


def test_info_and_load_of_a_path_under_a_file(tmp_path):
    (tmp_path / "a_file").write_bytes(b"x")
    with pytest.raises(CheckpointNotFoundError, match="no such checkpoint file"):
        load(tmp_path / "a_file" / "x.npz")
    with pytest.raises(CheckpointNotFoundError, match="no such checkpoint file"):
        checkpoint_info(tmp_path / "a_file" / "x.npz")
