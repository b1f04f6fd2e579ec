"""The op functions (``add(a, b)``, ``summation(a, axes=None)``, ...), generated from the registry.

Each function takes the op's array inputs first and its attributes after them, builds the op
and applies it. Ops without attributes share one instance, so a call costs one node.
"""

from __future__ import annotations

import inspect
from typing import Any

from . import registry
from .registry import REGISTRY, OpRecord


def _function_source(record: OpRecord) -> tuple[str, dict]:
    """Python source of the op function for ``record`` and the names it refers to."""
    cls = record.cls
    namespace: dict[str, Any] = {"_cls": cls, "_factory": registry._NODE_FACTORY}
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
    namespace["make_tuple"] = lambda *args: globals()["make_tuple"](*args)
    exec(compile(source, f"<needle op {record.name}>", "exec"), namespace)  # noqa: S102
    fn = namespace[record.name]
    fn.__doc__ = record.doc
    fn.__module__ = "needle.ops"
    fn.__qualname__ = record.name
    return fn


def install_tensor_methods(tensor_cls: type) -> None:
    """Give Tensor the method forms the registry asks for (``x.sum()``, ``x.exp()``, ...)."""
    for record in REGISTRY.values():
        for method in record.methods:
            if method not in vars(tensor_cls):
                setattr(tensor_cls, method, globals()[record.name])


def _load() -> list[str]:
    from . import (  # noqa: F401
        ops_check,
        ops_conv,
        ops_elementwise,
        ops_linalg,
        ops_norm,
        ops_random,
        ops_reduce,
        ops_shape,
        ops_state,
    )

    names = []
    for name, record in REGISTRY.items():
        globals()[name] = _generate(record)
        names.append(name)
    return names


OP_FUNCTIONS = _load()
__all__ = [*OP_FUNCTIONS, "install_tensor_methods"]
