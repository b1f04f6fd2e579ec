"""Tensor factories (rand, randn, randb, constant, ones, zeros, one_hot) on NumPy's global RNG.

Every random factory makes exactly one draw from NumPy's global generator
(``np.random.rand`` or ``np.random.randn`` of the full shape), so ``np.random.seed(s)``
reproduces needle's values bit for bit, whatever the device.

NOTE: as in needle's backend, the draw is cast to float32 *before* it is scaled (and before
randb compares it with p), so float32 results equal needle's exactly; a float64 request
keeps the draw in float64 instead of losing its precision.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..autograd import Tensor
from ..backend import Device, cpu

__all__ = [
    "constant", "one_hot", "ones", "ones_like", "rand", "randb", "randn", "zeros", "zeros_like",
]


def _shape(shape: tuple) -> tuple[int, ...]:
    """``f(2, 3)`` and ``f((2, 3))`` both mean shape (2, 3)."""
    if len(shape) == 1 and isinstance(shape[0], tuple | list):
        shape = tuple(shape[0])
    return tuple(int(d) for d in shape)


def _tensor(array: np.ndarray, device: Device | None, dtype: Any,
            requires_grad: bool) -> Tensor:
    """A leaf Tensor holding ``array`` converted to ``dtype`` on ``device`` (no extra copy)."""
    device = cpu() if device is None else device
    array = np.asarray(array).astype(dtype, copy=False)
    if device != cpu():
        array = device.array(array)
    # only floating tensors can require a gradient (as in Tensor.__init__)
    return Tensor.make_const(array, requires_grad=bool(requires_grad) and array.dtype.kind in "fc")


def _draw(sample: np.ndarray, dtype: Any) -> np.ndarray:
    """The raw draw in the precision it is scaled in: the requested float dtype, else float32."""
    dtype = np.dtype(dtype)
    return sample.astype(dtype if dtype.kind == "f" else np.float32)


def rand(*shape: int, low: float = 0.0, high: float = 1.0, device: Device | None = None,
         dtype: Any = "float32", requires_grad: bool = False) -> Tensor:
    """Uniform on [low, high): ``np.random.rand(*shape) * (high - low) + low`` (one draw)."""
    array = _draw(np.random.rand(*_shape(shape)), dtype) * (high - low) + low
    return _tensor(array, device, dtype, requires_grad)


def randn(*shape: int, mean: float = 0.0, std: float = 1.0, device: Device | None = None,
          dtype: Any = "float32", requires_grad: bool = False) -> Tensor:
    """Normal(mean, std^2): ``np.random.randn(*shape) * std + mean`` (one draw)."""
    array = _draw(np.random.randn(*_shape(shape)), dtype) * std + mean
    return _tensor(array, device, dtype, requires_grad)


def randb(*shape: int, p: float = 0.5, device: Device | None = None, dtype: Any = "bool",
          requires_grad: bool = False) -> Tensor:
    """Bernoulli(p): ``np.random.rand(*shape) <= p`` (one draw); bool unless ``dtype`` says."""
    array = _draw(np.random.rand(*_shape(shape)), "float32") <= p
    return _tensor(array, device, dtype, requires_grad)


def constant(*shape: int, c: float = 1.0, device: Device | None = None, dtype: Any = "float32",
             requires_grad: bool = False) -> Tensor:
    """A tensor of ``shape`` filled with ``c`` (no draw)."""
    array = np.full(_shape(shape), c, dtype=dtype)
    return _tensor(array, device, dtype, requires_grad)


def ones(*shape: int, device: Device | None = None, dtype: Any = "float32",
         requires_grad: bool = False) -> Tensor:
    """A tensor of ``shape`` filled with 1."""
    return constant(*shape, c=1.0, device=device, dtype=dtype, requires_grad=requires_grad)


def zeros(*shape: int, device: Device | None = None, dtype: Any = "float32",
          requires_grad: bool = False) -> Tensor:
    """A tensor of ``shape`` filled with 0."""
    return constant(*shape, c=0.0, device=device, dtype=dtype, requires_grad=requires_grad)


def ones_like(array: Tensor, *, device: Device | None = None,
              requires_grad: bool = False) -> Tensor:
    """Ones of ``array``'s shape and dtype (on its device unless given)."""
    return ones(*array.shape, dtype=array.dtype, device=device or array.device,
                requires_grad=requires_grad)


def zeros_like(array: Tensor, *, device: Device | None = None,
               requires_grad: bool = False) -> Tensor:
    """Zeros of ``array``'s shape and dtype (on its device unless given)."""
    return zeros(*array.shape, dtype=array.dtype, device=device or array.device,
                 requires_grad=requires_grad)


def _class_ids(i: Any) -> np.ndarray:
    """Class ids as an int64 NumPy array from a Tensor, an array, a list or an int."""
    if isinstance(i, Tensor):
        i = i.numpy()
    values = np.asarray(i)
    if values.dtype.kind == "b" or values.dtype.kind not in "iuf":
        raise ValueError(f"one_hot: class ids must be integers, got dtype {values.dtype}")
    ids = values.astype(np.int64)
    if values.dtype.kind == "f" and not np.array_equal(ids, values):
        raise ValueError("one_hot: class ids must be whole numbers, got non-integral floats")
    return ids


def one_hot(n: int, i: Any, device: Device | None = None, dtype: Any = "float32",
            requires_grad: bool = False) -> Tensor:
    """Rows of the n x n identity picked by ``i``: shape ``i.shape + (n,)``.

    ``i`` holds class ids in [0, n) (a Tensor, array, list or int; whole-valued floats work).

    >>> one_hot(3, [2, 0]).numpy()
    array([[0., 0., 1.],
           [1., 0., 0.]], dtype=float32)
    """
    ids = _class_ids(i)
    if ids.size and (ids.min() < 0 or ids.max() >= n):
        bad = ids[(ids < 0) | (ids >= n)]
        raise ValueError(f"one_hot: class ids must lie in [0, {n}), got {bad.ravel()[:5].tolist()}")
    array = np.zeros((*ids.shape, n), dtype=dtype)
    np.put_along_axis(array, ids[..., None], 1, axis=-1)
    return _tensor(array, device, dtype, requires_grad)
