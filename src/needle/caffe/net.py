"""Net: layers wired by blob names from a spec (dicts, JSON or YAML), run forward and backward.

A spec is a list of layer entries (or a dict with a ``"layer"`` list, Caffe's NetParameter)::

    [{"name": "data", "type": "Input", "top": ["data", "label"], "shape": [[None, 64], [None]]},
     {"name": "ip1", "type": "InnerProduct", "bottom": "data", "top": "ip1", "num_output": 10},
     {"name": "relu1", "type": "ReLU", "bottom": "ip1", "top": "ip1"},          # in place
     {"name": "loss", "type": "SoftmaxWithLoss", "bottom": ["ip1", "label"], "top": "loss"}]

Entry keys: ``name``, ``type`` (a registered Caffe type, ``"Op"`` for any registry op, or a
Layer class), ``bottom``, ``top``, ``loss_weight`` (one per top), ``param`` (Caffe's list of
``{"lr_mult", "decay_mult"}``, one per parameter blob), ``propagate_down`` (one bool per
bottom); every other key (or the keys of a nested ``"<something>_param"`` dict) is passed to
the layer's constructor. A ready Layer object may be given as ``"layer"``.

In place (top == bottom) is a wiring notion here: the top replaces the bottom under the same
name, and values are never overwritten in memory, so every layer may run in place. Each write
of a name is a separate value inside the Net; ``net.blobs[name].data`` is the latest value
and ``net.blobs[name].diff`` the gradient of the first one (Caffe's shared-memory result).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..autograd import Tensor
from ..core import profiling
from .blob import Blob
from .inference import NetFunction
from .layer import LAYER_TYPES, Layer, LayerError

__all__ = ["Net", "NetSpecError", "parse_spec"]

_ENTRY_KEYS = {"name", "type", "bottom", "top", "loss_weight", "param", "propagate_down",
               "lr_mult", "decay_mult", "layer"}
_INPUT_TYPES = {"Input"}


class NetSpecError(ValueError):
    """A Net spec that cannot be built: the message names the layer and what is wrong."""


@dataclass
class LayerEntry:
    """One parsed spec entry."""

    name: str
    type: Any
    bottoms: list[str]
    tops: list[str]
    kwargs: dict = field(default_factory=dict)
    loss_weight: list | None = None
    param: list = field(default_factory=list)
    param_all: dict = field(default_factory=dict)
    propagate_down: list | None = None
    layer: Layer | None = None


def _names(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def _shape(value: Any) -> tuple | None:
    """A declared shape: a list of dims or Caffe's ``{"dim": [...]}``; -1 / None = unknown."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        value = value.get("dim", [])
    return tuple(None if d is None or int(d) < 0 else int(d) for d in value)


def _shapes(value: Any, n: int, where: str) -> list:
    """One declared shape per top from ``shape`` (one shape, or a list of shapes)."""
    if value is None:
        return [None] * n
    if isinstance(value, Mapping) or (isinstance(value, list | tuple) and (
            not value or not isinstance(value[0], list | tuple | Mapping))):
        value = [value]
    if len(value) != n:
        raise NetSpecError(f"{where}: {len(value)} shapes for {n} tops")
    return [_shape(v) for v in value]


def _load_text(text: str) -> Any:
    """A spec from JSON text, or YAML text when PyYAML is installed."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as json_exc:
        try:
            import yaml
        except ImportError:
            raise NetSpecError(
                f"the spec text is not valid JSON ({json_exc}); YAML specs need PyYAML, which "
                "is not installed (pip install pyyaml), or write the spec as JSON") from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as yaml_exc:
            raise NetSpecError(f"the spec text is neither valid JSON ({json_exc}) nor valid "
                               f"YAML ({yaml_exc})") from None


def parse_spec(spec: Any) -> tuple[dict[str, tuple | None], list[LayerEntry]]:
    """Declared inputs (name -> shape or None) and the layer entries of a spec."""
    if isinstance(spec, str):
        spec = _load_text(spec)
    inputs: dict[str, tuple | None] = {}
    if isinstance(spec, Mapping):
        names = _names(spec.get("input"))
        shapes = _shapes(spec.get("input_shape"), len(names), "net inputs") if names else []
        inputs.update(zip(names, shapes))
        layers = spec.get("layer", spec.get("layers"))
        if layers is None:
            raise NetSpecError("a dict spec needs a 'layer' list of layer entries")
    elif isinstance(spec, list | tuple):
        layers = spec
    else:
        raise NetSpecError(f"a Net spec is a list of layer entries, a dict with a 'layer' list, "
                           f"or JSON / YAML text; got {type(spec).__name__}")
    entries = []
    for i, raw in enumerate(layers):
        if not isinstance(raw, Mapping):
            raise NetSpecError(f"layer entry {i} is a {type(raw).__name__}, expected a dict")
        raw = dict(raw)
        layer_obj = raw.get("layer")
        kind = raw.get("type", getattr(layer_obj, "type", None) or type(layer_obj).__name__
                       if layer_obj is not None else None)
        if kind is None:
            raise NetSpecError(f"layer entry {i} ({raw.get('name', 'unnamed')!r}) has no 'type'")
        kind_name = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
        name = str(raw.get("name") or getattr(layer_obj, "name", None) or f"{kind_name}{i}")
        where = f"layer {name!r} ({kind_name})"
        tops = _names(raw.get("top"))
        if kind in _INPUT_TYPES:
            params = dict(raw.get("input_param") or {})
            shapes = _shapes(raw.get("shape", params.get("shape")), len(tops), where)
            for top, shape in zip(tops, shapes):
                if top in inputs:
                    raise NetSpecError(f"{where}: input {top!r} is declared twice")
                inputs[top] = shape
            continue
        kwargs: dict[str, Any] = {}
        for key, value in raw.items():
            if key in _ENTRY_KEYS:
                continue
            if key.endswith("_param") and isinstance(value, Mapping):
                kwargs.update(value)
            else:
                kwargs[key] = value
        param = [dict(p) for p in (raw.get("param") or [])]
        param_all = {}
        for key in ("lr_mult", "decay_mult"):  # shortcuts: one value for all, or one per blob
            value = raw.get(key)
            if isinstance(value, list | tuple):
                while len(param) < len(value):
                    param.append({})
                for p, v in zip(param, value):
                    p[key] = v
            elif value is not None:
                param_all[key] = value
        loss_weight = raw.get("loss_weight")
        if loss_weight is not None and not isinstance(loss_weight, list | tuple):
            loss_weight = [loss_weight]
        entries.append(LayerEntry(name, kind, _names(raw.get("bottom")), tops, kwargs,
                                  None if loss_weight is None else [float(w) for w in
                                                                    loss_weight],
                                  param, param_all, raw.get("propagate_down"), layer_obj))
    return inputs, entries


def _build_layer(entry: LayerEntry) -> Layer:
    where = f"layer {entry.name!r} ({entry.type if isinstance(entry.type, str) else entry.type})"
    if entry.layer is not None:
        if not isinstance(entry.layer, Layer):
            raise NetSpecError(f"{where}: 'layer' must be a caffe Layer, got "
                               f"{type(entry.layer).__name__}")
        entry.layer.name = entry.name
        return entry.layer
    cls = entry.type
    if isinstance(cls, str):
        cls = LAYER_TYPES.get(cls)
        if cls is None:
            raise NetSpecError(f"{where}: unknown layer type; known types: "
                               f"{', '.join(sorted(LAYER_TYPES))}")
    if not (isinstance(cls, type) and issubclass(cls, Layer)):
        raise NetSpecError(f"{where}: type must be a registered name or a Layer subclass")
    try:
        return cls(name=entry.name, **entry.kwargs)
    except (TypeError, ValueError, KeyError) as exc:
        raise NetSpecError(f"{where}: {exc}") from exc


def _check_count(where: str, what: str, n: int, bounds: tuple) -> None:
    low, high = bounds
    if n < low or (high is not None and n > high):
        want = f"exactly {low}" if low == high else (
            f"at least {low}" if high is None else f"{low} to {high}")
        raise NetSpecError(f"{where}: takes {want} {what} blob(s), got {n}")


class Net:
    """Layers wired by blob names: ``Net(spec, phase="train", dtype="float32",
    force_backward=False)``.

    ``forward(**inputs)`` returns the output blobs (those no layer reads) and ``"loss"``, the
    sum over loss tops of ``loss_weight * sum(top)``. ``backward()`` propagates from the loss
    tops, adding parameter gradients to ``net.params[layer][i].diff`` (call
    ``clear_param_diffs()`` between iterations, as solvers do) and leaving blob gradients in
    ``net.blobs[name].diff``. Layers that no loss depends on, or that have nothing trainable
    behind them, do no backward work; data inputs get no diff unless ``force_backward``.
    """

    def __init__(self, spec: Any, phase: str = "train", dtype: Any = "float32",
                 force_backward: bool = False) -> None:
        inputs, entries = parse_spec(spec)
        self.dtype = np.dtype(dtype)
        self.force_backward = bool(force_backward)
        self.input_shapes: dict[str, tuple | None] = dict(inputs)
        self.entries = entries
        self.layers: list[Layer] = []
        self._wire(entries)
        self.phase = phase
        self._is_setup = False
        if all(s is not None for s in self.input_shapes.values()):  # also: no inputs at all
            self._setup({k: tuple(1 if d is None else d for d in s)
                         for k, s in self.input_shapes.items() if s is not None})

    # -- wiring ------------------------------------------------------------------------------
    def _wire(self, entries: list[LayerEntry]) -> None:
        """Build the layers and give every written value its own version id; check names."""
        self._version_names: list[str] = []
        current: dict[str, int] = {}
        producer: dict[str, str] = {}
        for name in self.input_shapes:
            current[name] = self._new_version(name)
            producer[name] = "the net inputs"
        self._input_vids = {name: current[name] for name in self.input_shapes}
        seen_names: set[str] = set()
        self._bottom_vids: list[list[int]] = []
        self._top_vids: list[list[int]] = []
        for entry in entries:
            layer = _build_layer(entry)
            where = f"layer {entry.name!r} ({layer.type or type(layer).__name__})"
            if entry.name in seen_names:
                raise NetSpecError(f"{where}: the layer name is used twice")
            seen_names.add(entry.name)
            _check_count(where, "bottom", len(entry.bottoms), layer.bottom_count)
            _check_count(where, "top", len(entry.tops), layer.top_count)
            bottoms = []
            for b in entry.bottoms:
                if b not in current:
                    known = ", ".join(sorted(current)) or "none"
                    raise NetSpecError(f"{where}: unknown bottom blob {b!r}: no earlier layer "
                                       f"produces it and it is not a declared input (known "
                                       f"blobs: {known}); declare inputs with an Input layer")
                bottoms.append(current[b])
            if len(set(entry.tops)) != len(entry.tops):
                raise NetSpecError(f"{where}: a top name appears twice: {entry.tops}")
            tops = []
            for t in entry.tops:
                if t in current and t not in entry.bottoms:
                    raise NetSpecError(f"{where}: top {t!r} is already produced by "
                                       f"{producer[t]}; only an in-place layer (top == one of "
                                       "its bottoms) may reuse a blob name")
                current[t] = self._new_version(t)
                producer[t] = f"layer {entry.name!r}"
                tops.append(current[t])
            if entry.propagate_down is not None and len(entry.propagate_down) != len(bottoms):
                raise NetSpecError(f"{where}: propagate_down has {len(entry.propagate_down)} "
                                   f"entries for {len(bottoms)} bottoms")
            weights = entry.loss_weight
            if weights is None:
                weights = [1.0 if layer.is_loss and k == 0 else 0.0 for k in range(len(tops))]
            elif len(weights) != len(tops):
                raise NetSpecError(f"{where}: {len(weights)} loss_weight values for "
                                   f"{len(tops)} tops")
            entry.loss_weight = weights
            layer.num_tops = len(tops)
            self.layers.append(layer)
            self._bottom_vids.append(bottoms)
            self._top_vids.append(tops)
        self._last_vid = dict(current)
        first: dict[str, int] = {}
        for vid, name in enumerate(self._version_names):
            first.setdefault(name, vid)
        self._first_vid = first
        consumed = {v for vids in self._bottom_vids for v in vids}
        self.outputs = [name for name, vid in current.items()
                        if vid not in consumed and name not in self.input_shapes]
        self.inputs = list(self.input_shapes)
        self._values: list[Any] = [None] * len(self._version_names)
        self._loss_tops = [(v, w) for vids, e in zip(self._top_vids, entries)
                           # (_wire gave every entry its loss_weight list above)
                           for v, w in zip(vids, e.loss_weight) if w != 0.0]  # type: ignore[arg-type]
        self.blobs: OrderedDict[str, Blob] = OrderedDict(
            (name, Blob(name=name)) for name in first)

    def _new_version(self, name: str) -> int:
        self._version_names.append(name)
        return len(self._version_names) - 1

    # -- set up --------------------------------------------------------------------------------
    def _setup(self, input_shapes: dict[str, tuple]) -> None:
        """Create every layer's parameters from the input shapes, then plan the backward."""
        shapes: dict[int, tuple] = {self._input_vids[k]: tuple(s) for k, s in
                                    input_shapes.items()}
        for i, layer in enumerate(self.layers):
            where = self._where(i)
            bottom_shapes = [shapes[v] for v in self._bottom_vids[i]]
            try:
                if not layer.is_setup:
                    layer.dtype = self.dtype
                layer.ensure_setup(bottom_shapes)
                self._apply_param_spec(i)
                top_shapes = layer.reshape(bottom_shapes)
            except NetSpecError:
                raise
            except Exception as exc:
                raise LayerError(f"{where}: setting up on bottom shapes "
                                 f"{[tuple(s) for s in bottom_shapes]} failed: "
                                 f"{type(exc).__name__}: {exc}") from exc
            if len(top_shapes) != len(self._top_vids[i]):
                raise NetSpecError(f"{where}: the layer makes {len(top_shapes)} tops for these "
                                   f"bottoms, the spec wires {len(self._top_vids[i])}")
            for v, s in zip(self._top_vids[i], top_shapes):
                shapes[v] = tuple(s)
        self._plan_backward()
        self._is_setup = True

    def _apply_param_spec(self, i: int) -> None:
        entry, layer = self.entries[i], self.layers[i]
        specs = entry.param
        if len(specs) > len(layer.params):
            raise NetSpecError(f"{self._where(i)}: {len(specs)} param specs for "
                               f"{len(layer.params)} parameter blobs")
        specs = specs + [{}] * (len(layer.params) - len(specs))
        for blob, spec in zip(layer.params, specs):
            spec = {**entry.param_all, **spec}
            unknown = set(spec) - {"lr_mult", "decay_mult", "name"}
            if unknown:
                raise NetSpecError(f"{self._where(i)}: unknown param settings {sorted(unknown)}"
                                   "; supported: lr_mult, decay_mult")
            blob.lr_mult = float(spec.get("lr_mult", blob.lr_mult))
            blob.decay_mult = float(spec.get("decay_mult", blob.decay_mult))

    def _plan_backward(self) -> None:
        """Decide which layers run backward and which bottoms get a diff."""
        carries: set[int] = set()  # values with something trainable behind them
        if self.force_backward:
            carries.update(self._input_vids.values())
        has_trainable = []
        for i, layer in enumerate(self.layers):
            learnable = any(b.lr_mult != 0 for b in layer.params)
            through = layer.differentiable and (
                learnable or any(v in carries for v in self._bottom_vids[i]))
            has_trainable.append(through)
            if through:
                carries.update(self._top_vids[i])
        needed = {v for v, _ in self._loss_tops}  # values some loss depends on
        reaches_loss = [False] * len(self.layers)
        for i in reversed(range(len(self.layers))):
            if self.layers[i].differentiable and any(v in needed for v in self._top_vids[i]):
                reaches_loss[i] = True
                needed.update(self._bottom_vids[i])
        self._bottom_needs: list[list[bool]] = []
        for i, layer in enumerate(self.layers):
            layer.needs_backward = reaches_loss[i] and has_trainable[i]
            allowed = self.entries[i].propagate_down or [True] * len(self._bottom_vids[i])
            needs = [layer.needs_backward and v in carries and bool(ok)
                     for v, ok in zip(self._bottom_vids[i], allowed)]
            layer.bottom_needs_diff = needs
            self._bottom_needs.append(needs)

    # -- properties ----------------------------------------------------------------------------
    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, value: str) -> None:
        value = str(value).lower()
        if value not in ("train", "test"):
            raise ValueError(f"Net: phase must be 'train' or 'test', got {value!r}")
        self._phase = value
        for layer in self.layers:
            layer.training = value == "train"

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def layer_dict(self) -> dict[str, Layer]:
        return {layer.name: layer for layer in self.layers}

    @property
    def params(self) -> OrderedDict[str, list[Blob]]:
        """Layer name -> its parameter Blobs (Caffe's ``net.params``), layers with params only."""
        return OrderedDict((layer.name, layer.params) for layer in self.layers if layer.params)

    @property
    def learnable_params(self) -> list[Blob]:
        """Every parameter Blob, in layer order (frozen ones included, as in Caffe)."""
        return [blob for layer in self.layers for blob in layer.params]

    def needs_backward(self, layer: str) -> bool:
        """Whether ``backward()`` runs the layer's backward."""
        return self.layer_dict[layer].needs_backward

    def _where(self, i: int) -> str:
        layer = self.layers[i]
        return f"layer {layer.name!r} ({layer.type or type(layer).__name__})"

    def _index(self, layer: int | str) -> int:
        if isinstance(layer, str):
            names = self.layer_names
            if layer not in names:
                raise KeyError(f"Net: no layer named {layer!r}; layers: {', '.join(names)}")
            return names.index(layer)
        n = len(self.layers)
        if not -n <= layer < n:
            raise IndexError(f"Net: layer index {layer} out of range for {n} layers")
        return layer % n

    # -- running -------------------------------------------------------------------------------
    def _feed(self, inputs: dict[str, Any]) -> None:
        for name, value in inputs.items():
            if name not in self._input_vids:
                raise KeyError(f"Net.forward: unknown input {name!r}; the net's inputs are "
                               f"{self.inputs}")
            array = value.numpy() if isinstance(value, Tensor) else np.asarray(value)
            if array.dtype.kind == "f" and array.dtype != self.dtype:
                array = array.astype(self.dtype)
            declared = self.input_shapes[name]
            if declared is not None and (len(declared) != array.ndim or any(
                    d is not None and d != n for d, n in zip(declared, array.shape))):
                raise ValueError(f"Net.forward: input {name!r} has shape {array.shape}, the "
                                 f"spec declares {declared}")
            self._values[self._input_vids[name]] = array
            self.blobs[name].data = array
        if not self._is_setup:
            missing = [k for k, v in self._input_vids.items() if self._values[v] is None]
            if missing:
                raise ValueError(f"Net.forward: feed every input on the first call (the layers "
                                 f"are set up from their shapes); missing {missing}")
            self._setup({k: self._values[v].shape for k, v in self._input_vids.items()})

    def _run(self, start: int, end: int) -> None:
        values = self._values
        profiler = profiling.active()  # ndl.profile(): each layer's forward is a region
        for i in range(start, end + 1):
            layer = self.layers[i]
            bottom = []
            for v in self._bottom_vids[i]:
                value = values[v]
                if value is None:
                    raise RuntimeError(f"{self._where(i)}: bottom {self._version_names[v]!r} "
                                       "has no value yet; feed the inputs or run the layers "
                                       "before this one")
                bottom.append(value)
            shapes = [tuple(b.shape) for b in bottom]
            try:
                top_shapes = layer.reshape(shapes)
                tops = layer.forward(bottom) if profiler is None else profiler.call(
                    layer.forward, (bottom,), layer.type or type(layer).__name__,
                    category="caffe", node=layer.name, inputs=bottom)
            except (LayerError, NetSpecError):
                raise
            except Exception as exc:
                raise LayerError(f"{self._where(i)} forward on bottoms of shapes {shapes}: "
                                 f"{type(exc).__name__}: {exc}") from exc
            vids = self._top_vids[i]
            if len(tops) != len(vids):
                raise LayerError(f"{self._where(i)}: forward returned {len(tops)} tops, the "
                                 f"spec wires {len(vids)}")
            for v, top, expected in zip(vids, tops, top_shapes):
                top = np.asarray(top) if isinstance(top, np.generic) else top
                if tuple(top.shape) != tuple(expected):
                    raise LayerError(f"{self._where(i)}: forward made a top of shape "
                                     f"{tuple(top.shape)}, reshape promised {tuple(expected)}")
                values[v] = top
        for name, vid in self._last_vid.items():
            if values[vid] is not None:
                blob = self.blobs[name]
                blob.data = values[vid]
                blob.diff = None

    def _loss(self, vids: set[int] | None = None) -> float | None:
        total, found = 0.0, False
        for v, w in self._loss_tops:
            if (vids is None or v in vids) and self._values[v] is not None:
                total += w * float(np.sum(self._values[v], dtype=np.float64))
                found = True
        return total if found else None

    def forward(self, **inputs: Any) -> dict[str, Any]:
        """Feed ``inputs`` (name=array), run every layer; the output blobs and ``"loss"``.

        Inputs not given keep their previous values (or what was put into
        ``net.blobs[name].data``). ``"loss"`` is the weighted total of the loss tops.
        """
        for name, vid in self._input_vids.items():
            data = self.blobs[name].data
            if name not in inputs and self._last_vid[name] == vid and data is not None:
                self._values[vid] = data  # Caffe style: net.blobs["data"].data = X
        self._feed(inputs)
        self._run(0, len(self.layers) - 1)
        out = {name: self._values[self._last_vid[name]] for name in self.outputs}
        loss = self._loss()
        if loss is not None:
            out["loss"] = loss
        return out

    def forward_from_to(self, start: int | str = 0, end: int | str = -1) -> dict[str, Any]:
        """Run layers ``start`` .. ``end`` (names or indices, inclusive; the Input entry is
        not a layer) on the current blob values (``net.blobs[name].data``, changed or
        replaced by the user); returns the tops made (name -> array) and ``"loss"``."""
        if not self._is_setup:
            raise RuntimeError("Net.forward_from_to: run forward(**inputs) once first, so the "
                               "layers are set up")
        i, j = self._index(start), self._index(end)
        if i > j:
            raise ValueError(f"Net.forward_from_to: start layer {start!r} comes after end "
                             f"layer {end!r}")
        for name, vid in self._last_vid.items():  # blobs the user replaced: use their data
            data = self.blobs[name].data
            if data is not None and data is not self._values[vid]:
                self._values[vid] = data
        self._run(i, j)
        made = [v for k in range(i, j + 1) for v in self._top_vids[k]]
        out = {self._version_names[v]: self._values[v] for v in made}
        loss = self._loss(set(made))
        if loss is not None:
            out["loss"] = loss
        return out

    def backward(self) -> None:
        """Back-propagate from the loss tops (seeded with their ``loss_weight``).

        Parameter diffs are *added* to ``blob.diff``; blob diffs land in ``net.blobs``.
        """
        if not self._loss_tops:
            raise RuntimeError("Net.backward: the net has no loss (no loss layer and no "
                               "loss_weight on any top)")
        values = self._values
        diffs: dict[int, Any] = {}
        for v, w in self._loss_tops:
            if values[v] is None:
                raise RuntimeError("Net.backward: run forward first")
            diffs[v] = np.full(np.shape(values[v]), w, dtype=np.asarray(values[v]).dtype)
        profiler = profiling.active()  # ndl.profile(): each layer's backward is a region
        for i in reversed(range(len(self.layers))):
            layer = self.layers[i]
            if not layer.needs_backward:
                continue
            vids = self._top_vids[i]
            top_diff = [diffs.get(v) for v in vids]
            if all(d is None for d in top_diff):
                continue
            top_diff = [d if d is not None else np.zeros_like(values[v])
                        for d, v in zip(top_diff, vids)]
            needs = self._bottom_needs[i]
            try:
                bottom_diff = layer.backward(top_diff, list(needs)) if profiler is None \
                    else profiler.call(layer.backward, (top_diff, list(needs)),
                                       layer.type or type(layer).__name__, category="caffe",
                                       phase="backward", node=layer.name, inputs=top_diff)
            except (LayerError, NetSpecError):
                raise
            except Exception as exc:
                raise LayerError(f"{self._where(i)} backward: {type(exc).__name__}: {exc}"
                                 ) from exc
            for v, d, need in zip(self._bottom_vids[i], bottom_diff, needs):
                if need and d is not None:
                    previous = diffs.get(v)
                    # never add in place: a layer may hand the same array to two bottoms
                    diffs[v] = d if previous is None else previous + d
        for name, vid in self._first_vid.items():
            self.blobs[name].diff = diffs.get(vid)

    def clear_param_diffs(self) -> None:
        """Zero every parameter diff (before accumulating a new iteration's gradients)."""
        for blob in self.learnable_params:
            blob.zero_diff()

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> OrderedDict[str, np.ndarray]:
        """``"<layer>.<i>"`` -> a copy of parameter blob i of that layer (for ndl.save)."""
        return OrderedDict((f"{name}.{i}", np.array(blob.data, copy=True))
                           for name, blobs in self.params.items() for i, blob in
                           enumerate(blobs))

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Copy values into the parameter blobs in place (memory shared with views stays)."""
        own = {f"{name}.{i}": blob for name, blobs in self.params.items()
               for i, blob in enumerate(blobs)}
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if strict and (missing or unexpected):
            raise KeyError(f"Net.load_state_dict: missing keys {missing}, unexpected keys "
                           f"{unexpected}")
        problems = []
        for key, blob in own.items():
            if key not in state:
                continue
            value = np.asarray(state[key])
            if value.shape != blob.data.shape:
                problems.append(f"{key}: saved {value.shape} vs net {blob.data.shape}")
                continue
            np.copyto(blob.data, value.astype(blob.data.dtype, copy=False))
        if problems:
            raise ValueError("Net.load_state_dict: shape mismatch for " + "; ".join(problems))

    def inference_function(self, outputs: list[str] | str | None = None) -> NetFunction:
        """The layers that predict, as a function of Tensors run in the test phase (losses,
        accuracies and their labels dropped; ``outputs`` names other blobs to return). Run it
        eagerly or under ``ndl.jit``; ``ndl.export(net, ...)`` saves it as a program."""
        return NetFunction(self, outputs)

    @classmethod
    def from_module(cls, module: Any, example_input: Any, loss: str | None = None,
                    input_name: str = "data", label_name: str = "label",
                    dtype: Any = "float32") -> Net:
        """Lower an ``nn.Sequential``-style model into a Net with the same parameter values
        (see :func:`needle.caffe.lowering.lower_to_spec`); its phase follows
        ``module.training``."""
        from .lowering import lower_to_spec

        spec, values = lower_to_spec(module, example_input, loss, input_name, label_name)
        net = cls(spec, phase="train" if module.training else "test", dtype=dtype)
        for name, arrays in values.items():
            for blob, value in zip(net.params[name], arrays):
                np.copyto(blob.data, value.astype(blob.data.dtype, copy=False))
        return net

    def __repr__(self) -> str:
        lines = [f"Net(phase={self.phase!r}, inputs={self.inputs}, outputs={self.outputs})"]
        for i, layer in enumerate(self.layers):
            bottoms = [self._version_names[v] for v in self._bottom_vids[i]]
            tops = [self._version_names[v] for v in self._top_vids[i]]
            params = ", ".join(str(b.shape) for b in layer.params)
            back = "" if layer.needs_backward else "  (no backward)"
            lines.append(f"  {layer.name} ({layer.type or type(layer).__name__}): {bottoms} -> "
                         f"{tops}{'  params ' + params if params else ''}{back}")
        return "\n".join(lines)
