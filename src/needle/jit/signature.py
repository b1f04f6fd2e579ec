"""Call signatures of jitted functions: what must match for a compiled plan to be replayed.

A signature is a tuple of (path, description) pairs, one per argument leaf: tensors and
NumPy arrays by shape, dtype, device and requires_grad (their values are read at every call);
Python scalars and strings by exact value (NaN equals NaN); containers by type and length;
any other object by identity, kept alive by the cache entry so that its ``id`` can never be
another object's. Comparing two signatures names the first guard that failed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..autograd import Tensor

_SCALARS = (bool, int, float, str, bytes, type(None))


def static_key(value: Any) -> tuple:
    """A hashable guard for a static argument's value (tensors by their values)."""
    if isinstance(value, Tensor):
        data = value.numpy()
        return ("static tensor", data.shape, data.dtype.str, data.tobytes())
    return ("static", type(value).__name__, _scalar_key(value))


def _scalar_key(value: Any) -> Any:
    """A Python scalar as a guard: floats by their exact bits (NaN equals NaN; -0.0 is not
    0.0), everything else as it is."""
    return value.hex() if type(value) is float else value


def flatten(value: Any, path: str, leaves: list, sig: list,
            static_ids: set[int] | frozenset = frozenset(), keep: list | None = None) -> Any:
    """Walk ``value``: collect tensors into ``leaves`` and guards into ``sig``.

    Returns a template of the same structure with tensors replaced by their leaf index, so
    :func:`rebuild` can put traced or concrete tensors back in place. NumPy arrays become
    constant Tensors sharing their memory (leaves too, so each call's values are used).
    Objects guarded by identity are appended to ``keep``: whoever keeps the signature must
    keep them alive. Values whose ids are in ``static_ids`` stay as they are (their values
    are guarded elsewhere).
    """
    if static_ids and id(value) in static_ids:
        return value
    if isinstance(value, Tensor | np.ndarray):
        if not isinstance(value, Tensor):
            value = Tensor.make_const(value if type(value) is np.ndarray
                                      else value.view(np.ndarray))
        sig.append((path, ("tensor", value.shape, value.dtype.str, value.device.name,
                           value.requires_grad)))
        leaves.append(value)
        return _Leaf(len(leaves) - 1)
    if isinstance(value, _SCALARS):
        sig.append((path, ("value", type(value).__name__, _scalar_key(value))))
        return value
    if isinstance(value, list | tuple):
        sig.append((path, (type(value).__name__, len(value))))
        items = [flatten(v, f"{path}[{i}]", leaves, sig, static_ids, keep)
                 for i, v in enumerate(value)]
        if isinstance(value, list):
            return items
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, dict):
        sig.append((path, ("dict", tuple(value))))
        return {k: flatten(v, f"{path}[{k!r}]", leaves, sig, static_ids, keep)
                for k, v in value.items()}
    # any other object (a module, a function): guarded by identity, kept alive by the entry
    sig.append((path, ("object", type(value).__name__, id(value))))
    if keep is not None:
        keep.append(value)
    return value


_ARG_PATHS = [f"call[0][{i}]" for i in range(16)]
_ARG_TEMPLATES: dict[int, tuple] = {}


def flatten_tensor_args(args: tuple, leaves: list, sig: list) -> Any:
    """``flatten((args, {}), "call", leaves, sig)`` for the common call of tensors only, in a
    fraction of its time (a jitted step is called thousands of times); None (and nothing
    appended) when an argument is anything else. The result is exactly flatten's."""
    n = len(args)
    if n > len(_ARG_PATHS):
        return None
    for a in args:
        if not isinstance(a, Tensor):
            return None
    sig.append(("call", ("tuple", 2)))
    sig.append(("call[0]", ("tuple", n)))
    for path, a in zip(_ARG_PATHS, args):
        sig.append((path, ("tensor", a.shape, a.dtype.str, a.device.name, a.requires_grad)))
    sig.append(("call[1]", ("dict", ())))
    leaves.extend(args)
    template = _ARG_TEMPLATES.get(n)
    if template is None:
        template = _ARG_TEMPLATES[n] = (tuple(_Leaf(i) for i in range(n)), {})
    return template


class _Leaf:
    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


def rebuild(template: Any, leaves: list) -> Any:
    """The template with leaf markers replaced by ``leaves[index]``."""
    if isinstance(template, _Leaf):
        return leaves[template.index]
    if isinstance(template, list):
        return [rebuild(v, leaves) for v in template]
    if isinstance(template, tuple):
        items = [rebuild(v, leaves) for v in template]
        return type(template)(*items) if hasattr(template, "_fields") else tuple(items)
    if isinstance(template, dict):
        return {k: rebuild(v, leaves) for k, v in template.items()}
    return template


def describe_difference(old: tuple, new: tuple) -> str:
    """Which guard failed between two signatures, in words."""
    old_map, new_map = dict(old), dict(new)
    for path, desc in new:
        before = old_map.get(path)
        if before is None:
            return f"{path}: new argument"
        if before != desc:
            return f"{path}: {_describe(before, desc)}"
    for path in old_map:
        if path not in new_map:
            return f"{path}: argument no longer passed"
    return "no difference in arguments"


def _shown(desc: tuple) -> Any:
    return float.fromhex(desc[2]) if desc[1] == "float" else desc[2]


def _describe(before: tuple, after: tuple) -> str:
    if before[0] == after[0] == "tensor":
        names = ("shape", "dtype", "device", "requires_grad")
        for name, a, b in zip(names, before[1:], after[1:]):
            if a != b:
                return f"tensor {name} changed from {a} to {b}"
    if before[0] == after[0] == "value":
        return f"Python value changed from {_shown(before)!r} to {_shown(after)!r}"
    if before[0] == after[0] and before[0] in ("list", "tuple"):
        return f"{before[0]} length changed from {before[1]} to {after[1]}"
    return f"changed from {before} to {after}"
