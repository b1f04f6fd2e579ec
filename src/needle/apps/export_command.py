"""``needle export CHECKPOINT --format {program,onnx} -o PATH``: a trained model as a file.

The model a ``needle train`` checkpoint describes (its config names the model, the image shape
and the classes) is rebuilt, its parameters and buffers restored, and it is exported in eval
mode (Dropout off, BatchNorm on its running statistics) with a free batch size: as a needle
program (``ndl.load_program`` runs it without the model's code) or as an ONNX model (any ONNX
runtime runs it; needs the ``onnx`` extra). ``--batch-size N`` fixes the batch size instead.
The input is ``images``, NHWC float32 as the data pipeline gives them; the output ``logits``.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np

from .. import nn
from ..checkpoint import CheckpointError, load
from .models import build_model
from .trainer import check_training_checkpoint

FORMATS = ("program", "onnx")
INPUT_NAME = "images"
OUTPUT_NAME = "logits"


class ExportCommandError(ValueError):
    """Bad input to ``needle export`` (an output it must not replace, a missing extra)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``needle export``."""
    parser.add_argument("checkpoint", help="a checkpoint.npz written by `needle train`")
    parser.add_argument("--format", choices=FORMATS, default="program",
                        help="a needle program (ndl.load_program) or an ONNX model (needs "
                        "the onnx extra: pip install 'needle[onnx]')")
    parser.add_argument("-o", "--output", required=True, metavar="PATH",
                        help="the file to write")
    parser.add_argument("--batch-size", type=int, default=None, help="export for this batch "
                        "size only (default: any batch size)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace PATH if it exists (refused otherwise)")


def model_from_checkpoint(path: str) -> tuple[nn.Module, dict, dict]:
    """The model of a ``needle train`` checkpoint with its weights, in eval mode; its
    identity (model, image_shape, num_classes) and the checkpoint. CheckpointError (one
    line naming the file and field) for a file that is not a usable training checkpoint."""
    ckpt = load(path)
    config = check_training_checkpoint(ckpt, path)
    identity = config["identity"]
    model = build_model(identity["model"], tuple(identity["image_shape"]),
                        identity["num_classes"])
    try:
        model.load_state_dict(ckpt["model"])
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
        text = " ".join(str(exc.args[0] if isinstance(exc, KeyError) and exc.args
                            else exc).split())
        raise CheckpointError(f"{path}: bad checkpoint field 'model': {text[:300]}") from None
    model.eval()
    return model, identity, ckpt


def check_output_file(output: str, overwrite: bool) -> None:
    """Refuse an output path that holds a file (unless ``overwrite``), is a folder, or lies
    in a folder that does not exist, before any work."""
    if os.path.isdir(output):
        raise ExportCommandError(f"-o {output}: is a folder; give a file path")
    if os.path.lexists(output) and not overwrite:
        raise ExportCommandError(f"-o {output}: already exists; replace it with --overwrite or "
                                 "choose another path")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise ExportCommandError(f"-o {output}: the folder {parent} does not exist")


def _require_onnx() -> None:
    from ..onnx import require_onnx

    try:
        require_onnx()
    except ImportError as exc:
        raise ExportCommandError(f"--format onnx: {exc}") from None


def export_checkpoint(checkpoint: str, fmt: str, output: str, batch_size: int | None = None,
                      overwrite: bool = False) -> dict[str, Any]:
    """Export the model of ``checkpoint`` to ``output``; what was written, for the summary."""
    if fmt not in FORMATS:
        raise ExportCommandError(f"--format {fmt}: unknown; choose one of {', '.join(FORMATS)}")
    if batch_size is not None and batch_size <= 0:
        raise ExportCommandError(f"--batch-size must be positive, got {batch_size}")
    check_output_file(output, overwrite)
    if fmt == "onnx":
        _require_onnx()  # before the work: one line saying how to install it
    model, identity, ckpt = model_from_checkpoint(checkpoint)
    example = np.zeros((batch_size or 2, *identity["image_shape"]), dtype=np.float32)
    dynamic = batch_size is None
    if fmt == "program":
        from ..program import export

        program = export(model, example, dynamic_batch=dynamic, input_names=[INPUT_NAME])
        program.save(output)
        size = f"{len(program.spec['nodes'])} ops"
    else:
        from .. import onnx as needle_onnx

        proto = needle_onnx.export(model, [example], output, input_names=[INPUT_NAME],
                                   output_names=[OUTPUT_NAME], dynamic_batch=dynamic)
        size = f"{len(proto.graph.node)} nodes"
    return {"model": identity["model"], "format": fmt, "output": output, "size": size,
            "epoch": ckpt.get("epoch"),
            "input": (None if dynamic else batch_size, *identity["image_shape"])}


def run(args: argparse.Namespace) -> int:
    """``needle export``: export, then print one line saying what was written."""
    r = export_checkpoint(args.checkpoint, args.format, args.output, args.batch_size,
                          args.overwrite)
    shape = ",".join("?" if d is None else str(d) for d in r["input"])
    kind = "a needle program" if r["format"] == "program" else "an ONNX model"
    epochs = r["epoch"]
    trained = "" if epochs is None else f", trained {epochs} epoch{'' if epochs == 1 else 's'}"
    print(f"exported {r['model']}{trained} as {kind} to {r['output']} ({r['size']}; input "
          f"{INPUT_NAME} float32[{shape}], eval mode)")
    return 0


__all__ = ["ExportCommandError", "FORMATS", "add_arguments", "check_output_file",
           "export_checkpoint", "model_from_checkpoint", "run"]
