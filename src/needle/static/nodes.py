"""Graph leaves: placeholders (fed at run time), Variables (state kept by a Session), constants."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..autograd import Tensor, _to_backend, init_leaf
from ..backend import Device, cpu
from ..backend.ndarray import lossless_astype
from ..core.registry import Aval, NodeMeta, fmt_shape
from ..core.source import user_source
from .graph import get_default_graph


def _init_leaf(node: Any, shape: tuple, dtype: Any, name: str | None, kind: str,
               requires_grad: bool = False, device: Device | None = None) -> Any:
    """Fill a graph leaf (no data: its value comes from a feed or a Session) and register it."""
    graph = get_default_graph()
    init_leaf(node, None, aval=Aval(tuple(shape), np.dtype(dtype)), requires_grad=requires_grad,
              device=device or cpu(),
              meta=NodeMeta(name=_unique_name(graph, name or kind), source=user_source()))
    graph.add_leaf(node, kind + "s")
    return node


def _unique_name(graph: Any, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``, ... if a leaf of the graph already has that name
    (Session.variables() and checkpoints key Variables by name)."""
    taken = {leaf.meta.name for kind in (graph.placeholders, graph.variables, graph.constants)
             for leaf in kind}
    if base not in taken:
        return base
    i = 1
    while f"{base}_{i}" in taken:
        i += 1
    return f"{base}_{i}"


class Placeholder(Tensor):
    """A graph input: declared shape (None dims = any size) and dtype, fed at each run."""

    __slots__ = ()

    @property
    def name(self) -> str:
        meta = self.meta
        assert meta is not None and meta.name is not None  # (set when the node is made)
        return meta.name

    def check_feed(self, value: Any) -> np.ndarray:
        """The fed value as an array of this dtype, or a ValueError naming both shapes.

        A conversion that would change values is refused with a ValueError naming the
        placeholder: non-whole floats (or NaN, or out-of-range values) for an integer
        placeholder (2.0 converts, 2.5 does not), finite values that overflow a float dtype.
        """
        if type(value) is not np.ndarray:
            value = value.numpy() if isinstance(value, Tensor) else np.asarray(value)
        declared, dtype = self._aval
        shape = value.shape
        if len(shape) != len(declared) or any(
                d is not None and d != n for d, n in zip(declared, shape)):
            raise ValueError(f"feed for placeholder {self.name!r}: declared shape "
                             f"{fmt_shape(declared)}, fed shape {fmt_shape(shape)}")
        if value.dtype == dtype:
            return value
        return lossless_astype(value, dtype, f"feed for placeholder {self.name!r} ({dtype})")

    def __repr__(self) -> str:
        return f"placeholder({self.name!r}, shape={fmt_shape(self.shape)}, dtype={self.dtype})"


class Variable(Tensor):
    """Graph state: a Session gives it ``initial_value`` when it starts and keeps it across runs.

    ``st.Variable(initial_value, name=None, trainable=True, dtype=None)``. It changes only
    through ``st.assign`` / ``assign_add`` / ``assign_sub`` or a train op. Names are unique
    in a graph (a repeated name gets ``_1``, ``_2``, ...). ``trainable=False`` keeps it out of
    ``st.minimize``; gradients with respect to it can still be asked for.
    """

    __slots__ = ("initial_value", "trainable")

    def __init__(self, initial_value: Any, name: str | None = None, trainable: bool = True,
                 dtype: Any = None) -> None:
        array, device = _to_backend(initial_value, None, dtype, copy=True)
        _init_leaf(self, array.shape, array.dtype, name, "variable",
                   requires_grad=array.dtype.kind in "fc", device=device)
        self.initial_value = array
        self.trainable = bool(trainable)

    @property
    def name(self) -> str:
        meta = self.meta
        assert meta is not None and meta.name is not None  # (set when the node is made)
        return meta.name

    def __repr__(self) -> str:
        return f"Variable({self.name!r}, shape={fmt_shape(self.shape)}, dtype={self.dtype})"


class Constant(Tensor):
    """A fixed value in a graph (folded into its consumers by the optimizer)."""

    __slots__ = ("value",)
    value: Any

    @property
    def name(self) -> str:
        meta = self.meta
        assert meta is not None and meta.name is not None  # (set when the node is made)
        return meta.name

    def __repr__(self) -> str:
        return f"constant({self.name!r}, shape={fmt_shape(self.shape)}, dtype={self.dtype})"


def placeholder(shape: Any = None, dtype: Any = "float32", name: str | None = None) -> Placeholder:
    """A graph input of ``shape`` (None dims are any size) fed through ``feed_dict``."""
    if shape is None:
        raise ValueError("placeholder: give a shape (None for dims of any size)")
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    # float placeholders take part in gradients (st.gradients(loss, x) is d loss / d x)
    return _init_leaf(Tensor.__new__(Placeholder), shape, dtype, name, "placeholder",
                      requires_grad=np.dtype(dtype).kind in "fc")


def constant(value: Any, name: str | None = None, dtype: Any = None) -> Constant:
    """A constant graph value (copied)."""
    array, device = _to_backend(value, None, dtype, copy=True)
    node = _init_leaf(Tensor.__new__(Constant), array.shape, array.dtype, name, "constant",
                      device=device)
    node.value = array
    return node
