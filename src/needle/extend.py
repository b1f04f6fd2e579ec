"""Extending needle from outside the package: ``ndl.register_op`` for a user-defined op.

An op registered here is a full member of the registry: it gets ``ndl.ops.<name>``,
``ndl.<name>``, its Tensor methods, and works in eager mode, in a Session, under ``ndl.jit``
and as a Caffe ``OpLayer``, with no further code (the front-ends only ever see ``Op``s).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from . import autograd, ops
from .core import api, registry


def register_op(name: str, inputs: tuple[str, ...] = ("a",), methods: tuple[str, ...] = (),
                tuple_input: bool = False) -> Callable[[type], type]:
    """Class decorator registering a user-defined op (a subclass of ``ndl.ops.Op``).

    ``inputs`` names the array arguments of the generated ``ndl.ops.<name>`` function; the
    class's ``__init__`` parameters become its attributes. ``methods`` are Tensor methods
    to add (an existing method is never replaced). See ``docs/adding_an_op.md``.
    """
    register = registry.register(name, inputs, methods, tuple_input)

    def decorate(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, registry.Op)):
            raise TypeError(f"register_op({name!r}): decorate a subclass of needle.ops.Op, "
                            f"got {cls!r}")
        clashes = [m for m in methods if hasattr(autograd.Tensor, m)]
        if clashes:
            raise ValueError(f"register_op({name!r}): Tensor already has the methods "
                             f"{clashes}; choose other names")
        register(cls)
        fn = getattr(registry.F, name)
        for namespace in (api, ops, sys.modules["needle"]):
            setattr(namespace, name, fn)
        setattr(ops, cls.__name__, cls)
        api.OP_FUNCTIONS.append(name)
        ops.__all__ += [name, cls.__name__]
        api.install_tensor_methods(autograd.Tensor)
        return cls

    return decorate


__all__ = ["register_op"]
