"""CNN training steps of this tree against an earlier needle, and PyTorch, in alternating processes.

Rows (benchmarks/cnn_step.py's models, batch 64): ``s111`` and ``s122`` (the 3-conv CNN on
32x32x3 NCHW images, strides 1,1,1 and 1,2,2), ``res32`` and ``res28`` (apps.models.ResidualCNN
on 32x32x3 and 28x28x1 NHWC images). Each round runs one process per variant, alternating,
and each process times needle's and PyTorch's steps in interleaved blocks, so a slow phase of
a shared machine hits both variants and both libraries. Reported: best and median per
variant, their ratios, and needle / PyTorch.

``--threads 1`` (the default) times each step in process CPU time on one thread (needle's,
BLAS's and PyTorch's): on a machine shared with other jobs that is far steadier than wall
time, and it compares the work done. ``--threads 2`` times wall clock with two threads, as
cnn_step.py does; there other jobs' load moves the ratios by 2x.

``--estimate`` (with ``--threads 2`` or more) estimates each step's wall time on an idle
machine from CPU times, which other jobs' load moves far less than wall time: needle's main
thread's CPU time with each parallel region (``cpu_threads.in_parallel`` / ``run_chunks``)
counted as its threads' total CPU time shared evenly (the region's ideal; the actual split
depends on when the other threads got a core), PyTorch's process CPU time divided by the
thread count, an upper bound: its OpenMP threads spin while they wait for each other, and
that counts as CPU time (2026-12-04, CNN strides 1,1,1: needle's estimate 83.5 ms, its wall
time in a quiet minute 84.4-85.2; PyTorch's estimate 88, its wall time 64-72; with 8 other
jobs on the 2 cores wall times moved 2-4x and PyTorch's median CPU time was 3x its best).
Use it to compare needle revisions; take PyTorch's time from a quiet run.

Run: python benchmarks/ab_cnn_step.py [--rev HEAD | --src DIR] [--rows s111,res32] [--rounds 3]
     [--threads 2 [--estimate]]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# one process's measurements, printed as JSON (runs with the variant's src/ on the path)
_MEASURE = r"""
import json, os, sys, time
sys.path.insert(0, {bench!r})
import common
common.torch_threads()
import numpy as np
import torch
import needle as ndl
from needle import nn
from needle.apps.models import ResidualCNN
import cnn_step

clock = time.process_time if common.THREADS == "1" else time.perf_counter


def by_clock(step):
    start = clock()
    step()
    return clock() - start


needle_time = torch_time = by_clock
if {estimate!r}:
    import collections
    import threading
    from needle.backend import cpu_threads

    regions = [0.0, 0.0]  # the main thread's CPU time in parallel regions; theirs shared

    def instrument(name):
        original = getattr(cpu_threads, name, None)
        if original is None:  # (an earlier needle)
            return

        def patched(fn, items, parts):
            spent = collections.defaultdict(float)

            def timed(*args):
                start = time.thread_time()
                try:
                    return fn(*args)
                finally:
                    spent[threading.get_ident()] += time.thread_time() - start

            out = original(timed, items, parts)
            regions[0] += spent.get(threading.get_ident(), 0.0)
            regions[1] += sum(spent.values()) / parts  # its work shared evenly
            return out

        setattr(cpu_threads, name, patched)

    for name in ("in_parallel", "run_chunks"):
        instrument(name)

    def needle_time(step):
        regions[:] = [0.0, 0.0]
        start = time.thread_time()
        step()
        return time.thread_time() - start - regions[0] + regions[1]

    def torch_time(step):
        start = time.process_time()
        step()
        return (time.process_time() - start) / int(common.THREADS)


def model_pair(row):
    rng = np.random.default_rng(0)
    np.random.seed(0)
    torch.manual_seed(0)
    if row.startswith("res"):
        size = int(row[3:])
        channels = 3 if size == 32 else 1
        images = rng.standard_normal((64, size, size, channels)).astype(np.float32)
        return (ResidualCNN(channels), images,
                cnn_step.TorchResidualCNN(in_channels=channels),
                images.transpose(0, 3, 1, 2).copy())
    strides = tuple(int(s) for s in row[1:])
    images = rng.standard_normal((64, 3, 32, 32)).astype(np.float32)
    return cnn_step.NeedleCNN(strides), images, cnn_step.torch_cnn(strides), images


def samples(step, count, measure):
    step()
    return [measure(step) for _ in range(count)]


result = {{}}
for row in {rows!r}:
    model, images, t_model, t_images = model_pair(row)
    labels = np.random.default_rng(1).integers(0, 10, 64)
    opt = ndl.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.SoftmaxLoss()
    x, y = ndl.from_numpy(images), ndl.from_numpy(labels)
    t_opt = torch.optim.Adam(t_model.parameters(), lr=1e-3)
    tx, ty = torch.from_numpy(t_images), torch.from_numpy(labels)

    def needle_step():
        opt.minimize(loss_fn(model(x), y))

    def torch_step():
        t_opt.zero_grad()
        torch.nn.functional.cross_entropy(t_model(tx), ty).backward()
        t_opt.step()

    times = {{"needle": [], "torch": []}}
    for _ in range(3):
        times["needle"] += samples(needle_step, 4, needle_time)
        times["torch"] += samples(torch_step, 4, torch_time)
    result[row] = times
print("RESULT " + json.dumps(result))
"""


def _measure(src: str, rows: list[str], threads: int, estimate: bool = False) -> dict:
    env = dict(os.environ, PYTHONPATH=src, NEEDLE_BENCH_THREADS=str(threads),
               NEEDLE_NUM_THREADS=str(threads))
    code = _MEASURE.format(bench=HERE, rows=rows, estimate=estimate)
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=HERE,
                         capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"the measuring process ({src}) failed:\n{run.stderr[-2000:]}")
    line = next(ln for ln in run.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _compare(variants: dict[str, str], rows: list[str], rounds: int, threads: int,
             estimate: bool = False) -> None:
    samples: dict[str, dict] = {name: {} for name in variants}
    for _ in range(rounds):
        for name, src in variants.items():
            for row, times in _measure(src, rows, threads, estimate).items():
                for lib, values in times.items():
                    samples[name].setdefault(row, {}).setdefault(lib, []).extend(values)
    this, base = variants
    clock = "CPU time, 1 thread" if threads == 1 else f"wall time, {threads} threads"
    if estimate:
        clock = f"idle-machine wall time estimated from CPU times, {threads} threads"
    print(f"| row ({rounds} alternating rounds, {clock}) | {this}: best ms | {base}: best ms "
          f"| ratio of bests | ratio of medians | {this} / torch (best) "
          f"| {base} / torch (best) | {this} / torch (median) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        new, old = samples[this][row], samples[base][row]
        torch_all = new["torch"] + old["torch"]
        best_torch, median_torch = min(torch_all), statistics.median(torch_all)
        print(f"| {row} | {min(new['needle']) * 1e3:.1f} | {min(old['needle']) * 1e3:.1f} | "
              f"{min(new['needle']) / min(old['needle']):.3f} | "
              f"{statistics.median(new['needle']) / statistics.median(old['needle']):.3f} | "
              f"{min(new['needle']) / best_torch:.3f} | {min(old['needle']) / best_torch:.3f} | "
              f"{statistics.median(new['needle']) / median_torch:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--rev", default="HEAD", help="the earlier revision (git)")
    group.add_argument("--src", help="the earlier needle: a directory holding its package")
    parser.add_argument("--rows", default="s111,s122,res32,res28")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--estimate", action="store_true",
                        help="estimate idle-machine wall times from CPU times (threads >= 2)")
    args = parser.parse_args()
    if args.estimate and args.threads < 2:
        parser.error("--estimate needs --threads 2 or more")
    rows = args.rows.split(",")
    this = os.path.join(ROOT, "src")
    if args.src:
        _compare({"this": this, "earlier": args.src}, rows, args.rounds, args.threads,
                 args.estimate)
        return
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "base")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", base, args.rev],
                       check=True, capture_output=True)
        try:
            _compare({"this": this, args.rev: os.path.join(base, "src")}, rows, args.rounds,
                     args.threads, args.estimate)
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", base],
                           check=False, capture_output=True)


if __name__ == "__main__":
    main()
