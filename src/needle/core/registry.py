"""The op registry: every op is one class with ``compute``, ``gradient`` and ``infer``.

An op instance holds only hashable attributes (axes as tuples, scalars as numbers), so two
nodes with the same op key and inputs compute the same value (CSE, caching). Applying an op to
values (``op(a, b)``) makes a graph node through the autograd front-end.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np


class ShapeError(ValueError):
    """An op's inputs do not fit together (shapes, axes, dtypes)."""


class CheckError(ValueError):
    """A check op (``check_class_ids``) found bad input values.

    Every executor raises it unchanged (eager ops, a Session's steps, a JIT plan's
    ``jit_call``), so every mode gives the same type and message.
    """


class Aval(NamedTuple):
    """Abstract value: what is known of a node before it has data. ``None`` dims are unknown."""

    shape: tuple
    dtype: np.dtype


class Op:
    """Base of every op: forward on backend arrays, gradient with ops, shape/dtype rule."""

    #: registered name, e.g. ``"add"``; set by :func:`register`
    name: str = ""
    #: False for ops whose output never carries a gradient (comparisons, sign, full_like)
    differentiable: bool = True
    #: True when ``compute`` returns a tuple of arrays (the node is a TensorTuple)
    returns_tuple: bool = False
    #: the device of the result when it is not the first input's (``to_device``)
    out_device: Any = None
    #: True for ops that do something besides computing their value (store, assign, print,
    #: an optimizer update): they run even when nothing reads their value
    side_effect: bool = False
    #: True for ops that change state other steps may read (assign, store, updates)
    writes_state: bool = False
    #: True for ops that draw random numbers (two nodes never compute the same value)
    random: bool = False

    def __call__(self, *args: Any) -> Any:
        return make_node(self, args)

    def compute(self, *arrays: Any) -> Any:
        """Forward on backend arrays."""
        raise NotImplementedError

    def gradient(self, out_grad: Any, node: Any) -> Any:
        """Adjoints of the inputs, written with ops, each of the broadcast output's shape."""
        raise NotImplementedError(f"{self.name}: no gradient")

    def gradient_as_tuple(self, out_grad: Any, node: Any) -> tuple:
        """``gradient`` as a tuple with one entry per input (None: no gradient)."""
        grads = self.gradient(out_grad, node)
        if isinstance(grads, tuple):
            return grads
        if isinstance(grads, list):
            return tuple(grads)
        return (grads,)

    def infer(self, *avals: Aval) -> Aval | tuple:
        """Static shape and dtype of the output; raises ShapeError naming the op and shapes."""
        raise NotImplementedError(f"{self.name}: no shape rule")

    def ufunc(self) -> tuple[str, tuple] | None:
        """``(NumPy ufunc name, extra arguments after the inputs)`` when ``compute`` is exactly
        that one ufunc call, else None. Compiled plans then call the ufunc directly and may
        write into a dead input's buffer (``out=``)."""
        return None

    def emit(self, args: list[str], node: Any) -> str | None:
        """A Python expression (NumPy calls on the argument names ``args``) computing this op
        for ``node``'s concrete input and output shapes, or None. Compiled plans with known
        shapes inline it instead of calling ``compute`` (no per-call shape handling)."""
        return None

    def attrs(self) -> tuple:
        """The op's attributes as a hashable, ordered tuple of (name, value)."""
        return tuple(sorted(vars(self).items()))

    def key(self) -> tuple:
        """Identity for CSE and caching: two ops with equal keys compute the same function."""
        return (type(self), self.attrs())

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.attrs())
        return f"{type(self).__name__}({args})"


class NodeMeta:
    """Optional per-node facts for front-ends: a name, the creating source line, flags.

    Most nodes have none (``node.meta is None``); autodiff reports gradients of nodes that
    have one, so front-ends mark the non-leaf nodes whose gradients they want.
    """

    __slots__ = ("name", "source", "retain_grad")

    def __init__(self, name: str | None = None, source: str | None = None) -> None:
        self.name = name
        self.source = source
        self.retain_grad = False


# The autograd front-end installs its node factory here (it imports this module, not the reverse).
_NODE_FACTORY: list = []


def make_node(op: Op, inputs: tuple) -> Any:
    """Make a graph node applying ``op`` to ``inputs`` (delegates to the front-end)."""
    return _NODE_FACTORY[0](op, inputs)


@dataclass
class OpRecord:
    """What the registry knows of one op: its class, input names and attribute names."""

    name: str
    cls: type
    inputs: tuple[str, ...]
    attrs: tuple[str, ...]
    methods: tuple[str, ...] = ()
    tuple_input: bool = False
    doc: str = field(default="", repr=False)


REGISTRY: dict[str, OpRecord] = {}


def register(name: str, inputs: tuple[str, ...] = ("a",), methods: tuple[str, ...] = (),
             tuple_input: bool = False):
    """Class decorator: record an op under ``name``.

    ``inputs`` names the array arguments of the generated ``ndl.ops.<name>`` function; the
    op's ``__init__`` parameters become its keyword/positional attributes after them.
    ``methods`` lists Tensor methods that call the op with the tensor as first input.
    ``tuple_input`` marks ops whose single input is a TensorTuple (``stack``).
    """

    def decorate(cls: type) -> type:
        if name in REGISTRY:
            raise ValueError(f"op {name!r} registered twice")
        params = []
        if cls.__init__ is not object.__init__:
            params = list(inspect.signature(cls.__init__).parameters)[1:]
        cls.name = name
        REGISTRY[name] = OpRecord(name, cls, tuple(inputs), tuple(params), tuple(methods),
                                  tuple_input, inspect.getdoc(cls) or "")
        return cls

    return decorate


def get_op(name: str) -> OpRecord:
    """The registry record of op ``name``; a KeyError lists the known names."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r}; known ops: {', '.join(sorted(REGISTRY))}") from None


def fmt_shape(shape: tuple) -> str:
    """A shape as ``(None, 3)`` text."""
    dims = ", ".join("None" if d is None else str(d) for d in shape)
    return f"({dims},)" if len(shape) == 1 else f"({dims})"
