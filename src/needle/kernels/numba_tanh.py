"""``tanh`` that LLVM vectorizes inside numba loops (imported only where numba is installed).

Why: a loop that runs a whole LSTM recurrence in numba (numba_rnn.py) needs tanh on every
gate; numba's own ``tanh`` is a scalar libm call per element (~10x NumPy's SIMD tanh), which
would cost more than the Python calls the loop saves.

``tanh_f32`` is the classic float32 split (as in Cephes' tanhf): an odd polynomial
``x + x^3 P(x^2)`` below |x| = 0.625, where ``1 - 2 / (e^2|x| + 1)`` would cancel, and that
formula above it with numba_exp.exp_f32 (|x| clamped at 10, where tanh rounds to 1, so no
denormal ever appears). Both sides are computed and one is selected, so the loop has no
branch; a loop that calls it should ask for 512-bit vectors (numba_intrinsics.wide_vectors:
9 us against 12 us on 16k values; NumPy's tanh takes 5). Within 2 ulp of the correctly
rounded value (tests/test_numba_tanh.py; NumPy's own float32 tanh is too), so the two differ
in the last bits. ``tanh_of`` picks it for float32 and libm's tanh for float64 (the gradient
checks' dtype, where speed does not matter).
"""

from __future__ import annotations

import numba
import numpy as np
from numba.core import types
from numba.extending import overload

from .numba_exp import exp_f32

#: only FMA contraction, as numba_exp: NaN and inf keep their IEEE meaning
_FLAGS = {"contract"}


@numba.njit(fastmath=_FLAGS, error_model="numpy", nogil=True)
def tanh_f32(x):  # type: ignore[no-untyped-def]
    """tanh(x) for a float32 x (NaN stays NaN, +-inf gives +-1, -0.0 stays -0.0)."""
    z = abs(x)
    # small |x|: x + x^3 P(x^2), P Cephes' degree-4 fit on [0, 0.625]
    s = x * x
    p = np.float32(-5.70498872745e-3)
    p = p * s + np.float32(2.06390887954e-2)
    p = p * s - np.float32(5.37397155531e-2)
    p = p * s + np.float32(1.33314422036e-1)
    p = p * s - np.float32(3.33332819422e-1)
    small = x + x * s * p
    # large |x|: 1 - 2 / (e^(2|x|) + 1), |x| clamped where tanh is 1 in float32
    e = exp_f32(np.float32(2.0) * min(z, np.float32(10.0)))
    large = np.float32(1.0) - np.float32(2.0) / (e + np.float32(1.0))
    large = -large if x < np.float32(0.0) else large
    result = small if z < np.float32(0.625) else large
    return x if x != x or x == np.float32(0.0) else result  # NaN, and -0.0 keeps its sign


def tanh_of(x):  # type: ignore[no-untyped-def]
    """tanh of a float scalar inside numba loops: ``tanh_f32`` for float32, libm's for others."""
    return np.tanh(x)


@overload(tanh_of, jit_options={"nogil": True})
def _tanh_of(x):  # type: ignore[no-untyped-def]
    if x == types.float32:
        return lambda x: tanh_f32(x)
    return lambda x: np.tanh(x)
