"""The printable IR: a Program as text, one line per step, in the style of a jaxpr.

::

    { lambda w:f32[3,4] ; x:f32[?,3] . let
        a:f32[?,4] = matmul x w
        b:f32[?,4] = relu a
        c:f32[] = summation[axes=None] b
      in (c) }

Before ``;``: sources whose values the caller does not feed (parameters, Variables, other
leaves with data); after it: fed inputs (placeholders, a jitted function's arguments).
Constants folded into the program print as ``c0``, ``c1``, ... Each step names its output with
shape (``?`` for a dimension known only at run time) and dtype, then the op, its attributes
in brackets, and its inputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_SHORT_DTYPES = {"float16": "f16", "float32": "f32", "float64": "f64", "int8": "i8",
                 "int16": "i16", "int32": "i32", "int64": "i64", "uint8": "u8", "bool": "bool",
                 "complex64": "c64", "complex128": "c128"}


def _type_text(aval: Any) -> str:
    """``f32[?,3]`` for an Aval; ``(f32[2], f32[3])`` for a tuple of them."""
    if isinstance(aval, tuple) and aval and not hasattr(aval, "shape"):
        return "(" + ", ".join(_type_text(a) for a in aval) + ")"
    if not hasattr(aval, "shape"):
        return "?"
    dtype = np.dtype(aval.dtype).name
    dims = ",".join("?" if d is None else str(d) for d in aval.shape)
    return f"{_SHORT_DTYPES.get(dtype, dtype)}[{dims}]"


def _value_text(value: Any) -> str:
    """An attribute value, short: numbers and tuples as written, objects by their kind."""
    if value is None or isinstance(value, bool | int | float | str | np.generic):
        return repr(value.item() if isinstance(value, np.generic) else value)
    if isinstance(value, tuple):
        inner = ",".join(_value_text(v) for v in value)
        return f"({inner})"
    if isinstance(value, np.dtype):
        return value.name
    return f"<{type(value).__name__}>"


class _Typed:
    """Shape and dtype of a constant's array, as an Aval offers them."""

    def __init__(self, shape: tuple, dtype: Any) -> None:
        self.shape = shape
        self.dtype = dtype


def _step_name(index: int) -> str:
    """a, b, ..., z, ba, bb, ... (as jaxprs name their variables)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    name = letters[index % 26]
    index //= 26
    while index:
        name = letters[index % 26] + name
        index //= 26
    return name


def program_text(program: Any) -> str:
    """The Program as jaxpr-style text (see the module docstring)."""
    names: dict[int, str] = {}
    used: set[str] = set()

    def unique(name: str) -> str:
        base, i = name, 1
        while name in used:
            name = f"{base}_{i}"
            i += 1
        used.add(name)
        return name

    read = {slot for step in program.steps for slot in step.inputs} | set(program.outputs)
    fixed: list[str] = []
    fed: list[str] = []
    for i, node in enumerate(program.sources):
        if id(node) not in read or id(node) in program.constants:
            continue  # pruned away, or its value is a constant of the program
        meta = node.meta
        label = meta.name if meta is not None and meta.name else f"s{i}"
        names[id(node)] = unique(label.replace(" ", "_"))
        text = f"{names[id(node)]}:{_type_text(node.aval)}"
        (fixed if node._data is not None else fed).append(text)
    for i, (slot, value) in enumerate(program.constants.items()):
        names[slot] = unique(f"c{i}")
        if hasattr(value, "shape"):
            fixed.append(f"{names[slot]}:{_type_text(_Typed(value.shape, value.dtype))}")
    step_index = 0
    lines = []
    for step in program.steps:
        name = _step_name(step_index)
        while name in used:
            step_index += 1
            name = _step_name(step_index)
        step_index += 1
        names[step.out] = unique(name)
        attrs = ", ".join(f"{k}={_value_text(v)}" for k, v in step.op.attrs())
        op = f"{step.op.name}[{attrs}]" if attrs else step.op.name
        args = " ".join(names.get(slot, "?") for slot in step.inputs)
        lines.append(f"    {names[step.out]}:{_type_text(step.node.aval)} = {op}"
                     + (f" {args}" if args else ""))
    outputs = ", ".join(names.get(slot, "?") for slot in program.outputs)
    head = f"{{ lambda {' '.join(fixed)} ; {' '.join(fed)} . let"
    return "\n".join([head, *lines, f"  in ({outputs}) }}"])


__all__ = ["program_text"]
