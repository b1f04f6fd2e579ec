"""The op functions (``add(a, b)``, ``summation(a, axes=None)``, ...), generated from the registry.

Each function takes the op's array inputs first and its attributes after them, builds the op
and applies it. Ops without attributes share one instance, so a call costs one node.
"""

from __future__ import annotations

import importlib
import os
import pkgutil

from .registry import REGISTRY, F

_CORE_DIR = os.path.dirname(os.path.abspath(__file__))


def install_tensor_methods(tensor_cls: type) -> None:
    """Give Tensor the method forms the registry asks for (``x.sum()``, ``x.exp()``, ...)."""
    for record in REGISTRY.values():
        for method in record.methods:
            if method not in vars(tensor_cls):
                setattr(tensor_cls, method, getattr(F, record.name))


def _load() -> list[str]:
    """Import every ``core/ops_*.py`` (each registers its ops) and bind their functions here."""
    for module in sorted(pkgutil.iter_modules([_CORE_DIR]), key=lambda m: m.name):
        if module.name.startswith("ops_"):
            importlib.import_module(f"{__package__}.{module.name}")
    names = []
    for name, record in REGISTRY.items():
        if not record.internal:  # internal node kinds are made by their front-ends
            globals()[name] = getattr(F, name)
            names.append(name)
    return names


OP_FUNCTIONS = _load()
__all__ = [*OP_FUNCTIONS, "install_tensor_methods"]
