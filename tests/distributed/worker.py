"""Scenarios that tests/test_distributed*.py run under ``mpirun -n N`` (and alone, as the
single-process reference). Each writes what it found as .npy files into --out."""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import needle as ndl
import needle.distributed as dist
from needle import nn, optim
from needle.apps.models import MLPResNet

IN, HIDDEN, CLASSES, BATCHES = 12, 16, 5, 4


def _data(global_batch: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((BATCHES * global_batch, IN)).astype(np.float32)
    y = rng.integers(0, CLASSES, BATCHES * global_batch)
    return x, y


def train(args: argparse.Namespace) -> None:
    """``steps`` SGD steps of the MLP-ResNet on a global batch split over the ranks; a plain
    BatchNorm model without DDP when ``--reference`` (one process, the whole batch)."""
    comm = dist.init()
    np.random.seed(0)
    model: nn.Module = MLPResNet(IN, HIDDEN, num_blocks=2, num_classes=CLASSES, drop_prob=0.0)
    if not args.reference:
        model = dist.DistributedDataParallel(model, bucket_mb=args.bucket_mb, sync_bn=True)
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.SoftmaxLoss()
    x_all, y_all = _data(args.batch)
    share = args.batch // comm.size
    lo, hi = comm.rank * share, (comm.rank + 1) * share

    def batch(step: int) -> tuple[np.ndarray, np.ndarray]:
        k = step % BATCHES
        rows = slice(k * args.batch, (k + 1) * args.batch)
        xs, ys = x_all[rows], y_all[rows]
        return xs[lo:hi], ys[lo:hi]

    if args.mode == "session":
        import needle.static as st

        with st.Graph():
            xp = st.placeholder((share, IN))
            yp = st.placeholder((share,), dtype="int64")
            train_op = opt.minimize(loss_fn(model(xp), yp))
            sess = st.Session()
            for step in range(args.steps):
                xb, yb = batch(step)
                sess.run(train_op, {xp: xb, yp: yb})
    else:
        def step_fn(x: ndl.Tensor, y: ndl.Tensor) -> ndl.Tensor:
            return opt.minimize(loss_fn(model(x), y))

        def forward_fn(x: ndl.Tensor, y: ndl.Tensor) -> ndl.Tensor:
            return loss_fn(model(x), y)

        forward = ndl.jit(forward_fn)  # "jit_forward": backward and step run eagerly
        run = ndl.jit(step_fn) if args.mode == "jit" else step_fn
        for step in range(args.steps):
            xb, yb = batch(step)
            x, y = ndl.Tensor(xb, requires_grad=False), ndl.Tensor(yb, requires_grad=False)
            if args.mode == "jit_forward":
                opt.reset_grad()
                forward(x, y).backward()
                opt.step()
            else:
                run(x, y)
    state = model.state_dict()
    prefix = "" if args.reference else "module."
    if comm.rank == 0 or args.all_ranks_write:
        for name, value in state.items():
            np.save(os.path.join(args.out, f"r{comm.rank}_{name.removeprefix(prefix)}.npy"), value)
    if args.mode == "jit" and not args.reference:  # one trace, holding the all-reduces
        xb, yb = batch(0)
        program = run.lower(ndl.Tensor(xb, requires_grad=False),
                            ndl.Tensor(yb, requires_grad=False))
        ops = [s.op.name for s in program.steps]
        np.save(os.path.join(args.out, f"r{comm.rank}_jit.npy"),
                np.array([run.explain().traces, ops.count("all_reduce")]))


def overlap(args: argparse.Namespace) -> None:
    """Eager backward of a deep MLP with small buckets: record the reducer's events."""
    comm = dist.init()
    np.random.seed(0)
    layers: list[nn.Module] = []
    for _ in range(8):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    model = dist.DistributedDataParallel(nn.Sequential(*layers), bucket_mb=0.26)
    x = ndl.Tensor(np.random.randn(64, 256).astype(np.float32), requires_grad=False)
    for _ in range(2):
        model(x).sum().backward()
    events = model.reducer.events
    kinds = np.array([e[0] for e in events])
    np.save(os.path.join(args.out, f"r{comm.rank}_events.npy"), kinds)
    grads = np.concatenate([p.grad.numpy().ravel() for p in model.parameters()])
    np.save(os.path.join(args.out, f"r{comm.rank}_grads.npy"), grads)


def collectives(args: argparse.Namespace) -> None:
    """Each collective's value and gradient: rank r's input is ``x_r``, its loss
    ``sum(w_r * y)`` (the test computes the closed forms from the same seeds)."""
    comm = dist.init()
    r = comm.rank
    found = {}
    for name, fn in [("sum", lambda t: dist.all_reduce(t)),
                     ("mean", lambda t: dist.all_reduce(t, op="mean")),
                     ("broadcast", lambda t: dist.broadcast(t, root=1 % comm.size)),
                     ("gather", dist.all_gather),
                     ("scatter", dist.reduce_scatter),
                     ("reduce", lambda t: ndl.ops.reduce_to_root(t, root=0))]:
        x_np, w_np = collective_inputs(name, r, comm.size)
        x = ndl.Tensor(x_np, requires_grad=True)
        y = fn(x)
        (y * ndl.Tensor(w_np)).sum().backward()
        found[f"{name}_y"], found[f"{name}_grad"] = y.numpy(), x.grad.numpy()
    for key, value in found.items():
        np.save(os.path.join(args.out, f"r{r}_{key}.npy"), value)


def collective_inputs(name: str, rank: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(x_r, w_r) of rank ``rank`` for collective ``name``."""
    rng = np.random.default_rng(100 + rank)
    rows = 2 * size if name == "scatter" else 2
    x = rng.standard_normal((rows, 3))
    out_rows = {"gather": 2 * size, "scatter": 2}.get(name, rows)
    return x, rng.standard_normal((out_rows, 3))


def syncbn(args: argparse.Namespace) -> None:
    """SyncBatchNorm on rank r's share of a global batch: output, gradients, statistics."""
    comm = dist.init()
    x_all, w_all = syncbn_inputs()
    share = len(x_all) // comm.size
    rows = slice(comm.rank * share, (comm.rank + 1) * share)
    bn = nn.SyncBatchNorm(x_all.shape[1])
    bn.weight.data = np.linspace(0.5, 1.5, x_all.shape[1], dtype=np.float64)
    bn.bias.data = np.linspace(-1, 1, x_all.shape[1], dtype=np.float64)
    x = ndl.Tensor(x_all[rows], requires_grad=True)
    y = bn(x)
    (y * ndl.Tensor(w_all[rows])).sum().backward()
    found = {"y": y.numpy(), "x_grad": x.grad.numpy(), "w_grad": bn.weight.grad.numpy(),
             "b_grad": bn.bias.grad.numpy(), "mean": bn.running_mean.numpy(),
             "var": bn.running_var.numpy()}
    for key, value in found.items():
        np.save(os.path.join(args.out, f"r{comm.rank}_bn_{key}.npy"), value)


def syncbn_inputs() -> tuple[np.ndarray, np.ndarray]:
    """The global batch (12, 4, 3) and the loss weights of the SyncBatchNorm check."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((12, 4, 3)) * 2 + 1
    return x, rng.standard_normal((12, 4, 3))


def suite(args: argparse.Namespace) -> None:
    """Everything but the failures in one launch (starting mpirun costs seconds)."""
    collectives(args)
    syncbn(args)
    overlap(args)
    base = args.out
    for mode in ("eager", "jit", "jit_forward", "session"):
        args.out, args.mode = os.path.join(base, mode), mode
        os.makedirs(args.out, exist_ok=True)
        train(args)
    args.out = base


def fail(args: argparse.Namespace) -> None:
    """Rank 1 dies (``kill``) or stops taking part (``hang``); the others all-reduce."""
    comm = dist.init(timeout=args.timeout)
    x = ndl.Tensor(np.ones(4, dtype=np.float32))
    dist.all_reduce(x)
    if comm.rank == 1:
        if args.how == "kill":
            os.kill(os.getpid(), 9)
        time.sleep(60)
    for _ in range(3):
        dist.all_reduce(x)
    print("unreachable", flush=True)


SCENARIOS = {"train": train, "overlap": overlap, "collectives": collectives, "syncbn": syncbn,
             "suite": suite, "fail": fail}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument("--out", default=".")
    parser.add_argument("--mode", default="eager",
                        choices=("eager", "jit", "jit_forward", "session"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--bucket-mb", type=float, default=0.002)
    parser.add_argument("--reference", action="store_true")
    parser.add_argument("--all-ranks-write", action="store_true")
    parser.add_argument("--how", default="kill", choices=("kill", "hang"))
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    SCENARIOS[args.scenario](args)


if __name__ == "__main__":
    sys.exit(main())
