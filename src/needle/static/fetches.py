"""Fetch structures: what ``Session.run`` and ``to_dot`` accept as fetches, flattened and
rebuilt (nested lists, tuples, namedtuples and dicts of graph nodes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..autograd import Value


def fetch_key(fetches: Any) -> Any:
    """A hashable key for a (nested) fetch structure: node ids and container kinds."""
    if isinstance(fetches, Value):
        return id(fetches)
    if isinstance(fetches, list):
        return ("list", *[fetch_key(f) for f in fetches])
    if isinstance(fetches, tuple):
        return (type(fetches), *[fetch_key(f) for f in fetches])
    if isinstance(fetches, dict):
        return (type(fetches), *[(k, fetch_key(v)) for k, v in fetches.items()])
    raise TypeError(f"Session.run: cannot fetch a {type(fetches).__name__}; fetch graph "
                    "tensors, operations, or lists / tuples / dicts of them")


def flatten_fetches(fetches: Any) -> tuple[list, Callable[[list], Any]]:
    """Flat list of fetched nodes and a function rebuilding the nested structure from values."""
    if isinstance(fetches, Value):
        return [fetches], lambda values: values[0]
    if isinstance(fetches, dict):
        keys = list(fetches)
        parts = [flatten_fetches(fetches[k]) for k in keys]
    elif isinstance(fetches, list | tuple):
        keys = None
        parts = [flatten_fetches(f) for f in fetches]
    else:
        fetch_key(fetches)  # raises the TypeError naming the bad fetch
        raise AssertionError("unreachable")
    flat = [node for sub, _ in parts for node in sub]
    sizes = [len(sub) for sub, _ in parts]
    kind = type(fetches)

    def rebuild(values: list) -> Any:
        out, start = [], 0
        for (_, inner), n in zip(parts, sizes):
            out.append(inner(values[start:start + n]))
            start += n
        if keys is not None:
            return kind(zip(keys, out))
        if kind is list:
            return out
        return kind(*out) if hasattr(kind, "_fields") else kind(out)  # namedtuples

    return flat, rebuild


__all__ = ["fetch_key", "flatten_fetches"]
