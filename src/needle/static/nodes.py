"""Graph leaves: placeholders (fed at run time), Variables (state kept by a Session), constants."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..autograd import Tensor, _to_backend
from ..backend import Device, cpu
from ..core.registry import Aval, NodeMeta, fmt_shape
from .graph import get_default_graph, user_source


def _init_leaf(node: Any, shape: tuple, dtype: Any, name: str | None, kind: str,
               requires_grad: bool = False, device: Device | None = None) -> Any:
    """Fill a graph leaf (no data: its value comes from a feed or a Session) and register it."""
    from .. import autograd

    autograd.TENSOR_COUNTER += 1
    graph = get_default_graph()
    node.op = None
    node.inputs = ()
    node._data = None
    node.requires_grad = requires_grad
    node.device = device or cpu()
    node._aval = Aval(tuple(shape), np.dtype(dtype))
    node.meta = NodeMeta(name=name or f"{kind}_{graph.node_count}", source=user_source())
    node.grad = None
    graph.add_leaf(node, kind + "s")
    return node


class Placeholder(Tensor):
    """A graph input: declared shape (None dims = any size) and dtype, fed at each run."""

    __slots__ = ()

    @property
    def name(self) -> str:
        return self.meta.name

    def check_feed(self, value: Any) -> np.ndarray:
        """The fed value as an array of this dtype, or a ValueError naming both shapes."""
        array = value.numpy() if isinstance(value, Tensor) else np.asarray(value)
        declared = self._aval.shape
        fits = array.ndim == len(declared) and all(
            d is None or d == n for d, n in zip(declared, array.shape))
        if not fits:
            raise ValueError(f"feed for placeholder {self.name!r}: declared shape "
                             f"{fmt_shape(declared)}, fed shape {fmt_shape(array.shape)}")
        return array.astype(self._aval.dtype, copy=False)

    def __repr__(self) -> str:
        return f"placeholder({self.name!r}, shape={fmt_shape(self.shape)}, dtype={self.dtype})"


class Variable(Tensor):
    """Graph state: a Session gives it ``initial_value`` when it starts and keeps it across runs.

    ``st.Variable(initial_value, name=None, trainable=True, dtype=None)``. It changes only
    through ``st.assign`` / ``assign_add`` / ``assign_sub`` or a train op.
    """

    __slots__ = ("initial_value", "trainable")

    def __init__(self, initial_value: Any, name: str | None = None, trainable: bool = True,
                 dtype: Any = None) -> None:
        array, device = _to_backend(initial_value, None, dtype, copy=True)
        _init_leaf(self, array.shape, array.dtype, name, "variable",
                   requires_grad=trainable and array.dtype.kind in "fc", device=device)
        self.initial_value = array
        self.trainable = bool(trainable)

    @property
    def name(self) -> str:
        return self.meta.name

    def __repr__(self) -> str:
        return f"Variable({self.name!r}, shape={fmt_shape(self.shape)}, dtype={self.dtype})"


class Constant(Tensor):
    """A fixed value in a graph (folded into its consumers by the optimizer)."""

    __slots__ = ("value",)

    @property
    def name(self) -> str:
        return self.meta.name

    def __repr__(self) -> str:
        return f"constant({self.name!r}, shape={fmt_shape(self.shape)}, dtype={self.dtype})"


def placeholder(shape: Any = None, dtype: Any = "float32", name: str | None = None) -> Placeholder:
    """A graph input of ``shape`` (None dims are any size) fed through ``feed_dict``."""
    if shape is None:
        raise ValueError("placeholder: give a shape (None for dims of any size)")
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    return _init_leaf(Tensor.__new__(Placeholder), shape, dtype, name, "placeholder")


def constant(value: Any, name: str | None = None, dtype: Any = None) -> Constant:
    """A constant graph value (copied)."""
    array, device = _to_backend(value, None, dtype, copy=True)
    node = _init_leaf(Tensor.__new__(Constant), array.shape, array.dtype, name, "constant",
                      device=device)
    node.value = array
    return node
