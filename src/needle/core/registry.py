"""The op registry: every op is one class with ``compute``, ``gradient`` and ``infer``.

An op instance holds only hashable attributes (axes as tuples, scalars as numbers), so two
nodes with the same op key and inputs compute the same value (CSE, caching). Applying an op to
values (``op(a, b)``) makes a graph node through the autograd front-end.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple, TypeVar

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
    #: True for ``tuple_get_item``: autodiff gathers the items' adjoints into one tuple
    selects_item: bool = False
    #: functions ``emit``'s expressions call by name besides ``np`` (compiled plans bind
    #: them: ``{"_sum_to_rows": column_sums.sum_rows}``); a class attribute, never mutated
    emit_helpers: Mapping[str, Callable[..., Any]] = MappingProxyType({})

    def __call__(self, *args: Any) -> Any:
        return make_node(self, args)

    def compute(self, *arrays: Any) -> Any:
        """Forward on backend arrays."""
        raise NotImplementedError

    def gradient(self, out_grad: Any, node: Any) -> Any:
        """Adjoints of the inputs, written with ops, each of the broadcast output's shape."""
        raise NotImplementedError(f"{self.name}: no gradient")

    def gradient_as_tuple(self, out_grad: Any, node: Any) -> tuple:
        """``gradient`` as a tuple with one entry per input (None: no gradient), each summed
        back to its input's shape and cast to its dtype, as the autodiff engine does.

        Course code calls this directly: ``(6, 6, 5, 4) @ (4, 3)`` gives a ``(4, 3)`` adjoint
        of the second input here, while ``gradient`` returns the broadcast ``(6, 6, 4, 3)``.
        """
        grads = self.gradient(out_grad, node)
        if isinstance(grads, list):
            grads = tuple(grads)
        elif not isinstance(grads, tuple):
            grads = (grads,)
        fitted = list(grads)
        for i, (grad, inp) in enumerate(zip(grads, node.inputs)):
            # tuple inputs (make_tuple, split) take tuple adjoints as they are, as in the engine
            if grad is not None and not isinstance(inp._data, tuple) and not (
                    inp.op is not None and inp.op.returns_tuple):
                fitted[i] = fit_to_input(grad, inp)
        return tuple(fitted)

    def infer(self, *avals: Any) -> Aval | tuple:
        """Static shape and dtype of the output from each input's Aval (a tuple of them for a
        tuple input); raises ShapeError naming the op and shapes."""
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

    def large_products(self, node: Any) -> bool:
        """Whether this op makes, for ``node``'s shapes, a matrix product large enough for
        kernels/blas_policy.py to split into blocks; a jitted plan with such a step holds
        OpenBLAS on one thread for its run (jit/compiled.py). Ops with products say so."""
        return False

    def scalar_expr(self, args: list[str], const: Any) -> str | None:
        """This elementwise op on one element: a numba-compilable expression over the operand
        expressions ``args`` (already cast to the dtype NumPy computes in), or None.
        ``const(value)`` names an attribute value cast to that dtype. Region fusion
        (``compiler/fusion.py``) inlines it into one loop; ops without it are never fused."""
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


def fit_to_input(grad: Any, node: Any) -> Any:
    """Sum a broadcast adjoint back to the input's shape and cast it to the input's dtype
    (the one un-broadcast of the autodiff engine and of ``Op.gradient_as_tuple``)."""
    g_data, n_data = grad._data, node._data
    if (g_data is not None and n_data is not None  # eager fast path: compare the arrays
            and g_data.shape == n_data.shape and g_data.dtype == n_data.dtype):
        return grad
    if grad.shape != node.shape:
        grad = F.sum_to(grad, tuple(node.shape))
    if grad.dtype != node.dtype:
        grad = F.astype(grad, node.dtype)
    return grad


def make_node(op: Op, inputs: tuple) -> Any:
    """Make a graph node applying ``op`` to ``inputs`` (delegates to the front-end)."""
    return _NODE_FACTORY[0](op, inputs)


@dataclass
class OpRecord:
    """What the registry knows of one op: its class, input names and attribute names."""

    name: str
    cls: type[Op]
    inputs: tuple[str, ...]
    attrs: tuple[str, ...]
    methods: tuple[str, ...] = ()
    tuple_input: bool = False
    doc: str = field(default="", repr=False)
    #: a node kind the front-ends make themselves (assign, cond, jit_call, ...): enumerable
    #: here, but no ``ndl.ops`` function (its attributes are objects, not values)
    internal: bool = False


REGISTRY: dict[str, OpRecord] = {}
_OpClass = TypeVar("_OpClass", bound=Op)


class OpFunctions:
    """The op functions by name (``F.add(a, b)``, ``F.summation(a, axes=(0,))``), one
    attribute per registered op, set as each op registers.

    Op definitions write gradients with it (``from .registry import F``), so an op file
    imports only the registry, and ``core/api.py`` can import every op file without a cycle.
    """

    def __repr__(self) -> str:
        return f"<needle op functions: {len(vars(self))} ops>"


F: Any = OpFunctions()


def register(name: str, inputs: tuple[str, ...] = ("a",), methods: tuple[str, ...] = (),
             tuple_input: bool = False, internal: bool = False):
    """Class decorator: record an op under ``name``.

    ``inputs`` names the array arguments of the generated ``ndl.ops.<name>`` function; the
    op's ``__init__`` parameters become its keyword/positional attributes after them.
    ``methods`` lists Tensor methods that call the op with the tensor as first input.
    ``tuple_input`` marks ops whose single input is a TensorTuple (``stack``). ``internal``
    marks node kinds a front-end makes itself (no generated function).
    """

    def decorate(cls: type[_OpClass]) -> type[_OpClass]:
        if name in REGISTRY:
            raise ValueError(f"op {name!r} registered twice")
        params = []
        if cls.__init__ is not object.__init__:
            params = list(inspect.signature(cls.__init__).parameters)[1:]
        cls.name = name
        record = OpRecord(name, cls, tuple(inputs), tuple(params), tuple(methods),
                          tuple_input, inspect.getdoc(cls) or "", internal)
        REGISTRY[name] = record
        if not internal:
            setattr(F, name, _generate(record))
        return cls

    return decorate


def _function_source(record: OpRecord) -> tuple[str, dict]:
    """Python source of the op function for ``record`` and the names it refers to."""
    cls = record.cls
    namespace: dict[str, Any] = {"_cls": cls, "_factory": _NODE_FACTORY}
    params = []
    for name in record.attrs:
        default = inspect.signature(cls.__init__).parameters[name].default
        if default is inspect.Parameter.empty:
            params.append(name)
        else:
            namespace[f"_default_{name}"] = default
            params.append(f"{name}=_default_{name}")
    inputs = ", ".join(record.inputs)
    if any(name.startswith("*") for name in record.inputs):
        params = [p if "=" in p else f"{p}=None" for p in params]  # keyword-only after *args
    signature = ", ".join([inputs] + params)
    args_tuple = f"({inputs},)"  # "(a, *rest,)" unpacks a variadic input too
    if record.attrs:
        make_op = f"_cls({', '.join(record.attrs)})"
    else:
        namespace["_op"] = cls()
        make_op = "_op"
    body = ""
    if record.tuple_input:
        arg = record.inputs[0]
        body += f"    if isinstance({arg}, (list, tuple)):\n        {arg} = make_tuple(*{arg})\n"
    body += f"    return _factory[0]({make_op}, {args_tuple})\n"
    source = f"def {record.name}({signature}):\n{body}"
    return source, namespace


def _generate(record: OpRecord) -> Any:
    source, namespace = _function_source(record)
    namespace["make_tuple"] = lambda *args: F.make_tuple(*args)
    exec(compile(source, f"<needle op {record.name}>", "exec"), namespace)  # noqa: S102
    fn = namespace[record.name]
    fn.__doc__ = record.doc
    fn.__module__ = "needle.ops"
    fn.__qualname__ = record.name
    return fn


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
