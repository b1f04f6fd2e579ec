"""needle.remote: run a declared graph on a server (TensorFlow 1's ``tf.train.Server`` and
``tf.Session("grpc://...")``), and serve a saved program's inference, over gRPC.

Start a server with ``needle serve`` (or :class:`RemoteServer`), then
``st.Session(target="grpc://127.0.0.1:PORT")`` runs graphs there and
``ndl.remote.Client(address).predict(inputs)`` calls its program. Needs the ``remote`` extra
(``pip install 'needle[remote]'``: grpcio and protobuf). The names below are imported on
first use, so ``import needle`` and ``needle --help`` never import gRPC; a missing extra
raises one ImportError naming it. docs/remote.md describes the protocol and security model.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..core import context

if TYPE_CHECKING:
    from .client import Client, RemoteSession
    from .limits import Limits
    from .server import RemoteServer
    from .wire import ProtocolError, RemoteError

_WHERE = {"Client": "client", "RemoteSession": "client", "RemoteServer": "server",
          "Limits": "limits", "ProtocolError": "wire", "RemoteError": "wire"}


def _remote_session(**kwargs: Any) -> Any:
    """``st.Session(target=...)``: static asks for this service (it sits below this layer)."""
    from .client import RemoteSession

    return RemoteSession(**kwargs)


context.provide("remote_session", _remote_session)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'needle.remote' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = ["Client", "Limits", "ProtocolError", "RemoteError", "RemoteServer", "RemoteSession"]
