"""The Session that is running a graph right now (state ops reach Variables through it)."""

from __future__ import annotations

import contextlib
from typing import Any

_RUNNING: list = []
#: callables told about every step run, innermost last (RunMetadata listens to cond branches)
STEP_OBSERVERS: list = []


def current_session() -> Any:
    """The Session whose ``run`` is executing, or a RuntimeError outside any run."""
    if not _RUNNING:
        raise RuntimeError("this graph operation changes Variables and runs only inside "
                           "Session.run")
    return _RUNNING[-1]


@contextlib.contextmanager
def running(session: Any):
    _RUNNING.append(session)
    try:
        yield
    finally:
        _RUNNING.pop()
