"""needle's op functions and op classes, all generated from the one registry in ``needle.core``."""

from typing import TYPE_CHECKING

from ..core import api as _api
from ..core.api import *  # the op functions: add, multiply, summation, matmul, ...
from ..core.registry import REGISTRY, CheckError, Op, ShapeError
from ..core.registry import Op as TensorOp  # needle's base-class name

if TYPE_CHECKING:
    # type checkers cannot evaluate the __all__ below: they take the op function names from
    # core/api.pyi's __all__ (so `from .ops import *` gives them needle.add, needle.exp, ...)
    from ..core.api import __all__ as __all__

    __all__.remove("install_tensor_methods")

# needle's op class names (EWiseAdd, AddScalar, ...) come from the registry too (core/api.pyi
# declares the package's own for type checkers)
for _record in REGISTRY.values():
    globals()[_record.cls.__name__] = _record.cls


def zeros_like(a, dtype=None):
    """Zeros of a's shape (a's dtype unless given)."""
    return _api.full_like(a, 0, dtype)


def ones_like(a, dtype=None):
    """Ones of a's shape (a's dtype unless given)."""
    return _api.full_like(a, 1, dtype)


__all__ = [*_api.OP_FUNCTIONS, "CheckError", "Op", "ShapeError", "TensorOp", "ones_like",
           "zeros_like", *(r.cls.__name__ for r in REGISTRY.values())]
