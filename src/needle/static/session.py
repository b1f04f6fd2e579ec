"""Session: runs the part of a declared graph that the fetches need, with feeds and Variables.

A run is planned once per (fetch structure, set of fed nodes): the program is pruned to the
fetches' ancestors (stopping at fed nodes), optimized by the shared compiler passes, compiled
to one straight-line function, and cached with everything a later run needs (how to fetch
each source value, which outputs may alias state and must be copied). A cached run only
checks the fed values' shapes, gathers the sources and calls the compiled function.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..autograd import Tensor, TensorTuple, _to_backend
from ..backend import cpu, device_of
from ..compiler import optimize as optimize_program
from ..compiler import predict_peak_bytes
from ..compiler.codegen import compile_program
from ..compiler.fusion import tiered
from ..core import context, profiling
from ..core.interpret import (
    ByteTracker,
    Program,
    build_program,
    describe_node,
    run_program,
    snapshot,
)
from ..core.profiling import Event, node_name
from ..core.registry import Aval, fmt_shape
from ..profiler import chrome_trace
from . import runtime
from .fetches import fetch_key, flatten_fetches
from .graph import Graph, get_default_graph
from .nodes import Constant, Placeholder, Variable

_CPU = cpu()

#: plans kept per Session by default (the least recently used is dropped first)
MAX_CACHED_PLANS = 64


@dataclass
class RunOptions:
    """What ``Session.run(..., options=...)`` records, as TensorFlow 1's ``RunOptions``.

    ``trace_level``: ``NO_TRACE`` (the default) leaves ``RunMetadata.step_stats`` empty;
    ``SOFTWARE_TRACE`` and above (``FULL_TRACE`` is what TF1 users write) time every step.
    Timing each step costs about as much again as the step-by-step run itself, so it is
    asked for, not implied by passing a ``RunMetadata``.
    """

    NO_TRACE = 0
    SOFTWARE_TRACE = 1
    HARDWARE_TRACE = 2
    FULL_TRACE = 3

    trace_level: int = NO_TRACE


@dataclass
class RunMetadata:
    """Filled by ``Session.run(..., run_metadata=...)``: what ran, its times and memory.

    ``executed``: node names in execution order (cond / while_loop branch steps included,
    right after nothing else ran in between); ``peak_bytes``: the most bytes of intermediate
    values held at once (buffers of Variables, parameters, feeds and constants excluded;
    values inside branches not counted); ``step_stats`` (with
    ``options=RunOptions(trace_level=RunOptions.FULL_TRACE)``, else empty, as in TensorFlow
    1): one profiler ``Event`` per step run, in the order the steps finished (``node``,
    ``name`` (the op), ``seconds``, ``input_shapes``, ``output_shapes``, ``bytes``).
    """

    executed: list[str] = field(default_factory=list)
    peak_bytes: int = 0
    step_stats: list[Event] = field(default_factory=list)

    @property
    def node_times(self) -> dict[str, float]:
        """Node name -> seconds it ran (summed over the runs of a while_loop body)."""
        times: dict[str, float] = {}
        for event in self.step_stats:
            key = event.node or event.name
            times[key] = times.get(key, 0.0) + event.seconds
        return times

    def chrome_trace(self, path: str | None = None) -> dict:
        """The steps as a Chrome / Perfetto trace (``{"traceEvents": [...]}``), written to
        ``path`` as JSON when given (TensorFlow 1's timeline)."""
        return chrome_trace(self.step_stats, path)


@dataclass
class RunPlan:
    """What ``run`` would do, without doing it (``Session.plan``).

    ``steps``: node names in execution order; ``ops``: their ops; ``replaced_by_feeds``: fed
    node name -> the nodes that no longer run because it is fed (empty for a placeholder);
    ``missing_feeds``: needed placeholders without a feed; predicted peak bytes of
    intermediates with the memory plan (each value freed after its last use) and without it
    (the pruned program before the passes, every value held to the end of the run).
    """

    steps: list[str]
    ops: list[str]
    replaced_by_feeds: dict[str, list[str]]
    missing_feeds: list[str]
    peak_bytes_with_reuse: int
    peak_bytes_without_reuse: int
    passes: list[str]
    nodes_before: int
    nodes_after: int
    #: the optimized program itself; ``str(program)`` is the printable IR
    program: Program | None = field(default=None, repr=False)

    def __str__(self) -> str:
        lines = [f"RunPlan: {self.nodes_after} steps ({self.nodes_before} before passes: "
                 f"{', '.join(self.passes)})"]
        if self.program is not None:
            lines += ["  " + line for line in str(self.program).splitlines()]
        else:
            lines += [f"  {i:4d}  {name}  [{op}]" for i, (name, op) in
                      enumerate(zip(self.steps, self.ops))]
        for fed, skipped in self.replaced_by_feeds.items():
            lines.append(f"  feed {fed}: " + (f"replaces {', '.join(skipped)}" if skipped
                                              else "placeholder"))
        if self.missing_feeds:
            lines.append(f"  missing feeds: {', '.join(self.missing_feeds)}")
        lines.append(f"  predicted peak bytes: {self.peak_bytes_with_reuse} with the memory "
                     f"plan, {self.peak_bytes_without_reuse} without")
        return "\n".join(lines)



def _trace_level(options: RunOptions | None) -> int:
    """``options.trace_level`` (NO_TRACE without options); TypeError for anything else."""
    if options is None:
        return RunOptions.NO_TRACE
    if not isinstance(options, RunOptions):
        raise TypeError(f"Session.run: options must be a needle.static.RunOptions, got "
                        f"{type(options).__name__}")
    return int(options.trace_level)


def _fetched(value: Any, aliased: set[int]) -> Any:
    """A fetched value the caller may keep: copied if it may share memory with graph state."""
    if value is None:
        return None
    if isinstance(value, tuple):
        return tuple(_fetched(v, aliased) for v in value)
    if isinstance(value, np.generic):
        return np.asarray(value)  # a NumPy scalar from a full reduction
    if not isinstance(value, np.ndarray):  # a CuPy array: fetches come back as NumPy
        return device_of(value).to_numpy(value)
    if value.base is not None or id(value) in aliased:
        return value.copy()  # a view, or a Variable / parameter / feed / constant array
    return value  # a fresh array no one else holds


# -- one cached way to run -------------------------------------------------------------------------
_FEED, _FIXED, _LEAF = 0, 1, 2


class _Runner:
    """Everything needed to run one (fetch structure, fed set) again: program, compiled
    function, how to get each source value, the placeholders still missing."""

    def __init__(self, session: Session, fetches: Any, feed_nodes: list) -> None:
        flat, self.rebuild = flatten_fetches(fetches)
        # the plan cache is keyed by these nodes' ids: holding them keeps the ids theirs
        # (constant folding may leave none of them in the program)
        self.keys = (flat, feed_nodes)
        fed = {id(n) for n in feed_nodes}

        def is_source(node: Any) -> bool:
            return node.op is None or id(node) in fed

        program = build_program(flat, is_source)
        if session.optimize:
            optimize_program(program, _constant_value)
        else:
            program.passes = ["prune"]
        self.program = program
        self.missing = [n for n in program.sources
                        if isinstance(n, Placeholder) and id(n) not in fed]
        self.sources: list[tuple[int, Any]] = []
        for node in program.sources:
            if id(node) in fed:
                self.sources.append((_FEED, id(node)))
            elif isinstance(node, Variable):  # the session's array, written in place only
                self.sources.append((_FIXED, session.variable_value(node)))
            elif isinstance(node, Constant):
                self.sources.append((_FIXED, node.value))
            elif node._data is not None or isinstance(node, Placeholder):
                # a parameter or other eager leaf: read its current array on every run, so
                # eager training (which may replace the array) is seen
                self.sources.append((_LEAF, node))
            else:
                raise ValueError(f"Session.run: {describe_node(node)} has no value: it is not "
                                 "a placeholder, Variable or constant of a graph")
        self.constant_ids = {id(v) for v in program.constants.values()}
        # outputs of effect ops (an assign's or a store's value may be the state's own array)
        effects = {s.out for s in program.steps if s.op.side_effect}
        self.copy_always = [slot in effects for slot in program.outputs]
        self.compiled: Callable[[list], list] | None = None
        if not self.missing:
            self.compiled = compile_program(program)
            if session.optimize:  # elementwise regions as numba loops once the plan is hot
                self.compiled = tiered(program, self.compiled, compile_program)

    def source_values(self, feeds: dict[int, Any]) -> list:
        values: list = []
        append = values.append
        for kind, item in self.sources:
            if kind == _FIXED:
                append(item)
            elif kind == _FEED:
                append(feeds[item])
            else:
                append(item._data)
        return values


def _constant_value(node: Any) -> Any:
    return node.value if isinstance(node, Constant) else None


class Session:
    """Executes graphs: ``Session(graph=None, optimize=True).run(fetches, feed_dict)``.

    Only the ancestors of the fetches that are not replaced by feeds run, each once per run.
    Variables of the graph get their initial values when the session starts and keep their
    values across runs. Plans are cached per (fetches, fed nodes), at most
    ``max_cached_plans`` (default ``MAX_CACHED_PLANS``, least recently used dropped first);
    with ``optimize`` the shared compiler passes (constant folding, CSE, dead-step
    elimination, freeing values after their last use) apply; results are identical either
    way. Several threads may run one Session at once (as in TensorFlow 1).

    ``target="grpc://host:port"`` (and ``token``) makes a remote Session instead: the same
    API, the graph and its Variables living on a ``needle serve`` server (needle.remote,
    docs/remote.md).
    """

    def __new__(cls, graph: Graph | None = None, optimize: bool = True,
                max_cached_plans: int | None = None, target: str | None = None,
                token: str | None = None) -> Any:
        if target is None:
            return super().__new__(cls)
        # needle.remote (a layer above) provides it; gRPC is imported only now
        return context.service("remote_session")(
            graph=graph, target=target, token=token, optimize=optimize,
            max_cached_plans=max_cached_plans)

    def __init__(self, graph: Graph | None = None, optimize: bool = True,
                 max_cached_plans: int | None = None, target: str | None = None,
                 token: str | None = None) -> None:
        self.graph = graph if graph is not None else get_default_graph()
        self.optimize = bool(optimize)
        self.max_cached_plans = (MAX_CACHED_PLANS if max_cached_plans is None
                                 else int(max_cached_plans))
        if self.max_cached_plans < 1:
            raise ValueError(f"Session: max_cached_plans must be at least 1, got "
                             f"{max_cached_plans}")
        self._values: dict[int, tuple[Variable, Any]] = {}
        # (fetch structure, fed nodes) -> plan, least recently used first; each plan holds
        # the nodes its key names, so a key's ids cannot be reused by other nodes
        self._runners: OrderedDict[tuple, _Runner] = OrderedDict()
        self._lock = threading.Lock()
        self._closed = False
        for var in self.graph.variables:
            self._init_variable(var)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the plans and the Variables' values; the session cannot run afterwards."""
        self._runners.clear()
        self._values.clear()
        self._closed = True

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

    def _check_open(self, what: str) -> None:
        # a closed session dropped its Variables' values: reading them would silently give
        # (or writing them would set) fresh initial values
        if self._closed:
            raise RuntimeError(f"Session.{what}: Session is closed")

    def variables(self) -> dict[str, np.ndarray]:
        """Name -> value (a copy) of every Variable of the graph, ready for ``ndl.save``.
        Raises RuntimeError after ``close()``."""
        self._check_open("variables")
        return {var.name: var.device.to_numpy(self.variable_value(var)).copy()
                for var in self.graph.variables}

    def load_variables(self, values: dict[str, Any], strict: bool = True) -> None:
        """Set Variables by name from arrays or Tensors (what ``variables()`` or a checkpoint
        entry holds). With ``strict`` unknown and missing names raise one KeyError; after
        ``close()`` a RuntimeError."""
        self._check_open("load_variables")
        by_name = {var.name: var for var in self.graph.variables}
        unknown = [k for k in values if k not in by_name]
        missing = [k for k in by_name if k not in values]
        if strict and (unknown or missing):
            raise KeyError(f"load_variables: unknown names {unknown}, missing names {missing}")
        problems = []
        arrays = {}
        for name, value in values.items():
            if name not in by_name:
                continue
            var = by_name[name]
            array = value.numpy() if isinstance(value, Tensor) else np.asarray(value)
            if tuple(array.shape) != tuple(var.shape):
                problems.append(f"{name!r}: Variable {fmt_shape(var.shape)}, value "
                                f"{fmt_shape(array.shape)}")
            arrays[name] = array
        if problems:  # check everything before changing anything
            raise ValueError("load_variables: shape mismatch for " + "; ".join(problems))
        for name, array in arrays.items():
            var = by_name[name]
            np.copyto(self.variable_value(var), array.astype(var.dtype, copy=False))

    # -- feeds -----------------------------------------------------------------------------------
    @staticmethod
    def _feed_value(node: Any, value: Any) -> Any:
        """The fed value as an array of the node's dtype, or a ValueError naming both shapes."""
        if isinstance(node, Placeholder):
            array = node.check_feed(value)
            if node.device is _CPU:
                return array
        else:
            if not isinstance(node, Tensor):
                raise TypeError(f"feed_dict keys must be graph tensors, got {node!r}")
            array = value.numpy() if isinstance(value, Tensor) else np.asarray(value)
            shape = node.shape
            if len(shape) != array.ndim or any(
                    d is not None and d != n for d, n in zip(shape, array.shape)):
                raise ValueError(f"feed for {describe_node(node)}: its shape is "
                                 f"{fmt_shape(shape)}, fed shape {fmt_shape(array.shape)}")
            array = array.astype(node.dtype, copy=False)
        if node.device != _CPU:
            array, _ = _to_backend(array, node.device, None, copy=False)
        return array

    def _runner(self, fetches: Any, feed_dict: dict | None) -> _Runner:
        if self._closed:
            raise RuntimeError("Session.run: the session is closed")
        key = (fetch_key(fetches), frozenset(map(id, feed_dict)) if feed_dict else None)
        with self._lock:
            runner = self._runners.get(key)
            if runner is not None:
                self._runners.move_to_end(key)
                return runner
        feed_nodes = list(feed_dict or ())
        for node in feed_nodes:
            if not isinstance(node, Tensor) or isinstance(node, TensorTuple):
                raise TypeError(f"feed_dict keys must be graph tensors, got {node!r}")
        runner = _Runner(self, fetches, feed_nodes)
        with self._lock:
            self._runners[key] = runner
            while len(self._runners) > self.max_cached_plans:
                self._runners.popitem(last=False)
        return runner

    # -- running ---------------------------------------------------------------------------------
    def run(self, fetches: Any, feed_dict: dict | None = None,
            run_metadata: RunMetadata | None = None, *,
            options: RunOptions | None = None) -> Any:
        """Values of ``fetches`` (same nesting, NumPy arrays; None for operations).

        ``feed_dict`` maps placeholders, or any graph tensor, to values; a fed tensor's
        ancestors do not run. Fed shapes are checked and every missing placeholder is named
        before anything runs. ``run_metadata`` receives what ran and the peak bytes, and with
        ``options=RunOptions(trace_level=RunOptions.FULL_TRACE)`` each step's timings.
        """
        trace_level = 0 if options is None else _trace_level(options)
        self.graph.note_run()
        runner = self._runner(fetches, feed_dict)
        feeds = {id(node): self._feed_value(node, value)
                 for node, value in feed_dict.items()} if feed_dict else {}
        if runner.missing:
            names = ", ".join(f"{n.name!r} (shape {fmt_shape(n.shape)}, {n.dtype})"
                              for n in runner.missing)
            raise ValueError(f"Session.run: these placeholders are needed by the fetches and "
                             f"were not fed: {names}")
        sources = runner.source_values(feeds)
        with runtime.running(self):  # state ops find their Session here
            if run_metadata is None:
                assert runner.compiled is not None  # (compiled unless placeholders are missing)
                profiler = profiling.active()
                outputs = runner.compiled(sources) if profiler is None else profiler.call(
                    runner.compiled, (sources,), "Session.run", category="session")
            else:
                outputs = self._run_traced(runner, sources, run_metadata,
                                           trace_level >= RunOptions.SOFTWARE_TRACE)
        aliased = {id(v) for v in sources} | runner.constant_ids
        return runner.rebuild([snapshot(v) if copy else _fetched(v, aliased)
                               for v, copy in zip(outputs, runner.copy_always)])

    @staticmethod
    def _run_traced(runner: _Runner, sources: list, metadata: RunMetadata,
                    timed: bool) -> list:
        """Walk the steps one by one, recording names and live bytes, and with ``timed``
        each step's times and shapes (a profile of this thread, a temporary one if none is
        active)."""
        program = runner.program
        metadata.executed = []
        record = metadata.executed.append

        def on_step(step: Any) -> None:
            record(node_name(step.node))

        tracker = ByteTracker(exclude=[*sources, *program.constants.values()])
        env = {id(n): v for n, v in zip(program.sources, sources)}
        observers = runtime.step_observers()
        observers.append(on_step)
        metadata.step_stats = []
        try:
            if not timed:
                env = run_program(program, env, tracker, on_step)
            else:
                profiler, first = profiling.start()
                try:
                    env = profiler.call(run_program, (program, env, tracker, on_step),
                                        "Session.run", category="session")
                finally:
                    profiling.stop(profiler)
                metadata.step_stats = [e for e in profiler.events[first:] if e.kind == "step"]
        finally:
            observers.pop()
        metadata.peak_bytes = tracker.peak
        return [env[slot] for slot in program.outputs]

    # -- planning --------------------------------------------------------------------------------
    def plan(self, fetches: Any, feed_dict: dict | None = None) -> RunPlan:
        """What ``run(fetches, feed_dict)`` would do, without running anything.

        Fed shapes are checked as ``run`` checks them; missing placeholders are listed rather
        than raised.
        """
        runner = self._runner(fetches, feed_dict)
        feed_dict = feed_dict or {}
        feeds = {id(node): self._feed_value(node, value) for node, value in feed_dict.items()}
        program = runner.program
        flat, _ = flatten_fetches(fetches)

        def is_source(node: Any) -> bool:
            return node.op is None or id(node) in feeds

        unoptimized = build_program(flat, is_source)
        running_ids = {id(s.node) for s in unoptimized.steps}
        replaced = {}
        for node in feed_dict:
            skipped = [] if node.op is None else [
                node_name(s.node) for s in build_program([node], lambda n: n.op is None).steps
                if id(s.node) not in running_ids and s.node is not node]
            replaced[node_name(node)] = skipped
        shapes: dict[int, Any] = {}
        for node in unoptimized.sources:
            value = feeds.get(id(node))
            if value is None:
                if isinstance(node, Variable):
                    value = self.variable_value(node)
                elif isinstance(node, Constant):
                    value = node.value
                else:
                    value = node._data
            if value is not None:
                shapes[id(node)] = Aval(tuple(value.shape), value.dtype)
        return RunPlan(
            steps=[node_name(s.node) for s in program.steps],
            ops=[s.op.name for s in program.steps],
            replaced_by_feeds=replaced,
            missing_feeds=[n.name for n in runner.missing],
            peak_bytes_with_reuse=predict_peak_bytes(program, True, shapes),
            peak_bytes_without_reuse=predict_peak_bytes(unoptimized, False, shapes),
            passes=list(program.passes),
            nodes_before=program.nodes_before,
            nodes_after=len(program.steps),
            program=program,
        )


__all__ = ["RunMetadata", "RunPlan", "Session"]
