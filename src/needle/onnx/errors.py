"""The error type of needle.onnx and the check that the optional onnx package is there.

Kept free of any onnx import so that ``import needle.onnx`` works without the extra.
"""

from __future__ import annotations

from typing import Any

INSTALL_HINT = "pip install 'needle[onnx]'"


class OnnxError(ValueError):
    """An ONNX model needle cannot export or import: unsupported ops, a bad file, a graph
    whose nodes read missing values or form a cycle. Raised before anything is written or run.
    """


def require_onnx() -> Any:
    """The ``onnx`` module, or one ImportError that says how to install it."""
    try:
        import onnx
    except ImportError as exc:
        raise ImportError(
            f"needle.onnx needs the onnx package, which is not installed: {INSTALL_HINT}"
        ) from exc
    return onnx
