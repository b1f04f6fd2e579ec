"""Graph passes shared by the Session and the JIT: CSE, constant folding, memory plan."""

from .passes import eliminate_common_subexpressions, fold_constants, optimize, predict_peak_bytes

__all__ = ["eliminate_common_subexpressions", "fold_constants", "optimize", "predict_peak_bytes"]
