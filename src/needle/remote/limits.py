"""What one server allows: every resource a client can make it hold is bounded here."""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Bounds of a server (``needle serve`` options in brackets).

    ``max_message_bytes``: largest request or reply [--max-message-mb]; ``max_sessions``:
    client sessions held at once (a new one beyond it is refused) [--max-sessions];
    ``max_graph_nodes``: nodes one session's graph may grow to; ``session_timeout_s``: a
    session whose client sent nothing (no call, no heartbeat) for this long is freed
    [--session-timeout]; ``call_timeout_s``: the deadline a client puts on each call.
    """

    max_message_bytes: int = 256 * MIB
    max_sessions: int = 64
    max_graph_nodes: int = 200_000
    session_timeout_s: float = 30.0
    call_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        for name in ("max_message_bytes", "max_sessions", "max_graph_nodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("session_timeout_s", "call_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def heartbeat_s(self) -> float:
        """How often a client pings: a third of the timeout, so one lost ping is harmless."""
        return self.session_timeout_s / 3


__all__ = ["MIB", "Limits"]
