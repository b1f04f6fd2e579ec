"""Random primitives: drawn afresh every time they run (never merged, folded or replayed)."""

from __future__ import annotations

from ..backend import array_module
from ..kernels.random_mask import bernoulli_mask
from .registry import Aval, Op, register


@register("bernoulli_like", inputs=("a",))
class BernoulliLike(Op):
    """A 0/1 mask of a's shape and dtype, 1 with probability ``p``: ``rand(*a.shape) <= p``.

    One ``np.random.rand`` draw per run (NumPy's global RNG on the CPU, so ``np.random.seed``
    reproduces it; needle's ``init.randb`` makes the same draw, cast to float32 first).
    """

    differentiable = False
    random = True

    def __init__(self, p: float) -> None:
        self.p = float(p)

    def compute(self, a):
        # the draw, then one fused pass where numba runs (kernels/random_mask.py): same bits
        return bernoulli_mask(array_module(a), a.shape, self.p, a.dtype)

    def infer(self, a: Aval) -> Aval:
        return a
