"""Run a graph as a Program: a list of steps over value slots, freeing values after last use.

The declarative Session and the JIT both execute graphs through this module. A Program is
built from the nodes the outputs need (stopping at sources: leaves and fed nodes); compiler
passes may rewrite it (CSE, constant folding, fusion) without touching the user's nodes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .autodiff import find_topo_sort
from .registry import Op, fmt_shape


class NodeRunError(RuntimeError):
    """A node failed while a graph ran; the message names the node, its op, shapes and origin."""


def describe_node(node: Any) -> str:
    """``'name' (op matmul, created at file.py:12)`` for error messages."""
    meta = node.meta
    name = getattr(meta, "name", None) if meta is not None else None
    op = node.op.name if node.op is not None else "leaf"
    where = f", created at {meta.source}" if meta is not None and meta.source else ""
    return f"{name or op!r} (op {op}{where})"


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


def _ancestors(fetches: list, is_source: Callable[[Any], bool]) -> list:
    """Post-order of the nodes the fetches depend on, not descending below sources."""

    class _View:
        __slots__ = ("node", "_inputs")

        def __init__(self, node: Any) -> None:
            self.node = node
            self._inputs = None

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


def build_program(fetches: Iterable[Any], is_source: Callable[[Any], bool]) -> Program:
    """The steps needed to compute ``fetches``, each node once, sources left to the caller."""
    fetches = list(fetches)
    order = _ancestors(fetches, is_source)
    steps = [Step(n.op, tuple(id(i) for i in n.inputs), id(n), n)
             for n in order if not is_source(n)]
    sources = [n for n in order if is_source(n)]
    return Program(steps, sources, [id(f) for f in fetches], nodes_before=len(steps))


def plan_frees(program: Program) -> None:
    """Free each computed value right after its last use (fetched values are kept)."""
    keep = set(program.outputs)
    computed = {s.out for s in program.steps}
    last_use: dict[int, int] = {}
    for i, step in enumerate(program.steps):
        for slot in step.inputs:
            last_use[slot] = i
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
    """Bytes held by live intermediate values, counting each owned buffer once; keeps the peak."""

    def __init__(self) -> None:
        self._owners: dict[int, list] = {}  # id(buffer) -> [buffer, number of values using it]
        self.current = 0
        self.peak = 0

    @staticmethod
    def _buffers(value: Any) -> list:
        if value is None:
            return []
        if isinstance(value, tuple):
            return [b for v in value for b in ByteTracker._buffers(v)]
        return [owned_buffer(value)]

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


def run_program(program: Program, env: dict[int, Any], tracker: ByteTracker | None = None,
                on_step: Callable[[Step], None] | None = None) -> dict[int, Any]:
    """Compute every step into ``env`` (slot -> value), freeing values as the plan says."""
    env.update(program.constants)
    frees = program.frees or [()] * len(program.steps)
    for step, dead in zip(program.steps, frees):
        args = [env[slot] for slot in step.inputs]
        try:
            value = step.op.compute(*args)
        except Exception as exc:  # noqa: BLE001 - rewrapped with the node's origin
            shapes = ", ".join(fmt_shape(a.shape) if hasattr(a, "shape") else type(a).__name__
                               for a in args)
            raise NodeRunError(f"error running node {describe_node(step.node)} on inputs of "
                               f"shapes {shapes}: {type(exc).__name__}: {exc}") from exc
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
