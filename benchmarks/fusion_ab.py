"""Region fusion A/B: the same jitted work with NEEDLE_FUSION=0 and =1, alternating, one process.

(a) the 100-op elementwise chain of benchmarks/op_overhead.py under ndl.jit: the function of
    benchmarks/jit.py (forward, then ``backward()`` inside the jitted call, which leaves no
    gradient plan in it: it runs the forward only), and the chain jitted as a forward whose
    output's ``backward()`` runs the gradient plan, us per op;
(b) the MLP-ResNet training step (batch 100, Adam) under ndl.jit, ms per step;
(c) the same step on a 20-unit-wide model (small arrays: per-call costs dominate).
Each pair is built once per setting (fusion is decided when a plan is compiled), called until
its plan is hot (regions compile at the plan's 50th call), and timed in alternating rounds,
so machine load hits both alike; best of the rounds.
Run: python benchmarks/fusion_ab.py [--rounds N]
"""

from __future__ import annotations

# isort: off
import common

# isort: on
import os
import sys

import numpy as np

import needle as ndl
import needle.nn as nn
from needle.apps.models import MLPResNet
from needle.apps.trainer import make_train_step
from needle.compiler import fusion
from op_overhead import CHAIN, _needle_chain


def _with_fusion(flag: str, build):
    old = os.environ.get("NEEDLE_FUSION")
    os.environ["NEEDLE_FUSION"] = flag
    try:
        return build()
    finally:
        if old is None:
            del os.environ["NEEDLE_FUSION"]
        else:
            os.environ["NEEDLE_FUSION"] = old


def chain_case():
    rng = np.random.default_rng(0)
    x = ndl.Tensor(rng.standard_normal((1, 64)).astype(np.float32))
    c = ndl.Tensor(rng.uniform(0.9, 1.1, (1, 64)).astype(np.float32), requires_grad=False)

    def step(x, c):
        out = _needle_chain(x, c)
        out.backward()
        return out

    fn = ndl.jit(step)
    _warm(lambda: fn(x, c))
    return lambda: fn(x, c)


def _warm(run) -> None:
    """Trace, then call until the plan is hot (regions compile at FUSE_AFTER_CALLS calls)."""
    for _ in range(fusion.FUSE_AFTER_CALLS + 2):
        run()


def chain_grad_case():
    """The chain jitted as a function returning its output, ``backward()`` called on that
    output: the forward plan and its gradient plan (both compiled and fused) run, and
    ``x.grad`` is set (a ``backward()`` inside the jitted function sets no argument's grad)."""
    rng = np.random.default_rng(0)
    x = ndl.Tensor(rng.standard_normal((1, 64)).astype(np.float32))
    c = ndl.Tensor(rng.uniform(0.9, 1.1, (1, 64)).astype(np.float32), requires_grad=False)
    forward = ndl.jit(_needle_chain)

    def step():
        x.grad = None
        forward(x, c).backward()

    _warm(step)
    return step


def mlp_case(hidden: int, width: int = 784):
    def build():
        np.random.seed(0)
        model = MLPResNet(width, hidden=hidden, num_blocks=3, drop_prob=0.1)
        opt = ndl.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-3)
        step = ndl.jit(make_train_step(model, nn.SoftmaxLoss(), opt))
        rng = np.random.default_rng(0)
        x = ndl.from_numpy(rng.random((100, width), dtype=np.float32))
        y = ndl.from_numpy(rng.integers(0, 10, 100))
        _warm(lambda: step(x, y))
        return lambda: step(x, y)
    return build


def main(rounds: int = 7) -> list[dict]:
    per_op = 1e6 / ((CHAIN // 3) * 3)
    cases = [("100-op chain, jit.py's jitted step, us/op", chain_case, per_op, 200),
             ("100-op chain, jitted forward + gradient plan, us/op", chain_grad_case, per_op,
              100),
             ("MLP-ResNet train step (hidden 100), ms", mlp_case(100), 1e3, 20),
             ("MLP-ResNet train step (hidden 20, 64 in), ms", mlp_case(20, 64), 1e3, 50)]
    rows = []
    for name, build, scale, number in cases:
        runs = {flag: _with_fusion(flag, build) for flag in ("0", "1")}
        best = {"0": float("inf"), "1": float("inf")}
        for _ in range(rounds):
            for flag in ("0", "1"):
                best[flag] = min(best[flag], common.best_time(runs[flag], repeat=1,
                                                              number=number))
        rows.append({"benchmark": name, "NEEDLE_FUSION=0": best["0"] * scale,
                     "NEEDLE_FUSION=1": best["1"] * scale,
                     "fused / unfused": best["1"] / best["0"]})
    return rows


if __name__ == "__main__":
    rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 7
    print(common.machine())
    print(common.markdown_table(main(rounds)))
