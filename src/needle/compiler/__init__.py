"""Graph passes shared by the Session and the JIT: CSE, constant folding, memory plan."""

from .passes import (
    eliminate_common_subexpressions,
    eliminate_dead_steps,
    fold_constants,
    infer_avals,
    optimize,
    predict_peak_bytes,
)

__all__ = [
    "eliminate_common_subexpressions", "eliminate_dead_steps", "fold_constants", "infer_avals",
    "optimize", "predict_peak_bytes",
]
