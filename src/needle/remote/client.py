"""Clients of a needle server: ``RemoteSession`` (a Session whose graph runs on the server)
and ``Client`` (inference with the server's saved program).

A RemoteSession keeps a GraphWriter: each call sends only the part of the graph the server
has not seen (once), then feeds by node id and the flat list of fetched ids; fetch
structures are flattened and rebuilt here, so they behave exactly as a local Session's.
A daemon thread sends heartbeats; a session whose heartbeats stop is freed by the server.
Steps go over one long-lived RunStream call (stream.py: cheaper per step than unary calls),
or by unary Run calls when the stream is busy or the server refused it.
"""

from __future__ import annotations

import contextlib
import json
import threading
import weakref
from typing import Any

import numpy as np

from ..autograd import Tensor, TensorTuple
from ..program.graph_io import GraphWriter
from ..static.fetches import flatten_fetches
from ..static.graph import Graph, get_default_graph
from ..static.session import RunMetadata, RunOptions, RunPlan, Session, _trace_level
from ._grpc import pb
from .connection import Connection
from .stats import events_from_json
from .stream import RunStream
from .wire import array_field, decode_array, decode_error, decode_value, encode_array


def _heartbeats(session_ref: weakref.ref, connection: Connection, session_id: str,
                interval: float, stop: threading.Event) -> None:
    """Ping the server every ``interval`` seconds while the session lives and is open."""
    while not stop.wait(interval):
        if session_ref() is None:
            break
        try:
            connection.call("Heartbeat", pb.SessionRequest(session=session_id),
                            timeout_s=max(1.0, interval))
        except Exception:  # noqa: BLE001 - the next run reports a lost server or session
            continue


def _close_remote(connection: Connection, session_id: str, stop: threading.Event,
                  stream: RunStream) -> None:
    """Free the session on the server (best effort: it frees it by timeout otherwise)."""
    stop.set()
    stream.close()
    with contextlib.suppress(Exception):  # a server already gone has nothing to free
        connection.call("Close", pb.SessionRequest(session=session_id), timeout_s=2.0)
    connection.close()


class RemoteSession:
    """A Session whose graph, Variables and runs live on a needle server.

    ``st.Session(graph=None, target="grpc://127.0.0.1:PORT", token=None)`` makes one; it has
    the API of a local Session (``run``, ``plan``, ``variables``, ``load_variables``,
    ``close``, context manager). Errors raised on the server arrive as the same exception
    types and messages; a server that is gone gives one RemoteError (every call has a
    deadline, ``timeout_s``). Eager parameters are sent with the graph once: eager training
    after that is not seen by the server, and the session's train ops update the server's
    copies (fetch them to read them).
    """

    def __init__(self, graph: Graph | None = None, target: str = "", token: str | None = None,
                 optimize: bool = True, max_cached_plans: int | None = None,
                 timeout_s: float | None = None) -> None:
        if max_cached_plans is not None and int(max_cached_plans) < 1:
            raise ValueError(f"Session: max_cached_plans must be at least 1, got "
                             f"{max_cached_plans}")
        self.graph = graph if graph is not None else get_default_graph()
        self.target = target
        self.optimize = bool(optimize)
        self._closed = True  # until the server has opened it
        self.last_server_run_s = 0.0
        self._connection = Connection(target, token, timeout_s)
        self._writer = GraphWriter()
        self._lock = threading.Lock()  # deltas are made and sent in order
        self._pending: list = []  # graph deltas the server has not acknowledged
        self._seq = 0
        request = pb.OpenRequest(optimize=self.optimize,
                                 max_cached_plans=int(max_cached_plans or 0))
        self._add_deltas(request.deltas, list(self.graph.variables))
        try:
            reply = self._connection.call("Open", request)
        except BaseException:
            self._connection.close()
            raise
        self._acknowledged(reply.applied_seq)
        self._id = reply.session
        self._closed = False
        self._stream = RunStream(self._connection)
        stop = threading.Event()
        self._finalizer = weakref.finalize(self, _close_remote, self._connection, self._id, stop,
                                           self._stream)
        self._heartbeat = threading.Thread(
            target=_heartbeats, args=(weakref.ref(self), self._connection, self._id,
                                      reply.heartbeat_s, stop),
            name="needle-remote-heartbeat", daemon=True)
        self._heartbeat.start()

    # -- lifetime ------------------------------------------------------------------------------
    def __enter__(self) -> RemoteSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Free the session's state on the server; the session cannot run afterwards."""
        if not self._closed:
            self._closed = True
            self._finalizer()

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(f"Session.{what}: Session is closed")

    # -- graph deltas --------------------------------------------------------------------------
    def _add_deltas(self, deltas: Any, roots: list) -> None:
        """Write the part of ``roots``' graph not yet written as the next numbered delta, and
        put every delta the server has not acknowledged into ``deltas`` (a repeated
        GraphDelta). Call with ``_lock`` held (or before the session is shared)."""
        spec, arrays = self._writer.add(roots)
        if spec.get("nodes") or spec.get("optimizers") or spec.get("names"):
            self._seq += 1
            delta = pb.GraphDelta(spec_json=json.dumps(spec), seq=self._seq)
            for name, array in arrays.items():
                item = delta.arrays.add()
                item.name = name
                encode_array(array, item.array)
            self._pending.append(delta)
        deltas.extend(self._pending)

    def _acknowledged(self, applied_seq: int) -> None:
        """The server holds every delta up to ``applied_seq``: stop sending them."""
        with self._lock:
            while self._pending and self._pending[0].seq <= applied_seq:
                self._pending.pop(0)

    def _call(self, name: str, request: Any) -> Any:
        """Call the server (a Run on the session's stream when it can take it); acknowledged
        deltas are dropped even when the call failed."""
        reply = None
        if name == "Run":
            reply = self._stream.run(request, self._connection.timeout_s)
        if reply is None:
            reply = self._connection.call(name, request, check=False)
        self._acknowledged(reply.applied_seq)
        if reply.HasField("error"):
            raise decode_error(reply.error)
        return reply

    # -- running -------------------------------------------------------------------------------
    def _request(self, fetches: Any, feed_dict: dict | None, trace: bool = False,
                 plan: bool = False, trace_level: int = 0) -> tuple[bytes, Any]:
        """The serialized RunRequest, and the function that rebuilds the fetch structure from
        the flat list of values."""
        if self._closed:
            raise RuntimeError("Session.run: the session is closed")
        flat, rebuild = flatten_fetches(fetches)
        feed_nodes = list(feed_dict or ())
        for node in feed_nodes:
            if not isinstance(node, Tensor) or isinstance(node, TensorTuple):
                raise TypeError(f"feed_dict keys must be graph tensors, got {node!r}")
        feeds = [Session._feed_value(node, value) for node, value in (feed_dict or {}).items()]
        request = pb.RunRequest(session=self._id, trace=trace, plan=plan,
                                trace_level=trace_level)
        with self._lock:
            try:  # every node written before (so is everything they reach): nothing to add
                fetch_ids = [self._writer.id_of(node) for node in flat]
                feed_ids = [self._writer.id_of(node) for node in feed_nodes]
                request.deltas.extend(self._pending)
            except KeyError:
                self._add_deltas(request.deltas, flat + feed_nodes)
                fetch_ids = [self._writer.id_of(node) for node in flat]
                feed_ids = [self._writer.id_of(node) for node in feed_nodes]
            request.fetch_ids.extend(fetch_ids)
            request.feed_ids.extend(feed_ids)
        # the feeds (field 4) appended to the rest: their bytes are copied once, by join
        pieces = [request.SerializeToString()]
        for array in feeds:
            pieces += array_field(4, array)
        return b"".join(pieces), rebuild

    def run(self, fetches: Any, feed_dict: dict | None = None,
            run_metadata: RunMetadata | None = None, *,
            options: RunOptions | None = None) -> Any:
        """Values of ``fetches`` (same nesting, NumPy arrays; None for operations), computed
        on the server; as ``Session.run``."""
        self.graph.note_run()
        trace_level = _trace_level(options) if run_metadata is not None else 0
        request, rebuild = self._request(fetches, feed_dict, trace=run_metadata is not None,
                                         trace_level=trace_level)
        reply = self._call("Run", request)
        self.last_server_run_s = reply.run_s  # (benchmarks/remote.py: the transport's share)
        values = [decode_value(v) for v in reply.outputs]
        if run_metadata is not None:
            run_metadata.executed = list(reply.executed)
            run_metadata.peak_bytes = int(reply.peak_bytes)
            if hasattr(run_metadata, "step_stats"):
                run_metadata.step_stats = events_from_json(reply.step_stats_json)
        return rebuild(values)

    def plan(self, fetches: Any, feed_dict: dict | None = None) -> RunPlan:
        """What ``run`` would do (as ``Session.plan``; the Program stays on the server, so
        ``plan.program`` is None)."""
        request, _ = self._request(fetches, feed_dict, plan=True)
        data = json.loads(self._call("Run", request).plan_json)
        data.pop("text", None)
        return RunPlan(**data)

    # -- Variables -----------------------------------------------------------------------------
    def variables(self) -> dict[str, np.ndarray]:
        """Name -> value of every Variable of the graph (read from the server)."""
        self._check_open("variables")
        request = pb.SessionRequest(session=self._id)
        with self._lock:
            self._add_deltas(request.deltas, list(self.graph.variables))
        reply = self._call("Variables", request)
        return {item.name: decode_array(item.array) for item in reply.variables}

    def load_variables(self, values: dict[str, Any], strict: bool = True) -> None:
        """Set Variables on the server by name (as ``Session.load_variables``)."""
        self._check_open("load_variables")
        request = pb.LoadVariablesRequest(session=self._id, strict=bool(strict))
        with self._lock:
            self._add_deltas(request.deltas, list(self.graph.variables))
        for name, value in values.items():
            item = request.variables.add()
            item.name = str(name)
            encode_array(value.numpy() if isinstance(value, Tensor) else np.asarray(value),
                         item.array)
        self._call("LoadVariables", request)


class Client:
    """Inference with the program a server was started with (``needle serve --program``).

    ``Client(address, token=None).predict(inputs)``: ``inputs`` is one array or a list of
    them (the program's inputs in order); returns one array, or a tuple for a program with
    several outputs.
    """

    def __init__(self, address: str, token: str | None = None,
                 timeout_s: float | None = None) -> None:
        self._connection = Connection(address, token, timeout_s)
        self.address = self._connection.target

    def predict(self, inputs: Any) -> Any:
        arrays = [inputs] if isinstance(inputs, np.ndarray | Tensor) else list(inputs)
        request = pb.PredictRequest()
        for value in arrays:
            encode_array(value.numpy() if isinstance(value, Tensor) else np.asarray(value),
                         request.inputs.add())
        reply = self._connection.call("Predict", request)
        outputs = [decode_array(a) for a in reply.outputs]
        return outputs[0] if reply.single_output else tuple(outputs)

    def info(self) -> dict[str, Any]:
        """The server's version, limits, counters and program signature."""
        result: dict[str, Any] = json.loads(self._connection.call("Info", pb.InfoRequest())
                                            .info_json)
        return result

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Client", "RemoteSession"]
