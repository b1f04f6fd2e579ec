"""``needle serve``: start a RemoteServer, print its address, stop cleanly on Ctrl-C / SIGTERM.

Its options are registered without importing gRPC (``needle --help`` works without the
``remote`` extra); the server is imported when the command runs."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Any

from .limits import MIB, Limits


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``needle serve`` (registered by needle.cli)."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on; anything "
                        "but loopback needs --token-file")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: a free "
                        "one, printed)")
    parser.add_argument("--token-file", metavar="PATH", help="file holding the token every "
                        "request must carry (required off loopback)")
    parser.add_argument("--max-message-mb", type=int, default=256,
                        help="largest request or reply, in MiB")
    parser.add_argument("--max-sessions", type=int, default=Limits.max_sessions,
                        help="client sessions held at once")
    parser.add_argument("--session-timeout", type=float, default=Limits.session_timeout_s,
                        help="seconds without a heartbeat after which a client's session is "
                        "freed")
    parser.add_argument("--workers", type=int, default=8, help="threads serving requests")
    parser.add_argument("--blas-threads", type=int, metavar="N", help="threads of each BLAS "
                        "product (default: the BLAS library's own; 1 suits a server sharing "
                        "its cores with clients or serving several sessions at once; needs "
                        "threadpoolctl, the fast extra)")
    parser.add_argument("--program", metavar="PATH", help="also serve this saved program "
                        "(ndl.export(...).save(PATH)) for ndl.remote.Client(...).predict")


def read_token(path: str) -> str:
    """The token in ``path`` (surrounding whitespace dropped); ValueError if empty."""
    with open(path) as f:
        token = f.read().strip()
    if not token:
        raise ValueError(f"--token-file {path}: the file is empty")
    return token


def limit_blas_threads(threads: int) -> Any:
    """Cap the BLAS library's threads for the whole process (from the main thread: a count
    set from another thread is ignored once the main thread set one)."""
    from ..backend.cpu_threads import blas_control

    control = blas_control()
    if control is None:
        raise ValueError("--blas-threads needs threadpoolctl (pip install 'needle[fast]'), or "
                         "set OPENBLAS_NUM_THREADS / OMP_NUM_THREADS before starting")
    return control.limit(limits=threads)


def serve(args: argparse.Namespace, ready: Any = None) -> int:
    """Run the server until SIGINT or SIGTERM; ``ready(server)`` is called once it listens."""
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    for name in ("max_message_mb", "max_sessions", "workers", "blas_threads"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got "
                             f"{getattr(args, name)}")
    from .server import RemoteServer, is_loopback

    if not args.session_timeout > 0:
        raise ValueError(f"--session-timeout must be positive, got {args.session_timeout}")
    token = read_token(args.token_file) if args.token_file else None
    if token is None and not is_loopback(args.host):
        raise ValueError(f"--host {args.host} is not loopback: give --token-file PATH (every "
                         "request must then carry the token)")
    program = None
    if args.program:
        from ..program import load_program

        program = load_program(args.program)
    if getattr(args, "blas_threads", None) is not None:
        limit_blas_threads(args.blas_threads)  # for the rest of the process
    limits = Limits(max_message_bytes=args.max_message_mb * MIB, max_sessions=args.max_sessions,
                    session_timeout_s=args.session_timeout)
    server = RemoteServer(args.host, args.port, token=token, limits=limits,
                          workers=args.workers, program=program)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        what = f", program {os.path.basename(args.program)}" if program is not None else ""
        print(f"needle serve: listening on {server.address}{what} (pid {os.getpid()}; "
              "Ctrl-C stops)", flush=True)
        if ready is not None:
            ready(server)
        while not stop.wait(0.5):
            pass
    finally:
        server.stop(grace=2.0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("needle serve: stopped", file=sys.stderr, flush=True)
    return 0


__all__ = ["add_arguments", "read_token", "serve"]
