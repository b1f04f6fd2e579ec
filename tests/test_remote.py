"""Remote execution (needle.remote): a Session whose graph runs on a server, and a served
program's inference. Servers listen on 127.0.0.1 on ports they pick and stop by themselves;
every client call has a deadline."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("google.protobuf")

import needle as ndl  # noqa: E402
import needle.nn as nn  # noqa: E402
import needle.static as st  # noqa: E402
from needle.apps.models import MLPResNet  # noqa: E402
from needle.program.graph_io import GraphWriter  # noqa: E402
from needle.remote import Client, Limits, RemoteError, RemoteServer, RemoteSession  # noqa: E402
from needle.remote import needle_remote_pb2 as pb  # noqa: E402
from needle.remote.server import SERVICE, TOKEN_KEY  # noqa: E402
from needle.remote.wire import encode_array  # noqa: E402

from .remote_fixtures import running_server, serve_process, wait_until  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _run_python(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


# -- packaging -----------------------------------------------------------------------------------
def test_import_needle_does_not_import_grpc():
    done = _run_python("""
        import sys, needle, needle.static
        from needle.cli import _parser
        _parser()  # `needle --help` registers `serve` without gRPC
        assert 'grpc' not in sys.modules and 'google.protobuf' not in sys.modules, 'imported'
        print('ok')""")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_a_missing_extra_gives_one_import_error_naming_it():
    done = _run_python("""
        import sys
        sys.modules['grpc'] = None  # as if grpcio were not installed
        import needle.static as st
        for make in (lambda: st.Session(target='grpc://127.0.0.1:1'),
                     lambda: __import__('needle').remote.Client):
            try:
                make()
            except ImportError as exc:
                print(exc)
        """)
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2 and all("pip install 'needle[remote]'" in ln for ln in lines), done


# -- the same results as a local Session ---------------------------------------------------------
def _mlp_resnet_training(session_factory, steps: int, batches: list):
    """Train needle.apps.models' MLP-ResNet (dropout 0) ``steps`` Adam steps in a Session;
    the losses, and the parameters and BatchNorm statistics at the end."""
    np.random.seed(7)
    model = MLPResNet(784, hidden=100, num_blocks=3, drop_prob=0.0)
    with st.Graph():
        x = st.placeholder((100, 784), name="images")
        y = st.placeholder((100,), dtype="int64", name="labels")
        loss = nn.SoftmaxLoss()(model(x), y)
        train = st.minimize(ndl.optim.Adam(model.parameters(), lr=1e-3), loss)
        sess = session_factory()
        losses = [sess.run([train, loss], {x: images, y: labels})[1]
                  for images, labels in batches[:steps]]
        state = [p for p in model.parameters()] + [
            b for m in model.modules() if isinstance(m, nn.BatchNorm1d)
            for b in (m.running_mean, m.running_var)]
        final = sess.run(state)
        sess.close()
    return losses, final


def test_mlp_resnet_trained_remotely_is_bit_identical_to_local():
    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((100, 784)).astype(np.float32), rng.integers(0, 10, 100))
               for _ in range(50)]
    local_losses, local_state = _mlp_resnet_training(st.Session, 50, batches)
    with running_server() as server:
        remote_losses, remote_state = _mlp_resnet_training(
            lambda: st.Session(target=server.address), 50, batches)
        assert len(server.sessions) == 0
    assert local_losses[-1] < local_losses[0]  # it trained
    np.testing.assert_array_equal(np.array(remote_losses), np.array(local_losses))
    assert len(remote_state) == len(local_state) == 40  # 28 parameters, 6 x 2 statistics
    for remote, local in zip(remote_state, local_state):
        assert remote.dtype == local.dtype
        np.testing.assert_array_equal(remote, local)


def test_variables_name_the_graphs_variables_as_locally():
    """Eager parameters become Variables on the server, but variables() and load_variables()
    name only the graph's own st.Variables, as a local Session does."""
    with running_server() as server, st.Graph():
        np.random.seed(0)
        layer = nn.Linear(3, 2)
        x = st.placeholder((None, 3))
        scale = st.Variable(np.float32(2), name="scale")
        out = layer(x) * scale
        local, remote = st.Session(), st.Session(target=server.address)
        feed = {x: np.ones((1, 3))}
        np.testing.assert_array_equal(remote.run(out, feed), local.run(out, feed))
        assert list(remote.variables()) == list(local.variables()) == ["scale"]
        remote.load_variables({"scale": 3.0})
        local.load_variables(remote.variables())
        np.testing.assert_array_equal(remote.run(out, feed), local.run(out, feed))
        for sess in (local, remote):
            with pytest.raises(KeyError, match="unknown names \\['weight'\\], missing names "
                               "\\['scale'\\]"):
                sess.load_variables({"weight": np.zeros((3, 2))})
        remote.close()


def test_variables_and_load_variables_round_trip():
    with running_server() as server, st.Graph():
        w = st.Variable(np.arange(3, dtype=np.float32), name="w")
        b = st.Variable(np.float32(2), name="b")
        out = w * b
        with st.Session(target=server.address) as sess:
            assert sorted(sess.variables()) == ["b", "w"]
            sess.load_variables({"w": np.ones(3), "b": np.float32(5)})
            np.testing.assert_array_equal(sess.run(out), [5.0, 5.0, 5.0])
            with pytest.raises(KeyError, match="unknown names \\['z'\\]"):
                sess.load_variables({"w": np.ones(3), "b": 1.0, "z": 1.0})
            with pytest.raises(ValueError, match="shape mismatch"):
                sess.load_variables({"w": np.ones(4), "b": 1.0})
            later = st.Variable(np.float32(9), name="later")  # made after the session opened
            assert sess.variables()["later"] == 9.0 and sess.run(later) == 9.0
        with pytest.raises(RuntimeError, match="closed"):
            sess.variables()


def test_run_metadata_comes_back_with_the_servers_step_stats():
    with running_server() as server, st.Graph():
        x = st.placeholder((None, 4), name="x")
        out = (ndl.ops.exp(x) * 2).sum(axes=(1,))
        feed = {x: np.ones((3, 4))}
        local_meta, remote_meta = st.RunMetadata(), st.RunMetadata()
        untimed = st.RunMetadata()
        full = st.RunOptions(trace_level=st.RunOptions.FULL_TRACE)
        st.Session().run(out, feed, run_metadata=local_meta, options=full)
        with st.Session(target=server.address) as sess:
            sess.run(out, feed, run_metadata=remote_meta, options=full)
            sess.run(out, feed, run_metadata=untimed)
    assert remote_meta.executed == local_meta.executed and len(local_meta.executed) == 3
    assert remote_meta.peak_bytes == local_meta.peak_bytes > 0
    assert [e.node for e in remote_meta.step_stats] == \
        [e.node for e in local_meta.step_stats]
    assert [e.output_shapes for e in remote_meta.step_stats] == \
        [e.output_shapes for e in local_meta.step_stats]
    assert all(t > 0 for t in remote_meta.node_times.values())
    assert untimed.executed == local_meta.executed and untimed.step_stats == []


# -- isolation, lifetimes, failures ---------------------------------------------------------------
def test_two_clients_training_at_once_do_not_see_each_others_variables():
    """Two threads, each a client with its own graph whose Variable is named 'w', train at
    once on one server: each ends where the same training ends locally."""
    def train(seed: int, session_factory, out: dict) -> None:
        rng = np.random.default_rng(seed)
        data = rng.standard_normal((20, 8, 4)).astype(np.float32)
        with st.Graph():
            w = st.Variable(rng.standard_normal((4, 1)).astype(np.float32), name="w")
            x = st.placeholder((8, 4))
            loss = ((x @ w) ** 2).sum()
            train_op = st.minimize(ndl.optim.SGD([w], lr=0.01), loss)
            sess = session_factory()
            for batch in data:
                sess.run(train_op, {x: batch})
            out[seed] = sess.variables()["w"]
            sess.close()

    local: dict = {}
    for seed in (1, 2):
        train(seed, st.Session, local)
    remote: dict = {}
    with running_server(workers=4) as server:
        threads = [threading.Thread(target=train, args=(seed, lambda: st.Session(
            target=server.address), remote)) for seed in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not np.array_equal(local[1], local[2])
    for seed in (1, 2):
        np.testing.assert_array_equal(remote[seed], local[seed])


def test_a_killed_client_process_has_its_state_freed_by_timeout():
    with running_server() as server:
        code = f"""
            import numpy as np, needle.static as st
            with st.Graph():
                v = st.Variable(np.zeros(1000, np.float32))
                step = st.assign_add(v, np.ones(1000, np.float32))
                sess = st.Session(target={server.address!r})
                sess.run(step)
                print('running', flush=True)
                while True:
                    sess.run(step)
            """
        child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)],
                                 stdout=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            assert child.stdout.readline().strip() == "running"
            assert len(server.sessions) == 1
            child.kill()  # mid-run: no close(), no more heartbeats
            child.wait(10)
        finally:
            if child.poll() is None:
                child.kill()
        started = time.monotonic()
        assert wait_until(lambda: len(server.sessions) == 0, timeout_s=15)
        assert time.monotonic() - started < Limits(session_timeout_s=1.5).session_timeout_s + 3
        assert server.sessions.freed_by_timeout == 1


def test_a_killed_server_gives_the_client_one_clear_error():
    with serve_process() as (proc, address), st.Graph():
        x = st.placeholder((2,))
        sess = st.Session(target=address)
        np.testing.assert_array_equal(sess.run(x * 2, {x: [1.0, 2.0]}), [2.0, 4.0])
        proc.kill()
        proc.wait(10)
        started = time.monotonic()
        with pytest.raises(RemoteError, match=f"needle server {address} is unreachable"):
            sess.run(x * 3, {x: [1.0, 2.0]})
        assert time.monotonic() - started < 10
        sess.close()  # no hang either


def test_every_call_has_a_deadline(monkeypatch):
    release = threading.Event()
    monkeypatch.setattr(RemoteServer, "_run", lambda self, request, reply: release.wait(10))
    with running_server(workers=2) as server, st.Graph():
        x = st.placeholder((1,))
        sess = RemoteSession(target=server.address, timeout_s=0.5)
        started = time.monotonic()
        try:
            with pytest.raises(RemoteError, match="did not answer Run within 0.5 s"):
                sess.run(x * 2, {x: [1.0]})
            assert time.monotonic() - started < 5
        finally:
            release.set()
            sess.close()


def test_session_and_graph_limits():
    limits = Limits(max_sessions=2, max_graph_nodes=30, session_timeout_s=5)
    with running_server(limits=limits) as server, st.Graph():
        x = st.placeholder((3,))
        first, second = (st.Session(target=server.address) for _ in range(2))
        with pytest.raises(RemoteError, match="limit of 2 sessions"):
            st.Session(target=server.address)
        np.testing.assert_array_equal(first.run(x + 1.0, {x: np.zeros(3)}), np.ones(3))
        y = x
        for _ in range(40):
            y = y + 1.0
        with pytest.raises(ValueError, match="over this server's limit \\(30\\)"):
            first.run(y, {x: np.zeros(3)})
        # the refused part of the graph is not resent: the session runs what it can
        assert first.variables() == {}
        np.testing.assert_array_equal(first.run(x * 2.0, {x: np.ones(3)}), 2 * np.ones(3))
        with pytest.raises(ValueError, match="not defined before it"):
            first.run(y * 2.0, {x: np.zeros(3)})
        np.testing.assert_array_equal(second.run(x + 1.0, {x: np.zeros(3)}), np.ones(3))
        first.close()
        second.close()
        assert len(server.sessions) == 0


def test_messages_over_the_size_limit_are_refused():
    with running_server(limits=Limits(max_message_bytes=1 << 20)) as server, st.Graph():
        x = st.placeholder((None,))
        with st.Session(target=server.address) as sess:
            with pytest.raises(RemoteError, match="RESOURCE_EXHAUSTED|size limit"):
                sess.run(x * 2, {x: np.zeros(1 << 19, np.float32)})  # 2 MiB
            np.testing.assert_array_equal(sess.run(x * 2, {x: np.ones(4)}), 2 * np.ones(4))


# -- malformed requests and tokens ---------------------------------------------------------------
def _valid_run_request(session_id: str) -> bytes:
    """A Run request carrying its graph (delta 1 of a fresh session ``session_id``)."""
    with st.Graph():
        x = st.placeholder((None, 3), name="x")
        out = ndl.ops.exp(x) * 2
        writer = GraphWriter()
        spec, arrays = writer.add([out])
        request = pb.RunRequest(session=session_id, fetch_ids=[writer.id_of(out)],
                                feed_ids=[writer.id_of(x)])
        request.deltas.add(spec_json=json.dumps(spec), seq=1)
        encode_array(np.ones((4, 3), np.float32), request.feeds.add())
    return request.SerializeToString()


def _invalid_requests(session_id: str, rng: random.Random) -> list[tuple[str, bytes]]:
    """Well-formed protobuf whose content the server must refuse."""
    bad = []
    for i in range(200):
        kind = i % 8
        request = pb.RunRequest(session=session_id)
        if kind == 0:
            request.session = "no-such-session"
        elif kind == 1:
            request.deltas.add(spec_json="{not json", seq=2)
        elif kind == 2:
            request.deltas.add(seq=2, spec_json='{"format": "needle-graph", "version": 1, '
                               '"nodes": [{"id": 0, "kind": "op", "op": "os.system", '
                               '"inputs": []}]}')
        elif kind == 3:
            request.fetch_ids.append(10**6 + i)
        elif kind == 4:
            request.feed_ids.append(0)
            request.feeds.add(dtype="object", shape=[1], data=b"x" * 8)
        elif kind == 5:
            request.feed_ids.append(0)
            request.feeds.add(dtype="float32", shape=[1000, 1000], data=b"\0" * 8)
        elif kind == 6:
            request.feed_ids.extend([0, 1])
        else:
            request.deltas.add(seq=2, spec_json='{"format": "needle-graph", "version": 99, '
                               '"nodes": []}')
        bad.append(("Run", request.SerializeToString()))
    return bad


def test_malformed_truncated_and_unauthenticated_requests_are_refused(capsys):
    token = "test-token-" + str(os.getpid())
    rng = random.Random(0)
    methods = ["Open", "Heartbeat", "Close", "Run", "Variables", "LoadVariables", "Predict",
               "Info"]
    with running_server(token=token) as server:
        with st.Graph():
            x = st.placeholder((2,))
            sess = RemoteSession(target=server.address, token=token)
            assert sess.run(x + 1, {x: [1.0, 2.0]}).tolist() == [2.0, 3.0]
        channel = grpc.insecure_channel(server.address.removeprefix("grpc://"))
        raw = {m: channel.unary_unary(f"/{SERVICE}/{m}") for m in methods}
        raw_session = pb.OpenReply.FromString(raw["Open"](
            pb.OpenRequest(optimize=True).SerializeToString(), timeout=10,
            metadata=((TOKEN_KEY, token),))).session
        valid = _valid_run_request(raw_session)
        assert pb.RunReply.FromString(raw["Run"](valid, timeout=10, metadata=(
            (TOKEN_KEY, token),))).outputs[0].array.shape == [4, 3]
        cases: list[tuple[str, bytes, tuple | None]] = []
        good_token = ((TOKEN_KEY, token),)
        for _ in range(300):  # random bytes
            data = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200)))
            cases.append((rng.choice(methods), data, good_token))
        for _ in range(300):  # valid requests cut short
            cases.append(("Run", valid[:rng.randint(1, len(valid) - 1)], good_token))
        cases += [(m, d, good_token) for m, d in _invalid_requests(raw_session, rng)]
        for i in range(200):  # wrong or missing token
            metadata = ((TOKEN_KEY, token + "x"),) if i % 2 else None
            cases.append(("Run", valid, metadata))
        assert len(cases) == 1000
        counts = {"rpc_error": 0, "error_reply": 0, "reply": 0, "unauthenticated": 0}
        reply_classes = {"Run": pb.RunReply, "Open": pb.OpenReply, "Info": pb.InfoReply,
                         "Variables": pb.VariablesReply, "Predict": pb.PredictReply}
        for method, data, metadata in cases:
            try:
                answer = raw[method](data, timeout=10, metadata=metadata)
            except grpc.RpcError as exc:
                counts["rpc_error"] += 1
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    counts["unauthenticated"] += 1
                continue
            reply = reply_classes.get(method, pb.StatusReply).FromString(answer)
            counts["error_reply" if reply.HasField("error") else "reply"] += 1
        channel.close()
        with capsys.disabled():
            print(f"\n1000 malformed / truncated / unauthenticated requests: {counts}; "
                  f"server: {server.stats()}")
        assert sum(v for k, v in counts.items() if k != "unauthenticated") == 1000
        assert counts["unauthenticated"] == 200 and server.refused == 200
        assert counts["rpc_error"] + counts["error_reply"] >= 900
        # and it keeps serving, the session intact
        with st.Graph():
            y = st.placeholder((2,))
            assert sess.run(y * 3, {y: [1.0, 2.0]}).tolist() == [3.0, 6.0]
        sess.close()
        with st.Graph(), pytest.raises(RemoteError, match="refused Open: wrong or missing"):
            RemoteSession(target=server.address, token="wrong")


def test_serving_off_loopback_needs_a_token(tmp_path):
    with pytest.raises(ValueError, match="needs a token"):
        RemoteServer("0.0.0.0", 0)  # refused before binding anything
    done = subprocess.run([sys.executable, "-m", "needle", "serve", "--host", "0.0.0.0"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "needle serve: error: --host 0.0.0.0 is not loopback: give --token-file PATH (every "
        "request must then carry the token)"]


# -- serving a saved program ---------------------------------------------------------------------
def test_needle_serve_program_predicts_as_the_local_program_and_stops_on_sigterm(tmp_path):
    np.random.seed(3)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    model.eval()
    program = ndl.export(model, np.ones((2, 6), np.float32))
    path = str(tmp_path / "model.npz")
    program.save(path)
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    inputs = np.random.default_rng(1).standard_normal((5, 6)).astype(np.float32)
    expected = ndl.load_program(path)(ndl.Tensor(inputs, requires_grad=False)).numpy()
    with serve_process("--program", path, "--token-file", str(token_file)) as (proc, address):
        client = Client(address, token="s3cret")
        np.testing.assert_array_equal(client.predict(inputs), expected)
        assert client.info()["program"]["inputs"][0]["shape"] == [None, 6]
        with pytest.raises(ValueError, match="program input 'x0': expected shape"):
            client.predict(np.ones((5, 7), np.float32))
        with pytest.raises(RemoteError, match="wrong or missing token"):
            Client(address).predict(inputs)
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert "needle serve: stopped" in proc.stderr.read()


def test_predict_without_a_program_is_a_clear_error():
    with running_server() as server, Client(server.address) as client, \
            pytest.raises(RuntimeError, match="serves no program"):
        client.predict(np.ones(3))


def test_remote_doc_examples_run(tmp_path, monkeypatch, capsys):
    import re

    monkeypatch.chdir(tmp_path)
    path = os.path.join(ROOT, "docs", "remote.md")
    with open(path) as f:
        code = "\n".join(re.findall(r"```python\n(.*?)```", f.read(), re.S))
    exec(compile(code, path, "exec"), {})
    assert capsys.readouterr().out.splitlines()[-1] == "(5, 3)"
