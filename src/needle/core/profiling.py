"""The profiler's recording side: one Recorder per thread while ``ndl.profile()`` is active.

Every executor reports here, and only when this thread's ``ThreadState.profiler`` is set:
eager ops (``autograd.make_from_op``), the steps of a Program (``core/interpret.run_program``
and the instrumented variant of ``compiler.codegen.CompiledProgram``), and coarse regions
(``Tensor.backward``, ``Session.run``, a Caffe layer, a user's ``ndl.profile.record``).
With no profile active each executor pays one attribute check (eager: per op, on the thread
state it has already fetched; compiled programs: per program call) and runs its usual code.

Time is ``time.perf_counter_ns``. Recording keeps a stack of open frames: a frame adds its
duration to its parent, so each event knows its *self* time (its duration less its children's)
and nested events (a jitted call's steps, the ops of a Caffe layer) are not counted twice.
Events keep names, shapes and dtypes only, never arrays or nodes, so a profile does not keep
values or graphs alive. The user-facing ``needle.profiler`` formats tables and traces.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from time import perf_counter_ns
from typing import Any

from .context import _get, state


class Event:
    """One timed thing: an eager op, a program step, or a region (layer, backward, user's).

    ``kind``: ``"op"`` (eager), ``"step"`` (a Program's step: Session, JIT, cond branch) or
    ``"region"``; ``category``: the front-end (``"eager"``, ``"session"``, ``"jit"``,
    ``"caffe"``, ``"autograd"``, ``"user"``, ``"program"`` for a program run outside those);
    ``phase``: ``"forward"`` or ``"backward"``; ``node``: the graph node's or layer's name;
    ``source``: ``file:line`` that made the node, where known; times in nanoseconds
    (``start_ns`` on the ``perf_counter_ns`` clock).
    """

    __slots__ = ("name", "kind", "category", "phase", "node", "source", "input_shapes",
                 "input_dtypes", "output_shapes", "output_dtypes", "bytes", "start_ns",
                 "dur_ns", "self_ns", "thread")

    def __init__(self, name: str, kind: str, category: str, phase: str, node: str | None,
                 source: str | None, inputs: Sequence[Any], output: Any, start_ns: int,
                 dur_ns: int, self_ns: int, thread: int) -> None:
        self.name = name
        self.kind = kind
        self.category = category
        self.phase = phase
        self.node = node
        self.source = source
        self.input_shapes, self.input_dtypes, _ = _describe(inputs)
        self.output_shapes, self.output_dtypes, self.bytes = _describe(
            output if isinstance(output, list | tuple) else (output,))
        self.start_ns = start_ns
        self.dur_ns = dur_ns
        self.self_ns = self_ns
        self.thread = thread

    @property
    def seconds(self) -> float:
        """Wall time of the event in seconds (children included)."""
        return self.dur_ns * 1e-9

    @property
    def self_seconds(self) -> float:
        """Wall time less the time of the events nested in it, in seconds."""
        return self.self_ns * 1e-9

    def __repr__(self) -> str:
        where = f" {self.node!r}" if self.node else ""
        return (f"Event({self.name}{where}, {self.kind}/{self.category}/{self.phase}, "
                f"{self.dur_ns / 1e3:.1f} us, in {self.input_shapes} -> {self.output_shapes})")


def _describe(values: Sequence[Any]) -> tuple[tuple, tuple, int]:
    """(shapes, dtypes, total bytes) of arrays; a tuple value (split) gives tuples of them.

    The dtypes are kept as ``np.dtype`` objects (they compare equal to their names); making
    their names here would cost more than the op of a small array.
    """
    if len(values) == 1:  # one array (an op's output): the common case, quickly
        value = values[0]
        try:
            return (value.shape,), (value.dtype,), value.nbytes
        except AttributeError:
            pass
    shapes: list = []
    dtypes: list = []
    total = 0
    for value in values:
        try:  # an array (NumPy or CuPy): the common case first
            shape, dtype, nbytes = value.shape, value.dtype, value.nbytes
            shapes.append(shape)
            dtypes.append(dtype)
            total += nbytes
        except AttributeError:
            if isinstance(value, list | tuple):
                inner_shapes, inner_dtypes, nbytes = _describe(value)
                shapes.append(inner_shapes)
                dtypes.append(inner_dtypes)
                total += nbytes
            else:  # a Python number, or None (an operation's value)
                shapes.append(None if value is None else ())
                dtypes.append(type(value).__name__)
    return tuple(shapes), tuple(dtypes), total


def node_name(node: Any) -> str:
    """A graph node's name: its given name, else ``<op>_<number>`` (as Session reports)."""
    meta = node.meta
    name = meta.name if meta is not None and meta.name else None
    return name or f"{node.op.name if node.op is not None else 'leaf'}_{id(node) % 100000}"


class Recorder:
    """This thread's event list and stack of open frames (one per thread, while profiling).

    A frame is ``[children's nanoseconds, category, phase]``; children inherit the category
    and phase of the frame they run in (a jitted call's steps are ``"jit"``, ops under
    ``Tensor.backward`` are ``"backward"``).
    """

    def __init__(self, with_source: bool = False) -> None:
        self.events: list[Event] = []
        self.with_source = with_source
        self.thread = threading.get_ident()
        self.users = 0  # profiles using this recorder (nested ``with ndl.profile()``)
        self._frames: list[list] = [[0, "program", "forward"]]  # the root is never closed

    # -- frames ----------------------------------------------------------------------------
    def begin(self, category: str | None = None, phase: str | None = None) -> int:
        """Open a frame; returns its start time."""
        top = self._frames[-1]
        self._frames.append([0, category or top[1], phase or top[2]])
        return perf_counter_ns()

    def abort(self, depth: int) -> None:
        """Drop frames left open above ``depth`` (an exception went through them)."""
        del self._frames[depth:]

    def depth(self) -> int:
        return len(self._frames)

    def end(self, start: int, name: str, kind: str, node: str | None, source: str | None,
            inputs: Sequence[Any], output: Any) -> Event:
        """Close the innermost frame as an event (the time is taken first)."""
        stop = perf_counter_ns()
        children, category, phase = self._frames.pop()
        duration = stop - start
        self._frames[-1][0] += duration
        event = Event(name, kind, category, phase, node, source, inputs, output, start,
                      duration, duration - children, self.thread)
        self.events.append(event)
        return event

    # -- what the executors call -----------------------------------------------------------
    def run_op(self, op: Any, arrays: Sequence[Any]) -> Any:
        """An eager op: ``op.compute(*arrays)`` timed and recorded."""
        depth = len(self._frames)
        start = self.begin(getattr(op, "profile_category", "eager"))
        try:
            data = op.compute(*arrays)
        except BaseException:
            self.abort(depth)
            raise
        source = None
        if self.with_source:
            from .source import user_source

            source = user_source()
        self.end(start, op.name, "op", None, source, arrays, data)
        return data

    def step(self, step: Any, start: int, args: Sequence[Any], value: Any) -> None:
        """A Program step finished (its frame opened with ``begin()`` at ``start``)."""
        node = step.node
        meta = node.meta
        self.end(start, step.op.name, "step", node_name(node),
                 meta.source if meta is not None else None, args, value)

    def call(self, fn: Callable[..., Any], args: Sequence[Any], name: str, *,
             category: str, phase: str | None = None, node: str | None = None,
             inputs: Sequence[Any] = ()) -> Any:
        """``fn(*args)`` recorded as a region (its events nest inside it)."""
        depth = len(self._frames)
        start = self.begin(category, phase)
        try:
            result = fn(*args)
        except BaseException:
            self.abort(depth)
            raise
        self.end(start, name, "region", node, None, inputs,
                 result if isinstance(result, list | tuple) else ())
        return result

    @contextlib.contextmanager
    def region(self, name: str, category: str = "user", phase: str | None = None,
               node: str | None = None) -> Iterator[None]:
        """Record the block as a region event."""
        depth = len(self._frames)
        start = self.begin(category, phase)
        try:
            yield
        except BaseException:
            self.abort(depth)
            raise
        self.end(start, name, "region", node, None, (), ())


def active() -> Recorder | None:
    """This thread's recorder while a profile is active in it, else None."""
    current = _get(None)
    return None if current is None else current.profiler


def start(with_source: bool = False) -> tuple[Recorder, int]:
    """Begin profiling in this thread (or join the profile already active in it).

    Returns the recorder and the index of the first event that belongs to the caller.
    """
    current = state()
    recorder = current.profiler
    if recorder is None:
        recorder = current.profiler = Recorder(with_source)
    recorder.users += 1
    return recorder, len(recorder.events)


def stop(recorder: Recorder) -> None:
    """End one profile in this thread; the last one to end switches recording off."""
    current = state()
    if current.profiler is not recorder:
        raise RuntimeError("profile: stopped in a thread other than the one that started it")
    recorder.users -= 1
    if recorder.users == 0:
        current.profiler = None


__all__ = ["Event", "Recorder", "active", "node_name", "start", "stop"]
