"""Graph: the default-graph context, its leaves and its bookkeeping."""

from __future__ import annotations

import warnings
import weakref
from typing import Any

from ..core import context
from ..core.registry import NodeMeta
from ..core.source import caller_site, user_source


class Graph:
    """A declared computation: its leaves, (weakly) its op nodes, and a node count.

    ``with st.Graph() as g:`` makes ``g`` the default graph for everything made inside.
    Inside the block every op keeps its inputs, even one applied only to eager tensors
    (``ops.reshape(param)``), so a Session recomputes it from their current values on each
    run instead of freezing the value it had when the graph was built.
    """

    #: a Session.run call site that sees the graph grow this many times in a row warns
    GROWTH_WARNING_RUNS = 3

    def __init__(self) -> None:
        self.placeholders: list = []
        self.variables: list = []
        self.constants: list = []
        self.node_count = 0
        self._nodes: list[weakref.ref] = []  # op nodes, for to_dot (not kept alive by the graph)
        # nodes with effects (BatchNorm's stores) are kept: nothing else may hold them, and
        # st.minimize / st.state_updates look them up
        self._effects: list = []
        self._prune_at = 1024
        self._last_run: tuple | None = None  # (call site, node_count) at the previous run
        self._growing_runs = 0
        self._warned = False
        self._names: dict[str, Any] = {}  # names given by Graph.save / st.load_graph

    # -- context -------------------------------------------------------------------------------
    def __enter__(self) -> Graph:
        # the default graph and recording belong to this thread (as in TensorFlow 1)
        state = context.state()
        state.graphs.append(self)
        state.recording += 1
        return self

    def __exit__(self, *exc: object) -> None:
        state = context.state()
        state.recording -= 1
        # remove this graph's innermost entry (graphs may be entered more than once)
        for i in range(len(state.graphs) - 1, -1, -1):
            if state.graphs[i] is self:
                del state.graphs[i]
                break

    def as_default(self) -> Graph:
        """``with g.as_default():`` is the same as ``with g:`` (TensorFlow's spelling)."""
        return self

    # -- bookkeeping ---------------------------------------------------------------------------
    def add_leaf(self, node: Any, kind: str) -> None:
        getattr(self, kind).append(node)
        self.node_count += 1

    def add_node(self, node: Any) -> None:
        """Count an op node made while this graph is the default."""
        self.node_count += 1
        self._nodes.append(weakref.ref(node))
        # a JIT trace is not a declared graph: its effects belong to the trace alone
        if node.op.side_effect and context.active_trace() is None:
            self._effects.append(node)
        if len(self._nodes) >= self._prune_at:  # drop dead references now and then
            self._nodes = [r for r in self._nodes if r() is not None]
            self._prune_at = max(1024, 2 * len(self._nodes))

    def nodes(self) -> list:
        """The op nodes made in this graph that are still alive, in creation order."""
        return [n for n in (r() for r in self._nodes) if n is not None]

    def effect_nodes(self) -> list:
        """The nodes with effects (assign, store, print, train ops) made in this graph."""
        return list(self._effects)

    def trainable_variables(self) -> list:
        """The Variables made with ``trainable=True``."""
        return [v for v in self.variables if v.trainable]

    def note_run(self) -> None:
        """Called by Session.run: warn once when one call site keeps seeing the graph grow.

        Making nodes between runs is fine (build, run, extend, run); a run made from the
        same line again and again with new nodes each time is a graph built inside a loop.
        """
        site = caller_site()
        last = self._last_run
        if last is not None and last[0] == site and self.node_count > last[1]:
            self._growing_runs += 1
        else:
            self._growing_runs = 0
        if self._growing_runs >= self.GROWTH_WARNING_RUNS and not self._warned:
            self._warned = True
            assert last is not None  # (runs grow only after a last run)
            added = self.node_count - last[1]
            where = f" at {site[0]}:{site[1]}" if site else ""
            warnings.warn(
                f"the graph keeps growing: Session.run{where} has seen {added} new nodes since "
                f"its previous call, {self._growing_runs} calls in a row. Build the graph once, "
                "outside the loop, and feed new values through placeholders.",
                RuntimeWarning, stacklevel=3)
        self._last_run = (site, self.node_count)

    # -- names and files -------------------------------------------------------------------------
    def get(self, name: str) -> Any:
        """The node called ``name``: one named when the graph was saved or loaded, a
        placeholder, Variable or constant, or an op node (``matmul_12``); a KeyError lists
        the known names otherwise."""
        node = self._names.get(name)
        if node is not None:
            return node
        for leaf in (*self.placeholders, *self.variables, *self.constants):
            if leaf.meta.name == name:
                return leaf
        for node in self.nodes():
            if node.meta is not None and node.meta.name == name:
                return node
        known = sorted(self._names) + [leaf.meta.name for leaf in (
            *self.placeholders, *self.variables, *self.constants)]
        shown = ", ".join(known[:40]) + (f", ... ({len(known) - 40} more)"
                                          if len(known) > 40 else "")
        raise KeyError(f"no node named {name!r} in the graph; known names: {shown or 'none'} "
                       "(and op nodes by their names, e.g. 'matmul_12')")

    def save(self, path: Any, session: Any = None, names: dict[str, Any] | None = None) -> None:
        """Write the whole graph (its effects, Variables, placeholders, constants, the nodes
        in ``names`` and everything they reach) to ``path``, a data-only needle archive:
        Variables with ``session``'s values (their initial values without one), a train op
        with its optimizer's state. ``st.load_graph(path)`` reads it back where the code that
        built it is absent; ``names`` become ``g.get(name)`` there."""
        context.service("save_graph")(self, path, session, names)

    def to_dot(self, fetches: Any = None, feed_dict: dict | None = None) -> str:
        """Graphviz DOT text of the graph (see :func:`needle.static.dot.to_dot`)."""
        from .dot import to_dot

        return to_dot(self, fetches, feed_dict)


#: the process-wide default graph, used by threads that have not entered one
_GLOBAL_GRAPH: list[Graph] = [Graph()]


def get_default_graph() -> Graph:
    """The graph that new placeholders, Variables, constants and op nodes belong to: the
    innermost one this thread entered (``with g:``), else the process-wide default."""
    graphs = context.state().graphs
    return graphs[-1] if graphs else _GLOBAL_GRAPH[0]


def load_graph(path: Any) -> Graph:
    """The graph ``Graph.save`` wrote to ``path`` (see ``needle.program.graph_io``): every
    problem named in one error before anything is built; nothing in the file runs but
    registered ops. A ``Session`` on it starts from the saved Variable values."""
    return context.service("load_graph")(path)


def reset_default_graph() -> None:
    """Replace the process-wide default graph by an empty one."""
    _GLOBAL_GRAPH[0] = Graph()


def _on_lazy_node(node: Any) -> None:
    """Every lazy op node: remember where the user made it, and count it in the graph."""
    graph = get_default_graph()
    if node.meta is None:
        node.meta = NodeMeta(name=f"{node.op.name}_{graph.node_count}", source=user_source())
    graph.add_node(node)


context.add_node_hook(_on_lazy_node)
