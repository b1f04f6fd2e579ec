"""Run a graph as a Program: a list of steps over value slots, freeing values after last use.

The declarative Session and the JIT both execute graphs through this module. A Program is
built from the nodes the outputs need (stopping at sources: leaves and fed nodes); compiler
passes may rewrite it (CSE, constant folding, frees) without touching the user's nodes.

Two executors share one Program: :func:`run_program` here walks the steps (it can report each
step and count bytes), and ``compiler.codegen.compile_program`` turns the steps into one
straight-line Python function (each value a local variable, each free a ``del``), which is
what a Session and the JIT run on their hot paths.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import profiling
from .autodiff import find_topo_sort
from .registry import CheckError, Op, fmt_shape


class NodeRunError(RuntimeError):
    """A node failed while a graph ran; the message names the node, its op, shapes and origin."""


def describe_node(node: Any) -> str:
    """``'name' (op matmul, created at file.py:12)`` for error messages."""
    meta = node.meta
    name = getattr(meta, "name", None) if meta is not None else None
    op = node.op.name if node.op is not None else "leaf"
    where = f", created at {meta.source}" if meta is not None and meta.source else ""
    return f"{name or op!r} (op {op}{where})"


def writes_state(op: Any) -> bool:
    """Whether running ``op`` changes state other steps may read (assign, optimizer updates)."""
    return bool(op.writes_state)


@dataclass
class Step:
    """Compute ``op`` on the values in slots ``inputs`` into slot ``out`` (``node``: origin)."""

    op: Op
    inputs: tuple
    out: int
    node: Any


@dataclass
class Program:
    """Steps in execution order over value slots (slot = ``id`` of the node that owns the value)."""

    steps: list[Step]
    sources: list  # leaf or fed nodes whose values the caller provides
    outputs: list[int]  # slots of the fetched values, in fetch order
    constants: dict[int, Any] = field(default_factory=dict)  # slots with values known at plan time
    frees: list[list[int]] = field(default_factory=list)  # slots dead after each step
    passes: list[str] = field(default_factory=list)  # names of the passes applied
    nodes_before: int = 0  # steps before optimization

    def step_names(self) -> list[str]:
        return [describe_node(s.node) for s in self.steps]

    def __str__(self) -> str:
        """The program as jaxpr-style text: one line per step (``core/program_text.py``)."""
        from .program_text import program_text

        return program_text(self)


def ancestors(fetches: list, is_source: Callable[[Any], bool]) -> list:
    """Post-order of the nodes the fetches depend on, not descending below sources."""

    class _View:
        __slots__ = ("node", "_inputs")

        def __init__(self, node: Any) -> None:
            self.node = node
            self._inputs: tuple | None = None

        @property
        def inputs(self) -> tuple:
            if self._inputs is None:
                self._inputs = () if is_source(self.node) else tuple(
                    view(i) for i in self.node.inputs)
            return self._inputs

    views: dict[int, _View] = {}

    def view(node: Any) -> _View:
        wrapped = views.get(id(node))
        if wrapped is None:
            wrapped = views[id(node)] = _View(node)
        return wrapped

    return [v.node for v in find_topo_sort([view(f) for f in fetches])]


def _writes_last(steps: list[Step]) -> list[Step]:
    """The steps reordered so that each state write runs as late as its dependents allow.

    NOTE: a fetch such as ``[train_op, loss]`` must see the loss of the values *before* the
    update, whatever order the depth-first sort found. A topological sort that always takes
    a ready non-writing step first (the earliest in depth-first order) and a write only when
    nothing else is ready makes every read that does not depend on a write see the values
    the run started with.
    """
    if not any(writes_state(s.op) for s in steps):
        return steps
    producer = {s.out: i for i, s in enumerate(steps)}
    waiting = [0] * len(steps)  # number of inputs not yet computed
    users: list[list[int]] = [[] for _ in steps]
    for i, step in enumerate(steps):
        for slot in set(step.inputs):
            j = producer.get(slot)
            if j is not None:
                waiting[i] += 1
                users[j].append(i)
    ready = [i for i, n in enumerate(waiting) if n == 0 and not writes_state(steps[i].op)]
    ready_writes = [i for i, n in enumerate(waiting) if n == 0 and writes_state(steps[i].op)]
    heapq.heapify(ready)
    heapq.heapify(ready_writes)
    order = []
    while ready or ready_writes:
        i = heapq.heappop(ready) if ready else heapq.heappop(ready_writes)
        order.append(steps[i])
        for j in users[i]:
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready_writes if writes_state(steps[j].op) else ready, j)
    return order


def build_program(fetches: Iterable[Any], is_source: Callable[[Any], bool]) -> Program:
    """The steps needed to compute ``fetches``, each node once, sources left to the caller.

    State writes (assign, an optimizer update) run as late as possible, so within one run
    the reads that do not depend on them see the values the run started with.
    """
    fetches = list(fetches)
    order = ancestors(fetches, is_source)
    steps = [Step(n.op, tuple(id(i) for i in n.inputs), id(n), n)
             for n in order if not is_source(n)]
    sources = [n for n in order if is_source(n)]
    return Program(_writes_last(steps), sources, [id(f) for f in fetches],
                   nodes_before=len(steps))


def plan_frees(program: Program) -> None:
    """Free each computed value right after its last use (fetched values are kept).

    A value nothing reads (an assign's result that is not fetched) is freed right away.
    """
    keep = set(program.outputs)
    last_use: dict[int, int] = {}
    for i, step in enumerate(program.steps):
        last_use.setdefault(step.out, i)
        for slot in step.inputs:
            last_use[slot] = i
    computed = {s.out for s in program.steps}
    program.frees = [[] for _ in program.steps]
    for slot, i in last_use.items():
        if slot in computed and slot not in keep:
            program.frees[i].append(slot)


def owned_buffer(array: Any) -> Any:
    """The array that owns ``array``'s memory (views share their base's buffer)."""
    while getattr(array, "base", None) is not None:
        array = array.base
    return array


class ByteTracker:
    """Bytes held by live intermediate values, counting each owned buffer once; keeps the peak.

    Buffers listed in ``exclude`` (sources: Variables, parameters, feeds, constants) are not
    intermediates, so values that merely view them (a transposed weight) add nothing.
    """

    def __init__(self, exclude: Iterable[Any] = ()) -> None:
        self._owners: dict[int, list] = {}  # id(buffer) -> [buffer, number of values using it]
        self._exclude = {id(owned_buffer(v)) for v in _leaves(list(exclude))}
        self.current = 0
        self.peak = 0

    def _buffers(self, value: Any) -> Sequence[Any]:
        if value.__class__ is np.ndarray and value.base is None:  # the common case, quickly
            return () if id(value) in self._exclude else (value,)
        return [b for b in map(owned_buffer, _leaves([value])) if id(b) not in self._exclude]

    def add(self, value: Any) -> None:
        for buf in self._buffers(value):
            entry = self._owners.get(id(buf))
            if entry is None:
                self._owners[id(buf)] = [buf, 1]
                self.current += int(getattr(buf, "nbytes", 0))
            else:
                entry[1] += 1
        self.peak = max(self.peak, self.current)

    def remove(self, value: Any) -> None:
        for buf in self._buffers(value):
            entry = self._owners[id(buf)]
            entry[1] -= 1
            if entry[1] == 0:
                del self._owners[id(buf)]
                self.current -= int(getattr(buf, "nbytes", 0))


def _leaves(values: list) -> list:
    """The arrays inside values that may be tuples (split, cond); None (operations) dropped."""
    out = []
    stack = list(values)
    while stack:
        value = stack.pop()
        if isinstance(value, tuple):
            stack.extend(value)
        elif value is not None:
            out.append(value)
    return out


def snapshot_slots(program: Program) -> set[int]:
    """Fetched slots to copy as soon as they have a value, so a state write later in the same
    run (an optimizer update in place) cannot change what the fetch returns.

    Only programs that write state need this; a write's own result is never copied.
    """
    writes = {s.out for s in program.steps if writes_state(s.op)}
    if not writes:
        return set()
    return {slot for slot in program.outputs
            if slot not in writes and slot not in program.constants}


def snapshot(value: Any) -> Any:
    """A copy of an array (or a tuple of arrays) that no later write can reach."""
    if isinstance(value, tuple):
        return tuple(snapshot(v) for v in value)
    return None if value is None else value.copy()


def step_error(step: Step, args: list, exc: Exception) -> Exception:
    """The error to raise for a step that failed: its node, op, input shapes and origin."""
    if isinstance(exc, NodeRunError):
        return exc  # from a sub-program (a cond branch): it names the innermost node already
    if isinstance(exc, CheckError):
        return exc  # a check op's message is the same in every mode (eager raises it as is)
    shapes = ", ".join(fmt_shape(a.shape) if hasattr(a, "shape") else type(a).__name__
                       for a in args)
    return NodeRunError(f"error running node {describe_node(step.node)} on inputs of shapes "
                        f"{shapes}: {type(exc).__name__}: {exc}")


def run_program(program: Program, env: dict[int, Any], tracker: ByteTracker | None = None,
                on_step: Callable[[Step], None] | None = None) -> dict[int, Any]:
    """Compute every step into ``env`` (slot -> value), freeing values as the plan says.

    While ``ndl.profile()`` (or a Session's ``RunMetadata``) is active in this thread, each
    step is timed and recorded (``core/profiling.py``).
    """
    profiler = profiling.active()
    env.update(program.constants)
    frees: Sequence[Sequence[int]] = program.frees
    if not frees:
        frees = [()] * len(program.steps)
    snap = snapshot_slots(program)
    for slot in snap.intersection(env):  # fetched sources: their values at the start
        env[slot] = snapshot(env[slot])
    for step, dead in zip(program.steps, frees):
        args = [env[slot] for slot in step.inputs]
        if profiler is not None:
            depth = profiler.depth()
            start = profiler.begin()
        try:
            value = step.op.compute(*args)
        except Exception as exc:  # noqa: BLE001 - rewrapped with the node's origin
            if profiler is not None:
                profiler.abort(depth)
            raise step_error(step, args, exc) from exc
        if step.out in snap:
            value = snapshot(value)
        if profiler is not None:
            profiler.step(step, start, args, value)
        env[step.out] = value
        if tracker is not None:
            tracker.add(value)
        if on_step is not None:
            on_step(step)
        for slot in dead:
            value = env.pop(slot)
            if tracker is not None:
                tracker.remove(value)
    return env
