"""Check ops: identity ops that validate values in every mode (eager, Session, JIT)."""

# A check is a graph op (in the spirit of ``tf.debugging.assert_*``), so it runs wherever
# values exist: at once in eager mode, on every Session run and on every call of a JIT plan.
# Its output is the checked input itself: code that uses the output (not the input) keeps
# the check alive through pruning and dead-step elimination.

from __future__ import annotations

from ..backend import array_module
from ..kernels import cross_entropy
from .registry import Aval, CheckError, Op, ShapeError, register


@register("check_class_ids", inputs=("y",))
class CheckClassIds(Op):
    """``y`` unchanged, after checking that every value is a whole class id in [0, classes).

    ``what`` names the caller in the error (``"SoftmaxLoss"``). A failure raises
    :class:`CheckError` (a ValueError) with the same message in every mode; the message names
    the logits shape as ``(*y.shape, classes)``, known once ``y`` has a value.
    """

    differentiable = False

    def __init__(self, classes: int, what: str = "check_class_ids") -> None:
        self.classes = int(classes)
        self.what = str(what)

    def compute(self, y):
        if cross_entropy.ids_within(y, self.classes):  # integer ids: one compiled pass
            return y
        xp = array_module(y)
        if y.dtype.kind == "f" and not bool(xp.all(y == xp.round(y))):
            raise CheckError(f"{self.what}: float labels must be whole numbers (class ids)")
        # one min and one max over the labels: the cost of the check when it passes
        if y.size and (bool(y.min() < 0) or bool(y.max() >= self.classes)):
            bad = y[(y < 0) | (y >= self.classes)]
            logits_shape = (*y.shape, self.classes)
            raise CheckError(f"{self.what}: class ids must lie in [0, {self.classes}) for "
                             f"logits of shape {logits_shape}, got {bad[:5].tolist()}")
        return y

    def infer(self, y: Aval) -> Aval:
        if y.dtype.kind not in "iuf":
            raise ShapeError(f"{self.what}: labels must be integer class ids, got dtype "
                             f"{y.dtype}")
        return y

