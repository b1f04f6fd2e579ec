"""Op attributes as JSON data and back: what a program file may hold, and nothing that runs.

An attribute is a number (a NumPy scalar keeps its dtype), a string, None, a dtype, a slice,
``...``, an array (stored beside the graph, by name), a tuple or list of those, or
``k * batch`` in a program exported with a dynamic batch size. Anything else cannot be
written down as data, and the op holding it is named in the error.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


class ProgramError(ValueError):
    """A program cannot be saved or loaded as given; the message lists every problem."""


class Batch:
    """``k`` times the batch size, in an attribute of a program with a dynamic batch."""

    __slots__ = ("k",)

    def __init__(self, k: int) -> None:
        self.k = k

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Batch) and other.k == self.k

    def __hash__(self) -> int:
        return hash(("batch", self.k))

    def __repr__(self) -> str:
        return "batch" if self.k == 1 else f"{self.k}*batch"


class Unencodable(Exception):
    """An attribute value with no data form (an object, a function)."""


def encode(value: Any, arrays: dict[str, np.ndarray], name: str) -> Any:
    """``value`` as JSON data; arrays go into ``arrays`` under names made from ``name``."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, np.number) and not isinstance(value, np.bool_):
        # a NumPy scalar keeps its type: float32 * np.float64 rounds differently from
        # float32 * a Python float (NEP 50), so a loaded op must see the same kind of scalar
        number = value.item()
        if isinstance(number, float) and not math.isfinite(number):
            number = repr(number)
        return {"scalar": [np.dtype(type(value)).name, number]}
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, float):
        value = float(value)
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, Batch):
        return {"batch": value.k}
    if isinstance(value, np.dtype) or (isinstance(value, type) and issubclass(value, np.generic)):
        return {"dtype": np.dtype(value).name}
    if isinstance(value, slice):
        return {"slice": [encode(v, arrays, name) for v in (value.start, value.stop, value.step)]}
    if value is Ellipsis:
        return {"ellipsis": True}
    if isinstance(value, np.ndarray):
        key = f"{name}.{len(arrays)}"
        arrays[key] = value
        return {"array": key}
    if isinstance(value, tuple | list):
        kind = "tuple" if isinstance(value, tuple) else "list"
        return {kind: [encode(v, arrays, name) for v in value]}
    if hasattr(value, "name") and type(value).__name__.endswith("Device"):
        return {"device": value.name}
    raise Unencodable(type(value).__name__)


def decode(data: Any, arrays: dict[str, np.ndarray], batch: int | None) -> Any:
    """The attribute ``encode`` wrote, ``k * batch`` resolved (None where the batch size is
    not known: a declared graph's placeholder, a printout)."""
    if data is None or isinstance(data, bool | int | float | str):
        return data
    if isinstance(data, list):
        raise ProgramError(f"malformed attribute {data!r}: a bare list")
    if not isinstance(data, dict) or len(data) != 1:
        raise ProgramError(f"malformed attribute {data!r}")
    (kind, body), = data.items()
    if kind == "float":
        return float(body)
    if kind == "scalar":
        return _scalar(data, body)
    if kind == "batch":
        return None if batch is None else int(body) * batch
    if kind == "dtype":
        return np.dtype(body)
    if kind == "slice":
        return slice(*(decode(v, arrays, batch) for v in body))
    if kind == "ellipsis":
        return Ellipsis
    if kind == "array":
        if body not in arrays:
            raise ProgramError(f"the array {body!r} an attribute names is not in the file")
        return arrays[body]
    if kind in ("tuple", "list"):
        items = [decode(v, arrays, batch) for v in body]
        return tuple(items) if kind == "tuple" else items
    if kind == "device":
        from ..backend import cpu, cuda

        return cuda() if body == "cuda" else cpu()
    raise ProgramError(f"unknown attribute kind {kind!r}")


def _scalar(data: Any, body: Any) -> np.number:
    """The NumPy scalar ``{"scalar": [dtype name, value]}`` describes."""
    try:
        dtype = np.dtype(body[0]) if isinstance(body, list) and len(body) == 2 else None
    except TypeError:
        dtype = None
    value = body[1] if dtype is not None else None
    if dtype is None or dtype.kind not in "iuf" or isinstance(value, bool) \
            or not isinstance(value, int | float | str):
        raise ProgramError(f"malformed scalar attribute {data!r}")
    try:
        return dtype.type(float(value) if isinstance(value, str) else value)
    except (ValueError, OverflowError) as exc:
        raise ProgramError(f"malformed scalar attribute {data!r}: {exc}") from None


def check_format(spec: Any, fmt: str, version: int, what: str) -> None:
    """Refuse a spec that is not ``fmt`` (``what`` names it: "program", "graph") or was
    written by a newer needle than this one reads."""
    if not isinstance(spec, dict) or spec.get("format") != fmt:
        raise ProgramError(f"not a needle {what} (no {fmt!r} format marker)")
    found = spec.get("version")
    if not isinstance(found, int) or found > version:
        raise ProgramError(f"{what} format version {found!r} is newer than this needle "
                           f"reads ({version}): upgrade needle")


def has_batch(data: Any) -> bool:
    """Whether an encoded attribute depends on the batch size."""
    if isinstance(data, dict):
        return "batch" in data or any(has_batch(v) for v in data.values())
    if isinstance(data, list):
        return any(has_batch(v) for v in data)
    return False


__all__ = ["Batch", "ProgramError", "Unencodable", "check_format", "decode", "encode",
           "has_batch"]
