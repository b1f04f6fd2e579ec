"""NumPy's own OpenBLAS ``cblas_?gemm`` as a ctypes function, for numba loops that multiply
inside a ``prange`` region (kernels/numba_parallel_conv.py).

Why: a convolution split by images across needle's Python threads pays ~100-150 us a hand-off
on a loaded 2-core machine (backend/cpu_threads.in_parallel); numba's TBB threads start a
region in ~1.5 us, but numba's own ``np.dot`` needs SciPy's BLAS (not a dependency). numba
calls a ctypes function pointer directly, so each block's product runs on the TBB thread
that built its patches, through the very library NumPy's ``matmul`` uses: the same kernels,
so the same bits as NumPy's product of the same block.

Found only for NumPy's OpenBLAS (the ``scipy_openblas`` wheels and system OpenBLAS builds,
LP64 or ILP64, told apart by ``openblas_get_config``); elsewhere (MKL, Accelerate, BLIS,
CuPy) ``gemm`` returns None and the caller keeps its NumPy path.
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Any

import numpy as np

__all__ = ["ROW_MAJOR", "NO_TRANS", "TRANS", "gemm"]

#: CBLAS enum values (cblas.h)
ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112

#: OpenBLAS symbol names: scipy-openblas wheels prefix ``scipy_`` and suffix ``64_`` (ILP64)
_PREFIXES = ("scipy_", "")
_SUFFIXES = ("64_", "", "_64")


def _openblas_path() -> str | None:
    """The file of the OpenBLAS that NumPy's products run on, as threadpoolctl sees it: the
    one inside NumPy's package where several are loaded (SciPy's wheel brings its own), else
    the only one; None where that is not clear."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    paths = [str(info["filepath"]) for info in threadpool_info()
             if info.get("internal_api") == "openblas" and info.get("filepath")]
    numpy_dir = os.path.dirname(os.path.dirname(os.path.abspath(np.__file__)))
    own = [path for path in paths
           if os.path.abspath(path).startswith(os.path.join(numpy_dir, "numpy"))]
    if len(own) == 1:
        return own[0]
    return paths[0] if len(paths) == 1 else None


@functools.lru_cache(maxsize=1)
def library() -> Any:
    """NumPy's OpenBLAS as a ctypes library, or None where it is not found."""
    path = _openblas_path()
    if path is None:
        return None
    try:
        return ctypes.CDLL(path)
    except OSError:
        return None


def symbols(*names: str) -> list | None:
    """The functions ``names`` of NumPy's OpenBLAS under the first of its symbol spellings
    (``_PREFIXES`` x ``_SUFFIXES``) that has them all, or None."""
    lib = library()
    if lib is None:
        return None
    for prefix in _PREFIXES:
        for suffix in _SUFFIXES:
            found = [getattr(lib, f"{prefix}{name}{suffix}", None) for name in names]
            if all(fn is not None for fn in found):
                return found
    return None


@functools.lru_cache(maxsize=2)
def gemm(dtype: Any) -> Any:
    """``cblas_sgemm`` (float32) or ``cblas_dgemm`` (float64) of NumPy's OpenBLAS as a ctypes
    function with its argument types set (ints of the library's width), or None where there
    is none (another BLAS, another dtype, no threadpoolctl)."""
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        return None
    letter, real = ("s", ctypes.c_float) if dtype == np.float32 else ("d", ctypes.c_double)
    found = symbols(f"cblas_{letter}gemm", "openblas_get_config")
    if found is None:
        return None
    fn, config = found
    config.restype = ctypes.c_char_p
    config.argtypes = []
    wide = b"USE64BITINT" in (config() or b"")
    index = ctypes.c_int64 if wide else ctypes.c_int32
    fn.restype = None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, index, index, index, real,
                   ctypes.c_void_p, index, ctypes.c_void_p, index, real, ctypes.c_void_p, index]
    return fn
