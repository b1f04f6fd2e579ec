"""OpenBLAS held on one thread, process-wide, for as long as any thread of needle asks.

Why: OpenBLAS's thread count is one number for the whole process (``openblas_set_num_threads``
sets it whichever thread calls, measured with NumPy's OpenBLAS 0.3.31), and needle needs it
at one thread wherever its own threads split work that calls BLAS: the convolutions' blocks on
numba's TBB threads (kernels/conv.py, winograd.py), the recurrent steps' small products
(kernels/rnn.py), and a jitted plan's run with its large products split into blocks
(kernels/blas_policy.py). Before, each of those set the count on its own (threadpoolctl's
``limit``, ~7 us) from the main thread only, so a Session served on another thread kept
OpenBLAS's two-thread products (other bits, ~1 ulp, in ~60% of float32 shapes) and never
split its convolutions, and two threads' settings could undo each other.

Here the hold is counted: the first holder sets one thread (~0.2 us through ctypes), the last
one out restores the count it found; in between any thread's products run on one thread, so
one thread's hold is never cut short by another's release. A thread's nested holds count once.

Where NumPy's BLAS is not OpenBLAS, threadpoolctl sets the count instead (the ``fast``
extra); without either nothing is held (``available`` is False) and callers keep their
unsplit NumPy paths.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import threading
from collections.abc import Callable, Iterator

from . import openblas_gemm

__all__ = ["available", "count", "hold", "held", "lend_threads", "restore_count", "thread_state"]

#: guards the holder count and the count to restore
_lock = threading.Lock()
#: threads holding now, and OpenBLAS's count when the first of them came
_holders = [0]
_restore = [0]


class _ThreadState(threading.local):
    """Per thread: ``held`` is True inside this thread's outermost ``hold``."""

    held = False


#: this thread's state (read directly where a function call would cost: blas_policy.matmul)
thread_state = _ThreadState()


@functools.lru_cache(maxsize=1)
def _count_functions() -> tuple[Callable[[], int], Callable[[int], None]] | None:
    """(get, set) of the process's BLAS thread count: NumPy's OpenBLAS through ctypes, else
    threadpoolctl's controllers; None where neither is found."""
    found = openblas_gemm.symbols("openblas_get_num_threads", "openblas_set_num_threads")
    if found is not None:
        get, put = found
        get.restype, get.argtypes = ctypes.c_int, []
        put.restype, put.argtypes = None, [ctypes.c_int]
        return (lambda: int(get())), put
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    controllers = ThreadpoolController().select(user_api="blas").lib_controllers
    if not controllers:
        return None

    def get_count() -> int:
        return min(int(c.num_threads) for c in controllers)

    def set_count(count: int) -> None:
        for c in controllers:
            c.set_num_threads(count)

    return get_count, set_count


def available() -> bool:
    """Whether BLAS's thread count can be held here (any thread)."""
    return _count_functions() is not None


def held() -> bool:
    """Whether this thread runs inside a ``hold``."""
    return thread_state.held


def _acquire() -> bool:
    """Count this thread in as a holder (the first sets one thread); False where it holds
    already or nothing can be held."""
    functions = _count_functions()
    if functions is None or held():
        return False
    with _lock:
        if _holders[0] == 0:
            _restore[0] = functions[0]()
            if _restore[0] > 1:
                functions[1](1)
        _holders[0] += 1
    thread_state.held = True
    return True


def _release() -> None:
    """Count this thread out (the last restores the count the first found)."""
    functions = _count_functions()
    assert functions is not None
    thread_state.held = False
    with _lock:
        _holders[0] -= 1
        if _holders[0] == 0 and _restore[0] > 1:
            functions[1](_restore[0])


@contextlib.contextmanager
def hold() -> Iterator[None]:
    """BLAS on one thread inside the block, for the whole process; a no-op where this thread
    holds already or nothing can be held."""
    if not _acquire():
        yield
        return
    try:
        yield
    finally:
        _release()


def restore_count() -> int:
    """The count the holds will restore (OpenBLAS's own when nothing is held)."""
    with _lock:
        if _holders[0]:
            return _restore[0]
    functions = _count_functions()
    return functions[0]() if functions is not None else 1


@contextlib.contextmanager
def lend_threads() -> Iterator[bool]:
    """Inside a hold: BLAS's own threads back for one call (a large product that cannot be
    split into blocks), where this thread is the only holder; yields whether they were lent.
    Other threads' holds wait meanwhile (their products would run threaded otherwise)."""
    functions = _count_functions()
    if functions is None or not held():
        yield False
        return
    with _lock:
        if _holders[0] != 1 or _restore[0] < 2:
            lent = False
        else:
            lent = True
            functions[1](_restore[0])
            try:
                yield True
            finally:
                functions[1](1)
    if not lent:
        yield False


def count() -> int:
    """BLAS's thread count now (1 where nothing can tell)."""
    functions = _count_functions()
    return functions[0]() if functions is not None else 1

