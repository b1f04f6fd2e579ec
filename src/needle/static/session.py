"""Session: runs the part of a declared graph that the fetches need, with feeds and Variables."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..autograd import Tensor, Value, _to_backend
from ..compiler import optimize as optimize_program
from ..compiler import predict_peak_bytes
from ..core.interpret import (
    ByteTracker,
    Program,
    build_program,
    describe_node,
    plan_frees,
    run_program,
)
from ..core.registry import fmt_shape
from .graph import Graph, get_default_graph
from .nodes import Constant, Placeholder, Variable
from .runtime import running


@dataclass
class RunMetadata:
    """Filled by ``Session.run(..., run_metadata=...)``: what ran and the memory it held."""

    executed: list[str] = field(default_factory=list)
    peak_bytes: int = 0


@dataclass
class RunPlan:
    """What ``run`` would do, without doing it (``Session.plan``)."""

    steps: list[str]
    replaced_by_feeds: list[str]
    missing_feeds: list[str]
    peak_bytes_with_reuse: int
    peak_bytes_without_reuse: int
    passes: list[str]
    nodes_before: int
    nodes_after: int


def _flatten(fetches: Any) -> tuple[list, Callable[[list], Any]]:
    """Flat list of fetched nodes and a function rebuilding the nested structure from values."""
    if isinstance(fetches, Value):
        return [fetches], lambda values: values[0]
    if isinstance(fetches, dict):
        keys = list(fetches)
        parts = [_flatten(fetches[k]) for k in keys]
    elif isinstance(fetches, list | tuple):
        keys = None
        parts = [_flatten(f) for f in fetches]
    else:
        raise TypeError(f"Session.run: cannot fetch a {type(fetches).__name__}; fetch graph "
                        "tensors, operations, or lists / tuples / dicts of them")
    flat = [node for sub, _ in parts for node in sub]
    sizes = [len(sub) for sub, _ in parts]

    def rebuild(values: list) -> Any:
        out, start = [], 0
        for (_, inner), n in zip(parts, sizes):
            out.append(inner(values[start:start + n]))
            start += n
        if keys is not None:
            return type(fetches)(zip(keys, out)) if type(fetches) is not dict else dict(
                zip(keys, out))
        return type(fetches)(out) if isinstance(fetches, tuple) else out

    return flat, rebuild


class Session:
    """Executes graphs: ``Session(graph=None, optimize=True).run(fetches, feed_dict)``.

    Only the ancestors of the fetches that are not replaced by feeds run, each once per run.
    Variables of the graph get their initial values when the session starts and keep their
    values across runs. Plans are cached per (fetches, fed nodes); with ``optimize`` the
    shared compiler passes (constant folding, CSE, dead-step elimination, freeing values after
    their last use) apply; results are identical either way.
    """

    def __init__(self, graph: Graph | None = None, optimize: bool = True) -> None:
        self.graph = graph or get_default_graph()
        self.optimize = optimize
        self._values: dict[int, Any] = {}
        self._programs: dict[tuple, tuple[Program, list]] = {}
        for var in self.graph.variables:
            self._init_variable(var)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._programs.clear()

    # -- Variables -------------------------------------------------------------------------------
    def _init_variable(self, var: Variable) -> Any:
        value = var.initial_value.copy()
        self._values[id(var)] = (var, value)
        return value

    def variable_value(self, node: Tensor) -> Any:
        """The live array of a Variable (this session's) or of a parameter (its own data)."""
        if isinstance(node, Variable):
            entry = self._values.get(id(node))
            return entry[1] if entry is not None else self._init_variable(node)
        if node._data is None:
            raise TypeError(f"{describe_node(node)} is not a Variable or parameter")
        return node._data

    def variables(self) -> dict[str, np.ndarray]:
        """Name -> value (a copy) of every Variable of the graph."""
        return {var.name: np.array(self.variable_value(var)) for var in self.graph.variables}

    def load_variables(self, values: dict[str, Any], strict: bool = True) -> None:
        """Set Variables by name (arrays, Tensors, or a checkpoint's nested dict entry)."""
        by_name = {var.name: var for var in self.graph.variables}
        unknown = [k for k in values if k not in by_name]
        missing = [k for k in by_name if k not in values]
        if strict and (unknown or missing):
            raise KeyError(f"load_variables: unknown names {unknown}, missing names {missing}")
        for name, value in values.items():
            if name not in by_name:
                continue
            var = by_name[name]
            array = value.numpy() if isinstance(value, Tensor) else np.asarray(value)
            if tuple(array.shape) != tuple(var.shape):
                raise ValueError(f"load_variables: {name!r} has shape {fmt_shape(var.shape)}, "
                                 f"the value {fmt_shape(array.shape)}")
            np.copyto(self.variable_value(var), array.astype(var.dtype, copy=False))

    # -- feeds -----------------------------------------------------------------------------------
    @staticmethod
    def _check_feeds(feed_dict: dict | None) -> dict[int, tuple[Tensor, Any]]:
        feeds: dict[int, tuple[Tensor, Any]] = {}
        for node, value in (feed_dict or {}).items():
            if not isinstance(node, Tensor):
                raise TypeError(f"feed_dict keys must be graph tensors, got {node!r}")
            if isinstance(node, Placeholder):
                array = node.check_feed(value)
            else:
                array = value.numpy() if isinstance(value, Tensor) else np.asarray(value)
                shape = node.shape
                if len(shape) != array.ndim or any(
                        d is not None and d != n for d, n in zip(shape, array.shape)):
                    raise ValueError(f"feed for {describe_node(node)}: its shape is "
                                     f"{fmt_shape(shape)}, fed shape {fmt_shape(array.shape)}")
                array = array.astype(node.dtype, copy=False)
            array, _ = _to_backend(array, node.device, None, copy=False)
            feeds[id(node)] = (node, array)
        return feeds

    # -- planning --------------------------------------------------------------------------------
    def _program(self, flat: list, feeds: dict) -> tuple[Program, list]:
        key = (tuple(id(n) for n in flat), frozenset(feeds))
        cached = self._programs.get(key)
        if cached is not None:
            return cached

        def is_source(node: Any) -> bool:
            return node.op is None or id(node) in feeds

        program = build_program(flat, is_source)
        missing = [n for n in program.sources
                   if isinstance(n, Placeholder) and id(n) not in feeds]
        if self.optimize:
            optimize_program(program, self._constant_value)
        else:
            program.passes = ["prune"]
        self._programs[key] = (program, missing)
        return program, missing

    @staticmethod
    def _constant_value(node: Any) -> Any:
        return node.value if isinstance(node, Constant) else None

    def _source_value(self, node: Any, feeds: dict) -> Any:
        fed = feeds.get(id(node))
        if fed is not None:
            return fed[1]
        if isinstance(node, Variable):
            return self.variable_value(node)
        if isinstance(node, Constant):
            return node.value
        if node._data is not None:
            return node._data
        raise RuntimeError(f"{describe_node(node)} has no value and was not fed")

    # -- running ---------------------------------------------------------------------------------
    def run(self, fetches: Any, feed_dict: dict | None = None,
            run_metadata: RunMetadata | None = None) -> Any:
        """Values of ``fetches`` (same nesting, NumPy arrays; None for operations)."""
        self.graph.note_run()
        flat, rebuild = _flatten(fetches)
        feeds = self._check_feeds(feed_dict)
        program, missing = self._program(flat, feeds)
        if missing:
            names = ", ".join(f"{n.name!r} {fmt_shape(n.shape)}" for n in missing)
            raise ValueError(f"Session.run: these placeholders are needed and were not fed: "
                             f"{names}")
        env = {id(n): self._source_value(n, feeds) for n in program.sources}
        tracker = ByteTracker() if run_metadata is not None else None
        on_step = None
        if run_metadata is not None:
            run_metadata.executed = []

            def on_step(step: Any) -> None:
                run_metadata.executed.append(_node_name(step.node))

        with running(self):
            env = run_program(program, env, tracker, on_step)
        if run_metadata is not None:
            run_metadata.peak_bytes = tracker.peak
        values = [self._fetched(env[slot]) for slot in program.outputs]
        return rebuild(values)

    @staticmethod
    def _fetched(value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, tuple):
            return tuple(np.array(v) for v in value)
        return np.array(value)  # a copy the caller can keep (Variables are not aliased)

    def plan(self, fetches: Any, feed_dict: dict | None = None) -> RunPlan:
        """What ``run(fetches, feed_dict)`` would do, without running anything."""
        flat, _ = _flatten(fetches)
        feeds = self._check_feeds(feed_dict)
        program, missing = self._program(flat, feeds)
        unoptimized = build_program(flat, lambda n: n.op is None or id(n) in feeds)
        plan_frees(unoptimized)
        return RunPlan(
            steps=[_node_name(s.node) for s in program.steps],
            replaced_by_feeds=[_node_name(node) for node, _ in feeds.values()
                               if node.op is not None],
            missing_feeds=[n.name for n in missing],
            peak_bytes_with_reuse=predict_peak_bytes(program, free_early=self.optimize),
            peak_bytes_without_reuse=predict_peak_bytes(unoptimized, free_early=False),
            passes=list(program.passes),
            nodes_before=program.nodes_before,
            nodes_after=len(program.steps),
        )


def _node_name(node: Any) -> str:
    meta = node.meta
    name = meta.name if meta is not None and meta.name else None
    return name or f"{node.op.name}_{id(node) % 100000}"
