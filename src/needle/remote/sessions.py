"""The server's client sessions: one isolated graph and Session each, freed on close or when
the client stops sending heartbeats."""

from __future__ import annotations

import json
import secrets
import threading
import time
from typing import Any

from ..program.graph_io import GraphReader
from ..static.session import Session
from .limits import Limits
from .wire import ProtocolError, RemoteError, decode_array


class ClientSession:
    """One client's state: the graph rebuilt from the deltas it sent, and a local Session
    over it (its Variables live here across runs)."""

    def __init__(self, optimize: bool, max_cached_plans: int | None, limits: Limits) -> None:
        self.reader = GraphReader()
        graph = self.reader.graph
        # the client warns about a graph growing in a loop; here it grows by its deltas
        graph.GROWTH_WARNING_RUNS = 2**62
        self.session = Session(graph, optimize=optimize, max_cached_plans=max_cached_plans)
        self.limits = limits
        self.lock = threading.Lock()  # graph deltas are applied one at a time
        self.last_seen = time.monotonic()
        self.nodes = 0
        self.applied_seq = 0  # the last graph delta applied (they are numbered from 1)
        self.user_variables: dict[str, None] = {}  # names, in the client's order

    def extend(self, deltas: Any) -> None:
        """Add a client's graph deltas (protobuf GraphDeltas) in order, skipping those seen
        before; a ProtocolError (or the reader's ProgramError) if one is malformed, out of
        order, or would grow the graph past the limit. Call with ``lock`` held."""
        for delta in deltas:
            if delta.seq <= self.applied_seq:
                continue  # sent again by a client that did not see our reply
            if delta.seq != self.applied_seq + 1:
                raise ProtocolError(f"graph delta {delta.seq} arrived before delta "
                                    f"{self.applied_seq + 1}")
            try:
                self._apply(delta)
            finally:
                # a refused delta is consumed too: its client stops sending it, and only
                # runs that need its nodes fail (they are not defined here), not every call
                self.applied_seq = delta.seq

    def _apply(self, delta: Any) -> None:
        try:
            spec = json.loads(delta.spec_json)
        except ValueError as exc:
            raise ProtocolError(f"graph delta is not JSON: {exc}") from None
        if not isinstance(spec, dict):
            raise ProtocolError("graph delta is not a JSON object")
        added = _node_count(spec)
        if self.nodes + added > self.limits.max_graph_nodes:
            raise ProtocolError(f"graph of {self.nodes + added} nodes is over this server's "
                                f"limit ({self.limits.max_graph_nodes})")
        arrays = {}
        for item in delta.arrays:
            if item.name in arrays:
                raise ProtocolError(f"graph delta names array {item.name!r} twice")
            arrays[item.name] = decode_array(item.array)
        self.reader.add(spec, arrays)
        self.nodes += added
        for record in spec.get("nodes", []):
            # the client's st.Variables (not the eager parameters and buffers that became
            # Variables here): what its variables() and load_variables() name
            if record.get("kind") == "variable" and record.get("origin") == "variable":
                self.user_variables[record["name"]] = None

    def node(self, node_id: int) -> Any:
        """The node a client's id names; ProtocolError for an id never sent."""
        try:
            return self.reader.node(int(node_id))
        except (KeyError, IndexError):
            raise ProtocolError(f"node id {node_id} was never sent by this client") from None

    def close(self) -> None:
        self.session.close()


def _node_count(spec: dict) -> int:
    nodes = spec.get("nodes", [])
    return len(nodes) if isinstance(nodes, list) else 0


class SessionTable:
    """Client sessions by unguessable id, at most ``limits.max_sessions``; ``reap`` frees the
    ones not seen for ``limits.session_timeout_s``."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._sessions: dict[str, ClientSession] = {}
        self._lock = threading.Lock()
        self.freed_by_timeout = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, optimize: bool, max_cached_plans: int | None) -> tuple[str, ClientSession]:
        with self._lock:
            if len(self._sessions) >= self.limits.max_sessions:
                raise RemoteError(f"the server holds its limit of {self.limits.max_sessions} "
                                  "sessions; close one or try later")
            state = ClientSession(optimize, max_cached_plans, self.limits)
            session_id = secrets.token_hex(16)
            self._sessions[session_id] = state
        return session_id, state

    def find(self, session_id: str) -> ClientSession | None:
        """The session, or None (no error, no heartbeat)."""
        return self._sessions.get(session_id)

    def get(self, session_id: str) -> ClientSession:
        state = self._sessions.get(session_id)
        if state is None:
            raise RemoteError("Session: this session is not on the server (closed, or freed "
                              "after its client sent no heartbeat for "
                              f"{self.limits.session_timeout_s:g} s)")
        state.last_seen = time.monotonic()
        return state

    def close(self, session_id: str) -> bool:
        with self._lock:
            state = self._sessions.pop(session_id, None)
        if state is not None:
            state.close()
        return state is not None

    def reap(self, now: float | None = None) -> int:
        """Free every session whose client has been silent too long; how many were freed."""
        now = time.monotonic() if now is None else now
        limit = self.limits.session_timeout_s
        with self._lock:
            stale = [k for k, s in self._sessions.items() if now - s.last_seen > limit]
            states = [self._sessions.pop(k) for k in stale]
        for state in states:
            state.close()
        self.freed_by_timeout += len(states)
        return len(states)

    def clear(self) -> None:
        with self._lock:
            states = list(self._sessions.values())
            self._sessions.clear()
        for state in states:
            state.close()


__all__ = ["ClientSession", "SessionTable"]
