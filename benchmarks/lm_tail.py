"""The language models' shared tail, piece by piece: needle eager vs PyTorch eager, in one run.

The pieces of benchmarks/lm_step.py that do not depend on the model body: the
Linear(128, 10,000) head over the LSTM's 1,120 rows (forward and backward, the input needing a
gradient), softmax cross-entropy over 10k classes (forward and backward), both, and both fused
(``nn.LinearSoftmaxLoss``: core/ops_vocab_head.py), the Embedding(10,000,
128) lookup and its scatter-add backward, and SGD / Adam steps on two 10k x 128 tables plus a
bias. Times are the medians, over rounds that alternate needle and PyTorch, of the CPU time of
the calling thread (less sensitive than wall time to other jobs on a shared machine), so run it
with one BLAS thread (``NEEDLE_BENCH_THREADS=1``, the default here) for comparable numbers.
Run: python benchmarks/lm_tail.py [--rounds N]
"""

from __future__ import annotations

import os

os.environ.setdefault("NEEDLE_BENCH_THREADS", "1")

# isort: off
import common  # noqa: E402  (pins BLAS threads before NumPy and torch load)

# isort: on
import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import needle as ndl  # noqa: E402
from needle import nn  # noqa: E402

VOCAB, DIM, ROWS = 10_000, 128, 1_120


def _cpu_time(fn: Callable[[], object], number: int) -> float:
    start = time.thread_time()
    for _ in range(number):
        fn()
    return (time.thread_time() - start) / number


def compare(pairs: dict[str, tuple[Callable, Callable]], rounds: int, number: int = 3
            ) -> list[dict]:
    """Median CPU time per call of each (needle, torch) pair, alternating within each round."""
    samples: dict[str, list[list[float]]] = {name: [[], []] for name in pairs}
    for fns in pairs.values():
        for fn in fns:
            fn()
    for _ in range(rounds):
        for name, fns in pairs.items():
            for i, fn in enumerate(fns):
                samples[name][i].append(_cpu_time(fn, number))
    rows = []
    for name, (n_s, t_s) in samples.items():
        n_t, t_t = statistics.median(n_s) * 1e3, statistics.median(t_s) * 1e3
        rows.append({"piece (CPU ms per call)": name, "needle": n_t, "pytorch": t_t,
                     "ratio": n_t / t_t})
    return rows


def pieces() -> dict[str, tuple[Callable, Callable]]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    labels = rng.integers(0, VOCAB, ROWS)
    ids = rng.integers(0, VOCAB, (35, 32))
    logits = rng.standard_normal((ROWS, VOCAB)).astype(np.float32)

    np.random.seed(0)
    head = nn.Linear(DIM, VOCAB)
    t_head = torch.nn.Linear(DIM, VOCAB)
    nx, tx = ndl.Tensor(x), torch.tensor(x, requires_grad=True)
    ny, ty = ndl.Tensor(labels, requires_grad=False), torch.from_numpy(labels)
    nz, tz = ndl.Tensor(logits), torch.tensor(logits, requires_grad=True)
    loss_fn = nn.SoftmaxLoss()

    ones = np.ones((ROWS, VOCAB), np.float32)  # the output adjoint, made once for both
    n_ones, t_ones = ndl.Tensor(ones, requires_grad=False), torch.from_numpy(ones)

    def n_head():
        head(nx).backward(n_ones)

    def t_head_step():
        tx.grad = None
        t_head.zero_grad()
        t_head(tx).backward(t_ones)

    def n_loss():
        loss_fn(nz, ny).backward()

    def t_loss():
        tz.grad = None
        torch.nn.functional.cross_entropy(tz, ty).backward()

    def n_head_loss():
        loss_fn(head(nx), ny).backward()

    def t_head_loss():
        tx.grad = None
        t_head.zero_grad()
        torch.nn.functional.cross_entropy(t_head(tx), ty).backward()

    fused = nn.LinearSoftmaxLoss(DIM, VOCAB)
    fused.weight, fused.bias = head.weight, head.bias

    def n_fused_head_loss():
        fused(nx, ny).backward()

    emb = nn.Embedding(VOCAB, DIM)
    t_emb = torch.nn.Embedding(VOCAB, DIM)
    n_ids, t_ids = ndl.Tensor(ids, requires_grad=False), torch.from_numpy(ids)
    seed = ndl.Tensor(np.ones((35, 32, DIM), np.float32), requires_grad=False)
    t_seed = torch.ones(35, 32, DIM)

    def n_emb():
        emb(n_ids).backward(seed)

    def t_emb_step():
        t_emb.zero_grad()
        t_emb(t_ids).backward(t_seed)

    def tables(lib: str) -> list:
        shapes = [(VOCAB, DIM), (DIM, VOCAB), (1, VOCAB), (DIM,)]
        arrays = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        if lib == "needle":
            params = [nn.Parameter(a) for a in arrays]
            for p, g in zip(params, grads):
                p.grad = ndl.Tensor(g, requires_grad=False)
            return params
        params = [torch.nn.Parameter(torch.from_numpy(a)) for a in arrays]
        for p, g in zip(params, grads):
            p.grad = torch.from_numpy(g)
        return params

    sgd = ndl.optim.SGD(tables("needle"), lr=1e-3)
    t_sgd = torch.optim.SGD(tables("torch"), lr=1e-3)
    adam = ndl.optim.Adam(tables("needle"), lr=1e-3)
    t_adam = torch.optim.Adam(tables("torch"), lr=1e-3)
    return {
        "head Linear(128, 10k) fwd+bwd, 1120 rows": (n_head, t_head_step),
        "softmax cross-entropy fwd+bwd, 1120 x 10k": (n_loss, t_loss),
        "head + loss fwd+bwd": (n_head_loss, t_head_loss),
        "head + loss fused (nn.LinearSoftmaxLoss; what ndl.jit rewrites them to)":
            (n_fused_head_loss, t_head_loss),
        "Embedding(10k, 128) fwd+bwd, 35 x 32 ids": (n_emb, t_emb_step),
        "SGD step, 2.57M elements": (sgd.step, t_sgd.step),
        "Adam step, 2.57M elements": (adam.step, t_adam.step),
    }


def main(rounds: int = 5) -> list[dict]:
    common.torch_threads()
    return compare(pieces(), rounds)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"{common.machine()}\n")
    print(common.markdown_table(main(args.rounds)))
