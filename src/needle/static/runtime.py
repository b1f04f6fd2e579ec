"""The Session that is running a graph right now in this thread (state ops reach Variables
through it), and the observers told about each step it runs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ..core import context


def current_session() -> Any:
    """The Session whose ``run`` is executing in this thread, or a RuntimeError outside any."""
    sessions = context.state().sessions
    if not sessions:
        raise RuntimeError("this graph operation changes Variables and runs only inside "
                           "Session.run")
    return sessions[-1]


@contextlib.contextmanager
def running(session: Any) -> Iterator[None]:
    """``session`` runs a graph in this thread inside the block."""
    sessions = context.state().sessions
    sessions.append(session)
    try:
        yield
    finally:
        sessions.pop()


def step_observers() -> list:
    """This thread's callables told about every step run, innermost last (RunMetadata
    listens to cond branches)."""
    return context.state().step_observers
