"""What makes a remote step cheap, kept correct: a Session's steps over one RunStream call
(needle.remote.stream; used when the server has a stream slot free, unary Run otherwise;
replies never mixed up between threads; a deadline on every step; the token checked), feeds
encoded without copies (wire.array_field), ``needle serve --blas-threads``. Servers listen on
127.0.0.1 on ports they pick and stop by themselves."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("google.protobuf")

import needle.static as st  # noqa: E402
from needle.remote import Client, RemoteError, RemoteServer, RemoteSession  # noqa: E402
from needle.remote import needle_remote_pb2 as pb  # noqa: E402
from needle.remote.server import SERVICE, STREAM_METHOD  # noqa: E402

from .remote_fixtures import running_server, serve_process, wait_until  # noqa: E402


def test_steps_go_over_one_stream_that_ends_with_the_session():
    with running_server(workers=4) as server, st.Graph():
        x = st.placeholder((3,))
        v = st.Variable(np.zeros(3, np.float32))
        step = st.assign_add(v, x)
        sess = st.Session(target=server.address)
        for i in range(20):
            sess.run(step, {x: np.full(3, i, np.float32)})
        assert server.streams == 1
        np.testing.assert_array_equal(sess.run(v), np.full(3, sum(range(20)), np.float32))
        sess.close()
        assert wait_until(lambda: server.streams == 0, timeout_s=10)
        assert len(server.sessions) == 0


def test_sessions_beyond_the_stream_slots_run_by_unary_calls():
    with running_server(workers=3) as server, st.Graph():  # one stream slot
        assert server.stream_slots == 1
        x = st.placeholder((2,))
        first, second = (st.Session(target=server.address) for _ in range(2))
        for k in range(5):
            np.testing.assert_array_equal(first.run(x * 2.0, {x: [k, 1.0]}), [2.0 * k, 2.0])
            np.testing.assert_array_equal(second.run(x * 3.0, {x: [k, 1.0]}), [3.0 * k, 3.0])
        assert server.streams == 1
        assert first._stream.refused is False and second._stream.refused is True
        a, b = st.placeholder((None,)), st.placeholder((None,))
        for sess in (first, second):  # an error raised on the server comes back either way
            with pytest.raises(Exception, match="broadcast|shape") as info:
                sess.run(a + b, {a: np.ones(2), b: np.ones(3)})
            assert "needle server" not in str(info.value)  # the server's error, not transport
        np.testing.assert_array_equal(first.run(x + 1.0, {x: [1.0, 2.0]}), [2.0, 3.0])
        first.close()
        second.close()


def test_threads_sharing_a_session_get_their_own_replies():
    """One thread's step goes on the stream, another's meanwhile by unary Run."""
    with running_server(workers=4) as server, st.Graph():
        x = st.placeholder((64,))
        out = x * 2.0 + 1.0
        total = st.Variable(np.zeros((), np.float32))
        count = st.assign_add(total, np.float32(1.0))
        sess = st.Session(target=server.address)
        errors: list[str] = []

        def client(seed: int) -> None:
            rng = np.random.default_rng(seed)
            for _ in range(40):
                data = rng.standard_normal(64).astype(np.float32)
                got, _ = sess.run([out, count], {x: data})
                if not np.array_equal(got, data * np.float32(2.0) + np.float32(1.0)):
                    errors.append(f"thread {seed} got another step's reply")

        threads = [threading.Thread(target=client, args=(seed,)) for seed in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        assert float(sess.run(total)) == 120.0  # every step ran exactly once
        sess.close()


def test_a_step_on_the_stream_has_a_deadline_and_the_next_reopens_it(monkeypatch):
    release = threading.Event()
    run = RemoteServer._run

    def slow_run(self, request, reply):
        if request.feeds and float(np.frombuffer(request.feeds[0].data, np.float32)[0]) < 0:
            release.wait(10)
        run(self, request, reply)

    monkeypatch.setattr(RemoteServer, "_run", slow_run)
    with running_server(workers=4) as server, st.Graph():
        x = st.placeholder((1,))
        sess = RemoteSession(target=server.address, timeout_s=0.5)
        np.testing.assert_array_equal(sess.run(x * 2, {x: [1.0]}), [2.0])
        assert server.streams == 1
        started = time.monotonic()
        try:
            with pytest.raises(RemoteError, match="did not answer Run within 0.5 s"):
                sess.run(x * 2, {x: [-1.0]})
            assert time.monotonic() - started < 5
        finally:
            release.set()
        np.testing.assert_array_equal(sess.run(x * 3, {x: [2.0]}), [6.0])  # a new stream
        assert sess._stream.refused is False
        assert wait_until(lambda: server.streams == 1, timeout_s=10)  # the old one ended
        sess.close()


def test_a_stream_without_the_token_is_refused_before_any_request_is_read():
    token = "stream-token"
    with running_server(token=token, workers=4) as server:
        channel = grpc.insecure_channel(server.address.removeprefix("grpc://"))
        call = channel.stream_stream(f"/{SERVICE}/{STREAM_METHOD}")
        request = pb.RunRequest(session="whatever").SerializeToString()
        with pytest.raises(grpc.RpcError) as info:
            list(call(iter([request]), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert server.refused == 1 and server.requests == 0
        channel.close()
        with st.Graph():  # with the token: steps on the stream
            x = st.placeholder((2,))
            with RemoteSession(target=server.address, token=token) as sess:
                np.testing.assert_array_equal(sess.run(x + 1, {x: [1.0, 2.0]}), [2.0, 3.0])
                assert server.streams == 1


def test_needle_serve_blas_threads():
    pytest.importorskip("threadpoolctl")
    with serve_process("--blas-threads", "1") as (proc, address), Client(address) as client:
        assert set(client.info()["blas_threads"]) == {1}
    done = subprocess.run([sys.executable, "-m", "needle", "serve", "--blas-threads", "0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "needle serve: error: --blas-threads must be positive, got 0"]


@pytest.mark.parametrize("array", [
    np.float32(3.5), np.array(7, np.int64), np.zeros((0, 3), np.float32),
    np.arange(12, dtype=np.int64).reshape(3, 4).T,  # not C-contiguous
    np.random.default_rng(0).standard_normal((100, 784)).astype(np.float32),
    np.array([True, False, True]), np.arange(5, dtype=">f8"),  # big-endian: sent little
    np.arange(300, dtype=np.uint8).reshape(2, 150), np.arange(6, dtype=np.complex64)])
def test_array_field_is_what_protobuf_writes(array):
    from needle.remote.wire import array_field, decode_array, encode_array

    feeds_only = b"".join(array_field(4, array))
    assert feeds_only == pb.RunRequest(feeds=[encode_array(array)]).SerializeToString()
    head = pb.RunRequest(session="s", fetch_ids=[3, 4], feed_ids=[1, 2])
    message = pb.RunRequest.FromString(head.SerializeToString() + feeds_only * 2)
    assert list(message.fetch_ids) == [3, 4] and len(message.feeds) == 2
    for item in message.feeds:
        np.testing.assert_array_equal(decode_array(item), array)
        assert decode_array(item).dtype == array.dtype.newbyteorder("=")


def test_an_idle_stream_gives_its_worker_thread_back(monkeypatch):
    import needle.remote.stream as stream

    monkeypatch.setattr(stream, "IDLE_S", 0.3)
    with running_server(workers=3) as server, st.Graph():  # one stream slot
        x = st.placeholder((2,))
        first = RemoteSession(target=server.address, timeout_s=2.0)
        np.testing.assert_array_equal(first.run(x + 1.0, {x: [1.0, 2.0]}), [2.0, 3.0])
        assert server.streams == 1
        assert wait_until(lambda: server.streams == 0, timeout_s=10)  # idle: ended
        second = RemoteSession(target=server.address)  # the slot is free again
        np.testing.assert_array_equal(second.run(x * 2.0, {x: [1.0, 2.0]}), [2.0, 4.0])
        assert server.streams == 1 and second._stream.refused is False
        second.close()
        assert wait_until(lambda: server.streams == 0, timeout_s=10)
        np.testing.assert_array_equal(first.run(x + 2.0, {x: [1.0, 2.0]}), [3.0, 4.0])
        assert first._stream.opened == 2  # reopened after being idle
        first.close()
