"""Dropout's 0/1 mask from one uniform draw: ``(float32(rand(*shape)) <= p).astype(dtype)``.

The draw is NumPy's (the global RNG, so ``np.random.seed`` reproduces it); only what follows
it is fused. NumPy needs three passes after the draw (a float32 copy, the comparison, the cast
to the output dtype), three calls that cost more than their arithmetic on an MLP's (100, 50)
activations; with numba (the ``fast`` extra) one loop reads the float64 draw once. The loop
rounds each draw to float32 and compares it with p rounded to float32, which is what NumPy
does (a Python float beside a float32 array is cast to float32), so both paths give the same
mask bit for bit.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backend.numba_support import NumbaLoops

__all__ = ["bernoulli_mask"]

#: kernels/numba_random_mask.py on first use (NumPy runs where numba cannot)
LOOPS = NumbaLoops(f"{__package__}.numba_random_mask")

_LOOP_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def bernoulli_mask(xp: Any, shape: tuple, p: float, dtype: Any) -> Any:
    """A ``shape`` mask of ``dtype``, 1 where ``float32(draw) <= float32(p)``, from one
    ``xp.random.rand(*shape)`` draw (xp: the array module, NumPy or CuPy)."""
    draw = xp.asarray(xp.random.rand(*shape))  # (a 0-d draw is a Python float)
    if xp is np and draw.ndim and np.dtype(dtype) in _LOOP_DTYPES:
        loops = LOOPS.module()
        if loops is not None:
            out = np.empty(shape, dtype)
            if LOOPS.call(loops.bernoulli_mask, draw.reshape(-1), np.float32(p),
                          out.reshape(-1)):
                return out
    return (draw.astype(np.float32) <= p).astype(dtype)
