"""Declared graphs (``needle.static``) as data: written incrementally, read back, trained on.

A TF1 MetaGraph in needle's terms: every node of a declared graph (placeholders, Variables
with their values, constants, registered ops with their attributes, the state writes of a
training step and the optimizer that runs it) written as JSON data plus arrays, and rebuilt
into a fresh ``st.Graph`` where the code that built it is absent. Nothing in the data runs
but registered ops; an optimizer is named from a fixed table, never imported.

Incremental API (the remote Session ships a graph once, then only the nodes added since)::

    writer = GraphWriter(session=None)
    delta, arrays = writer.add(roots, names=None)
        # every node reachable from ``roots`` (and from the nodes in ``names``) that no
        # earlier ``add`` wrote, inputs first; ``delta`` is JSON-able, ``arrays`` maps the
        # names it mentions to NumPy arrays. Variables carry the session's current values
        # (their initial values without a session); an optimizer its hyperparameters and
        # state. Raises one ProgramError listing everything that cannot be written (nothing
        # is recorded as written then).
    writer.id_of(node) -> int          # the stable id of a written node (KeyError if not)

    reader = GraphReader()
    reader.add(delta, arrays)          # validate (one ProgramError listing every problem,
                                       # nothing built), then rebuild inside reader.graph
    reader.node(id) -> node            # the rebuilt node for a writer's id
    reader.names -> {name: node}       # every name given to ``add`` so far
    reader.initial_values -> {Variable name: saved array}
    reader.optimizers -> {optimizer id: the rebuilt optimizer}

A Session on ``reader.graph`` starts from the saved Variable values; the rebuilt train op
holds an optimizer with the saved state, so training continues bit for bit. Parameters and
buffers of ``nn.Module``s (eager leaves a declared graph reads) become Variables of the
rebuilt graph (``trainable`` for parameters), named by ``names`` where given. Eager leaves
that are neither state nor trainable become constants.

Delta layout (format ``needle-graph``, version 1)::

    {"format": "needle-graph", "version": 1,
     "nodes": [{"id", "kind": "placeholder", "name", "shape", "dtype", "source"}
               | {"id", "kind": "variable", "name", "array", "trainable", "origin", "source"}
               | {"id", "kind": "constant", "name", "array"}
               | {"id", "kind": "op", "op", "attrs", "inputs", "refs", "shape" | "shapes",
                  "dtype" | "dtypes", "name", "source", "branches"?, "stand_ins"?}],
     "optimizers": [{"id", "class", "hyperparams", "fused", "step_count", "params",
                     "state": {index: {state name: array}}}],
     "names": {name: id}}

``refs`` names the leaves an effect writes (``store``: ``target``, ``assign``: ``var``,
``apply_updates``: ``optimizer`` and ``params``). ``cond`` / ``while_loop`` nodes hold their
branches as sub-lists of op nodes (``{"nodes", "outputs"}``) whose ids are visible only
inside; a while loop's loop variables are ``stand_ins``.

``Graph.save(path, session=None, names=None)`` / ``st.load_graph(path)`` write and read one
delta holding the whole graph, inside needle's checkpoint archive (key ``graph``).
"""

from __future__ import annotations

import os
from typing import Any

from .. import checkpoint
from ..core import context
from ..static.graph import Graph
from .encoding import ProgramError
from .graph_format import FORMAT, OPTIMIZERS, VERSION, branches_of
from .graph_reader import GraphReader
from .graph_writer import GraphWriter


def _branch_internal_ids(graph: Graph) -> set[int]:
    """Ids of the nodes made inside cond / while_loop branches (written with their node)."""
    inside: set[int] = set()
    for node in graph.nodes():
        for _, branch in branches_of(node.op):
            inside |= branch.internal
    return inside


def save_graph(graph: Graph, path: str | os.PathLike, session: Any = None,
               names: dict[str, Any] | None = None) -> None:
    """Write ``graph`` (its named nodes, effects, Variables, placeholders and constants, and
    everything they reach) to ``path`` in needle's checkpoint archive, atomically."""
    if session is not None and getattr(session, "graph", None) is not graph:
        raise ValueError("Graph.save: the session runs another graph")
    inside = _branch_internal_ids(graph)
    roots = [n for n in graph.effect_nodes() if id(n) not in inside]
    roots += [*graph.variables, *graph.placeholders, *graph.constants]
    all_names = {**graph._names, **(names or {})}
    writer = GraphWriter(session)
    delta, arrays = writer.add(roots, all_names)
    checkpoint.save(path, graph={**delta, "arrays": arrays})
    graph._names.update(names or {})  # g.get(name) finds them here too


def load_graph(path: str | os.PathLike) -> Graph:
    """The graph a ``Graph.save`` wrote: one ProgramError (or CheckpointError for a damaged
    archive) naming every problem, nothing executed. A Session on it starts from the saved
    Variable values; its train ops hold the saved optimizer state."""
    data = checkpoint.load(path)
    spec = data.get("graph")
    if not isinstance(spec, dict):
        hint = " (it holds a needle program: use ndl.load_program)" if "program" in data else ""
        raise ProgramError(f"{os.fspath(path)}: not a needle graph{hint}")
    arrays = spec.pop("arrays", {})
    if not isinstance(arrays, dict):
        raise ProgramError(f"{os.fspath(path)}: malformed arrays")
    reader = GraphReader()
    reader.add(spec, arrays)
    return reader.graph


context.provide("save_graph", save_graph)
context.provide("load_graph", load_graph)

__all__ = ["FORMAT", "OPTIMIZERS", "VERSION", "GraphReader", "GraphWriter", "load_graph",
           "save_graph"]
