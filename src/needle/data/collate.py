"""Collation: turn a list of samples into one batch (a tuple of stacked NumPy arrays)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def default_collate(samples: Sequence[Any]) -> tuple[np.ndarray, ...]:
    """Stack field j of every sample into one array: ``[(x0, y0), (x1, y1)] -> (X, Y)``.

    A sample that is not a tuple or list counts as one field, so the batch is a 1-tuple.
    Python ints become int64 and floats float64, as ``np.asarray`` makes them.
    """
    if len(samples) == 0:
        raise ValueError("default_collate: got no samples (an empty batch)")
    first = samples[0]
    if not isinstance(first, tuple | list):
        return (np.stack([np.asarray(s) for s in samples]),)
    n_fields = len(first)
    for i, s in enumerate(samples):
        if not isinstance(s, tuple | list) or len(s) != n_fields:
            raise ValueError(
                f"default_collate: sample {i} has {len(s) if isinstance(s, tuple | list) else 1} "
                f"fields, sample 0 has {n_fields}; every sample needs the same fields")
    return tuple(np.stack([np.asarray(s[j]) for s in samples]) for j in range(n_fields))
