"""This tree against an earlier revision of needle, side by side in one run (before/after).

Each round runs one short process per variant, alternating (A, B, A, B, ...), so a slow
phase of a shared machine hits both; the best time of each variant over all rounds is
reported with the ratio this/earlier, and the medians beside them (a best time can be
one lucky sample). Measured: the 100-op chain of op_overhead.py (eager,
forward+backward and no-grad, us/op), and the MLP-ResNet epoch of jit.py (eager and
ndl.jit, seconds). The earlier revision is checked out in a temporary git worktree.

Run: python benchmarks/ab_compare.py [--rev HEAD~1] [--rounds 6]
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

# one process's measurements, printed as JSON (runs with the variant's src/ first on the path)
_MEASURE = r"""
import json, sys
sys.path.insert(0, {bench!r})
import common
import numpy as np
import needle as ndl
from op_overhead import _needle_chain, CHAIN
import jit as jit_bench

rng = np.random.default_rng(0)
x = ndl.Tensor(rng.standard_normal((1, 64)).astype(np.float32))
c = ndl.Tensor(rng.uniform(0.9, 1.1, (1, 64)).astype(np.float32), requires_grad=False)
n_ops = (CHAIN // 3) * 3

def fwd_bwd():
    _needle_chain(x, c).backward()

def fwd():
    with ndl.no_grad():
        _needle_chain(x, c)

X, Y, _ = jit_bench.mnist_arrays()
Y = Y.astype(np.int64)
result = {{
    "op chain fwd+bwd (us/op)": common.best_time(fwd_bwd, repeat=7, number=20) / n_ops * 1e6,
    "op chain fwd, no grad (us/op)": common.best_time(fwd, repeat=7, number=20) / n_ops * 1e6,
    "jit 100-op chain fwd+bwd (us/op)": jit_bench.chain_us_per_op(True),
    "MLP-ResNet epoch, eager (s)": common.best_time(jit_bench.needle_epoch(X, Y, False),
                                                    repeat=2),
    "MLP-ResNet epoch, ndl.jit (s)": common.best_time(jit_bench.needle_epoch(X, Y, True),
                                                      repeat=2),
}}
print("RESULT " + json.dumps(result))
"""


def _measure(src: str) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=src)
    code = _MEASURE.format(bench=HERE)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=HERE, check=True,
                         capture_output=True, text=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="HEAD~1", help="the earlier revision (git)")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "base")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", base, args.rev],
                       check=True, capture_output=True)
        try:
            variants = {"this": os.path.join(ROOT, "src"), args.rev: os.path.join(base, "src")}
            samples: dict[str, dict[str, list[float]]] = {name: {} for name in variants}
            for _ in range(args.rounds):
                for name, src in variants.items():
                    for key, value in _measure(src).items():
                        samples[name].setdefault(key, []).append(value)
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", base],
                           check=False, capture_output=True)
    print(f"| benchmark ({args.rounds} alternating rounds) | this tree: best | {args.rev}: best "
          "| ratio of bests | ratio of medians |")
    print("|---|---|---|---|---|")
    for key, values in samples["this"].items():
        before = samples[args.rev][key]
        print(f"| {key} | {min(values):.4g} | {min(before):.4g} | "
              f"{min(values) / min(before):.3f} | "
              f"{statistics.median(values) / statistics.median(before):.3f} |")


if __name__ == "__main__":
    main()
