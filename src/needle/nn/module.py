"""nn.Module and Parameter: composition, parameter discovery, train/eval, state dicts."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np

from ..autograd import Tensor
from ..backend.ndarray import lossless_astype
from ..core.context import module_called


class Parameter(Tensor):
    """A Tensor that a Module owns and an optimizer updates (always requires a gradient)."""

    __slots__ = ()

    def __init__(self, data: Any, *, device: Any = None, dtype: Any = None,
                 requires_grad: bool = True) -> None:
        super().__init__(data, device=device, dtype=dtype, requires_grad=requires_grad)


class Buffer(Tensor):
    """A Tensor a Module keeps as state but does not train (BatchNorm's running statistics)."""

    __slots__ = ()

    def __init__(self, data: Any, *, device: Any = None, dtype: Any = None) -> None:
        super().__init__(data, device=device, dtype=dtype, requires_grad=False)


#: Parameter or Buffer: what ``Module._ordered`` collects
_TensorKind = TypeVar("_TensorKind", bound=Tensor)


def _walk(value: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """(dotted name, object) for every Tensor or Module inside attributes, lists, tuples, dicts."""
    if isinstance(value, Tensor | Module):
        yield prefix, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _walk(item, f"{prefix}.{i}" if prefix else str(i))


class Module:
    """Base of every layer: tensor in, tensor out.

    Subclasses set Parameters, Buffers and child Modules as attributes in ``__init__`` and
    define ``forward``. Parameters are found by walking attributes in insertion order
    (also inside lists, tuples and dicts), so no registration calls are needed.
    """

    #: how layers below nn (the JIT's guards) recognise a module without importing nn
    __needle_module__ = True

    def __init__(self) -> None:
        self.training = True

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module_called(self)  # a JIT trace in progress guards on the modules it calls
        return self.forward(*args, **kwargs)

    # -- discovery -----------------------------------------------------------------------------
    def _members(self) -> Iterator[tuple[str, Any]]:
        """Direct (name, Tensor or Module) members, in attribute order."""
        for name, value in vars(self).items():
            yield from _walk(value, name)

    def named_children(self) -> Iterator[tuple[str, Module]]:
        for name, value in self._members():
            if isinstance(value, Module):
                yield name, value

    def children(self) -> list[Module]:
        return [m for _, m in self.named_children()]

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """This module and every descendant, depth first, with dotted names."""
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self) -> list[Module]:
        return [m for _, m in self.named_modules()]

    def named_parameters(self) -> Iterator[tuple[str, Parameter]]:
        """(dotted name, Parameter) pairs, each shared Parameter once."""
        yield from self._ordered(Parameter)

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def named_buffers(self) -> Iterator[tuple[str, Buffer]]:
        yield from self._ordered(Buffer)

    def buffers(self) -> list[Buffer]:
        return [b for _, b in self.named_buffers()]

    def _ordered(self, kind: type[_TensorKind]) -> Iterator[tuple[str, _TensorKind]]:
        """Tensors of ``kind`` in attribute order, children in place (depth first)."""
        seen: set[int] = set()

        def visit(module: Module, base: str) -> Iterator[tuple[str, _TensorKind]]:
            for name, value in module._members():
                full = f"{base}.{name}" if base else name
                if isinstance(value, Module):
                    yield from visit(value, full)
                elif isinstance(value, kind) and id(value) not in seen:
                    seen.add(id(value))
                    yield full, value

        yield from visit(self, "")

    # -- modes -----------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> Module:
        """Set training mode on this module and every descendant."""
        # named_modules, not modules(): Sequential keeps needle's `.modules` tuple attribute
        for _, module in self.named_modules():
            module.training = mode
        return self

    def eval(self) -> Module:
        return self.train(False)

    def to(self, device: Any) -> Module:
        """Move every parameter and buffer to ``device``, in place (the Tensor objects stay, so
        references to them remain valid). Create optimizers after moving, as in PyTorch."""
        for _, tensor in [*self.named_parameters(), *self.named_buffers()]:
            if tensor.device != device:
                host = tensor.device.to_numpy(tensor.realize_data())
                tensor._data = device.array(host)
                tensor.device = device
        return self

    def apply(self, fn: Callable[[Module], None]) -> Module:
        """Call ``fn`` on every descendant, then on this module (as PyTorch)."""
        for child in self.children():
            child.apply(fn)
        fn(self)
        return self

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> OrderedDict[str, np.ndarray]:
        """Parameters then buffers as dotted name -> NumPy array (copies)."""
        state: OrderedDict[str, np.ndarray] = OrderedDict()
        for name, tensor in [*self.named_parameters(), *self.named_buffers()]:
            state[name] = np.array(tensor.numpy(), copy=True)
        return state

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Copy values into parameters and buffers, in place.

        With ``strict``, missing or unexpected keys raise a KeyError naming all of them; a
        shape mismatch always raises a ValueError naming every offending key with both shapes,
        and so do values that the parameter's dtype cannot hold (1e300 for float32, 2.5 for
        an integer buffer). Nothing changes when it raises.
        """
        own = OrderedDict([*self.named_parameters(), *self.named_buffers()])
        values = {k: (v.numpy() if isinstance(v, Tensor) else np.asarray(v))
                  for k, v in state.items()}
        problems = [f"{k}: checkpoint {tuple(values[k].shape)} vs model {tuple(t.shape)}"
                    for k, t in own.items()
                    if k in values and tuple(values[k].shape) != tuple(t.shape)]
        if problems:
            raise ValueError(f"load_state_dict({type(self).__name__}): shape mismatch for "
                             + "; ".join(problems))
        missing = [k for k in own if k not in values]
        unexpected = [k for k in values if k not in own]
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict({type(self).__name__}): missing keys {missing}, "
                           f"unexpected keys {unexpected}")
        converted, lossy = {}, []
        for key, tensor in own.items():
            if key not in values:
                continue
            try:  # 1e300 into float32, 2.5 into int64: refused, naming the key
                array = lossless_astype(values[key], tensor.dtype, repr(key))
            except ValueError as exc:
                lossy.append(str(exc))
                continue
            # a value of the right dtype comes back uncopied (it may be a user's array)
            converted[key] = array.copy() if values[key].dtype == tensor.dtype else array
        if lossy:  # checked before anything changes
            raise ValueError(f"load_state_dict({type(self).__name__}): " + "; ".join(lossy))
        for key, array in converted.items():
            own[key].data = array

    # -- printing --------------------------------------------------------------------------------
    def extra_repr(self) -> str:
        """Shapes of this module's own parameters, shown by ``repr``."""
        own = [f"{name}={tuple(value.shape)}" for name, value in self._members()
               if isinstance(value, Parameter)]
        return ", ".join(own)

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        children = list(self.named_children())
        if not children:
            return lines[0] + ")"
        for name, child in children:
            body = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        return "\n".join(lines) + "\n)"


__all__ = ["Buffer", "Module", "Parameter"]
