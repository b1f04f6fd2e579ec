"""Layer (Caffe's interface), TensorLayer (forward with ops, backward by autodiff) and OpLayer.

A Caffe layer is an op whose gradient is its own backward. ``Layer`` is the bare interface:
``setup`` creates parameter Blobs from the bottom shapes once, ``reshape`` gives the top
shapes before every forward, ``forward`` maps bottom arrays to top arrays and ``backward``
maps top diffs to bottom diffs, accumulating parameter diffs into ``self.params[i].diff``.

``TensorLayer`` writes only ``compute(bottom, params)`` with needle ops on Tensors; its
``reshape`` comes from the ops' shape rules and its ``backward`` from the same reverse mode as
``Tensor.backward``, so the built-in layers define no op math of their own. ``OpLayer`` makes
any registry op a layer with no new code.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..autograd import Tensor, is_grad_enabled, make_from_op, new_leaf, no_grad
from ..backend import cpu
from ..core import autodiff
from ..core.registry import Aval, get_op
from .blob import Blob, fill

if TYPE_CHECKING:
    from ..function import Function

__all__ = ["LAYER_TYPES", "FunctionLayer", "Layer", "LayerError", "OpLayer", "TensorLayer",
           "register_layer"]

#: Caffe type name -> Layer class; ``Net`` builds layers from spec entries through it
LAYER_TYPES: dict[str, type] = {}


def register_layer(name: str):
    """Class decorator: make a Layer subclass available to Net specs as ``"type": name``."""

    def decorate(cls: type[Layer]) -> type[Layer]:
        if name in LAYER_TYPES and LAYER_TYPES[name] is not cls:
            raise ValueError(f"layer type {name!r} registered twice")
        cls.type = name
        LAYER_TYPES[name] = cls
        return cls

    return decorate


class LayerError(RuntimeError):
    """A layer failed while a Net ran it; the message names the layer, its type and shapes."""


class Layer:
    """Base of every layer (Caffe's ``Layer``), on arrays.

    Subclasses set ``bottom_count`` / ``top_count`` ((min, max), max None = any) for the
    Net's wiring checks and implement ``setup``, ``reshape``, ``forward`` and ``backward``.
    A layer keeps what its backward needs from its latest forward.

    Attributes a Net (or the user) sets: ``training`` (train / test phase), ``dtype`` of new
    parameters, ``needs_backward`` (False: forward need not keep anything) and
    ``bottom_needs_diff`` (per bottom; None means every float bottom).
    """

    type: str = ""
    bottom_count: tuple = (1, 1)
    top_count: tuple = (1, 1)
    #: loss layers' first top gets loss_weight 1 by default (Caffe's rule)
    is_loss: bool = False
    #: False for layers whose tops never carry a gradient (Accuracy)
    differentiable: bool = True
    #: which forward call the layer's state belongs to (set by the Function bridge, bridge.py)
    _bridge_token: object

    def __init__(self, name: str | None = None) -> None:
        self.name = name or type(self).__name__
        self.params: list[Blob] = []
        self.training = True
        self.dtype = np.dtype(np.float32)
        self.needs_backward = True
        self.bottom_needs_diff: list[bool] | None = None
        #: number of tops the Net wired to this layer (None when used on its own)
        self.num_tops: int | None = None
        self.is_setup = False

    # -- the interface ---------------------------------------------------------------------
    def setup(self, bottom_shapes: list[tuple]) -> None:
        """Create parameter Blobs (``self.params``) from the bottom shapes; called once."""

    def reshape(self, bottom_shapes: list[tuple]) -> list[tuple]:
        """The top shapes for these bottom shapes; called before every forward."""
        raise NotImplementedError(f"{type(self).__name__} does not define reshape()")

    def forward(self, bottom: list) -> list:
        """Top arrays from bottom arrays."""
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def backward(self, top_diff: list, propagate_down: list[bool]) -> list:
        """Bottom diffs (None where ``propagate_down`` is False) from top diffs; parameter
        diffs are *added* to ``self.params[i].diff``."""
        raise NotImplementedError(f"{type(self).__name__} does not define backward()")

    # -- helpers ---------------------------------------------------------------------------
    def ensure_setup(self, bottom_shapes: Sequence[tuple]) -> None:
        """Run ``setup`` unless it ran already."""
        if not self.is_setup:
            self.setup([tuple(s) for s in bottom_shapes])
            self.is_setup = True

    def add_param(self, name: str, shape: tuple, filler: dict | None, default: dict,
                  fan_in: int = 1, fan_out: int = 1, lr_mult: float = 1.0,
                  decay_mult: float = 1.0) -> Blob:
        """Create, fill and append a parameter Blob (see :func:`fill` for filler specs)."""
        data = fill(filler, tuple(shape), fan_in, fan_out, self.dtype, default)
        blob = Blob(data, name=name, lr_mult=lr_mult, decay_mult=decay_mult)
        self.params.append(blob)
        return blob

    def zero_param_diffs(self) -> None:
        for blob in self.params:
            blob.zero_diff()

    def __repr__(self) -> str:
        shapes = ", ".join(f"{b.name}={b.shape}" for b in self.params)
        return f"{type(self).__name__}({self.name!r}{', ' + shapes if shapes else ''})"


def _abstract(shape: tuple, dtype: Any) -> Tensor:
    """A leaf Tensor with a shape and dtype but no values (ops on it only infer shapes)."""
    return new_leaf(Tensor, None, aval=Aval(tuple(shape), np.dtype(dtype)), device=cpu())


class TensorLayer(Layer):
    """A layer whose forward is written with needle ops; its backward is their autodiff.

    Subclasses implement ``compute(bottom, params) -> list of top Tensors`` where ``bottom``
    are Tensors wrapping the bottom arrays (no copy) and ``params`` Tensors wrapping
    ``self.params[i].data``. ``reshape`` runs ``compute`` on value-less Tensors, so the top
    shapes come from the ops' shape rules (cached per bottom shapes).
    """

    #: dtypes assumed for bottoms when inferring shapes (None: the layer's dtype)
    bottom_dtypes: tuple | None = None

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self._saved: tuple | None = None
        self._shape_cache: dict[tuple, list[tuple]] = {}

    def compute(self, bottom: list[Tensor], params: list[Tensor]) -> list[Tensor]:
        raise NotImplementedError(f"{type(self).__name__} does not define compute()")

    def reshape(self, bottom_shapes: list[tuple]) -> list[tuple]:
        key = tuple(bottom_shapes)
        try:
            cached = self._shape_cache.get(key)
        except TypeError:  # shapes given as lists
            key = tuple(tuple(s) for s in bottom_shapes)
            cached = self._shape_cache.get(key)
        if cached is not None:
            return cached
        dtypes = self.bottom_dtypes or (self.dtype,) * len(key)
        with no_grad():
            bottom = [_abstract(s, d) for s, d in zip(key, dtypes)]
            params = [_abstract(b.shape, b.data.dtype) for b in self.params]
            tops = self.compute(bottom, params)
        shapes = [tuple(t.shape) for t in tops]
        self._shape_cache[key] = shapes
        return shapes

    def forward(self, bottom: list) -> list:
        record = self.needs_backward and is_grad_enabled()
        wants = self.bottom_needs_diff
        b = [Tensor.make_const(a, requires_grad=record and a.dtype.kind in "fc"
                               and (wants is None or wants[i]))
             for i, a in enumerate(bottom)]
        p = [Tensor.make_const(blob.data, requires_grad=record and blob.lr_mult != 0)
             for blob in self.params]
        # without `record` no input requires a gradient, so the ops record nothing
        tops = self.compute(b, p)
        self._saved = (b, p, tops) if record else None
        return [t.realize_data() for t in tops]

    def backward(self, top_diff: list, propagate_down: list[bool]) -> list:
        saved = self._saved
        if saved is None:
            raise RuntimeError(f"layer {self.name!r} ({self.type or type(self).__name__}): "
                               "backward() needs a forward that recorded its graph (it ran "
                               "under no_grad(), or with needs_backward = False)")
        b, p, tops = saved
        pairs = [(t, d) for t, d in zip(tops, top_diff) if d is not None and t.requires_grad]
        down = [i for i, x in enumerate(b) if propagate_down[i] and x.requires_grad]
        learn = [j for j, q in enumerate(p) if q.requires_grad]
        bottom_diff: list = [None] * len(b)
        if not pairs or not (down or learn):
            return bottom_diff
        seeds = [Tensor.make_const(np.asarray(d, dtype=t.dtype)) for t, d in pairs]
        found: dict[int, Any] = {}

        def collect(node: Any, grad: Any) -> None:
            found[id(node)] = grad

        with no_grad():  # the gradients are arrays for the Net: they need no graph
            # bottoms and params are leaves, so reverse mode reports each of them
            autodiff.reverse_mode([t for t, _ in pairs], seeds, collect)
        for i in down:
            g = found.get(id(b[i]))
            bottom_diff[i] = g.realize_data() if g is not None else np.zeros_like(b[i]._data)
        for j in learn:
            g = found.get(id(p[j]))
            if g is not None:
                blob = self.params[j]
                blob.diff += g.realize_data()
        return bottom_diff


def _hashable(value: Any) -> Any:
    """JSON lists become tuples so op attributes stay hashable."""
    if isinstance(value, list | tuple):
        return tuple(_hashable(v) for v in value)
    return value


class OpLayer(TensorLayer):
    """Any registry op as a layer: ``OpLayer("tanh")``, ``OpLayer("summation", axes=(1,))``.

    Bottoms are the op's array inputs in order (all of them packed into one tuple for
    ``stack``); tops are its output, or the items of a tuple output (``split``). The backward is
    the op's gradient through autodiff, so every op works in this style without new code.
    In a Net spec: ``{"type": "Op", "op": "tanh", "bottom": "x", "top": "y"}`` with the
    op's attributes as further keys.
    """

    type = "Op"

    def __init__(self, op: str, name: str | None = None, **attrs: Any) -> None:
        super().__init__(name or op)
        self.record = get_op(op)
        unknown = [k for k in attrs if k not in self.record.attrs]
        if unknown:
            raise TypeError(f"OpLayer({op!r}): unknown attributes {unknown}; the op takes "
                            f"{list(self.record.attrs) or 'no attributes'}")
        self.op = self.record.cls(**{k: _hashable(v) for k, v in attrs.items()})
        variadic = self.record.tuple_input or self.record.inputs[0].startswith("*")
        n = len(self.record.inputs)
        self.bottom_count = (1, None) if variadic else (n, n)
        self.top_count = (1, None) if self.record.cls.returns_tuple else (1, 1)

    def compute(self, bottom: list[Tensor], params: list[Tensor]) -> list[Tensor]:
        if self.record.tuple_input:
            from ..core import api as F

            args: tuple = (F.make_tuple(*bottom),)
        else:
            args = tuple(bottom)
        out = make_from_op(self.op, args)
        if self.record.cls.returns_tuple:
            return list(out)
        return [out]


register_layer("Op")(OpLayer)


class FunctionLayer(TensorLayer):
    """A custom ``Function`` (``needle.function``) as a layer: ``FunctionLayer(MyFn)``.

    The bottoms are passed to ``MyFn.apply`` in order (then ``args``, non-Tensor extras);
    the tops are its output(s); the backward is ``MyFn.backward`` through autodiff. In a Net
    spec: ``{"type": "Function", "function": MyFn, "bottom": ..., "top": ...}``.
    """

    type = "Function"
    bottom_count = (1, None)
    top_count = (1, None)

    def __init__(self, function: builtins.type[Function], args: Sequence = (),
                 name: str | None = None) -> None:
        from ..function import Function

        if not (isinstance(function, type) and issubclass(function, Function)):
            raise TypeError(f"FunctionLayer: expected a Function subclass, got {function!r}")
        super().__init__(name or function.__name__)
        self.function = function
        self.args = tuple(args)

    def compute(self, bottom: list[Tensor], params: list[Tensor]) -> list[Tensor]:
        out = self.function.apply(*bottom, *self.args)
        return list(out) if isinstance(out, tuple) else [out]


register_layer("Function")(FunctionLayer)
