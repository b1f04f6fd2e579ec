"""How the JIT should run a fused elementwise chain: measured, not assumed.

Times one 6-op chain (add, scale, relu, tanh, multiply, add) on arrays of the sizes an
MLP-ResNet step sees, three ways: NumPy ufuncs writing in place (what compiled plans emit),
numexpr (one compiled expression) and numba (a compiled loop), each where installed.
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

    @numba.njit(cache=False)
    def chain(a, b):
        out = np.empty_like(a)
        fa, fb, fo = a.ravel(), b.ravel(), out.ravel()
        for i in range(fa.size):
            t = (fa[i] + fb[i]) * 1.5
            fo[i] = np.tanh(t if t > 0 else 0.0) * fb[i] + 0.5
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
    return rows


if __name__ == "__main__":
    print(common.machine())
    print(common.markdown_table(main()))
