"""Servers for the remote tests: in this process (a fixture) or as a `needle serve` child
process. Both listen on 127.0.0.1, on a port they pick, and stop by themselves."""

from __future__ import annotations

import contextlib
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

from needle.remote import Limits, RemoteServer

#: short enough for a test to see a dead client's session freed
TEST_LIMITS = Limits(session_timeout_s=1.5, call_timeout_s=30.0)


@contextlib.contextmanager
def running_server(**kwargs) -> Iterator[RemoteServer]:
    kwargs.setdefault("limits", TEST_LIMITS)
    server = RemoteServer("127.0.0.1", 0, **kwargs).start()
    try:
        yield server
    finally:
        server.stop(grace=0.5)


@contextlib.contextmanager
def serve_process(*args: str, timeout_s: float = 30.0) -> Iterator[tuple[subprocess.Popen, str]]:
    """`python -m needle serve --port 0 ARGS` in a child process and the address it printed;
    the child is stopped (SIGTERM, then SIGKILL) on the way out."""
    proc = subprocess.Popen([sys.executable, "-m", "needle", "serve", "--host", "127.0.0.1",
                             "--port", "0", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
        line = proc.stdout.readline() if ready else ""
        if "listening on " not in line:
            proc.kill()
            raise AssertionError(f"needle serve did not start: {line!r} "
                                 f"{proc.stderr.read()[-2000:]!r}")
        yield proc, line.split("listening on ")[1].split(",")[0].split(" ")[0]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def wait_until(predicate, timeout_s: float, step_s: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout_s`` passes; whether it became true."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step_s)
    return bool(predicate())


