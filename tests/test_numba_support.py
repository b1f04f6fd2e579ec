"""backend/numba_support.py: the kernels' lazily imported numba loops and their failure latch."""

import os
import subprocess
import sys

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


_ORDER_PROBE = r"""
import sys
import numpy as np
import numba
from needle.backend.numba_support import njit_cached

@njit_cached
def affine(x, a, b):
    return x * a + b

@numba.njit(fastmath={"contract"})
def contracting(x, a, b, out):
    for i in range(x.shape[0]):
        out[i] = affine(x[i], a, b)

@numba.njit
def plain(x, a, b, out):
    for i in range(x.shape[0]):
        out[i] = affine(x[i], a, b)

x = np.random.default_rng(0).standard_normal(1 << 16).astype(np.float32)
a, b = np.float32(1.1), np.float32(-0.3)
first, second = np.empty_like(x), np.empty_like(x)
contracting(x, a, b, first)
plain(x, a, b, second)
want = x * a + b
print(int((first != want).sum()), int((second != want).sum()))
"""


def test_a_helper_keeps_its_own_flags_whatever_compiles_it_first():
    """numba gives a function that sets no fastmath flags the flags of the caller that
    compiles it first, and every later caller that code: njit_cached sets fastmath=False, so
    a helper first compiled from a contracting loop still rounds x * a + b twice (before,
    ~1/3 of the values came out of one FMA, for the plain caller too)."""
    pytest.importorskip("numba")
    if numba_module() is None:
        pytest.skip("needle's numba loops are off here (NEEDLE_NUMBA=0)")
    # (a process of its own: the order of first compiles is the point)
    run = subprocess.run([sys.executable, "-c", _ORDER_PROBE], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ))
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["0", "0"]
