"""The optional gRPC dependency: one clear ImportError naming the extra when it is missing."""

from __future__ import annotations

try:
    import grpc
    from google.protobuf import message as protobuf_message

    from . import needle_remote_pb2 as pb
except ImportError as exc:  # grpcio or protobuf missing (or too old for the generated code)
    raise ImportError(
        "needle.remote needs grpcio and protobuf: pip install 'needle[remote]' "
        f"({exc})") from exc

__all__ = ["grpc", "pb", "protobuf_message"]
