"""How compiled plans run elementwise chains: NumPy in place, numexpr or numba.

(a) one 6-op chain (add, scale, relu, tanh, multiply, add) on arrays of the sizes an
    MLP-ResNet step sees, three ways: NumPy ufuncs writing in place (what compiled plans
    emit), numexpr (one compiled expression) and numba (a compiled float32 loop), each where
    installed;
(b) the Adam update (weight decay 1e-3) over the MLP-ResNet's 110,860 parameters laid end to
    end: the rule's NumPy calls (eager) against the same rule fused into one numba loop
    (needle/compiler/fused_update.py, what ndl.jit and Sessions run).
Run: python benchmarks/fusion_choice.py
"""

from __future__ import annotations

# isort: off
import common

# isort: on
import numpy as np

SHAPES = [(1, 64), (100, 100), (100, 784)]
EXPR = "(tanh(where((a + b) * 1.5 > 0, (a + b) * 1.5, 0)) * b) + 0.5"


def numpy_inplace(a, b):
    t = np.add(a, b)
    np.multiply(t, 1.5, out=t)
    np.maximum(t, 0, out=t)
    np.tanh(t, out=t)
    np.multiply(t, b, out=t)
    np.add(t, 0.5, out=t)
    return t


def _numexpr():
    try:
        import numexpr
    except ImportError:
        return None
    numexpr.set_num_threads(int(common.THREADS))
    return lambda a, b: numexpr.evaluate(EXPR, local_dict={"a": a, "b": b})


def _numba():
    try:
        import numba
    except ImportError:
        return None

    # float32 constants (a Python float would promote the loop to float64) and NumPy's error
    # model (no ZeroDivisionError checks), so LLVM can vectorize the loop
    scale, zero, half = np.float32(1.5), np.float32(0.0), np.float32(0.5)

    @numba.njit(cache=False, error_model="numpy")
    def chain(a, b):
        out = np.empty_like(a)
        fa, fb, fo = a.ravel(), b.ravel(), out.ravel()
        for i in range(fa.size):
            t = (fa[i] + fb[i]) * scale
            fo[i] = np.tanh(t if t > zero else zero) * fb[i] + half
        return out

    return chain


def main() -> list[dict]:
    candidates = {"numpy in place": numpy_inplace, "numexpr": _numexpr(), "numba": _numba()}
    rows = []
    for shape in SHAPES:
        rng = np.random.default_rng(0)
        a, b = (rng.random(shape, dtype=np.float32) for _ in range(2))
        reference = numpy_inplace(a, b)
        row: dict = {"shape": str(shape)}
        for name, fn in candidates.items():
            if fn is None:
                row[f"{name} (us)"] = "not installed"
                continue
            np.testing.assert_allclose(fn(a, b), reference, rtol=1e-5, atol=1e-6)
            row[f"{name} (us)"] = common.best_time(lambda fn=fn, a=a, b=b: fn(a, b), repeat=5,
                                                    number=200) * 1e6
        rows.append(row)
    rows.append(adam_update_row())
    return rows


def adam_update_row() -> dict:
    """The Adam update over the MLP-ResNet's parameters: the NumPy rule against its fused loop."""
    from needle import nn, optim
    from needle.apps.models import MLPResNet
    from needle.compiler import fused_update

    np.random.seed(0)
    model = MLPResNet(784, hidden=100, num_blocks=3, drop_prob=0.1)
    params = model.parameters()
    opt = optim.Adam(params, lr=1e-3, weight_decay=1e-3)
    rng = np.random.default_rng(0)
    for p in params:
        p.grad = nn.Parameter(rng.standard_normal(p.shape).astype(np.float32))
    opt.step()  # creates the flat state
    flat = opt._flat
    row: dict = {"shape": f"Adam update, ({flat.param.size},)",
                 "numpy in place (us)": common.best_time(
                     lambda: opt._flat_update(flat, fuse=False), repeat=5, number=200) * 1e6,
                 "numexpr (us)": "n/a"}
    if fused_update.available():
        opt._flat_update(flat, fuse=True)  # compiles the loop
        row["numba (us)"] = common.best_time(lambda: opt._flat_update(flat, fuse=True),
                                             repeat=5, number=200) * 1e6
    else:
        row["numba (us)"] = "not installed"
    return row


if __name__ == "__main__":
    print(common.machine())
    print(common.markdown_table(main()))
