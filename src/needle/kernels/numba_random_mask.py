"""The numba loop behind kernels/random_mask.py (imported only where numba is installed)."""

from __future__ import annotations

import numpy as np

from ..backend.numba_support import njit_cached


@njit_cached
def bernoulli_mask(draw, p32, out):
    """out[i] = 1 where float32(draw[i]) <= p32, else 0 (flat arrays; out in its own dtype)."""
    for i in range(draw.shape[0]):
        out[i] = 1 if np.float32(draw[i]) <= p32 else 0
