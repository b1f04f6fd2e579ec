"""ONNX export and import (optional extra: ``pip install 'needle[onnx]'``).

``export(model, example_inputs, path)`` traces a model's inference graph with ``ndl.jit`` and
writes it as an ONNX model; ``import_model(path)`` turns an ONNX model into an ``nn.Module``
whose initializers are trainable Parameters and whose forward is made of needle ops, so it
runs and fine-tunes eagerly, under ``ndl.jit`` and in a ``needle.static.Session``.

Importing this package does not import ``onnx``; each function does, and raises one
ImportError naming the extra where it is missing. See docs/export.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import OnnxError, require_onnx

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    import onnx

    from ..nn import Module

__all__ = ["DEFAULT_OPSET", "OnnxError", "export", "export_table", "import_model",
           "import_table"]

#: the opset ``export`` writes unless told otherwise (LayerNormalization needs 17)
DEFAULT_OPSET = 17


def export(module_or_fn: Any, example_inputs: Any, path: Any = None,
           input_names: list[str] | None = None, output_names: list[str] | None = None,
           dynamic_batch: bool = True, opset: int | None = None,
           batch_axis: int = 0) -> onnx.ModelProto:
    """Write the inference graph of ``module_or_fn`` on ``example_inputs`` as an ONNX model.

    A Module is traced in eval mode (its training flags are restored after). With
    ``dynamic_batch`` the ``batch_axis`` dimension of every input is symbolic ('batch'); the
    model is traced at two batch sizes so that no reshape or broadcast keeps the example's.
    Returns the checked ``onnx.ModelProto``, also saved to ``path`` when one is given. Ops with
    no ONNX mapping raise one OnnxError listing each (with where it was made); nothing is
    written then.
    """
    require_onnx()
    from . import exporter

    return exporter.export(module_or_fn, example_inputs, path, input_names=input_names,
                           output_names=output_names, dynamic_batch=dynamic_batch,
                           opset=DEFAULT_OPSET if opset is None else opset,
                           batch_axis=batch_axis)


def import_model(path_or_proto: Any) -> Module:
    """An ``nn.Module`` running the ONNX model (a path, bytes or a ``ModelProto``).

    Float initializers become trainable ``nn.Parameter``s (BatchNormalization's running
    statistics become Buffers); the forward applies needle ops node by node. The whole file is
    checked first: unsupported ops, missing inputs and cycles raise one OnnxError.
    """
    require_onnx()
    from . import importer

    return importer.import_model(path_or_proto)


def export_table() -> dict[str, str]:
    """needle op name -> the ONNX ops it becomes ('' for ops that cannot be exported)."""
    require_onnx()
    from . import exporter

    return exporter.mapping_table()


def import_table() -> list[str]:
    """The ONNX op types ``import_model`` supports."""
    require_onnx()
    from . import importer

    return sorted(importer.IMPORTERS)
