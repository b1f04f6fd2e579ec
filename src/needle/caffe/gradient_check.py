"""check_gradient: Caffe's GradientChecker, finite differences against any layer's backward."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .layer import Layer

__all__ = ["GradientCheckError", "GradientCheckReport", "check_gradient"]


class GradientCheckError(AssertionError):
    """A layer's backward disagrees with finite differences (the message says where)."""


@dataclass
class GradientCheckReport:
    """The result of :func:`check_gradient`.

    ``max_error`` is the largest ``|analytic - numeric| / max(|analytic|, |numeric|, 1)``
    (Caffe's scaled error), ``worst`` where it occurred (``"bottom 0 [1, 2]"`` or
    ``"param 'weight' [3]"``) with its two values, ``errors`` the largest error per checked
    blob and ``checked`` the number of elements compared.
    """

    layer: str
    max_error: float
    tolerance: float
    worst: str
    analytic: float
    numeric: float
    errors: dict[str, float] = field(default_factory=dict)
    checked: int = 0

    @property
    def passed(self) -> bool:
        return self.max_error <= self.tolerance

    def __str__(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (f"gradient check of {self.layer} {verdict}: max error {self.max_error:.3g} "
                f"(tolerance {self.tolerance:.3g}) at {self.worst}: analytic "
                f"{self.analytic:.6g}, numeric {self.numeric:.6g}; {self.checked} elements")


def _layer_name(layer: Layer) -> str:
    return f"layer {layer.name!r} ({layer.type or type(layer).__name__})"


def check_gradient(layer: Layer, bottom_shapes: list[tuple] | None = None,
                   bottoms: list[Any] | None = None, *, eps: float = 1e-6,
                   tolerance: float = 1e-5, seed: int = 0, check_bottom: list[int] | None = None,
                   check_params: bool = True, max_checks: int | None = 200,
                   dtype: Any = np.float64, raise_on_fail: bool = True) -> GradientCheckReport:
    """Compare ``layer.backward`` with central differences of ``layer.forward``.

    The objective is ``sum_k <top_k, W_k>`` with fixed random weights ``W_k``; its analytic
    gradient is ``backward(W)``. Every checked element ``x`` of a bottom or a trainable
    parameter (lr_mult != 0) gets the numeric estimate ``(f(x + eps) - f(x - eps)) / (2 eps)``
    in ``dtype`` (float64 by default). ``bottoms`` gives the bottom arrays (else standard
    normals of ``bottom_shapes``); integer bottoms (labels) and those not in ``check_bottom``
    are not checked. Blobs larger than ``max_checks`` are checked at that many random
    elements. NumPy's global RNG is reseeded before every forward (Dropout draws one mask),
    and restored afterwards, as are the layer's parameters.

    Returns a :class:`GradientCheckReport`; with ``raise_on_fail`` a failure raises
    :class:`GradientCheckError` carrying the report's text.
    """
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if bottoms is None:
        if bottom_shapes is None:
            raise ValueError("check_gradient: give bottom_shapes or bottoms")
        bottoms = [rng.standard_normal(tuple(s)) for s in bottom_shapes]
    bottoms = [np.array(b, dtype=dtype) if np.asarray(b).dtype.kind == "f" else np.asarray(b)
               for b in bottoms]
    shapes = [b.shape for b in bottoms]
    layer.ensure_setup(shapes)
    if check_bottom is None:
        check_bottom = [i for i, b in enumerate(bottoms) if b.dtype.kind == "f"]
    saved_rng = np.random.get_state()
    saved_params = [(blob.data, blob._diff) for blob in layer.params]
    saved_flags = (layer.needs_backward, layer.bottom_needs_diff, layer.dtype)
    try:
        for blob in layer.params:  # check on copies in the check's precision
            blob.data = np.array(blob.data, dtype=dtype if blob.data.dtype.kind == "f"
                                 else blob.data.dtype)
            blob.diff = None
        layer.dtype = dtype
        return _check(layer, bottoms, check_bottom, check_params, eps, tolerance, seed, rng,
                      max_checks, raise_on_fail)
    finally:
        for blob, (data, diff) in zip(layer.params, saved_params):
            blob.data, blob.diff = data, diff
        layer.needs_backward, layer.bottom_needs_diff, layer.dtype = saved_flags
        np.random.set_state(saved_rng)


def _check(layer: Layer, bottoms: list, check_bottom: list[int], check_params: bool,
           eps: float, tolerance: float, seed: int, rng: np.random.Generator,
           max_checks: int | None, raise_on_fail: bool) -> GradientCheckReport:
    shapes = [b.shape for b in bottoms]
    propagate = [i in check_bottom for i in range(len(bottoms))]
    # the learned blobs as they are now: each finite-difference forward starts from them
    # (BatchNorm's forward updates its statistics blobs, which are restored every time)
    originals = [blob.data.copy() for blob in layer.params]

    def run(record: bool) -> list:
        for blob, original in zip(layer.params, originals):
            np.copyto(blob.data, original)
        layer.needs_backward = record
        layer.bottom_needs_diff = propagate
        np.random.seed(seed)
        layer.reshape(shapes)
        return [np.asarray(t, dtype=np.float64) for t in layer.forward(bottoms)]

    tops = run(record=True)
    weights = [np.asarray(rng.standard_normal(t.shape)) for t in tops]
    for blob in layer.params:
        blob.diff = np.zeros_like(blob.data)
    top_diff = [w.astype(t.dtype if t.dtype.kind == "f" else np.float64)
                for w, t in zip(weights, tops)]
    bottom_diff = layer.backward(top_diff, list(propagate))
    analytic: list[tuple[str, np.ndarray, Any]] = []  # (label, gradient, the array to nudge)
    for i in check_bottom:
        g = bottom_diff[i]
        label = f"bottom {i}"
        if g is None:
            raise GradientCheckError(f"{_layer_name(layer)}: backward returned no diff for "
                                     f"{label} although propagate_down asked for it")
        if np.shape(g) != bottoms[i].shape:
            raise GradientCheckError(f"{_layer_name(layer)}: the diff of {label} has shape "
                                     f"{np.shape(g)}, the bottom {bottoms[i].shape}")
        analytic.append((label, np.array(g, dtype=np.float64), bottoms[i]))
    if check_params:
        for j, blob in enumerate(layer.params):
            if blob.lr_mult != 0:
                label = f"param {blob.name or j!r}"
                analytic.append((label, np.array(blob.diff, dtype=np.float64), originals[j]))

    def objective() -> float:
        return float(sum(np.sum(t * w) for t, w in zip(run(record=False), weights)))

    report = GradientCheckReport(_layer_name(layer), 0.0, tolerance, "nothing checked", 0.0,
                                 0.0)
    for label, grad, target in analytic:
        flat = target.reshape(-1)  # a view: nudging it nudges the bottom or the parameter
        indices = np.arange(flat.size)
        if max_checks is not None and flat.size > max_checks:
            indices = rng.choice(flat.size, size=max_checks, replace=False)
        worst = 0.0
        for k in indices:
            keep = flat[k]
            flat[k] = keep + eps
            plus = objective()
            flat[k] = keep - eps
            minus = objective()
            flat[k] = keep
            numeric = (plus - minus) / (2 * eps)
            value = float(grad.reshape(-1)[k])
            error = abs(value - numeric) / max(abs(value), abs(numeric), 1.0)
            worst = max(worst, error)
            report.checked += 1
            if error > report.max_error or report.worst == "nothing checked":
                index = np.unravel_index(k, target.shape)
                report.max_error = max(report.max_error, error)
                report.worst = f"{label} {list(map(int, index))}"
                report.analytic, report.numeric = value, numeric
        report.errors[label] = worst
    if raise_on_fail and not report.passed:
        raise GradientCheckError(str(report))
    return report
