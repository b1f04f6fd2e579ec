"""Graph: the default-graph context, its leaves and its bookkeeping."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

from ..autograd import LAZY_NODE_HOOKS
from ..core.registry import NodeMeta

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def user_source() -> str | None:
    """``file:line`` of the innermost caller outside the needle package."""
    frame = sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame = frame.f_back
    if frame is None:
        return None
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


class Graph:
    """A declared computation: the leaves made while it is the default graph, and a node count.

    ``with st.Graph() as g:`` makes ``g`` the default graph for everything made inside.
    """

    #: a graph that grows during this many consecutive Session.run intervals gets a warning
    GROWTH_WARNING_RUNS = 3

    def __init__(self) -> None:
        self.placeholders: list = []
        self.variables: list = []
        self.constants: list = []
        self.node_count = 0
        self._count_at_last_run: int | None = None
        self._growing_runs = 0
        self._warned = False

    # -- context -------------------------------------------------------------------------------
    def __enter__(self) -> Graph:
        _DEFAULT_STACK.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _DEFAULT_STACK.remove(self)

    def as_default(self) -> Graph:
        return self

    # -- bookkeeping ---------------------------------------------------------------------------
    def add_leaf(self, node: Any, kind: str) -> None:
        getattr(self, kind).append(node)
        self.node_count += 1

    def note_run(self) -> None:
        """Called by Session.run: warn once when every recent interval added nodes."""
        if self._count_at_last_run is not None and self.node_count > self._count_at_last_run:
            self._growing_runs += 1
        else:
            self._growing_runs = 0
        if self._growing_runs >= self.GROWTH_WARNING_RUNS and not self._warned:
            self._warned = True
            added = self.node_count - (self._count_at_last_run or 0)
            warnings.warn(
                f"the graph keeps growing: {added} nodes were added since the last Session.run, "
                f"for {self._growing_runs} runs in a row. Build the graph once, outside the loop, "
                "and feed new values through placeholders.", RuntimeWarning, stacklevel=3)
        self._count_at_last_run = self.node_count

    def to_dot(self, fetches: Any = None) -> str:
        """Graphviz DOT text of the graph (see :func:`needle.static.dot.to_dot`)."""
        from .dot import to_dot

        return to_dot(self, fetches)


_DEFAULT_STACK: list[Graph] = [Graph()]


def get_default_graph() -> Graph:
    """The graph that new placeholders, Variables and constants belong to."""
    return _DEFAULT_STACK[-1]


def reset_default_graph() -> None:
    """Replace the global default graph by an empty one."""
    _DEFAULT_STACK[0] = Graph()


def _on_lazy_node(node: Any) -> None:
    """Every lazy op node: remember where the user made it, and count it in the graph."""
    graph = get_default_graph()
    if node.meta is None:
        node.meta = NodeMeta(name=f"{node.op.name}_{graph.node_count}", source=user_source())
    graph.node_count += 1


LAZY_NODE_HOOKS.append(_on_lazy_node)
