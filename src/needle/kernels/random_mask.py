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

import ctypes
from typing import Any

import numpy as np

from ..backend.numba_support import NumbaLoops

__all__ = ["bernoulli_mask"]

#: kernels/numba_random_mask.py on first use (NumPy runs where numba cannot)
LOOPS = NumbaLoops(f"{__package__}.numba_random_mask")
#: kernels/numba_mt19937.py: the mask drawn from NumPy's generator state directly
STREAM_LOOPS = NumbaLoops(f"{__package__}.numba_mt19937")

_LOOP_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

#: [bit generator, its key words, its read position]: views of the C state of NumPy's global
#: MT19937 (the generator kept alive here, so the views stay valid; one entry), or
#: [bit generator] for one whose state these views cannot read
_STATE_VIEWS: list = []


def _global_mt19937() -> list | None:
    """Views of the state of the generator behind ``np.random.rand`` (NumPy's
    ``mt19937_state``: 624 uint32 words, then an int position), or None where that is not an
    MT19937 (``np.random.set_bit_generator``) or its state is not laid out so."""
    get = getattr(np.random, "get_bit_generator", None)  # (NumPy >= 1.25)
    if get is None:
        return None
    bit_generator = get()
    views = _STATE_VIEWS
    if views and views[0] is bit_generator:
        return views if len(views) == 3 else None
    views[:] = [bit_generator]
    if type(bit_generator) is not np.random.MT19937:
        return None
    address = bit_generator.ctypes.state_address
    key = np.ctypeslib.as_array((ctypes.c_uint32 * 624).from_address(address))
    pos = np.ctypeslib.as_array((ctypes.c_int32 * 1).from_address(address + 4 * 624))
    state = bit_generator.state["state"]
    if not (np.array_equal(key, state["key"]) and int(pos[0]) == state["pos"]):
        return None  # (another layout: np.random.rand draws)
    views[:] = [bit_generator, key, pos]
    return views


def _mask_from_stream(shape: tuple, p: float, dtype: Any) -> np.ndarray | None:
    """The mask NumPy's draw would give, from the global generator's state in one numba loop
    (which leaves the generator as the draw would); None where that cannot run."""
    loops = STREAM_LOOPS.module()
    if loops is None:
        return None
    views = _global_mt19937()
    if views is None:
        return None
    bit_generator, key, pos = views
    out = np.empty(shape, dtype)
    with bit_generator.lock:  # (as np.random.rand holds it)
        if STREAM_LOOPS.call(loops.bernoulli_mask, key, pos, np.float32(p), out.reshape(-1)):
            return out
    return None


def bernoulli_mask(xp: Any, shape: tuple, p: float, dtype: Any) -> Any:
    """A ``shape`` mask of ``dtype``, 1 where ``float32(draw) <= float32(p)``, from one
    ``xp.random.rand(*shape)`` draw (xp: the array module, NumPy or CuPy).

    With numba and NumPy's default generator, the draw's words are taken from the generator
    directly (kernels/numba_mt19937.py: ~4x faster than the draw, the same mask and the same
    generator state after it)."""
    if xp is np and shape and np.dtype(dtype) in _LOOP_DTYPES:
        out = _mask_from_stream(shape, p, dtype)
        if out is not None:
            return out
    draw = xp.asarray(xp.random.rand(*shape))  # (a 0-d draw is a Python float)
    if xp is np and draw.ndim and np.dtype(dtype) in _LOOP_DTYPES:
        loops = LOOPS.module()
        if loops is not None:
            out = np.empty(shape, dtype)
            if LOOPS.call(loops.bernoulli_mask, draw.reshape(-1), np.float32(p),
                          out.reshape(-1)):
                return out
    return (draw.astype(np.float32) <= p).astype(dtype)
