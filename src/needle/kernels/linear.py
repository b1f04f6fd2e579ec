"""A dense layer's forward, ``x @ w + b``, with what follows it in a block finished inside the
product: a residual added (``r + (x @ w + b)``) and a ReLU.

Why: a Transformer layer's linears are followed by a ReLU (the feed-forward's first) or a
residual add (the attention's output projection and the feed-forward's second). As separate
ops each is a pass of its own over a (tokens, features) array after the product, on one
core, on a new array: in the jitted Transformer LM step the ReLU took 0.23 ms a call and each
residual add 71 us. Where a jitted plan splits the product into row or column blocks on
numba's threads (kernels/blas_policy.py), each block's lines get the bias, the residual and
the ReLU from the thread that made them, while they are in its cache
(numba_kernels.linear_epilogue): no pass of their own and no second array.

Bits: the epilogue does the separate ops' float operations in their order (``p + b``, then
``r + that``, then ``max(v, 0)``), so the result is theirs bit for bit; where the blocks do not
run (small products, outside a plan, float64, other layouts or a bias that is not one row)
the separate ops' own NumPy calls run in place on the product's array.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backend.device import array_module
from . import blas_policy, recycle, threaded_elementwise

__all__ = ["forward"]

#: the fewest multiply-adds of a product that may run as blocks, in a plan or alone
_FEWEST_MACS = min(blas_policy.MIN_MACS, blas_policy.EAGER_MIN_MACS)


def _bias_row(b: Any, cols: int) -> Any:
    """``b`` as the float32 (cols,) row the blocks' epilogue adds, or None where it is not one
    row of float32 values (a full (rows, cols) bias, another dtype)."""
    if type(b) is not np.ndarray or b.dtype != np.float32 or b.size != cols \
            or b.ndim > 2 or (b.ndim == 2 and b.shape[0] != 1):
        return None
    return np.ascontiguousarray(b.reshape(cols))


def _product(x: Any, w: Any) -> Any:
    """The output array to write ``x @ w`` into: recycled where vocabulary-sized (no page
    faults from step to step), else None (a new one)."""
    rows, cols = x.shape[0], w.shape[1]
    if rows * cols * x.itemsize >= recycle.MIN_BYTES and type(x) is np.ndarray \
            and type(w) is np.ndarray and x.dtype == w.dtype:
        return recycle.empty((rows, cols), x.dtype)
    return None


def _in_blocks(x: Any, w: Any, b: Any, residual: Any, relu: bool, out: Any) -> Any:
    """The whole forward as blocks with their epilogue (``blas_policy.split_with_epilogue``:
    large float32 products), or None where that does not run (nothing written)."""
    cols = w.shape[1]
    if x.shape[0] * x.shape[1] * cols < _FEWEST_MACS:  # (turned away at ~0.2 us: eager ops)
        return None
    row = _bias_row(b, cols)
    if row is None:
        return None
    if residual is not None and not (
            type(residual) is np.ndarray and residual.dtype == np.float32
            and residual.shape == (x.shape[0], cols) and residual.flags.c_contiguous):
        return None
    return blas_policy.split_with_epilogue(x, w, row, residual, relu, out)


def _add_bias(out: Any, b: Any) -> Any:
    """``out + b``, into ``out`` where b's dtype does not widen it (the product's own array:
    nothing else sees the write; NumPy refuses a bias that does not broadcast to it)."""
    if b.dtype is out.dtype or out.dtype == np.result_type(out.dtype, b.dtype):
        out += b
        return out
    if b.ndim > 2 or any(d not in (1, n) for d, n in zip(b.shape[::-1], out.shape[::-1])):
        raise ValueError("the bias does not broadcast to the output")
    return out + b


def forward(x: Any, w: Any, b: Any, residual: Any = None, relu: bool = False) -> Any:
    """``relu(residual + (x @ w + b))`` (each part only where asked) for matrices x (n, k) and
    w (k, m), a bias b that broadcasts to (n, m) and a residual of shape (n, m): the values
    of ``linear``, ``add(residual, ·)`` and ``relu`` run one after the other."""
    if x.ndim != 2 or w.ndim != 2:
        raise ValueError("x and w must be matrices")  # (the shape rule's error is raised)
    out = _product(x, w)
    done = _in_blocks(x, w, b, residual, relu, out)
    if done is not None:
        return done
    out = blas_policy.matmul(x, w) if out is None else blas_policy.matmul(x, w, out=out)
    out = _add_bias(out, b)
    if residual is not None:
        if type(out) is type(residual) and residual.shape == out.shape \
                and np.result_type(residual.dtype, out.dtype) == out.dtype:
            array_module(out).add(residual, out, out=out)
        else:
            out = residual + out
    return threaded_elementwise.relu_owned(out) if relu else out
