"""Inference of an exported model: needle's loaded program (called eagerly, and under ndl.jit)
against onnxruntime running the ONNX export of the same model.

The MLP-ResNet and the residual CNN of ``needle.apps.models`` (28x28x1 images, MNIST's shape;
eval mode, the weights of a fresh model) are exported twice, with ``ndl.export`` (saved and
read back with ``ndl.load_program``) and with ``needle.onnx.export``, and run on batches of 1
and 256 images. onnxruntime gets the same thread count as NumPy's BLAS (intra-op threads; one
inter-op thread). Before timing, the three outputs are checked to agree.
Run: python benchmarks/export.py
"""

from __future__ import annotations

# isort: off
import common

# isort: on
import os
import tempfile

import numpy as np

import needle as ndl
import needle.onnx
from needle.apps.models import MLPResNet, ResidualCNN

IMAGE = (28, 28, 1)
BATCHES = (1, 256)


def _models() -> dict[str, ndl.nn.Module]:
    np.random.seed(0)
    return {"MLP-ResNet": MLPResNet(int(np.prod(IMAGE))),
            "CNN": ResidualCNN(IMAGE[-1])}


def _onnx_session(path: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(common.THREADS)
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _runners(model: ndl.nn.Module, folder: str, name: str) -> dict:
    """The loaded program, the program under ndl.jit, and an onnxruntime session's run."""
    model.eval()
    example = np.zeros((2, *IMAGE), dtype=np.float32)
    program_path = os.path.join(folder, f"{name}.npz")
    ndl.export(model, example).save(program_path)
    program = ndl.load_program(program_path)
    onnx_path = os.path.join(folder, f"{name}.onnx")
    needle.onnx.export(model, [example], onnx_path, input_names=["images"])
    session = _onnx_session(onnx_path)
    return {"program": program, "jit": ndl.jit(program), "ort": session}


def _calls(run: dict, x: np.ndarray) -> dict:
    """One inference of ``x`` by each runner, returning a NumPy array."""
    tensor = ndl.Tensor(x, requires_grad=False)
    return {"program": lambda: run["program"](tensor).numpy(),
            "jit": lambda: run["jit"](tensor).numpy(),
            "ort": lambda: run["ort"].run(None, {"images": x})[0]}


def main() -> list[dict]:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:  # the onnx extra is optional: say so in the table
        return [{"model": "not measured", "note": "onnxruntime is not installed (pip install "
                 "'needle[onnx]')"}]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, model in _models().items():
            run = _runners(model, folder, name.lower())
            for batch in BATCHES:
                x = np.random.default_rng(batch).random((batch, *IMAGE), dtype=np.float32)
                fns = _calls(run, x)
                outputs = {key: fn() for key, fn in fns.items()}
                scale = float(np.abs(outputs["ort"]).max())
                for key in ("program", "jit"):
                    np.testing.assert_allclose(outputs[key], outputs["ort"], rtol=1e-4,
                                               atol=1e-5 * scale)
                best = common.best_times_in_rounds(fns, rounds=3, repeat=5 if batch == 1
                                                   else 3, pause=1.0)
                rows.append({
                    "model": name, "batch": batch,
                    "program (ms)": best["program"] * 1e3,
                    "program under jit (ms)": best["jit"] * 1e3,
                    "onnxruntime (ms)": best["ort"] * 1e3,
                    "program / ort": best["program"] / best["ort"],
                    "jit / ort": best["jit"] / best["ort"],
                })
    return rows


if __name__ == "__main__":
    print(common.machine())
    print(common.markdown_table(main()))
