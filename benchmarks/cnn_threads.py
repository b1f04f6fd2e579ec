"""Where the CNN step's second core idles: per-kernel wall time and each thread's CPU time.

For the benchmark CNN (cnn_step.py, strides 1,2,2 by default, batch 64), one eager training
step's large kernels (the three convolutions, BatchNorm's statistics, forward and backward,
ReLU and its adjoint) are wrapped where the ops call them, and each call records its wall
time, the calling (main) thread's CPU time and needle's worker thread's CPU time
(``time.pthread_getcpuclockid``). ``idle`` is wall minus the worker's CPU: the time the
second core did nothing for that kernel (serial passes, hand-off latency, imbalance). Then
each of the process's threads' CPU ticks over whole steps (/proc/self/task/*/stat) shows
which threads worked: needle's, OpenBLAS's (a spinning OpenBLAS worker would show here), and
PyTorch's OpenMP threads for PyTorch's step. The BLAS thread counts come from threadpoolctl.

Run on a quiet machine, two threads: python benchmarks/cnn_threads.py [--strides 111]
[--steps 20]. Linux only (/proc, pthread CPU clocks).
"""

from __future__ import annotations

import argparse
import collections
import os
import threading
import time
from collections.abc import Callable
from typing import Any

# isort: off
import common  # first: it pins BLAS threads before NumPy and torch load

# isort: on
import numpy as np
import torch

import cnn_step
import needle as ndl
import needle.core.ops_conv as ops_conv
from needle import nn
from needle.kernels import batchnorm, threaded_elementwise

#: (module, function) pairs wrapped: where the eager ops call the large kernels
WRAPPED = [(ops_conv, "conv2d"), (ops_conv, "conv2d_weight_grad"),
           (ops_conv, "conv2d_input_grad"), (batchnorm, "statistics"), (batchnorm, "forward"),
           (batchnorm, "backward_given_var"), (threaded_elementwise, "relu"),
           (threaded_elementwise, "relu_grad")]


def thread_ticks() -> dict[str, int]:
    """CPU ticks (user + system) of each of this process's threads, keyed 'tid:name'."""
    ticks = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:  # the thread ended
            continue
        ticks[f"{tid}:{name}"] = int(fields[11]) + int(fields[12])
    return ticks


def ticks_over(fn: Callable[[], Any], steps: int) -> tuple[float, dict[str, int]]:
    """(wall seconds, CPU ticks per thread that worked) over ``steps`` calls of ``fn``."""
    before = thread_ticks()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    wall = time.perf_counter() - start
    after = thread_ticks()
    return wall, {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


class KernelClock:
    """Wraps WRAPPED functions; per (name, first array shape): wall, main and worker CPU."""

    def __init__(self, worker_clock: int) -> None:
        self.worker_clock = worker_clock
        self.totals: dict[tuple, list[float]] = collections.defaultdict(lambda: [0.0] * 3)
        self.inside = threading.local()
        self.originals = [(module, name, getattr(module, name)) for module, name in WRAPPED]

    def install(self) -> None:
        for module, name, original in self.originals:
            setattr(module, name, self._wrap(name, original))

    def remove(self) -> None:
        for module, name, original in self.originals:
            setattr(module, name, original)

    def _wrap(self, name: str, original: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if getattr(self.inside, "on", False):  # a wrapped kernel calling another
                return original(*args, **kwargs)
            self.inside.on = True
            shape = next((tuple(a.shape) for a in args if hasattr(a, "shape")), ())
            worker0 = time.clock_gettime(self.worker_clock)
            main0, wall0 = time.thread_time(), time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                wall, main = time.perf_counter() - wall0, time.thread_time() - main0
                worker = time.clock_gettime(self.worker_clock) - worker0
                self.inside.on = False
                total = self.totals[(name, shape)]
                total[0] += wall
                total[1] += main
                total[2] += worker
        return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strides", default="122", help="the three convs' strides, e.g. 111")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    common.torch_threads()
    strides = tuple(int(s) for s in args.strides)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((cnn_step.BATCH, 3, 32, 32)).astype(np.float32)
    labels = rng.integers(0, cnn_step.CLASSES, cnn_step.BATCH)
    np.random.seed(0)
    model = cnn_step.NeedleCNN(strides)
    opt = ndl.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.SoftmaxLoss()
    x, y = ndl.from_numpy(images), ndl.from_numpy(labels)
    torch.manual_seed(0)
    t_model = cnn_step.torch_cnn(strides)
    t_opt = torch.optim.Adam(t_model.parameters(), lr=1e-3)
    tx, ty = torch.from_numpy(images), torch.from_numpy(labels)

    def needle_step() -> None:
        opt.minimize(loss_fn(model(x), y))

    def torch_step() -> None:
        t_opt.zero_grad()
        torch.nn.functional.cross_entropy(t_model(tx), ty).backward()
        t_opt.step()

    for _ in range(3):
        needle_step()
        torch_step()
    print(common.machine(), f"strides {args.strides}")
    try:
        from threadpoolctl import threadpool_info

        print("BLAS / OpenMP thread counts:",
              ", ".join(f"{i['internal_api']} {i['num_threads']}" for i in threadpool_info()))
    except ImportError:
        print("(threadpoolctl not installed: BLAS thread counts unknown)")
    print(f"main thread: {threading.get_native_id()}; needle's threads:",
          [t.native_id for t in threading.enumerate() if t.name.startswith("needle-cpu")])
    for name, fn in (("needle", needle_step), ("torch", torch_step)):
        wall, ticks = ticks_over(fn, args.steps)
        print(f"{name}: {wall / args.steps * 1e3:.2f} ms a step; CPU ticks per thread over "
              f"{args.steps} steps: {ticks}")
    workers = [t for t in threading.enumerate() if t.name.startswith("needle-cpu")]
    if not workers:
        print("needle started no worker thread (one thread?): no per-kernel table")
        return
    clock = KernelClock(time.pthread_getcpuclockid(workers[0].ident))
    clock.install()
    try:
        start = time.perf_counter()
        for _ in range(args.steps):
            needle_step()
        step = (time.perf_counter() - start) / args.steps
    finally:
        clock.remove()
    rows = []
    for (name, shape), (wall, main_cpu, worker) in sorted(clock.totals.items(),
                                                           key=lambda kv: -kv[1][0]):
        rows.append({"kernel": name, "shape": str(shape),
                     "wall ms": wall / args.steps * 1e3, "main CPU ms": main_cpu / args.steps * 1e3,
                     "worker CPU ms": worker / args.steps * 1e3,
                     "idle ms": (wall - worker) / args.steps * 1e3})
    print(f"needle step (kernels wrapped): {step * 1e3:.2f} ms")
    print(common.markdown_table(rows))


if __name__ == "__main__":
    main()
