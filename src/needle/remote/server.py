"""RemoteServer: serves client Sessions (their graphs run here) and a saved program's
inference over gRPC.

Every request is answered: a reply, an error in the reply (an exception raised while serving
it, sent as its allow-listed kind and message), or a gRPC status (undecodable bytes,
a wrong or missing token, a message over the size limit). Nothing a client sends is code:
graphs are rebuilt from registered ops only (program/graph_io.py), arrays from raw bytes.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import numpy as np

from .._version import __version__
from ..autograd import Tensor, no_grad
from ..backend.cpu_threads import blas_control
from ..program.exported import ExportedProgram
from ..static.session import RunMetadata, RunOptions
from ._grpc import grpc, pb
from .limits import Limits
from .sessions import SessionTable
from .stats import events_to_json
from .wire import ProtocolError, decode_array, encode_array, encode_error, encode_value

SERVICE = "needle.remote.Remote"
#: gRPC metadata key carrying the token
TOKEN_KEY = "needle-token"

#: method name -> (request class, reply class)
METHODS: dict[str, tuple[Any, Any]] = {
    "Open": (pb.OpenRequest, pb.OpenReply),
    "Heartbeat": (pb.SessionRequest, pb.StatusReply),
    "Close": (pb.SessionRequest, pb.StatusReply),
    "Run": (pb.RunRequest, pb.RunReply),
    "Variables": (pb.SessionRequest, pb.VariablesReply),
    "LoadVariables": (pb.LoadVariablesRequest, pb.StatusReply),
    "Predict": (pb.PredictRequest, pb.PredictReply),
    "Info": (pb.InfoRequest, pb.InfoReply),
}

#: Run as one long-lived stream per client session (requests and replies as Run's)
STREAM_METHOD = "RunStream"
#: the status details of a stream refused for want of a worker thread (the client then runs
#: its steps with unary Run calls; nothing in the stream was read)
NO_STREAM_SLOT = "no stream slot free on this server"


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _TokenCheck(grpc.ServerInterceptor):
    """Refuses (UNAUTHENTICATED) every call whose metadata lacks the token; constant time."""

    def __init__(self, token: bytes, on_refusal: Callable[[], None]) -> None:
        self._token = token
        self._on_refusal = on_refusal

        def refuse(request: Any, context: Any) -> None:
            on_refusal()
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong or missing token")

        def refuse_stream(requests: Any, context: Any) -> Any:
            on_refusal()
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong or missing token")
            yield  # (a generator: what a stream handler is)

        # raw bytes in: a refused request is never decoded
        self._refuse = grpc.unary_unary_rpc_method_handler(refuse)
        self._refuse_stream = grpc.stream_stream_rpc_method_handler(refuse_stream)

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        given = b""
        for key, value in details.invocation_metadata or ():
            if key == TOKEN_KEY:
                given = value.encode() if isinstance(value, str) else bytes(value)
        if hmac.compare_digest(given, self._token):
            return continuation(details)
        if details.method == f"/{SERVICE}/{STREAM_METHOD}":
            return self._refuse_stream
        return self._refuse


class RemoteServer:
    """A gRPC server of client Sessions and, with ``program``, of its inference.

    ``RemoteServer(host="127.0.0.1", port=0, token=None, limits=Limits(), workers=8,
    program=None).start()``; ``address`` is ``grpc://host:port`` (port 0 picks a free
    one). Binding an address other than loopback needs a ``token``; when one is given every
    call must carry it. ``stop()`` frees every session.

    A client session runs its steps over one ``RunStream`` call, which holds a worker thread
    while it is open: at most ``workers - 2`` streams are served at once (two threads stay
    for unary calls: heartbeats, opens, the sessions beyond that, which use ``Run``).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, token: str | bytes | None = None,
                 limits: Limits | None = None, workers: int = 8,
                 program: ExportedProgram | None = None) -> None:
        if not is_loopback(host) and not token:
            raise ValueError(f"serving on {host} (not loopback) needs a token "
                             "(needle serve --token-file PATH)")
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if isinstance(token, str):
            token = token.encode()
        self.host, self.limits, self.program = host, limits or Limits(), program
        self.sessions = SessionTable(self.limits)
        self.requests = 0
        self.errors = 0
        self.refused = 0
        self._count_lock = threading.Lock()
        self._stopped = threading.Event()
        self.stream_slots = workers - 2  # streams beyond it are refused (the client uses Run)
        self.streams = 0
        size = self.limits.max_message_bytes
        options = [("grpc.max_receive_message_length", size),
                   ("grpc.max_send_message_length", size),
                   ("grpc.so_reuseport", 0)]
        interceptors = [_TokenCheck(token, self._note_refusal)] if token else []
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers,
                                                              thread_name_prefix="needle-serve"),
                                   options=options, interceptors=interceptors,
                                   maximum_concurrent_rpcs=max(64, 4 * workers))
        handlers = {name: grpc.unary_unary_rpc_method_handler(
            self._handler(name, reply_cls), request_deserializer=request_cls.FromString,
            response_serializer=reply_cls.SerializeToString)
            for name, (request_cls, reply_cls) in METHODS.items()}
        run_request, run_reply = METHODS["Run"]
        handlers[STREAM_METHOD] = grpc.stream_stream_rpc_method_handler(
            self._stream_handler(self._handler("Run", run_reply)),
            request_deserializer=run_request.FromString,
            response_serializer=run_reply.SerializeToString)
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),))
        bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            self.port = self._server.add_insecure_port(bind)
        except RuntimeError as exc:  # gRPC's way of saying the port is taken
            raise OSError(f"cannot listen on {bind} (in use?): {exc}") from None
        if self.port == 0:
            raise OSError(f"cannot listen on {bind} (in use?)")
        self._reaper = threading.Thread(target=self._reap_loop, name="needle-serve-reaper",
                                        daemon=True)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"grpc://{host}:{self.port}"

    # -- lifetime ------------------------------------------------------------------------------
    def start(self) -> RemoteServer:
        self._server.start()
        self._reaper.start()
        return self

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop accepting calls, let running ones finish for ``grace`` seconds, free all."""
        self._stopped.set()
        self._server.stop(grace).wait()
        self.sessions.clear()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (True) or ``timeout`` passes (False)."""
        return self._server.wait_for_termination(timeout)

    def __enter__(self) -> RemoteServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _reap_loop(self) -> None:
        interval = min(1.0, self.limits.session_timeout_s / 4)
        while not self._stopped.wait(interval):
            self.sessions.reap()

    # -- counting ------------------------------------------------------------------------------
    def _note_refusal(self) -> None:
        with self._count_lock:
            self.refused += 1

    def stats(self) -> dict[str, Any]:
        """Counters: requests served, errors among them, token refusals, sessions held."""
        return {"requests": self.requests, "errors": self.errors, "refused": self.refused,
                "sessions": len(self.sessions), "streams": self.streams,
                "freed_by_timeout": self.sessions.freed_by_timeout}

    # -- handlers ------------------------------------------------------------------------------
    def _handler(self, name: str, reply_cls: Any) -> Callable[[Any, Any], Any]:
        method = getattr(self, "_" + name.lower())
        has_seq = "applied_seq" in reply_cls.DESCRIPTOR.fields_by_name and name != "Open"

        def handle(request: Any, context: Any) -> Any:
            reply = reply_cls()
            try:
                method(request, reply)
            except Exception as exc:  # noqa: BLE001 - every error goes back to the client
                reply.Clear()
                encode_error(exc, reply.error)
            if has_seq and request.session:  # which graph deltas the client may stop sending
                state = self.sessions.find(request.session)
                if state is not None:
                    reply.applied_seq = state.applied_seq
            with self._count_lock:
                self.requests += 1
                self.errors += reply.HasField("error")
            return reply

        return handle

    def _stream_handler(self, handle: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        """A RunStream call: every request answered in order by ``handle`` (Run's handler),
        on the one worker thread the stream holds; refused when no stream slot is free."""

        def handle_stream(requests: Any, context: Any) -> Any:
            with self._count_lock:
                admitted = self.streams < self.stream_slots
                self.streams += admitted
            if not admitted:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, NO_STREAM_SLOT)
            try:
                for request in requests:
                    yield handle(request, context)
            finally:
                with self._count_lock:
                    self.streams -= 1

        return handle_stream

    def _open(self, request: Any, reply: Any) -> None:
        plans = request.max_cached_plans or None
        if plans is not None and not 1 <= plans <= 4096:
            raise ValueError(f"Session: max_cached_plans must be at least 1, got {plans}")
        session_id, state = self.sessions.open(request.optimize, plans)
        try:
            with state.lock:
                state.extend(request.deltas)
        except Exception:
            self.sessions.close(session_id)
            raise
        reply.session = session_id
        reply.applied_seq = state.applied_seq
        reply.heartbeat_s = self.limits.heartbeat_s

    def _heartbeat(self, request: Any, reply: Any) -> None:
        self.sessions.get(request.session)

    def _close(self, request: Any, reply: Any) -> None:
        self.sessions.close(request.session)

    def _run(self, request: Any, reply: Any) -> None:
        state = self.sessions.get(request.session)
        if len(request.feed_ids) != len(request.feeds):
            raise ProtocolError(f"{len(request.feed_ids)} feed ids for {len(request.feeds)} "
                                "feeds")
        with state.lock:
            state.extend(request.deltas)
            fetches = [state.node(i) for i in request.fetch_ids]
            feed_dict = {state.node(i): decode_array(a, copy=False)
                         for i, a in zip(request.feed_ids, request.feeds)} or None
        if request.plan:
            plan = state.session.plan(fetches, feed_dict)
            reply.plan_json = json.dumps({
                "steps": plan.steps, "ops": plan.ops, "replaced_by_feeds": plan.replaced_by_feeds,
                "missing_feeds": plan.missing_feeds,
                "peak_bytes_with_reuse": plan.peak_bytes_with_reuse,
                "peak_bytes_without_reuse": plan.peak_bytes_without_reuse,
                "passes": plan.passes, "nodes_before": plan.nodes_before,
                "nodes_after": plan.nodes_after, "text": str(plan)})
            return
        metadata = RunMetadata() if request.trace else None
        options = RunOptions(trace_level=request.trace_level) if request.trace else None
        started = time.perf_counter()
        values = state.session.run(fetches, feed_dict, run_metadata=metadata, options=options)
        reply.run_s = time.perf_counter() - started
        for value in values:
            encode_value(value, reply.outputs.add())
        if metadata is not None:
            reply.executed.extend(metadata.executed)
            reply.peak_bytes = metadata.peak_bytes
            reply.step_stats_json = events_to_json(getattr(metadata, "step_stats", []))
        state.last_seen = time.monotonic()

    def _variables(self, request: Any, reply: Any) -> None:
        state = self.sessions.get(request.session)
        with state.lock:
            state.extend(request.deltas)
        for name, value in state.session.variables().items():
            if name not in state.user_variables:
                continue  # an eager parameter or buffer: not a Variable of the client's graph
            item = reply.variables.add()
            item.name = name
            encode_array(value, item.array)

    def _loadvariables(self, request: Any, reply: Any) -> None:
        state = self.sessions.get(request.session)
        with state.lock:
            state.extend(request.deltas)
        values: dict[str, np.ndarray] = {}
        for item in request.variables:
            values[item.name] = decode_array(item.array)
        names = state.user_variables  # as the local Session: the graph's st.Variables only
        unknown = [k for k in values if k not in names]
        missing = [k for k in names if k not in values]
        if request.strict and (unknown or missing):
            raise KeyError(f"load_variables: unknown names {unknown}, missing names {missing}")
        state.session.load_variables({k: v for k, v in values.items() if k in names},
                                     strict=False)

    def _predict(self, request: Any, reply: Any) -> None:
        if self.program is None:
            raise RuntimeError("Predict: this server serves no program (needle serve "
                               "--program PATH)")
        inputs = [Tensor(decode_array(a), requires_grad=False) for a in request.inputs]
        with no_grad():
            out = self.program(*inputs)
        outputs = [out] if self.program.spec["single_output"] else list(out)
        for value in outputs:
            encode_array(value.numpy(), reply.outputs.add())
        reply.single_output = self.program.spec["single_output"]

    def _info(self, request: Any, reply: Any) -> None:
        program = None
        if self.program is not None:
            program = {"inputs": self.program.spec["inputs"],
                       "outputs": len(self.program.spec["outputs"]),
                       "single_output": self.program.spec["single_output"]}
        control = blas_control()
        reply.info_json = json.dumps({
            "version": __version__, "pid": os.getpid(), "program": program,
            "blas_threads": [lib["num_threads"] for lib in control.info()] if control else None,
            "limits": {"max_message_bytes": self.limits.max_message_bytes,
                       "max_sessions": self.limits.max_sessions,
                       "max_graph_nodes": self.limits.max_graph_nodes,
                       "session_timeout_s": self.limits.session_timeout_s},
            **self.stats()})


__all__ = ["METHODS", "NO_STREAM_SLOT", "SERVICE", "STREAM_METHOD", "TOKEN_KEY", "RemoteServer",
           "is_loopback"]
