"""Weight initializers (Xavier/Glorot, Kaiming/He) and the gain of each nonlinearity.

Each initializer makes one draw through ``rand`` or ``randn`` (NumPy's global RNG).
"""

from __future__ import annotations

import math
from typing import Any

from ..autograd import Tensor
from .basic import rand, randn

__all__ = [
    "calculate_gain", "kaiming_normal", "kaiming_uniform", "xavier_normal", "xavier_uniform",
]

_GAINS = {"linear": 1.0, "identity": 1.0, "sigmoid": 1.0, "conv1d": 1.0, "conv2d": 1.0,
          "conv3d": 1.0, "tanh": 5.0 / 3.0, "relu": math.sqrt(2.0), "selu": 3.0 / 4.0}


def calculate_gain(nonlinearity: str, param: float | None = None) -> float:
    """The recommended gain for ``nonlinearity`` (PyTorch's values).

    linear, identity, sigmoid, conv*: 1; tanh: 5/3; relu: sqrt(2); selu: 3/4;
    leaky_relu: sqrt(2 / (1 + slope^2)) with slope ``param`` (default 0.01).
    """
    if nonlinearity == "leaky_relu":
        slope = 0.01 if param is None else float(param)
        return math.sqrt(2.0 / (1.0 + slope**2))
    if nonlinearity not in _GAINS:
        raise ValueError(f"calculate_gain: unknown nonlinearity {nonlinearity!r}; expected one "
                         f"of {sorted([*_GAINS, 'leaky_relu'])}")
    return _GAINS[nonlinearity]


def _check_fans(name: str, *fans: int) -> None:
    for fan in fans:
        if fan <= 0:
            raise ValueError(f"{name}: fan_in and fan_out must be positive, got {fans}")


def xavier_uniform(fan_in: int, fan_out: int, gain: float = 1.0, shape: tuple | None = None,
                   **kwargs: Any) -> Tensor:
    """Uniform on [-a, a] with a = gain * sqrt(6 / (fan_in + fan_out)); shape (fan_in, fan_out)."""
    _check_fans("xavier_uniform", fan_in, fan_out)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    shape = (fan_in, fan_out) if shape is None else shape
    return rand(*shape, low=-bound, high=bound, **kwargs)


def xavier_normal(fan_in: int, fan_out: int, gain: float = 1.0, shape: tuple | None = None,
                  **kwargs: Any) -> Tensor:
    """Normal(0, std^2) with std = gain * sqrt(2 / (fan_in + fan_out)); shape (fan_in, fan_out)."""
    _check_fans("xavier_normal", fan_in, fan_out)
    std = gain * math.sqrt(2.0 / (fan_in + fan_out))
    shape = (fan_in, fan_out) if shape is None else shape
    return randn(*shape, mean=0.0, std=std, **kwargs)


def _kaiming_args(nonlinearity: Any, shape: Any) -> tuple[str, Any]:
    # needle's hw4 signature is (fan_in, fan_out, shape=None, nonlinearity="relu"), hw2's is
    # (fan_in, fan_out, nonlinearity="relu"): accept a shape given positionally in third place
    if isinstance(nonlinearity, tuple | list):
        nonlinearity, shape = ("relu" if shape is None else shape), nonlinearity
    return nonlinearity, shape


def kaiming_uniform(fan_in: int, fan_out: int, nonlinearity: str = "relu",
                    shape: tuple | None = None, **kwargs: Any) -> Tensor:
    """Uniform on [-b, b] with b = gain * sqrt(3 / fan_in) (relu: sqrt(2) * sqrt(3 / fan_in)).

    The result has shape (fan_in, fan_out) unless ``shape`` is given (the bound still comes
    from ``fan_in``, as for a conv kernel (k, k, in, out) with fan_in = in * k * k).
    """
    nonlinearity, shape = _kaiming_args(nonlinearity, shape)
    _check_fans("kaiming_uniform", fan_in, fan_out)
    bound = calculate_gain(nonlinearity) * math.sqrt(3.0 / fan_in)
    shape = (fan_in, fan_out) if shape is None else shape
    return rand(*shape, low=-bound, high=bound, **kwargs)


def kaiming_normal(fan_in: int, fan_out: int, nonlinearity: str = "relu",
                   shape: tuple | None = None, **kwargs: Any) -> Tensor:
    """Normal(0, std^2) with std = gain / sqrt(fan_in) (relu: sqrt(2) / sqrt(fan_in))."""
    nonlinearity, shape = _kaiming_args(nonlinearity, shape)
    _check_fans("kaiming_normal", fan_in, fan_out)
    std = calculate_gain(nonlinearity) / math.sqrt(fan_in)
    shape = (fan_in, fan_out) if shape is None else shape
    return randn(*shape, mean=0.0, std=std, **kwargs)
