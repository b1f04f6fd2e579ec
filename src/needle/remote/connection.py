"""A client's gRPC channel to a needle server: typed calls with a deadline on every one, and
failures turned into one clear error (RemoteError, or the server's exception as itself)."""

from __future__ import annotations

from typing import Any

from ._grpc import grpc, pb
from .limits import Limits
from .server import METHODS, SERVICE, STREAM_METHOD, TOKEN_KEY
from .wire import RemoteError, decode_error


def parse_target(target: str) -> str:
    """``grpc://host:port`` (or ``host:port``) as gRPC's ``host:port``; ValueError otherwise."""
    if not isinstance(target, str):
        raise TypeError(f"target must be a string like 'grpc://127.0.0.1:PORT', got {target!r}")
    address = target.removeprefix("grpc://")
    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not host or not port.isdigit():
        raise ValueError(f"target {target!r} is not 'grpc://host:port'")
    return address


def _serialize(request: Any) -> bytes:
    """A request message's bytes; a request serialized already (a Run's, whose arrays were
    appended without copies: wire.array_field) as it is."""
    return request if isinstance(request, bytes) else request.SerializeToString()


class Connection:
    """Calls to one server. ``call(name, request)`` returns the reply, or raises the error
    the reply carries (rebuilt from an allow-list) or a RemoteError naming the server and
    what went wrong (unreachable, refused, no answer within ``timeout_s``)."""

    def __init__(self, target: str, token: str | bytes | None = None,
                 timeout_s: float | None = None, max_message_bytes: int | None = None) -> None:
        self.address = parse_target(target)
        self.target = "grpc://" + self.address
        self.timeout_s = float(timeout_s if timeout_s is not None else Limits.call_timeout_s)
        size = max_message_bytes or Limits.max_message_bytes
        self._channel = grpc.insecure_channel(self.address, options=[
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
            # fail fast on a dead server instead of waiting for it to come back
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
            ("grpc.enable_retries", 0)])
        if isinstance(token, bytes):
            token = token.decode()
        self._metadata = ((TOKEN_KEY, token),) if token else None
        self._methods = {
            name: self._channel.unary_unary(f"/{SERVICE}/{name}", request_serializer=_serialize,
                                            response_deserializer=reply.FromString)
            for name, (request, reply) in METHODS.items()}
        self._run_stream = self._channel.stream_stream(
            f"/{SERVICE}/{STREAM_METHOD}", request_serializer=_serialize,
            response_deserializer=pb.RunReply.FromString)

    def open_stream(self, requests: Any) -> Any:
        """A RunStream call sending ``requests`` (an iterator of RunRequests); iterate it for
        the replies. It has no deadline of its own: stream.py watches every step."""
        return self._run_stream(requests, metadata=self._metadata)

    def call(self, name: str, request: Any, timeout_s: float | None = None,
             check: bool = True) -> Any:
        """The reply to ``request``; with ``check`` the error a reply carries is raised."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            reply = self._methods[name](request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self.rpc_error(name, exc, timeout) from None
        if check and reply.HasField("error"):
            raise decode_error(reply.error)
        return reply

    def rpc_error(self, name: str, exc: Any, timeout: float) -> RemoteError:
        """One RemoteError naming the server, the call and what went wrong."""
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        where = f"needle server {self.target}"
        if code == grpc.StatusCode.UNAVAILABLE:
            return RemoteError(f"{where} is unreachable ({name}): {details}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return RemoteError(f"{where} did not answer {name} within {timeout:g} s")
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return RemoteError(f"{where} refused {name}: {details} (pass token=...)")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return RemoteError(f"{where} refused {name}: {details} (message over the size "
                               "limit?)")
        status = code.name if code is not None else "error"
        return RemoteError(f"{where}: {name} failed ({status}): {details}")

    def close(self) -> None:
        self._channel.close()


__all__ = ["Connection", "parse_target"]
