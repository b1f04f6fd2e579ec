"""backend/numba_support.py: the kernels' lazily imported numba loops and their failure latch."""

import numpy as np
import pytest

from needle.backend.numba_support import NumbaLoops, numba_module


def test_a_loop_numba_cannot_compile_sends_the_module_to_numpy_for_good():
    numba = pytest.importorskip("numba")
    if numba_module() is None:
        pytest.skip("numba is turned off (NEEDLE_NUMBA=0)")
    loops = NumbaLoops("needle.kernels.numba_layernorm")
    assert loops.module() is not None and hasattr(loops.module(), "layer_norm_rows")

    @numba.njit
    def untypable(x):
        return x.no_such_attribute

    out = np.zeros(3)
    assert loops.call(np.copyto, out, np.ones(3)) and out.sum() == 3  # a loop that runs
    assert loops.call(untypable, out) is False  # numba raised before running anything
    assert loops.failed == ["untypable"] and loops.module() is None
