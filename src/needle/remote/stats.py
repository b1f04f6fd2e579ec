"""A remote run's step statistics (profiler Events) as JSON and back, for RunMetadata."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from ..core.profiling import Event

#: the Event fields that travel (all of them: an Event is plain data)
FIELDS = ("name", "kind", "category", "phase", "node", "source", "input_shapes",
          "input_dtypes", "output_shapes", "output_dtypes", "bytes", "start_ns", "dur_ns",
          "self_ns", "thread")
_SHAPES = ("input_shapes", "output_shapes")
_DTYPES = ("input_dtypes", "output_dtypes")


def _plain(value: Any) -> Any:
    """Shapes and dtypes (nested tuples of ints / np.dtype) as JSON data."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, np.dtype):
        return value.name
    if isinstance(value, np.integer):
        return int(value)
    if value is None or isinstance(value, str | int | float):
        return value
    return getattr(value, "__name__", None) or str(value)  # (a type: its name)


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _dtypes(value: Any) -> Any:
    """np.dtype objects back from their names; other names (``"NoneType"`` for an
    operation's value) stay as they were."""
    if isinstance(value, list):
        return tuple(_dtypes(v) for v in value)
    if isinstance(value, str) and value in _NUMPY_NAMES:
        return np.dtype(value)
    return value


_NUMPY_NAMES = frozenset(np.dtype(c).name for c in np.typecodes["All"] if c not in "OUVSaMm")


def events_to_json(events: list) -> str:
    return json.dumps([{f: _plain(getattr(e, f, None)) for f in FIELDS} for e in events])


def events_from_json(text: str) -> list:
    """Events rebuilt from ``events_to_json`` (node names and times as the server saw them)."""
    events = []
    for record in json.loads(text) if text else []:
        event = Event.__new__(Event)
        for name in FIELDS:
            value = record.get(name)
            if name in _SHAPES:
                value = _tuples(value)
            elif name in _DTYPES:
                value = _dtypes(value)
            setattr(event, name, value)
        events.append(event)
    return events


__all__ = ["events_from_json", "events_to_json"]
