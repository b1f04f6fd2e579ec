"""Capture and restore NumPy random-number-generator state as checkpoint-friendly values."""

from __future__ import annotations

from typing import Any

import numpy as np


def rng_state(generator: np.random.Generator | None = None) -> Any:
    """The state of NumPy's global RNG (``np.random.get_state()``), or of ``generator``.

    The global state is a tuple ``('MT19937', uint32 array (624,), pos, has_gauss, cached_gauss)``;
    a ``Generator``'s state is its bit generator's dict. Both store in a checkpoint exactly:

    >>> import needle.checkpoint as ckpt
    >>> state = ckpt.rng_state()
    >>> a = np.random.rand(3)
    >>> ckpt.set_rng_state(state)
    >>> bool((np.random.rand(3) == a).all())
    True
    """
    if generator is None:
        return np.random.get_state()
    return generator.bit_generator.state


def set_rng_state(state: Any, generator: np.random.Generator | None = None) -> None:
    """Restore a state from :func:`rng_state` (for example one loaded from a checkpoint)."""
    if generator is None:
        np.random.set_state(state)
    else:
        generator.bit_generator.state = state
