"""kernels/blas_policy.py on and off, alternating in one process: OpenBLAS held on one thread
for each jitted plan's run (each eager product), its large products as blocks on numba's
threads, against OpenBLAS's own threads (whose worker spins ~0.1 s after each product).

Rows: ``lstm``, ``transformer`` (lm_step.py's LM steps), ``s111``, ``s122``, ``res``
(cnn_step.py's CNN steps, hot plans), ``mlpres`` (jit.py's MLP-ResNet epoch), ``large``
(large_mlp_step.py), each ``jit`` or ``eager``. One model per row, the policy switched per
round (``blas_policy.ENABLED``; for eager rows ``EAGER`` too, off by default), the order
alternating. Per round, the CPU time other
processes took (from /proc/stat, in cores) sorts its samples into load classes: on a shared
machine OpenBLAS's threads wait for a core at every product and the ratio depends on that
load, so compare within a class (the "< 0.25" class is the quiet machine).
Run: python benchmarks/ab_blas_policy.py [--rows lstm,transformer] [--modes jit,eager]
     [--rounds 8] [--switch all|eager]
"""

from __future__ import annotations

# isort: off
import common  # first: it pins BLAS threads before NumPy and torch load

# isort: on
import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np

import needle as ndl
from needle import nn
from needle.kernels import blas_policy

_HZ = os.sysconf("SC_CLK_TCK")
#: load classes: (upper bound in cores other processes used, label)
CLASSES = ((0.25, "< 0.25"), (1.2, "0.25-1.2"), (float("inf"), "> 1.2"))


def _busy_seconds() -> float:
    """CPU seconds all processes have used (every core), from /proc/stat."""
    with open("/proc/stat") as fh:
        ticks = [int(x) for x in fh.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / _HZ


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _lm(name: str, jitted: bool) -> tuple[Callable[[], object], int]:
    import lm_step

    rng = np.random.default_rng(0)
    np.random.seed(0)
    if name == "lstm":
        ids = rng.integers(0, lm_step.VOCAB, (lm_step.LSTM_BPTT, lm_step.LSTM_BATCH))
        targets = rng.integers(0, lm_step.VOCAB, lm_step.LSTM_BPTT * lm_step.LSTM_BATCH)
        model: nn.Module = lm_step.NeedleLSTMLM()
        opt: ndl.optim.Optimizer = ndl.optim.SGD(model.parameters(), lr=0.1)
    else:
        ids = rng.integers(0, lm_step.VOCAB, (lm_step.TF_BATCH, lm_step.TF_SEQ))
        targets = rng.integers(0, lm_step.VOCAB, lm_step.TF_BATCH * lm_step.TF_SEQ)
        model = lm_step.NeedleTransformerLM()
        opt = ndl.optim.Adam(model.parameters(), lr=1e-3)
    step = lm_step.needle_step(model, opt, jitted)
    x, y = ndl.Tensor(ids, requires_grad=False), ndl.Tensor(targets, requires_grad=False)
    return (lambda: step(x, y)), 5


def _cnn(name: str, jitted: bool) -> tuple[Callable[[], object], int]:
    import cnn_step
    from needle.apps.models import ResidualCNN
    from needle.compiler import fusion

    rng = np.random.default_rng(0)
    labels = rng.integers(0, cnn_step.CLASSES, cnn_step.BATCH)
    np.random.seed(0)
    if name == "res":
        images = rng.standard_normal((cnn_step.BATCH, 32, 32, 3)).astype(np.float32)
        model: nn.Module = ResidualCNN(3)
    else:
        images = rng.standard_normal((cnn_step.BATCH, 3, 32, 32)).astype(np.float32)
        model = cnn_step.NeedleCNN((1, 1, 1) if name == "s111" else (1, 2, 2))
    opt = ndl.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.SoftmaxLoss()
    x, y = ndl.from_numpy(images), ndl.from_numpy(labels)

    def step(x: ndl.Tensor, y: ndl.Tensor) -> ndl.Tensor:
        return opt.minimize(loss_fn(model(x), y))

    fn = ndl.jit(step) if jitted else step
    for _ in range(fusion.FUSE_AFTER_CALLS if jitted else 0):
        fn(x, y)  # a hot plan: its elementwise regions fused
    return (lambda: fn(x, y)), 4


def _mlp_resnet(jitted: bool) -> tuple[Callable[[], object], int]:
    import jit as jit_bench

    images, labels, _ = jit_bench.mnist_arrays()
    return jit_bench.needle_epoch(images, labels, jitted), 2


def _large(jitted: bool) -> tuple[Callable[[], object], int]:
    import large_mlp_step

    return large_mlp_step.needle_step(jitted), 3


def workload(name: str, mode: str) -> tuple[Callable[[], object], int]:
    """(the callable, timed calls per round)."""
    jitted = mode == "jit"
    if name in ("lstm", "transformer"):
        return _lm(name, jitted)
    if name in ("s111", "s122", "res"):
        return _cnn(name, jitted)
    return _mlp_resnet(jitted) if name == "mlpres" else _large(jitted)


#: what a round switches: "all" (the policy, and its eager holds, against OpenBLAS's own
#: threads) or "eager" (the eager holds only, the plans' holds on in both)
SWITCH = ["all"]


def _switch(on: bool) -> None:
    if SWITCH[0] == "eager":
        blas_policy.ENABLED, blas_policy.EAGER = True, on
    else:
        blas_policy.ENABLED = blas_policy.EAGER = on


def compare(fn: Callable[[], object], repeat: int, rounds: int) -> dict:
    """Samples of ``fn`` with the policy off and on, per load class."""
    eager = blas_policy.EAGER
    for on in (False, True):
        _switch(on)
        fn()
        fn()
    samples: dict[tuple[str, bool], list[float]] = {}
    for r in range(rounds):
        for on in ((False, True) if r % 2 == 0 else (True, False)):
            _switch(on)
            time.sleep(0.2)
            fn()
            busy, own, wall = _busy_seconds(), _own_seconds(), time.perf_counter()
            times = []
            for _ in range(repeat):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            other = ((_busy_seconds() - busy) - (_own_seconds() - own)) / (
                time.perf_counter() - wall)
            label = next(label for bound, label in CLASSES if other < bound)
            samples.setdefault((label, on), []).extend(times)
    blas_policy.ENABLED, blas_policy.EAGER = True, eager
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", default="lstm,transformer,s111,s122,res,mlpres,large")
    parser.add_argument("--modes", default="jit,eager")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--switch", choices=("all", "eager"), default="all",
                        help="all: the policy on/off; eager: blas_policy.EAGER only")
    args = parser.parse_args()
    SWITCH[0] = args.switch
    common.torch_threads()
    print(common.machine())
    for mode in args.modes.split(","):
        for name in args.rows.split(","):
            fn, repeat = workload(name, mode)
            samples = compare(fn, repeat, args.rounds)
            parts = []
            for _, label in CLASSES:
                off, on = samples.get((label, False)), samples.get((label, True))
                if off and on:
                    a, b = statistics.median(off), statistics.median(on)
                    parts.append(f"load {label}: off {1e3 * a:.1f} on {1e3 * b:.1f} ms "
                                 f"({b / a:.3f}; n {len(off)}/{len(on)})")
            print(f"{name} {mode}: " + "; ".join(parts or ["no class with both"]), flush=True)


if __name__ == "__main__":
    main()
