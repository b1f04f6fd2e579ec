"""``check_class_ids`` on integer ids: one compiled pass (kernels/cross_entropy.ids_within),
with the NumPy check's verdict and error for every id dtype and at the range's edges."""

from __future__ import annotations

import numpy as np
import pytest

from needle.backend.numba_support import numba_module
from needle.core.ops_check import CheckClassIds
from needle.core.registry import CheckError
from needle.kernels import cross_entropy

needs_numba = pytest.mark.skipif(numba_module() is None,
                                 reason="numba is not installed or NEEDLE_NUMBA=0")


@needs_numba
@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int32, np.int64, np.uint64])
def test_compiled_verdict_matches_numpy_at_the_edges(dtype):
    classes = 10
    rng = np.random.default_rng(0)
    good = rng.integers(0, classes, 100).astype(dtype)
    good[[0, -1]] = [0, classes - 1]
    assert cross_entropy.ids_within(good, classes) is True
    assert CheckClassIds(classes).compute(good) is good
    cases = [classes, classes + 1] + ([-1] if np.dtype(dtype).kind == "i" else [])
    for bad_value in cases:
        for position in (0, 50, 99):
            bad = good.copy()
            bad[position] = bad_value
            assert cross_entropy.ids_within(bad, classes) is False
            with pytest.raises(CheckError, match=rf"got \[{bad_value}\]"):
                CheckClassIds(classes).compute(bad)


def test_other_arrays_take_the_numpy_check():
    assert cross_entropy.ids_within(np.array([1.0, 2.0]), 10) is None  # float labels
    assert cross_entropy.ids_within(np.array([[1, 2]]), 10) is None  # not 1-D
    assert cross_entropy.ids_within([1, 2], 10) is None  # not an array
    with pytest.raises(CheckError, match="whole numbers"):
        CheckClassIds(10).compute(np.array([1.5]))
    with pytest.raises(CheckError, match=r"got \[12\]"):
        CheckClassIds(10).compute(np.array([[1, 12]]))
    empty = np.array([], np.int64)
    assert CheckClassIds(10).compute(empty) is empty
    strided = np.arange(20)[::2]  # a view with gaps: still one pass (NumPy's check without numba)
    if numba_module() is not None:
        assert cross_entropy.ids_within(strided, 19) is True
        assert cross_entropy.ids_within(strided, 18) is False
    assert CheckClassIds(19).compute(strided) is strided
    with pytest.raises(CheckError, match=r"got \[18\]"):
        CheckClassIds(18).compute(strided)
