"""A Net's inference computation as a function of Tensors (Caffe's "deploy" net).

``net.inference_function()`` keeps the layers that compute predictions and drops what only
training reads: loss layers (and tops with a ``loss_weight``), ``Accuracy``, and the labels
that only those read. The outputs are the tops of the kept layers that no kept layer reads
(the scores a loss read), or the blobs named in ``outputs``. Calling the function runs each
kept layer's ``compute`` (needle ops) in the test phase (Dropout off, BatchNorm on its
statistics), so it runs eagerly, under ``ndl.jit``, on a declared graph's placeholders, and
``ndl.export(net, ...)`` traces it into a program.

Only ``TensorLayer``s (every built-in computing layer, ``Op`` and ``Function`` layers) have a
forward made of ops; a layer written on NumPy arrays, or a data layer (``MemoryData``) the
outputs depend on, is refused by name.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..autograd import Tensor
from .layer import TensorLayer

Net = Any  # a needle.caffe.Net (not imported: net.py imports this module)

__all__ = ["NetExportError", "NetFunction"]

#: the batch size of example inputs made from a spec's declared shapes
EXAMPLE_BATCH = 2


class NetExportError(ValueError):
    """A Net whose inference part cannot be written as ops; the message names the layers."""


class NetFunction:
    """The inference part of a Net as a function: ``fn(*inputs) -> Tensor`` (or a tuple).

    ``input_names`` are the net inputs the outputs depend on (in the spec's order),
    ``output_names`` the blobs returned. ``training`` is False: the layers run in the test
    phase whatever the Net's phase is (restored after every call).
    """

    training = False

    def __init__(self, net: Net, outputs: list[str] | str | None = None) -> None:
        if not net._is_setup:
            raise NetExportError("the Net is not set up yet: declare its input shapes in the "
                                 "spec (Input layer) or run net.forward(...) once first")
        self.net = net
        producer = {v: i for i, vids in enumerate(net._top_vids) for v in vids}
        wanted = self._default_outputs(net) if outputs is None else \
            self._named_outputs(net, [outputs] if isinstance(outputs, str) else list(outputs))
        needed: set[int] = set()
        stack = list(wanted)
        while stack:
            i = producer.get(stack.pop())
            if i is not None and i not in needed:
                needed.add(i)
                stack.extend(net._bottom_vids[i])
        self.layer_indices = sorted(needed)
        refused = [f"{net._where(i)}" for i in self.layer_indices
                   if not isinstance(net.layers[i], TensorLayer)]
        if refused:
            raise NetExportError(
                f"the outputs {[net._version_names[v] for v in wanted]} depend on "
                f"{', '.join(refused)}, whose forward is not written with needle ops (a layer "
                "on NumPy arrays, or a data layer: declare inputs with an Input layer instead)")
        read = {v for i in self.layer_indices for v in net._bottom_vids[i]} | set(wanted)
        self.input_names = [name for name, v in net._input_vids.items() if v in read]
        self.output_names = [net._version_names[v] for v in wanted]
        self._output_vids = wanted

    @staticmethod
    def _default_outputs(net: Net) -> list[int]:
        """Tops of the predicting layers that no predicting layer reads."""
        kept = [i for i, layer in enumerate(net.layers)
                if layer.differentiable and not layer.is_loss
                and not any(w != 0.0 for w in net.entries[i].loss_weight or ())]
        read = {v for i in kept for v in net._bottom_vids[i]}
        outputs = [v for i in kept for v in net._top_vids[i] if v not in read]
        if not outputs:
            raise NetExportError("the Net has no layers to export besides losses and "
                                 "accuracies")
        return outputs

    @staticmethod
    def _named_outputs(net: Net, names: list[str]) -> list[int]:
        made = {net._version_names[v] for vids in net._top_vids for v in vids}
        unknown = [n for n in names if n not in made]
        if unknown:
            raise NetExportError(f"outputs {unknown} are not blobs a layer of the Net makes; "
                                 f"blobs: {sorted(made)}")
        return [net._last_vid[n] for n in names]

    # -- running -----------------------------------------------------------------------------
    def __call__(self, *inputs: Any) -> Any:
        """The outputs for ``inputs`` (Tensors; arrays are wrapped), in ``input_names`` order."""
        net = self.net
        if len(inputs) != len(self.input_names):
            raise TypeError(f"the Net's inference function takes {len(self.input_names)} "
                            f"inputs ({', '.join(self.input_names)}), got {len(inputs)}")
        env: dict[int, Any] = {}
        for name, value in zip(self.input_names, inputs):
            env[net._input_vids[name]] = value if isinstance(value, Tensor) else \
                Tensor(self._cast(np.asarray(value)), requires_grad=False)
        layers = [net.layers[i] for i in self.layer_indices]
        phases = [layer.training for layer in layers]
        try:
            for i, layer in zip(self.layer_indices, layers):
                assert isinstance(layer, TensorLayer)  # (checked when built)
                layer.training = False
                params = [Tensor.make_const(blob.data, requires_grad=False)
                          for blob in layer.params]
                tops = layer.compute([env[v] for v in net._bottom_vids[i]], params)
                env.update(zip(net._top_vids[i], tops))
        finally:
            for layer, phase in zip(layers, phases):
                layer.training = phase
        outputs = [env[v] for v in self._output_vids]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def _cast(self, array: np.ndarray) -> np.ndarray:
        """Float inputs in the Net's dtype, as ``net.forward`` feeds them."""
        dtype = self.net.dtype
        return array.astype(dtype) if array.dtype.kind == "f" and array.dtype != dtype \
            else array

    def example_inputs(self, given: tuple = ()) -> list[np.ndarray]:
        """``given`` as arrays in the Net's dtype, or zeros of the declared input shapes
        (batch ``EXAMPLE_BATCH``) when none are given."""
        if given:
            return [self._cast(x.numpy() if isinstance(x, Tensor) else np.asarray(x))
                    for x in given]
        examples = []
        for name in self.input_names:
            shape = self.net.input_shapes[name]
            if shape is None or None in shape[1:]:
                raise NetExportError(f"input {name!r} has no fully declared shape "
                                     f"({shape}); give example inputs")
            dims = tuple(EXAMPLE_BATCH if d is None else d for d in shape)
            examples.append(np.zeros(dims, dtype=self.net.dtype))
        return examples

    def __repr__(self) -> str:
        return (f"NetFunction(inputs={self.input_names}, outputs={self.output_names}, "
                f"{len(self.layer_indices)} layers)")
