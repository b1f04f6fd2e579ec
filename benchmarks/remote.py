"""Remote Sessions over loopback: requests/s and p50 / p99 latency for 1, 4 and 16 concurrent
clients, next to local Sessions, and the server's memory over 10,000 requests.

Two graphs: a small inference graph (Linear(100, 64) -> ReLU -> Linear(64, 10) on a batch of
32, 13 KB in) and needle's MLP-ResNet training step (batch 100, Adam, dropout 0: 0.3 MB of
images and labels in, the loss out). The server is a `needle serve` child process (16
workers); each client is a thread with its own graph and Session. The local rows run the same
threads with local Sessions. Goal: the remote training step adds at most 0.5 ms at p50 over
local (1 client); the server's RSS stays flat over 10,000 requests.

Then, for 1 client, where the overhead goes:
- per call, the client's wall time minus the server's own Session.run, for steps sent as
  unary Run calls and on the session's RunStream (the default), alternating blocks, and the
  training step again on a server started with --blas-threads 1;
- ``--breakdown``: the components of one call, from time.perf_counter_ns stamps taken in the
  client and in an instrumented server process (CLOCK_MONOTONIC: one clock for both);
- ``--floor``: bare grpcio (no needle, no protobuf) unary and streaming round trips with
  nothing or 0.3 MB in and out: what no needle change can go below.

NOTE: a shared 2-core machine: clients, server and the local rows compete for the same cores,
so at 4 and 16 clients both rows measure contention more than needle. The 1-client p50 rows
are measured alternately (local block, remote block, repeated) to compare them fairly.

Run: python benchmarks/remote.py [--quick] [--breakdown | --floor]
"""

from __future__ import annotations

# isort: off
import common  # noqa: F401  (pins BLAS threads before NumPy loads)

# isort: on
import argparse
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import numpy as np

import needle as ndl
import needle.nn as nn
import needle.static as st
from needle.apps.models import MLPResNet

CONCURRENCY = (1, 4, 16)


def start_server(*args: str, command: list[str] | None = None,
                 env: dict | None = None) -> tuple[subprocess.Popen, str]:
    command = command or [sys.executable, "-m", "needle", "serve"]
    proc = subprocess.Popen([*command, "--port", "0", "--workers", "16", *args],
                            stdout=subprocess.PIPE, text=True, env=env)
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    line = proc.stdout.readline() if ready else ""
    if "listening on " not in line:
        proc.kill()
        raise SystemExit(f"needle serve did not start: {line!r}")
    return proc, line.split("listening on ")[1].split(",")[0].split(" ")[0]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# -- the two workloads: each returns a function doing one request ------------------------------
def inference_step(make_session: Callable[[], object], seed: int) -> Callable[[], object]:
    rng = np.random.default_rng(seed)
    np.random.seed(seed)
    model = nn.Sequential(nn.Linear(100, 64), nn.ReLU(), nn.Linear(64, 10))
    with st.Graph():
        x = st.placeholder((32, 100), name="x")
        out = model(x)
        sess = make_session()
    data = rng.standard_normal((32, 100)).astype(np.float32)
    step = lambda: sess.run(out, {x: data})  # noqa: E731
    step.session = sess  # type: ignore[attr-defined]
    return step


def training_step(make_session: Callable[[], object], seed: int) -> Callable[[], object]:
    rng = np.random.default_rng(seed)
    np.random.seed(seed)
    model = MLPResNet(784, hidden=100, num_blocks=3, drop_prob=0.0)
    with st.Graph():
        x = st.placeholder((100, 784), name="images")
        y = st.placeholder((100,), dtype="int64", name="labels")
        loss = nn.SoftmaxLoss()(model(x), y)
        train = st.minimize(ndl.optim.Adam(model.parameters(), lr=1e-3), loss)
        sess = make_session()
    images = rng.standard_normal((100, 784)).astype(np.float32)
    labels = rng.integers(0, 10, 100)
    step = lambda: sess.run([train, loss], {x: images, y: labels})  # noqa: E731
    step.session = sess  # type: ignore[attr-defined]
    return step


# -- running clients -----------------------------------------------------------------------------
def measure(steps: list[Callable[[], object]], requests: int) -> tuple[float, np.ndarray]:
    """Every step function in its own thread, ``requests`` calls each (after 3 untimed);
    requests per second over all threads, and every call's latency in seconds."""
    latencies: list[list[float]] = [[] for _ in steps]
    barrier = threading.Barrier(len(steps) + 1)

    def client(i: int) -> None:
        step = steps[i]
        for _ in range(3):
            step()
        barrier.wait()
        record = latencies[i].append
        for _ in range(requests):
            start = time.perf_counter()
            step()
            record(time.perf_counter() - start)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(steps))]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    flat = np.array([x for per in latencies for x in per])
    return len(flat) / wall, flat


def row(name: str, mode: str, clients: int, rate: float, lat: np.ndarray) -> str:
    p50, p99 = np.percentile(lat, 50) * 1e3, np.percentile(lat, 99) * 1e3
    return (f"| {name} | {mode} | {clients} | {rate:9.1f} | {p50:8.3f} | {p99:8.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument("--breakdown", action="store_true", help="only the components of a "
                        "remote step")
    parser.add_argument("--floor", action="store_true", help="only bare grpcio's round trips")
    args = parser.parse_args()
    scale = 0.2 if args.quick else 1.0
    if args.breakdown or args.floor:
        if args.breakdown:
            breakdown(scale)
        if args.floor:
            floor(scale)
        return
    proc, address = start_server()
    try:
        def remote() -> object:
            return st.Session(target=address)

        print(f"server {address} (pid {proc.pid}); {os.cpu_count()} cores; "
              f"numpy {np.__version__}\n")
        print("| graph | Session | clients | requests/s | p50 ms | p99 ms |")
        print("|---|---|---:|---:|---:|---:|")
        workloads = {"inference (32x100 MLP)": (inference_step, 400),
                     "MLP-ResNet train step": (training_step, 40)}
        for name, (make, per_client) in workloads.items():
            for clients in CONCURRENCY:
                requests = max(5, int(per_client * scale / max(1, clients // 2)))
                for mode, factory in (("local", st.Session), ("remote", remote)):
                    steps = [make(factory, seed) for seed in range(clients)]
                    rate, lat = measure(steps, requests)
                    print(row(name, mode, clients, rate, lat), flush=True)
                    for step in steps:  # (an open session holds its step stream's thread)
                        step.session.close()  # type: ignore[attr-defined]
                    del steps

        # 1 client, alternating blocks: the overhead the goal is about. On a shared machine
        # the step's own time swings by 2-5x between blocks, so the overhead is also measured
        # per call: the client's wall time minus the server's Session.run time
        print("\nremote overhead, 1 client (alternating blocks; ms):")
        overhead(workloads, remote, scale)
        blas1, address1 = start_server("--blas-threads", "1")
        try:
            print("the training step again, next to a server started with --blas-threads 1:")
            overhead({k: v for k, v in workloads.items() if "train" in k}, remote, scale,
                     lambda: st.Session(target=address1))
        finally:
            stop(blas1)

        # server memory over 10,000 requests (inference graph, 4 clients)
        total = int(10_000 * (scale if args.quick else 1))
        steps = [inference_step(remote, seed) for seed in range(4)]
        measure(steps, 250)  # warm: plans, buffers, gRPC pools
        before = rss_mib(proc.pid)
        marks = [before]
        for _ in range(5):
            measure(steps, total // 20)
            marks.append(rss_mib(proc.pid))
        print(f"\nserver RSS over {total} more requests (4 clients, inference graph), MiB at "
              f"every {total // 5}: " + ", ".join(f"{m:.1f}" for m in marks)
              + f"; growth {marks[-1] - before:+.1f} MiB")
    finally:
        stop(proc)
    breakdown(scale)
    floor(scale)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


def one_blas_thread() -> contextlib.AbstractContextManager:
    """BLAS on one thread inside the block (threadpoolctl), the count restored after."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def _ms(values: list, q: float) -> float:
    return float(np.percentile(values, q)) * 1e3


def overhead(workloads: dict, remote: Callable[[], object], scale: float,
             blas1: Callable[[], object] | None = None) -> None:
    """Local steps, remote steps by unary Run calls and on the RunStream (and on a server
    with one BLAS thread), in alternating blocks; p50 / p99 of each one's wall time, of the
    server's Session.run, and of the per-call overhead (wall minus server run)."""
    for name, (make, per_client) in workloads.items():
        local = make(st.Session, 0)
        unary = make(remote, 0)
        unary.session._stream.refused = True  # type: ignore[attr-defined]
        modes = {"local": local, "remote, unary Run": unary, "remote, RunStream": make(remote, 0)}
        if blas1 is not None:
            modes = {"local": local, "local, BLAS on 1 thread": local,
                     "RunStream, server BLAS default": modes["remote, RunStream"],
                     "RunStream, server --blas-threads 1": make(blas1, 0)}
        walls: dict[str, list] = {k: [] for k in modes}
        runs: dict[str, list] = {k: [] for k in modes}
        for step in modes.values():
            for _ in range(3):
                step()
        block = max(10, int(per_client * scale / 2))
        for _ in range(6):
            for mode, step in modes.items():
                sess = step.session  # type: ignore[attr-defined]
                with one_blas_thread() if "BLAS on 1" in mode else contextlib.nullcontext():
                    for _ in range(block):
                        started = time.perf_counter()
                        step()
                        wall = time.perf_counter() - started
                        walls[mode].append(wall)
                        runs[mode].append(getattr(sess, "last_server_run_s", wall))
        local_p50 = _ms(walls["local"], 50)
        for mode, step in modes.items():
            step.session.close()  # type: ignore[attr-defined]
            if "RunStream" in mode and step.session._stream.refused:  # type: ignore[attr-defined]
                raise SystemExit(f"{mode}: the server refused the stream (its slots are taken)")
        print(f"  {name}:")
        for mode in modes:
            if mode.startswith("local,"):
                print(f"    {mode:36s} p50 {_ms(walls[mode], 50):7.3f} "
                      f"(p99 {_ms(walls[mode], 99):7.3f})")
                continue
            extra = [w - r for w, r in zip(walls[mode], runs[mode])]
            text = (f"    {mode:36s} p50 {_ms(walls[mode], 50):7.3f} "
                    f"(p99 {_ms(walls[mode], 99):7.3f})")
            if mode != "local":
                text += (f", minus local p50 {_ms(walls[mode], 50) - local_p50:+7.3f}; server's "
                         f"run p50 {_ms(runs[mode], 50):6.3f}; wall minus server run: p50 "
                         f"{_ms(extra, 50):.3f}, p99 {_ms(extra, 99):.3f}")
            print(text, flush=True)


# -- where one call's time goes ------------------------------------------------------------------
BREAKDOWN = [  # (what, from stamp, to stamp); c* in the client, s* in the server
    ("client: graph.note_run, flatten, feed checks", "c_run", "c_enc0"),
    ("client: encode the request", "c_enc0", "c_enc1"),
    ("gRPC client -> server (serialize, send, receive)", "c_send", "s_des0"),
    ("server: decode the request (protobuf)", "s_des0", "s_des1"),
    ("server: to the handler (thread hand-off)", "s_des1", "s_h0"),
    ("server: session lookup, deltas, feeds decoded", "s_h0", "s_run0"),
    ("server: Session.run", "s_run0", "s_run1"),
    ("server: encode the fetches", "s_run1", "s_h1"),
    ("server: handler exit, counters", "s_h1", "s_ser0"),
    ("server: serialize the reply", "s_ser0", "s_ser1"),
    ("gRPC server -> client (send, receive, parse)", "s_ser1", "c_recv"),
    ("client: decode, rebuild the fetches", "c_recv", "c_end"),
]


def instrumented_server(argv: list[str]) -> None:
    """A `needle serve` whose Run and RunStream stamp every request (time.perf_counter_ns);
    the stamps go to the file NEEDLE_BENCH_STAMPS when it stops (SIGTERM)."""
    import needle.remote.server as server_module
    from needle.remote import serve as serve_module
    from needle.remote._grpc import pb

    ns, stamps, current = time.perf_counter_ns, [], {}

    class Request:
        @staticmethod
        def FromString(data: bytes) -> object:  # noqa: N802 (protobuf's name)
            current.clear()
            current["s_des0"] = ns()
            message = pb.RunRequest.FromString(data)
            current["s_des1"] = ns()
            return message

    class Reply:
        DESCRIPTOR = pb.RunReply.DESCRIPTOR

        def __call__(self) -> object:
            return pb.RunReply()

        @staticmethod
        def SerializeToString(message: object) -> bytes:  # noqa: N802
            current["s_ser0"] = ns()
            data = message.SerializeToString()  # type: ignore[attr-defined]
            current["s_ser1"] = ns()
            stamps.append(dict(current))
            return data

    server_module.METHODS["Run"] = (Request, Reply())
    plain_run = server_module.RemoteServer._run

    def run(self: object, request: object, reply: object) -> None:
        current["s_h0"] = ns()
        session = self.sessions.get(request.session).session  # type: ignore[attr-defined]
        plain = session.run

        def timed(*args: object, **kwargs: object) -> object:
            current["s_run0"] = ns()
            try:
                return plain(*args, **kwargs)
            finally:
                current["s_run1"] = ns()

        session.run = timed
        try:
            plain_run(self, request, reply)
        finally:
            del session.run
        current["s_h1"] = ns()

    server_module.RemoteServer._run = run  # type: ignore[method-assign]
    parser = argparse.ArgumentParser()
    serve_module.add_arguments(parser)
    try:
        serve_module.serve(parser.parse_args(argv))
    finally:
        with open(os.environ["NEEDLE_BENCH_STAMPS"], "w") as f:
            json.dump(stamps, f)


def breakdown(scale: float) -> None:
    """p50 / p99 of every component of a remote step (1 client, on the RunStream)."""
    import tempfile

    import needle.remote.client as client_module
    import needle.remote.stream as stream_module

    ns, rows, current = time.perf_counter_ns, [], {}
    plain_request, plain_stream = client_module.RemoteSession._request, stream_module.RunStream.run

    def request(self: object, *args: object, **kwargs: object) -> object:
        current["c_enc0"] = ns()
        try:
            return plain_request(self, *args, **kwargs)
        finally:
            current["c_enc1"] = ns()

    def stream_run(self: object, message: object, timeout_s: float) -> object:
        current["c_send"] = ns()
        try:
            return plain_stream(self, message, timeout_s)
        finally:
            current["c_recv"] = ns()

    print("\nwhere a remote step's time goes (1 client, RunStream; us, p50 / p99 of each "
          "component, stamps in both processes):")
    with tempfile.TemporaryDirectory() as tmp:
        for name, make, count, options in (
                ("inference (32x100 MLP)", inference_step, 1000, ()),
                ("MLP-ResNet train step", training_step, 200, ()),
                ("MLP-ResNet train step, server --blas-threads 1", training_step, 200,
                 ("--blas-threads", "1"))):
            path = os.path.join(tmp, "stamps.json")
            proc, address = start_server(*options, env=dict(os.environ,
                                                            NEEDLE_BENCH_STAMPS=path),
                                         command=[sys.executable, __file__, "--serve-stamped"])
            client_module.RemoteSession._request = request  # type: ignore[method-assign]
            stream_module.RunStream.run = stream_run  # type: ignore[method-assign]
            try:
                step = make(lambda: st.Session(target=address), 0)  # noqa: B023
                for _ in range(5):
                    step()
                rows.clear()
                for _ in range(max(50, int(count * scale))):
                    current.clear()
                    current["c_run"] = ns()
                    step()
                    current["c_end"] = ns()
                    rows.append(dict(current))
                step.session.close()  # type: ignore[attr-defined]
            finally:
                client_module.RemoteSession._request = plain_request  # type: ignore[method-assign]
                stream_module.RunStream.run = plain_stream  # type: ignore[method-assign]
                stop(proc)
            with open(path) as f:
                served = json.load(f)[-len(rows):]
            stamps = [{**c, **s} for c, s in zip(rows, served)]
            print(f"  {name}:")
            for what, a, b in BREAKDOWN:
                d = [(x[b] - x[a]) / 1e3 for x in stamps]
                print(f"    {what:50s} {np.percentile(d, 50):8.1f} {np.percentile(d, 99):9.1f}")
            total = [(x["c_end"] - x["c_run"]) / 1e3 for x in stamps]
            extra = [(x["c_end"] - x["c_run"] - x["s_run1"] + x["s_run0"]) / 1e3 for x in stamps]
            print(f"    {'whole step':50s} {np.percentile(total, 50):8.1f} "
                  f"{np.percentile(total, 99):9.1f}")
            print(f"    {'whole step minus the server Session.run':50s} "
                  f"{np.percentile(extra, 50):8.1f} {np.percentile(extra, 99):9.1f}", flush=True)


# -- the floor: grpcio alone ---------------------------------------------------------------------
PAYLOAD = 314_000  # bytes: the training step's request (images and labels)


def echo_server(argv: list[str]) -> None:
    """A bare grpcio server: "Tiny" answers 34 bytes, "Big" PAYLOAD bytes, "Stream" answers
    each message with 34 bytes (its first byte 1: PAYLOAD bytes); bytes in and out, no
    protobuf. Prints its address as `needle serve` does; stops on SIGTERM."""
    from concurrent import futures

    import grpc

    size = [("grpc.max_receive_message_length", 1 << 28),
            ("grpc.max_send_message_length", 1 << 28)]
    server = grpc.server(futures.ThreadPoolExecutor(16), options=size)
    tiny, big = b"t" * 34, b"b" * PAYLOAD

    def stream(requests: object, context: object) -> object:
        for request in requests:  # type: ignore[attr-defined]
            yield big if request[:1] == b"\1" else tiny

    same = lambda data: data  # noqa: E731
    handlers = {
        "Tiny": grpc.unary_unary_rpc_method_handler(lambda r, c: tiny, same, same),
        "Big": grpc.unary_unary_rpc_method_handler(lambda r, c: big, same, same),
        "Stream": grpc.stream_stream_rpc_method_handler(stream, same, same)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("echo.Echo", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"listening on grpc://127.0.0.1:{port}", flush=True)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    while not stopped.wait(0.2):
        pass
    server.stop(0)


def floor(scale: float) -> None:
    """Bare grpcio round trips, unary and on one stream, with tiny and 0.3 MB messages,
    alternating blocks (us, p50 / p99)."""
    import queue

    import grpc

    proc, address = start_server(command=[sys.executable, __file__, "--echo-server"])
    size = [("grpc.max_receive_message_length", 1 << 28),
            ("grpc.max_send_message_length", 1 << 28)]
    channel = grpc.insecure_channel(address.removeprefix("grpc://"), options=size)
    same = lambda data: data  # noqa: E731
    requests: queue.SimpleQueue = queue.SimpleQueue()
    replies = channel.stream_stream("/echo.Echo/Stream", same, same)(iter(requests.get, None))

    def on_stream(message: bytes, timeout: float) -> bytes:
        requests.put(message)
        return next(replies)

    tiny, big = b"\0" * 34, b"\0" * PAYLOAD
    cases = {
        "unary, 34 B in, 34 B out": (channel.unary_unary("/echo.Echo/Tiny", same, same), tiny),
        "unary, 0.3 MB in, 34 B out": (channel.unary_unary("/echo.Echo/Tiny", same, same), big),
        "unary, 0.3 MB in, 0.3 MB out": (channel.unary_unary("/echo.Echo/Big", same, same), big),
        "stream, 34 B in, 34 B out": (on_stream, tiny),
        "stream, 0.3 MB in, 34 B out": (on_stream, big),
        "stream, 0.3 MB in, 0.3 MB out": (on_stream, b"\1" + big[1:])}
    times: dict[str, list] = {k: [] for k in cases}
    try:
        for call, message in cases.values():
            for _ in range(30):
                call(message, timeout=10)
        block = max(20, int(100 * scale))
        for _ in range(8):
            for name, (call, message) in cases.items():
                for _ in range(block):
                    started = time.perf_counter_ns()
                    call(message, timeout=10)
                    times[name].append((time.perf_counter_ns() - started) / 1e3)
    finally:
        requests.put(None)
        channel.close()
        stop(proc)
    print("\nthe floor: bare grpcio round trips over loopback, no needle, no protobuf "
          "(alternating blocks; us, p50 / p99):")
    for name, values in times.items():
        print(f"  {name:32s} {np.percentile(values, 50):8.1f} {np.percentile(values, 99):9.1f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--echo-server"]:
        echo_server(sys.argv[2:])
    elif sys.argv[1:2] == ["--serve-stamped"]:
        instrumented_server(sys.argv[2:])
    else:
        main()
