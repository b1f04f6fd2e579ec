"""Tensor, the eager front-end: a graph node (op, inputs, cached data) that computes as it is made.

A node made while no input requires a gradient is detached at once (no op, no inputs), so an
inference pass keeps no graph; a node that requires a gradient keeps its inputs until nothing
references it, and then the whole graph behind it is freed by reference counting.
"""

from __future__ import annotations

import builtins
import gc
from typing import TYPE_CHECKING, Any

import numpy as np

from .backend import Device, NDArray, as_ndarray, cpu, device_of
from .core import registry
from .core.autodiff import backward as _autodiff_backward
from .core.autodiff import find_topo_sort
from .core.context import GradMode, is_grad_enabled, lazy_node_made, recording
from .core.context import _get as _get_state
from .core.context import state as _thread_state
from .core.registry import Aval, CheckError, NodeMeta, Op, ShapeError, fmt_shape
from .core.source import user_source

__all__ = [  # (TENSOR_COUNTER: computed when read, by the module's __getattr__)
    "TENSOR_COUNTER",  # noqa: F822
    "Tensor", "TensorTuple", "Value", "enable_grad", "find_topo_sort", "is_grad_enabled",
    "no_grad",
]


def live_value_count() -> int:
    """The number of live graph values (Tensors and TensorTuples): ``autograd.TENSOR_COUNTER``.

    Counted when read, among the objects the cyclic garbage collector tracks (every Value is
    tracked from its allocation until it is freed), so it rises when a node is made and falls
    when it is freed, as a counter kept by ``__init__`` and ``__del__`` would; but no node pays
    for it. A ``__del__`` on every node was ~5% of an eager 100-op chain step (a Python call
    per freed node), and the increments another ~1%. Reading it walks the heap: for tests
    and debugging, not for a training loop.
    """
    # (type(), not isinstance: isinstance reads __class__, which some objects compute, and
    # torch's deprecated aliases warn when read)
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), Value))


def __getattr__(name: str) -> Any:
    """``TENSOR_COUNTER`` (the course's name), computed when read (see ``live_value_count``)."""
    if name == "TENSOR_COUNTER":
        return live_value_count()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

#: PyTorch's names for custom functions, set by needle/__init__.py to function.Function and
#: function.FunctionCtx (function.py builds on this module, so it cannot import them here)
Function: Any
FunctionCtx: Any


class TracerConversionError(RuntimeError):
    """A traced tensor was converted to a Python value (bool, item, numpy, float, print).

    Raised while ``ndl.jit`` traces a function: the value does not exist yet, so Python code
    that branches on it cannot be recorded. The JIT catches it and falls back (or, strict,
    explains the fixes).
    """

    def __init__(self, what: str, source: str | None) -> None:
        self.what = what
        self.source = source
        where = f" at {source}" if source else ""
        super().__init__(f"{what} of a traced tensor{where}: its value is not known while "
                         "tracing")


def no_grad() -> GradMode:
    """Nothing made inside records a graph: ``with ndl.no_grad(): y = model(x)``.

    Grad mode belongs to the thread: another thread's ops are unaffected.
    """
    return GradMode(False)


def enable_grad() -> GradMode:
    """Record graphs again inside a ``no_grad`` block (this thread only)."""
    return GradMode(True)


def _holds_float64(data: Any) -> bool:
    """Whether nested lists/tuples ``data`` hold a float64 NumPy scalar, array or Tensor."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list | tuple):
            stack.extend(item)
        elif getattr(item, "dtype", None) == np.float64:
            return True
    return False


def _default_dtype_array(data: Any) -> np.ndarray:
    """A NumPy array from Python data, with PyTorch's rules: Python floats become float32 and
    ints int64, while NumPy scalars and arrays (and Tensors) inside lists keep their dtype, so
    ``[np.float64(1.0)]`` stays float64 and ``[np.float32(1.0), 2.0]`` is float32."""
    arr = np.asarray(data)
    if arr.dtype == np.float64 and not _holds_float64(data):
        return arr.astype(np.float32)
    if arr.dtype.kind == "O":
        raise TypeError(f"Tensor: cannot make a tensor from {type(data).__name__} data")
    return arr


def _to_backend(data: Any, device: Device | None, dtype: Any, copy: bool) -> tuple[Any, Device]:
    """The backend array and device for Tensor(data, device=..., dtype=...)."""
    if isinstance(data, Value):
        arr = data.realize_data()
        src = data.device
    elif isinstance(data, np.ndarray):
        arr = data.view(np.ndarray) if type(data) is not np.ndarray else data
        src = cpu()
    elif isinstance(data, np.generic):
        arr, src, copy = np.asarray(data), cpu(), False
    elif type(data).__module__.startswith("cupy"):
        arr, src = data, device_of(data)
    else:
        arr, src, copy = _default_dtype_array(data), cpu(), False
    if dtype is not None and arr.dtype != np.dtype(dtype):
        arr, copy = arr.astype(dtype), False
    device = device or src
    if device != src:
        arr = device.array(src.to_numpy(arr)) if src != cpu() else device.array(arr)
        copy = False
    if copy:
        arr = arr.copy()
    return arr, device


class Value:
    """A graph node: the op that made it, its input nodes, and its data once computed."""

    __slots__ = ("op", "inputs", "_data", "requires_grad", "device", "_aval", "meta",
                 "__weakref__")
    op: Op | None
    inputs: tuple[Any, ...]
    _data: Any
    requires_grad: bool
    device: Device
    _aval: Any
    meta: NodeMeta | None

    # NOTE: no __del__ (nor weakref callbacks): a Python call for every freed node was ~5% of
    # an eager step of small ops; autograd.TENSOR_COUNTER counts live Values when read

    # -- state -------------------------------------------------------------------------------
    def is_leaf(self) -> bool:
        """True for nodes not made by an op (inputs, parameters, detached values)."""
        return self.op is None

    @property
    def aval(self) -> Aval:
        """Shape and dtype, known with or without data."""
        data = self._data
        if data is None:
            return self._aval
        if not isinstance(data, tuple):
            return Aval(data.shape, data.dtype)
        avals = self._aval  # (an eager TensorTuple's: made on first use, see make_from_op)
        if avals is None:
            avals = self._aval = tuple(Aval(a.shape, a.dtype) for a in data)
        return avals

    def realize_data(self, what: str = "reading the value") -> Any:
        """The backend array (or tuple of arrays); an error for a node without a value yet."""
        if self._data is None:
            if _thread_state().trace is not None:
                raise TracerConversionError(what, user_source())
            raise RuntimeError(
                f"{self._describe()} has no value: it belongs to a declared graph; "
                "run it with needle.static.Session().run(...)"
            )
        return self._data

    def _describe(self) -> str:
        name = getattr(self.meta, "name", None) if self.meta is not None else None
        what = self.op.name if self.op is not None else "leaf"
        return f"node {name or what!r}"


def init_leaf(node: Any, data: Any, *, aval: Aval | None = None, requires_grad: bool = False,
              device: Device | None = None, meta: NodeMeta | None = None) -> Any:
    """Fill an allocated node as a leaf: no op, no inputs, ``data`` (or None and its ``aval``).

    The one leaf constructor of every front-end: eager constants, detached values, a JIT's
    stand-ins for arguments, a declared graph's placeholders, Variables and constants.
    """
    node.op = None
    node.inputs = ()
    node._data = data
    node.requires_grad = requires_grad
    if device is None:
        device = device_of(data) if data is not None else cpu()
    node.device = device
    node._aval = aval
    node.meta = meta
    if isinstance(node, Tensor):
        node.grad = None
    return node


def new_leaf(cls: type, data: Any, **facts: Any) -> Any:
    """A new leaf node of class ``cls`` (see :func:`init_leaf`), made without ``__init__``."""
    return init_leaf(object.__new__(cls), data, **facts)


def _new_lazy_node(cls: type, op: Op, inputs: tuple, requires_grad: bool, device: Device,
                   aval: Any) -> Any:
    """A node whose value is not computed yet (a declared graph's, or a trace's)."""
    node: Any = object.__new__(cls)
    node.op = op
    node.inputs = inputs
    node._data = None
    node.requires_grad = requires_grad
    node.device = device
    node._aval = aval
    node.meta = None
    if cls is Tensor:
        node.grad = None
    return node


def _op_error(op: Op, inputs: tuple, exc: Exception) -> Exception:
    """A clear error for an op that failed: mixed devices, a shape rule, or the op's own."""
    if isinstance(exc, ShapeError | CheckError):
        return exc  # already names the op and what was wrong (a check's is the same in every mode)
    devices = {x.device for x in inputs if isinstance(x, Value)}
    if len(devices) > 1:
        return ValueError(
            f"{op.name}: inputs are on different devices ({', '.join(map(str, devices))}); "
            "move them with .to(device) first"
        )
    avals = [x.aval for x in inputs]
    try:
        op.infer(*avals)
    except ShapeError as shape_exc:
        return shape_exc
    except NotImplementedError:
        pass
    shapes = ", ".join(fmt_shape(a.shape) if isinstance(a, Aval) else "tuple" for a in avals)
    return type(exc)(f"{op.name} on inputs of shapes {shapes}: {exc}")


_new_object = object.__new__  # (bound once: two lookups less per node made)


def make_from_op(op: Op, inputs: tuple) -> Any:
    """Apply ``op`` to input nodes: compute now (eager) or record a lazy node (no data yet).

    The node is a Tensor, or a TensorTuple for an op that ``returns_tuple``.
    """
    try:
        # one and two inputs unrolled (and compute called without a packed tuple below): most
        # ops, and this is the hot path of every eager op
        n_inputs = len(inputs)
        if n_inputs == 2:
            a, b = inputs
            data_a, data_b = a._data, b._data
            lazy = data_a is None or data_b is None
            requires_grad = a.requires_grad or b.requires_grad
            device = a.device
        elif n_inputs == 1:
            a = inputs[0]
            data_a = a._data
            lazy = data_a is None
            requires_grad = a.requires_grad
            device = a.device
        else:
            lazy = requires_grad = False
            device = inputs[0].device if inputs else cpu()
            arrays: list = []
            for x in inputs:
                data = x._data
                if data is None:
                    lazy = True
                if x.requires_grad:
                    requires_grad = True
                arrays.append(data)
    except AttributeError:
        bad = next(type(x).__name__ for x in inputs if not isinstance(x, Value))
        raise TypeError(f"{op.name}: expected Tensor inputs, got {bad}") from None
    # one lookup of this thread's state (grad mode, trace, recording): see core/context.py
    state = _get_state(None) or _thread_state()
    if requires_grad:
        requires_grad = state.grad_enabled and op.differentiable
    if op.out_device is not None:
        device = op.out_device
    if lazy or state.trace is not None:
        node: Any = _new_lazy_node(TensorTuple if op.returns_tuple else Tensor, op, inputs,
                                   requires_grad, device, op.infer(*[x.aval for x in inputs]))
        lazy_node_made(node, state)
        return node
    try:
        if state.profiler is not None:  # ndl.profile() is active in this thread: time, record
            data = state.profiler.run_op(op, (data_a, data_b) if n_inputs == 2 else
                                         (data_a,) if n_inputs == 1 else arrays)
        elif n_inputs == 2:
            data = op.compute(data_a, data_b)
        elif n_inputs == 1:
            data = op.compute(data_a)
        else:
            data = op.compute(*arrays)
    except Exception as exc:  # noqa: BLE001 - rewrapped with the op name and shapes
        raise _op_error(op, inputs, exc) from exc
    # the node's fields set here, not by a call: this is the hot path of every eager op
    if op.returns_tuple:  # (its items' Avals are made when first asked for: most are not)
        node = _new_object(TensorTuple)
    else:
        node = _new_object(Tensor)
        node.grad = None
    node._aval = None
    if requires_grad or state.recording:
        node.op = op
        node.inputs = inputs
    else:
        node.op = None
        node.inputs = ()
    node._data = data
    node.requires_grad = requires_grad
    node.device = device
    node.meta = None
    return node


registry._NODE_FACTORY.append(make_from_op)


class TensorTuple(Value):
    """A node whose value is a tuple of arrays (the output of ``split``); index it for Tensors."""

    __slots__ = ()

    def __len__(self) -> int:
        return len(self.aval)

    def __getitem__(self, index: int) -> Tensor:
        data = self._data  # (the item count without making the items' Avals)
        n = len(data) if data is not None else len(self._aval)
        if not -n <= index < n:
            raise IndexError(f"TensorTuple index {index} out of range for {n} items")
        return _ops.tuple_get_item(self, index % n)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def tuple(self) -> tuple:
        """The items as a Python tuple of Tensors."""
        return tuple(self)

    def detach(self) -> TensorTuple:
        data = self.realize_data()
        return new_leaf(TensorTuple, data, device=self.device,
                        aval=tuple(Aval(a.shape, a.dtype) for a in data))

    def numpy(self) -> builtins.tuple:  # (``tuple`` here is the method above)
        return tuple(self.device.to_numpy(a) for a in self.realize_data())

    def __repr__(self) -> str:
        return f"TensorTuple({', '.join(repr(t) for t in self)})"

    def __add__(self, other: TensorTuple) -> TensorTuple:
        return _ops.make_tuple(*[a + b for a, b in zip(self, other)])


if TYPE_CHECKING:
    # the method forms of ops (x.sum(), x.exp(), ...) that core/api.py installs below, declared
    # in the generated stub core/api.pyi; at run time Tensor's only base is Value
    from .core.api import TensorMethods

    class _TensorBase(Value, TensorMethods): ...
else:
    _TensorBase = Value


class Tensor(_TensorBase):
    """An n-dimensional array that records how it was made, so gradients can flow back.

    ``Tensor(data, device=None, dtype=None, requires_grad=True)``: ``data`` may be a list, a
    number, a NumPy/CuPy array, an NDArray or a Tensor; it is copied. Without ``dtype``
    (PyTorch's rules where the course and PyTorch differ):

    * NumPy arrays and NumPy scalars keep their dtype (``np.float64(0.5)`` stays float64),
      also inside lists (``[np.float64(1.0)]`` is float64);
    * Python floats, and lists of them, become float32; Python ints int64; bools bool;
    * integer and bool tensors never require a gradient (``requires_grad`` is ignored), so
      labels can be made with the default ``requires_grad=True``.

    >>> x = Tensor([[1.0, 2.0]], requires_grad=True)
    >>> (x * x).sum().backward()
    >>> x.grad.numpy()
    array([[2., 4.]], dtype=float32)
    """

    __slots__ = ("grad",)
    grad: Tensor | None
    # Make NumPy defer to our reflected operators (ndarray + Tensor -> Tensor.__radd__).
    __array_ufunc__ = None

    def __init__(self, data: Any, *, device: Device | None = None, dtype: Any = None,
                 requires_grad: bool = True) -> None:
        arr, device = _to_backend(data, device, dtype, copy=True)
        init_leaf(self, arr, device=device,
                  requires_grad=bool(requires_grad) and arr.dtype.kind in "fc")

    # -- construction helpers ----------------------------------------------------------------
    @classmethod
    def make_const(cls, data: Any, requires_grad: bool = False) -> Tensor:
        """A leaf Tensor holding a backend array as is (no copy, no dtype change)."""
        return new_leaf(cls, data, requires_grad=requires_grad)

    @classmethod
    def make_from_op(cls, op: Op, inputs: list) -> Any:
        """needle's constructor for op results."""
        return make_from_op(op, tuple(inputs))

    # -- data access -------------------------------------------------------------------------
    @property
    def shape(self) -> tuple:
        data = self._data
        return data.shape if data is not None else self._aval.shape

    @property
    def dtype(self) -> np.dtype:
        data = self._data
        return data.dtype if data is not None else self._aval.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def cached_data(self) -> Any:
        """The values as an NDArray view (writes go through to this tensor)."""
        return as_ndarray(self.realize_data())

    @cached_data.setter
    def cached_data(self, value: Any) -> None:
        self._data = _to_backend(value, self.device, None, copy=False)[0]

    def realize_cached_data(self) -> Any:
        return self.cached_data

    def numpy(self) -> np.ndarray:
        """The values as a NumPy array (shares memory on the CPU)."""
        return self.device.to_numpy(self.realize_data("numpy()"))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """``np.array(t)``, ``np.testing.assert_allclose(t, ...)`` see the values (a copy when
        a dtype conversion asks for one)."""
        values = self.numpy()
        return values if dtype is None else values.astype(dtype, copy=False)

    def item(self) -> Any:
        """The single value as a Python number."""
        data = self.realize_data("item()")
        if data.size != 1:
            raise ValueError(f"item(): tensor has {data.size} elements, shape {data.shape}; "
                             "only one-element tensors convert to a Python number")
        return data.item()

    def __bool__(self) -> bool:
        data = self.realize_data("bool()")
        if data.size != 1:
            raise ValueError(f"bool() of a tensor with {data.size} elements (shape "
                             f"{data.shape}) is ambiguous; use .any() or .all() on .numpy()")
        return bool(data)

    def __float__(self) -> float:
        return float(self.item())

    def __int__(self) -> int:
        return int(self.item())

    def __index__(self) -> int:
        if self.dtype.kind not in "iu":
            raise TypeError(f"only integer tensors can be used as an index, not {self.dtype}")
        return int(self.item())

    def __len__(self) -> int:
        shape = self.shape
        if not shape:
            raise TypeError("len() of a 0-d tensor")
        return shape[0]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def data(self) -> Tensor:
        """A detached Tensor sharing these values; assigning replaces the values in place."""
        return self.detach()

    @data.setter
    def data(self, value: Any) -> None:
        if isinstance(value, Value):
            self._data = value.realize_data()
        else:
            self._data = _to_backend(value, self.device, None, copy=False)[0]

    def detach(self) -> Tensor:
        """A new leaf Tensor with the same values and no graph (a stop_gradient node for a
        value that is not computed yet)."""
        if self._data is None:
            return _ops.stop_gradient(self)
        return new_leaf(Tensor, self._data, device=self.device)

    def to(self, device: Device) -> Tensor:
        """This tensor on ``device``: itself if it is there, else a copy that gradients flow
        back through (the ``to_device`` op), as PyTorch's ``.to``."""
        if device == self.device:
            return self
        return _ops.to_device(self, device)

    def astype(self, dtype: Any) -> Tensor:
        return _ops.astype(self, np.dtype(dtype))

    # -- autodiff ----------------------------------------------------------------------------
    def backward(self, out_grad: Tensor | None = None, *, create_graph: bool = True) -> None:
        """Set ``.grad`` on every leaf that requires a gradient and reaches this tensor.

        The seed is ones of this tensor's shape unless ``out_grad`` is given. Gradients are
        built with ops, so with ``create_graph=True`` (needle's behaviour) they can be
        differentiated again; ``create_graph=False`` records no graph for them.
        """
        if not self.requires_grad:
            raise RuntimeError(
                "backward(): this tensor does not require a gradient: none of its inputs has "
                "requires_grad=True, or it was made under no_grad()"
            )
        profiler = _thread_state().profiler
        if profiler is None:
            self._backward(out_grad, create_graph)
        else:  # the seed and the gradient ops nest in one "backward" region, backward phase
            profiler.call(self._backward, (out_grad, create_graph), "backward",
                          category="autograd", phase="backward", inputs=(self._data,))

    def _backward(self, out_grad: Tensor | None, create_graph: bool) -> None:
        if out_grad is None:  # (ones of this shape: no shape to check)
            out_grad = _ops.full_like(self, 1)
        else:
            if not isinstance(out_grad, Value):
                out_grad = Tensor(out_grad, device=self.device, dtype=self.dtype,
                                  requires_grad=False)
            if tuple(out_grad.shape) != tuple(self.shape):
                raise ShapeError(f"backward(): out_grad shape {fmt_shape(out_grad.shape)} "
                                 f"differs from the tensor's shape {fmt_shape(self.shape)}")
        # GradMode(create_graph and is_grad_enabled()), inlined: this runs once per step
        state = _thread_state()
        enclosing = state.grad_enabled
        state.grad_enabled = create_graph and enclosing
        try:
            _autodiff_backward(self, out_grad)
        finally:
            state.grad_enabled = enclosing

    # -- printing ----------------------------------------------------------------------------
    def __repr__(self) -> str:
        extra = f", device={self.device}" if self.device != cpu() else ""
        if self.requires_grad:
            extra += ", requires_grad=True"
        if self._data is None:
            if _thread_state().trace is not None:
                raise TracerConversionError("printing", user_source())
            what = self.op.name if self.op is not None else "placeholder"
            return f"Tensor(<{what}: no value yet>, shape={fmt_shape(self.shape)}, " \
                   f"dtype={self.dtype}{extra})"
        body = np.array2string(self.numpy(), separator=", ", prefix="Tensor(")
        return f"Tensor({body}, dtype={self.dtype}{extra})"

    def __str__(self) -> str:
        return str(self.numpy()) if self._data is not None else repr(self)

    def __format__(self, spec: str) -> str:
        if self._data is None:
            return repr(self)
        return format(self.numpy(), spec) if spec else str(self)

    # -- operators (the op each one builds is needle's) -------------------------------------
    # The Tensor-Tensor case is tested first: it is the hot path of every model.
    def _other(self, other: Any) -> Any:
        """A Tensor for non-scalar array operands; scalars stay Python numbers."""
        if isinstance(other, np.ndarray) and other.size != 1:
            return Tensor(other, device=self.device, requires_grad=False)
        return other

    def __add__(self, other: Any) -> Tensor:
        if isinstance(other, _Operand):
            return make_from_op(_EWISE_ADD, (self, other))
        other = self._other(other)
        if isinstance(other, _Operand):
            return _ops.add(self, other)
        return _ops.add_scalar(self, other)

    __radd__ = __add__

    def __sub__(self, other: Any) -> Tensor:
        if not isinstance(other, _Operand):
            other = self._other(other)
            if not isinstance(other, _Operand):
                return _ops.add_scalar(self, -other)
        return _ops.add(self, _ops.negate(other))

    def __rsub__(self, other: Any) -> Tensor:
        other = self._other(other)
        if isinstance(other, _Operand):
            return _ops.add(other, _ops.negate(self))
        return _ops.add_scalar(_ops.negate(self), other)

    def __mul__(self, other: Any) -> Tensor:
        if isinstance(other, _Operand):
            return make_from_op(_EWISE_MUL, (self, other))
        other = self._other(other)
        if isinstance(other, _Operand):
            return _ops.multiply(self, other)
        return _ops.mul_scalar(self, other)

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> Tensor:
        if isinstance(other, _Operand):
            return make_from_op(_EWISE_DIV, (self, other))
        other = self._other(other)
        if isinstance(other, _Operand):
            return _ops.divide(self, other)
        return _ops.divide_scalar(self, other)

    def __rtruediv__(self, other: Any) -> Tensor:
        other = self._other(other)
        if isinstance(other, _Operand):
            return _ops.divide(other, self)
        return _ops.mul_scalar(_ops.power_scalar(self, -1), other)

    def __pow__(self, other: Any) -> Tensor:
        other = self._other(other)
        if isinstance(other, _Operand):
            return _ops.power(self, other)
        return _ops.power_scalar(self, other)

    def __rpow__(self, other: Any) -> Tensor:
        # s ** x = exp(x * log(s)) for a positive scalar base
        return _ops.exp(_ops.mul_scalar(self, float(np.log(other))))

    def __matmul__(self, other: Tensor) -> Tensor:
        return _ops.matmul(self, self._other(other))

    def __rmatmul__(self, other: Any) -> Tensor:
        return _ops.matmul(self._other(other), self)

    def __neg__(self) -> Tensor:
        return _ops.negate(self)

    def _compare(self, other: Any, kind: str) -> Tensor:
        other = self._other(other)
        if isinstance(other, _Operand):
            return _ops.compare(self, other, kind)
        return _ops.compare_scalar(self, other, kind)

    def __lt__(self, other: Any) -> Tensor:
        return self._compare(other, "lt")

    def __le__(self, other: Any) -> Tensor:
        return self._compare(other, "le")

    def __gt__(self, other: Any) -> Tensor:
        return self._compare(other, "gt")

    def __ge__(self, other: Any) -> Tensor:
        return self._compare(other, "ge")

    # Tensor keeps identity equality and hashing: user code compares tuples of tensors by
    # identity, and graph passes use nodes as dict keys.
    __eq__ = object.__eq__
    __ne__ = object.__ne__
    __hash__ = object.__hash__

    def __getitem__(self, index: Any) -> Tensor:
        return _ops.getitem(self, index)

    def retain_grad(self) -> None:
        """Also keep ``.grad`` on this non-leaf tensor at the next backward."""
        self.meta = _with_retain(self.meta)


# An operand node of Tensor's operators: ops take Tensors, so the type checker reads the
# ``isinstance(other, Value)`` tests as Tensor tests (a TensorTuple operand fails in the op).
if TYPE_CHECKING:
    _Operand = Tensor
else:
    _Operand = Value


def _with_retain(meta: NodeMeta | None) -> NodeMeta:
    meta = meta or NodeMeta()
    meta.retain_grad = True
    return meta


def from_numpy(array: np.ndarray, requires_grad: bool = False) -> Tensor:
    """A leaf Tensor sharing memory with a NumPy array (no copy), like ``torch.from_numpy``."""
    return Tensor.make_const(np.asarray(array), requires_grad=requires_grad)


from .core import api as _ops  # noqa: E402 - the op API needs Tensor defined first
from .core.registry import get_op as _get_op  # noqa: E402

_ops.install_tensor_methods(Tensor)
# the operators' hot path applies these shared op instances directly (one call less per op)
_EWISE_ADD = _get_op("add").cls()
_EWISE_MUL = _get_op("multiply").cls()
_EWISE_DIV = _get_op("divide").cls()
__all__ += ["NDArray", "from_numpy", "init_leaf", "new_leaf", "recording"]

