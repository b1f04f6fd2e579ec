"""Turn nested checkpoint values into a JSON-able description plus flat arrays, and back.

A value becomes a node, a JSON object tagged by ``"type"``:

- ``none``; ``bool``, ``int`` (any size), ``str``: ``{"value": ...}``;
- ``float``: ``{"value": 0.5}``; NaN and infinities as the strings ``"nan"``, ``"inf"``,
  ``"-inf"`` (strict JSON has no such numbers);
- ``dict``: ``{"keys": [...], "values": [node, ...]}``, keys str or int, order kept;
- ``list`` and ``tuple``: ``{"items": [node, ...]}``;
- ``ndarray``, ``tensor``, ``numpy_scalar``: ``{"member", "dtype", "shape", "nbytes", "sha256"}``,
  the values stored in the zip member ``member``. A Tensor comes back as a NumPy array, a NumPy
  scalar as a NumPy scalar.

An object with a ``state_dict()`` method is stored as its state dict; its node records the class
name in ``"state_dict_of"``.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..autograd import Tensor
from .errors import CheckpointError

ARRAY_TYPES = ("ndarray", "tensor", "numpy_scalar")
#: How many containers deep a value may nest (saving refuses deeper values, loading deeper
#: metadata), so that reading a file never depends on, or exhausts, Python's recursion limit.
MAX_DEPTH = 100
_SCALAR_TYPES = {"bool": (bool,), "int": (int,), "str": (str,)}
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_UNSAFE_MEMBER_CHARS = re.compile(r"[^A-Za-z0-9_.\-]+")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ArrayEntry:
    """One array to store: its zip member name and its values."""

    member: str
    array: np.ndarray


def path_name(path: tuple) -> str:
    """A place in the tree as text: ``('model', 'fc.weight')`` -> ``model/fc.weight``."""
    return "/".join(str(part) for part in path) if path else "<root>"


def array_sha256(array: np.ndarray) -> str:
    """SHA-256 (hex) of the array's bytes in C order, the same whatever its memory layout."""
    flat = np.ascontiguousarray(array).reshape(-1)
    # (arrays have the buffer protocol; NumPy's stubs declare it from Python 3.12 on)
    return hashlib.sha256(flat.view(np.uint8)).hexdigest()  # type: ignore[arg-type]


def _member_segment(part: Any) -> str:
    # Readable but safe zip names: no '..' or empty segments that could escape a naive unzip.
    segment = _UNSAFE_MEMBER_CHARS.sub("_", str(part))
    return segment if segment not in ("", ".", "..") else "_" * max(1, len(segment))


def _float_to_json(value: float) -> float | str:
    if math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


class _Flattener:
    """Walks the values to save, collecting arrays and building the node tree."""

    def __init__(self) -> None:
        self.arrays: list[ArrayEntry] = []
        self._members: set[str] = set()
        self._active: set[int] = set()  # ids of containers on the current path, to catch cycles

    def node(self, value: Any, path: tuple) -> dict:
        if value is None:
            return {"type": "none"}
        # Before the Python scalars: np.float64 and np.str_ subclass float and str.
        if isinstance(value, np.generic):
            return self.array(np.asarray(value), path, "numpy_scalar")
        if isinstance(value, bool):
            return {"type": "bool", "value": value}
        if isinstance(value, int):
            return {"type": "int", "value": int(value)}
        if isinstance(value, float):
            return {"type": "float", "value": _float_to_json(float(value))}
        if isinstance(value, str):
            return {"type": "str", "value": str(value)}
        if isinstance(value, Tensor):
            return self.array(value.numpy(), path, "tensor")
        if isinstance(value, np.ndarray):
            return self.array(value, path, "ndarray")
        if isinstance(value, (Mapping, list, tuple)):
            return self.container(value, path)
        if callable(getattr(value, "state_dict", None)):
            return self.container(value, path)
        raise TypeError(
            f"save: '{path_name(path)}' has type {type(value).__qualname__}, which a checkpoint "
            "cannot store; store NumPy arrays, Tensors, int/float/bool/str/None, dicts, lists, "
            "tuples, or objects with a state_dict() method")

    def container(self, value: Any, path: tuple) -> dict:
        if id(value) in self._active:
            raise ValueError(f"save: '{path_name(path)}' contains itself (a reference cycle)")
        if len(path) > MAX_DEPTH:
            raise ValueError(f"save: '{path_name(path[:3])}/...' nests containers more than "
                             f"{MAX_DEPTH} levels deep, more than a checkpoint may hold")
        self._active.add(id(value))
        try:
            if isinstance(value, Mapping):
                return self.mapping(value, path)
            if isinstance(value, (list, tuple)):
                kind = "tuple" if isinstance(value, tuple) else "list"
                items = [self.node(item, (*path, i)) for i, item in enumerate(value)]
                return {"type": kind, "items": items}
            node = self.node(value.state_dict(), path)
            node["state_dict_of"] = type(value).__qualname__
            return node
        finally:
            self._active.discard(id(value))

    def mapping(self, value: Mapping, path: tuple) -> dict:
        keys, values = [], []
        for key, item in value.items():
            # JSON keeps str and int apart; bool would come back as a JSON true, so refuse it.
            if isinstance(key, (bool, np.bool_)) or not isinstance(key, (str, int, np.integer)):
                raise TypeError(f"save: '{path_name(path)}' has a key {key!r} of type "
                                f"{type(key).__qualname__}; checkpoint dict keys are str or int")
            key = str(key) if isinstance(key, str) else int(key)
            keys.append(key)
            values.append(self.node(item, (*path, key)))
        return {"type": "dict", "keys": keys, "values": values}

    def array(self, array: np.ndarray, path: tuple, kind: str) -> dict:
        if array.dtype.hasobject:
            raise TypeError(f"save: '{path_name(path)}' is an array of dtype {array.dtype}; object "
                            "arrays need pickle, which checkpoints never contain")
        base = "/".join(_member_segment(part) for part in path)
        member, count = f"{base}.npy", 1
        while member in self._members:  # sanitizing can map two names onto one
            count += 1
            member = f"{base}~{count}.npy"
        self._members.add(member)
        self.arrays.append(ArrayEntry(member, array))
        return {"type": kind, "member": member, "dtype": array.dtype.str,
                "shape": [int(n) for n in array.shape], "nbytes": int(array.nbytes),
                "sha256": array_sha256(array)}


def flatten(items: Mapping[str, Any]) -> tuple[dict, list[ArrayEntry]]:
    """The node tree of ``items`` (a dict node) and the arrays it refers to, in order."""
    flattener = _Flattener()
    root = flattener.node(dict(items), ())
    return root, flattener.arrays


def _corrupt(source: str, path: tuple, what: str) -> CheckpointError:
    return CheckpointError(f"{source}: corrupted metadata at '{path_name(path)}': {what}")


def _check_array_node(node: dict, path: tuple, source: str) -> None:
    shape = node.get("shape")
    if not (isinstance(node.get("member"), str) and isinstance(node.get("dtype"), str)
            and isinstance(shape, list)
            and all(type(n) is int and n >= 0 for n in shape)
            and type(node.get("nbytes")) is int and node["nbytes"] >= 0
            and isinstance(node.get("sha256"), str) and _SHA256_HEX.fullmatch(node["sha256"])):
        raise _corrupt(source, path,
                       "array entry lacks a valid member, dtype, shape, nbytes or sha256")


def unflatten(node: Any, load_array: Callable[[dict, tuple], Any], source: str,
              path: tuple = ()) -> Any:
    """Rebuild the value a node tree describes; ``load_array(node, path)`` supplies each array.

    ``source`` names the file in error messages. The tree is untrusted input: every node is
    checked and anything unexpected raises :class:`CheckpointError`.
    """
    if not isinstance(node, dict):
        raise _corrupt(source, path, f"expected an object, found {type(node).__name__}")
    kind = node.get("type")
    if kind in ("dict", "list", "tuple") and len(path) > MAX_DEPTH:
        raise CheckpointError(f"{source}: corrupted metadata: nested too deeply (more than "
                              f"{MAX_DEPTH} levels, at '{path_name(path[:3])}/...')")
    if kind == "none":
        return None
    if kind in _SCALAR_TYPES:
        value = node.get("value")
        # bool is an int in Python; an "int" node holding true is corrupt.
        is_bool_as_int = kind == "int" and isinstance(value, bool)
        if not isinstance(value, _SCALAR_TYPES[kind]) or is_bool_as_int:
            raise _corrupt(source, path, f"{kind} entry holds {value!r}")
        return value
    if kind == "float":
        value = node.get("value")
        if isinstance(value, str) and value in _NON_FINITE:
            return _NON_FINITE[value]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _corrupt(source, path, f"float entry holds {value!r}")
        return float(value)
    if kind in ARRAY_TYPES:
        _check_array_node(node, path, source)
        return load_array(node, path)
    if kind == "dict":
        keys, values = node.get("keys"), node.get("values")
        if not (isinstance(keys, list) and isinstance(values, list) and len(keys) == len(values)):
            raise _corrupt(source, path, "dict entry needs equally long 'keys' and 'values' lists")
        out: dict = {}
        for key, value in zip(keys, values):
            if isinstance(key, bool) or not isinstance(key, (str, int)) or key in out:
                raise _corrupt(source, path, f"bad or repeated dict key {key!r}")
            out[key] = unflatten(value, load_array, source, (*path, key))
        return out
    if kind in ("list", "tuple"):
        items = node.get("items")
        if not isinstance(items, list):
            raise _corrupt(source, path, f"{kind} entry needs an 'items' list")
        values = [unflatten(item, load_array, source, (*path, i)) for i, item in enumerate(items)]
        return tuple(values) if kind == "tuple" else values
    raise _corrupt(source, path, f"unknown entry type {kind!r}")


def array_nodes(root: dict, source: str) -> Iterator[tuple[tuple, dict]]:
    """The ``(path, node)`` of every array in a node tree, in storage order (validating it)."""
    found: list[tuple[tuple, dict]] = []
    unflatten(root, lambda node, path: found.append((path, node)), source)
    return iter(found)
