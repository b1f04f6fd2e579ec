"""needle.init: tensor factories and weight initializers, all drawing from NumPy's global RNG."""

from .basic import (
    constant,
    one_hot,
    ones,
    ones_like,
    rand,
    randb,
    randn,
    zeros,
    zeros_like,
)
from .initializers import (
    calculate_gain,
    kaiming_normal,
    kaiming_uniform,
    xavier_normal,
    xavier_uniform,
)

__all__ = [
    "calculate_gain", "constant", "kaiming_normal", "kaiming_uniform", "one_hot", "ones",
    "ones_like", "rand", "randb", "randn", "xavier_normal", "xavier_uniform", "zeros",
    "zeros_like",
]
