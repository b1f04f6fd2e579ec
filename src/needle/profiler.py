"""``ndl.profile()``: what ran, for how long, on which shapes; as a table or a Chrome trace.

``with ndl.profile() as prof:`` records, in the calling thread, every eager op, every step of
a Session or JIT program, each Caffe layer's forward and backward, ``Tensor.backward`` and
the user's own regions (``ndl.profile.record("name")``). ``prof.table()`` sums the events by
op (PyTorch's ``key_averages().table()``), ``prof.export_chrome_trace(path)`` writes Trace
Event JSON for Perfetto / ``chrome://tracing``, ``prof.events`` is the raw list
(``core.profiling.Event``). The recording lives in ``core/profiling.py``; this module only
starts it and formats what it recorded. See docs/profiling.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from time import perf_counter_ns
from typing import Any

from .core import profiling
from .core.profiling import Event

#: ``group_by`` names -> the event fields that make a group's key
GROUPS: dict[str, tuple[str, ...]] = {
    "op": ("name",),
    "op+shape": ("name", "input_shapes"),
    "op+phase": ("name", "phase"),
    "op+category": ("name", "category"),
    "node": ("name", "node", "source"),
    "source": ("source",),
    "category": ("category",),
}

#: ``sort_by`` names -> the statistic sorted on (largest first; "name" sorts a-z)
SORTS: dict[str, str] = {
    "total_time": "total_ns", "total": "total_ns", "self_time": "self_ns", "self": "self_ns",
    "count": "count", "avg_time": "avg_ns", "avg": "avg_ns", "bytes": "bytes", "name": "name",
}


@dataclass
class OpStats:
    """The events of one group summed: ``count``, total and self nanoseconds, output bytes."""

    key: tuple
    name: str
    count: int = 0
    total_ns: int = 0
    self_ns: int = 0
    bytes: int = 0
    kinds: set[str] = field(default_factory=set)
    categories: set[str] = field(default_factory=set)

    @property
    def avg_ns(self) -> float:
        return self.total_ns / self.count if self.count else 0.0


def key_averages(events: Iterable[Event], group_by: str = "op") -> list[OpStats]:
    """The events summed per group (``group_by``: one of ``GROUPS``), in first-seen order."""
    fields = GROUPS.get(group_by)
    if fields is None:
        raise ValueError(f"profile: unknown group_by {group_by!r}; use one of {sorted(GROUPS)}")
    groups: dict[tuple, OpStats] = {}
    for event in events:
        key = tuple(getattr(event, f) for f in fields)
        stats = groups.get(key)
        if stats is None:
            label = " ".join(str(part) for part in key if part is not None) or "(unknown)"
            stats = groups[key] = OpStats(key, label)
        stats.count += 1
        stats.total_ns += event.dur_ns
        stats.self_ns += event.self_ns
        stats.bytes += event.bytes
        stats.kinds.add(event.kind)
        stats.categories.add(event.category)
    return list(groups.values())


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def format_table(events: list[Event], sort_by: str = "total_time", group_by: str = "op",
                 limit: int | None = 20, wall_ns: int | None = None) -> str:
    """The events summed per group, as a text table of the top ``limit`` rows."""
    key = SORTS.get(sort_by)
    if key is None:
        raise ValueError(f"profile: unknown sort_by {sort_by!r}; use one of {sorted(SORTS)}")
    rows = key_averages(events, group_by)
    if key == "name":
        rows.sort(key=lambda r: r.name)
    else:
        rows.sort(key=lambda r: getattr(r, key), reverse=True)
    shown = rows if limit is None else rows[:limit]
    self_total = sum(e.self_ns for e in events) or 1
    header = ["Name", "Kind", "Category", "Count", "Total ms", "Self ms", "Self %",
              "Avg us", "Out bytes"]
    table = [[r.name if len(r.name) <= 60 else r.name[:57] + "...",
              ",".join(sorted(r.kinds)), ",".join(sorted(r.categories)), str(r.count),
              f"{r.total_ns / 1e6:.3f}", f"{r.self_ns / 1e6:.3f}",
              f"{100 * r.self_ns / self_total:.1f}", f"{r.avg_ns / 1e3:.1f}",
              _fmt_bytes(r.bytes)] for r in shown]
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "-" * len(line(header))
    out = [rule, line(header), rule, *map(line, table), rule]
    footer = f"{len(events)} events in {len(rows)} groups"
    if len(shown) < len(rows):
        footer += f" ({len(rows) - len(shown)} not shown)"
    footer += f"; self time total {self_total / 1e6:.3f} ms"
    if wall_ns is not None:
        footer += f"; wall time {wall_ns / 1e6:.3f} ms"
    out.append(footer)
    return "\n".join(out)


def chrome_trace(events: Iterable[Event], path: str | None = None) -> dict:
    """Events as Trace Event JSON (``"X"`` complete events, microseconds), as a dict; also
    written to ``path`` (atomically) when given. Perfetto and ``chrome://tracing`` open it."""
    events = sorted(events, key=lambda e: e.start_ns)
    origin = events[0].start_ns if events else 0
    pid = os.getpid()
    trace: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": pid, "tid": 0,
         "args": {"name": "needle"}}]
    for event in events:
        args: dict[str, Any] = {
            "kind": event.kind, "phase": event.phase,
            "input_shapes": event.input_shapes, "input_dtypes": _names(event.input_dtypes),
            "output_shapes": event.output_shapes, "output_dtypes": _names(event.output_dtypes),
            "bytes": event.bytes, "self_us": event.self_ns / 1e3}
        if event.node is not None:
            args["node"] = event.node
        if event.source is not None:
            args["source"] = event.source
        trace.append({"name": event.name, "cat": event.category, "ph": "X",
                      "ts": (event.start_ns - origin) / 1e3, "dur": event.dur_ns / 1e3,
                      "pid": pid, "tid": event.thread, "args": args})
    result = {"traceEvents": trace, "displayTimeUnit": "ms"}
    if path is not None:
        _write_json(path, result)
    return result


def _names(dtypes: tuple) -> list:
    """Dtypes (nested for tuple values) as their names, for JSON."""
    return [_names(d) if isinstance(d, tuple) else str(d) for d in dtypes]


def _write_json(path: str, data: dict) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file (no half-written trace)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".trace-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def record(name: str) -> Iterator[None]:
    """Mark the block as a region named ``name`` in the active profile of this thread (none
    active: does nothing). ``ndl.profile.record("data loading")``."""
    recorder = profiling.active()
    if recorder is None:
        yield
        return
    with recorder.region(name):
        yield


class profile:  # noqa: N801 - used as ``with ndl.profile()`` like torch.profiler.profile
    """Record what runs in this thread inside ``with ndl.profile() as prof:``.

    ``with_source=True`` also records the user's source line of every eager op (a stack
    walk per op: slower). Only the thread that enters the block is recorded; enter a
    profile in each thread to profile several (each thread's events carry its id). A profile
    entered inside another in the same thread records its own block; the outer one sees
    those events too. Outside any profile, nothing is recorded and nothing is timed.
    """

    #: ``ndl.profile.record("name")``: a user region in this thread's active profile
    record = staticmethod(record)

    def __init__(self, *, with_source: bool = False) -> None:
        self.with_source = bool(with_source)
        self.events: list[Event] = []
        self.wall_ns = 0
        self._recorder: profiling.Recorder | None = None
        self._first = 0
        self._start_ns = 0
        self._saved_with_source = False

    def __enter__(self) -> profile:
        if self._recorder is not None:
            raise RuntimeError("profile: this profile is already active")
        recorder, self._first = profiling.start()
        self._saved_with_source = recorder.with_source
        recorder.with_source = recorder.with_source or self.with_source
        self._recorder = recorder
        self.events = []
        self._start_ns = perf_counter_ns()
        return self

    def __exit__(self, *exc: object) -> None:
        recorder = self._recorder
        assert recorder is not None
        if recorder.thread != threading.get_ident():
            raise RuntimeError("profile: exited in a thread other than the one that entered it")
        self.wall_ns = perf_counter_ns() - self._start_ns
        self.events = recorder.events[self._first:]
        recorder.with_source = self._saved_with_source
        self._recorder = None
        profiling.stop(recorder)

    @property
    def wall_time(self) -> float:
        """Seconds from entering the block to leaving it."""
        return self.wall_ns * 1e-9

    @contextlib.contextmanager
    def region(self, name: str) -> Iterator[None]:
        """Mark the block as a region named ``name`` (inside this profile's ``with``)."""
        recorder = self._recorder
        if recorder is None or recorder.thread != threading.get_ident():
            raise RuntimeError("profile.region: use it inside the profile's with block, in "
                               "the same thread")
        with recorder.region(name):
            yield

    def _events_now(self) -> list[Event]:
        if self._recorder is not None:  # still inside the block: what is recorded so far
            return self._recorder.events[self._first:]
        return self.events

    def key_averages(self, group_by: str = "op") -> list[OpStats]:
        """The events summed per group (see :data:`GROUPS`)."""
        return key_averages(self._events_now(), group_by)

    def table(self, sort_by: str = "total_time", group_by: str = "op",
              limit: int | None = 20, kind: str | None = None) -> str:
        """The top ``limit`` groups as text: count, total and self time, output bytes.

        ``sort_by``: ``"total_time"``, ``"self_time"`` (``"self"``), ``"count"``,
        ``"avg_time"``, ``"bytes"`` or ``"name"``; ``group_by``: ``"op"``, ``"op+shape"``,
        ``"op+phase"``, ``"op+category"``, ``"node"``, ``"source"`` or ``"category"``;
        ``kind``: only ``"op"`` (eager ops), ``"step"`` (program steps) or ``"region"``
        events. Self time is an event's time less the events nested in it, so the self
        column adds up to the profiled time once.
        """
        events = self._events_now()
        if kind is not None:
            if kind not in ("op", "step", "region"):
                raise ValueError(f"profile.table: unknown kind {kind!r}; use 'op', 'step' "
                                 "or 'region'")
            events = [e for e in events if e.kind == kind]
        return format_table(events, sort_by, group_by, limit,
                            self.wall_ns if self._recorder is None else None)

    def chrome_trace(self) -> dict:
        """The events as a Trace Event dict (``{"traceEvents": [...]}``)."""
        return chrome_trace(self._events_now())

    def export_chrome_trace(self, path: str) -> None:
        """Write the events to ``path`` as Trace Event JSON (Perfetto, chrome://tracing)."""
        chrome_trace(self._events_now(), path)

    def __repr__(self) -> str:
        state = "active" if self._recorder is not None else f"{self.wall_time:.3f} s"
        return f"<needle.profile: {len(self._events_now())} events, {state}>"


__all__ = ["GROUPS", "SORTS", "Event", "OpStats", "chrome_trace", "format_table",
           "key_averages", "profile", "record"]
