"""Threads do not interfere: grad mode, the JIT's active trace, graph recording and the
running Session are per-thread state (``needle.core.context``).

Each test runs work in several threads at once, then the same work in one thread on fresh,
identical models, and asks for bit-identical results: the same float32 operations run in
the same order in both, so any difference means one thread changed what another's ops did.
Threads draw no random numbers (NumPy's global RNG is shared by threads): models are built
in the main thread with fixed seeds and data comes from ``np.random.default_rng(seed)``.

``NEEDLE_STRESS_SECONDS`` (default 6, at most 30) sets the wall-clock budget of the stress
test's threads.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

import needle as ndl
import needle.nn as nn
import needle.static as st

#: seconds a thread may take before the test fails as hung
JOIN_TIMEOUT = 120.0
#: seconds an Event wait may take before the waiting side gives up
EVENT_TIMEOUT = 30.0
STRESS_SECONDS = min(30.0, float(os.environ.get("NEEDLE_STRESS_SECONDS", 6)))

IN, HIDDEN, CLASSES, BATCH = 8, 16, 4, 16


@pytest.fixture(autouse=True)
def _fine_switching():
    """Switch threads every 100 us instead of every 5 ms: far more interleavings per second."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


# -- helpers ------------------------------------------------------------------------------------
def _run_threads(targets: dict[str, Callable[[], None]], timeout: float = JOIN_TIMEOUT,
                 main: Callable[[], None] | None = None) -> None:
    """Run each target in its own thread (and ``main``, if given, in this thread meanwhile);
    fail if a thread hangs; re-raise the first exception of any of them here."""
    errors: list[tuple[str, BaseException]] = []

    def wrap(name: str, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                errors.append((name, exc))
        return run

    threads = [threading.Thread(target=wrap(name, fn), name=name, daemon=True)
               for name, fn in targets.items()]
    for t in threads:
        t.start()
    if main is not None:
        wrap("main thread", main)()
    end = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    hung = [t.name for t in threads if t.is_alive()]
    if hung:
        pytest.fail(f"threads still running after {timeout:.0f} s (hung?): {hung}; "
                    f"errors so far: {errors}")
    if errors:
        name, exc = errors[0]
        others = [f"{n}: {type(e).__name__}: {e}" for n, e in errors[1:]]
        raise AssertionError(f"{name!r} raised {type(exc).__name__}: {exc}"
                             + (f"; others: {others}" if others else "")) from exc


def _wait(event: threading.Event, what: str) -> None:
    if not event.wait(EVENT_TIMEOUT):
        raise TimeoutError(f"timed out waiting for {what}")


def _mlp(seed: int, batchnorm: bool = False, width: int = HIDDEN) -> nn.Module:
    """Linear -> (BatchNorm1d) -> ReLU -> Linear, initialized from ``np.random.seed(seed)``."""
    np.random.seed(seed)
    layers = [nn.Linear(IN, width)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(width))
    layers += [nn.ReLU(), nn.Linear(width, CLASSES)]
    return nn.Sequential(*layers)


def _state(model: nn.Module) -> list[np.ndarray]:
    """Copies of the parameters and buffers (BatchNorm's running statistics)."""
    return [p.numpy().copy() for p in model.parameters()] + \
        [b.numpy().copy() for b in model.buffers()]


def _batches(seed: int, count: int = 4, batch: int = BATCH) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((batch, IN)).astype(np.float32),
             rng.integers(0, CLASSES, batch)) for _ in range(count)]


def _tensors(batch: tuple[np.ndarray, np.ndarray]) -> tuple[ndl.Tensor, ndl.Tensor]:
    x, y = batch
    return ndl.Tensor(x, requires_grad=False), ndl.Tensor(y, requires_grad=False)


def _assert_same_states(got: list[np.ndarray], expected: list[np.ndarray], what: str) -> None:
    assert len(got) == len(expected), what
    for i, (a, b) in enumerate(zip(got, expected)):
        np.testing.assert_array_equal(a, b, err_msg=f"{what}: array {i}")


def _assert_same_lists(got: list, expected: list, what: str) -> None:
    assert len(got) == len(expected), f"{what}: {len(got)} vs {len(expected)} results"
    for i, (a, b) in enumerate(zip(got, expected)):
        np.testing.assert_array_equal(a, b, err_msg=f"{what}: result {i}")


class _Loop:
    """Bounds a thread's loop by an iteration cap, a deadline and an optional stop event."""

    def __init__(self, cap: int, seconds: float, stop: threading.Event | None = None) -> None:
        self.cap = cap
        self.seconds = seconds
        self.stop = stop
        self.deadline = 0.0

    def start(self) -> None:
        self.deadline = time.monotonic() + self.seconds

    def more(self, done: int) -> bool:
        if done >= self.cap or time.monotonic() >= self.deadline:
            return False
        return self.stop is None or not self.stop.is_set()


# -- workloads (each run once in a thread, then again sequentially) -------------------------------
def _eager_training(model: nn.Module, batches: list, steps: int | _Loop) -> list[np.ndarray]:
    """Eager training steps; returns the losses. ``steps`` is a count or a bounded loop."""
    opt = ndl.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.SoftmaxLoss()
    losses: list[np.ndarray] = []
    loop = steps if isinstance(steps, _Loop) else None
    while (loop.more(len(losses)) if loop else len(losses) < steps):
        x, y = _tensors(batches[len(losses) % len(batches)])
        loss = loss_fn(model(x), y)
        opt.reset_grad()
        loss.backward()
        opt.step()
        losses.append(loss.numpy().copy())
    return losses


def _jit_training(model: nn.Module, batches: list, steps: int | _Loop,
                  shared: object = None, shared_inputs: list | None = None,
                  shared_out: list | None = None) -> tuple[list[np.ndarray], object]:
    """A jitted training step (``opt.step()`` inside) per iteration; optionally also a call of
    the ``shared`` pure jitted function on this thread's own inputs."""
    opt = ndl.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = nn.SoftmaxLoss()

    @ndl.jit
    def step(x, y):
        loss = loss_fn(model(x), y)
        opt.reset_grad()
        loss.backward()
        opt.step()
        return loss

    losses: list[np.ndarray] = []
    loop = steps if isinstance(steps, _Loop) else None
    while (loop.more(len(losses)) if loop else len(losses) < steps):
        i = len(losses)
        losses.append(step(*_tensors(batches[i % len(batches)])).numpy().copy())
        if shared is not None:
            x, w = shared_inputs[i % len(shared_inputs)]
            shared_out.append(shared(ndl.Tensor(x, requires_grad=False),
                                     ndl.Tensor(w, requires_grad=False)).numpy().copy())
    return losses, step


def _session_training(model: nn.Module, batches: list, steps: int | _Loop,
                      entered: Callable[[], None] | None = None
                      ) -> tuple[list[np.ndarray], float]:
    """Build a graph (placeholders, an ``st.minimize`` train op, a Variable counting the
    runs) in this thread and run it; returns the losses and the counter's final value.
    ``entered`` is called right after entering the graph, before any node is made."""
    with st.Graph() as g:
        if entered is not None:
            entered()
        x = st.placeholder((BATCH, IN), name="x")
        y = st.placeholder((BATCH,), dtype="int64", name="y")
        loss = nn.SoftmaxLoss()(model(x), y)
        train = st.minimize(ndl.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), loss)
        counter = st.Variable(np.zeros((), np.float32), trainable=False, name="counter")
        count = st.assign_add(counter, st.constant(np.float32(1.0)))
        assert st.get_default_graph() is g
        sess = st.Session()
        losses: list[np.ndarray] = []
        loop = steps if isinstance(steps, _Loop) else None
        while (loop.more(len(losses)) if loop else len(losses) < steps):
            images, labels = batches[len(losses) % len(batches)]
            _, value, _ = sess.run([train, loss, count], {x: images, y: labels})
            losses.append(np.array(value))
        total = float(sess.run(counter))
    return losses, total


# -- 1. tracer and no_grad evaluator beside a trainer -------------------------------------------
def test_tracer_and_no_grad_evaluator_beside_a_trainer_match_a_lone_run():
    steps = 60
    train_batches = _batches(1)
    xb = np.random.default_rng(2).standard_normal((BATCH, IN)).astype(np.float32)
    xc = np.random.default_rng(3).standard_normal((BATCH, IN)).astype(np.float32)

    model_a, model_b, model_c = _mlp(10, batchnorm=True), _mlp(11), _mlp(12, batchnorm=True)
    model_c.eval()
    b_before = _state(model_b)
    barrier = threading.Barrier(3, timeout=EVENT_TIMEOUT)
    trainer_done = threading.Event()
    results: dict[str, list] = {"jit": [], "eval": []}
    traces: list[tuple[int, int, int]] = []

    def trainer() -> None:
        loop = _Loop(cap=steps, seconds=30.0)
        barrier.wait()
        loop.start()
        try:
            results["losses"] = _eager_training(model_a, train_batches, loop)
        finally:
            trainer_done.set()

    def tracer() -> None:
        loop = _Loop(cap=400, seconds=30.0, stop=trainer_done)
        barrier.wait()
        loop.start()
        while loop.more(len(results["jit"])):
            f = ndl.jit(lambda x: model_b(x) * 2.0)  # a new function: it traces every time
            results["jit"].append(f(ndl.Tensor(xb, requires_grad=False)).numpy().copy())
            report = f.explain()
            traces.append((report.traces, report.num_cache_entries,
                           report.cache_entries[0].effects))

    def evaluator() -> None:
        loop = _Loop(cap=10000, seconds=30.0, stop=trainer_done)
        barrier.wait()
        loop.start()
        while loop.more(len(results["eval"])):
            with ndl.no_grad():
                assert not ndl.is_grad_enabled()
                out = model_c(ndl.Tensor(xc, requires_grad=False))
            assert ndl.is_grad_enabled()
            results["eval"].append(out.numpy().copy())

    _run_threads({"trainer": trainer, "tracer": tracer, "evaluator": evaluator})
    assert results["losses"] and results["jit"] and results["eval"], "a thread never ran"
    assert all(t == (1, 1, 0) for t in traces), f"(traces, plans, effects) seen: {set(traces)}"

    # the same work in one thread, on fresh identical models
    lone_a, lone_b, lone_c = _mlp(10, batchnorm=True), _mlp(11), _mlp(12, batchnorm=True)
    lone_c.eval()
    lone_losses = _eager_training(lone_a, train_batches, len(results["losses"]))
    lone_jit = [ndl.jit(lambda x: lone_b(x) * 2.0)(ndl.Tensor(xb, requires_grad=False)).numpy()
                for _ in range(2)]
    eager_b = (lone_b(ndl.Tensor(xb, requires_grad=False)) * 2.0).numpy()
    with ndl.no_grad():
        eager_c = lone_c(ndl.Tensor(xc, requires_grad=False)).numpy()

    _assert_same_lists(results["losses"], lone_losses, "trainer losses")
    _assert_same_states(_state(model_a), _state(lone_a), "trainer weights and BatchNorm stats")
    np.testing.assert_array_equal(lone_jit[0], lone_jit[1])
    for i, out in enumerate(results["jit"]):
        np.testing.assert_array_equal(out, lone_jit[0], err_msg=f"jitted call {i}")
        np.testing.assert_array_equal(out, eager_b, err_msg=f"jitted call {i} vs eager")
    # a pure jitted function never recorded the trainer's opt.step(): model_b is untouched
    _assert_same_states(_state(model_b), b_before, "model_b after the tracer")
    _assert_same_states(_state(model_b), _state(lone_b), "model_b vs a fresh copy")
    for i, out in enumerate(results["eval"]):
        np.testing.assert_array_equal(out, eager_c, err_msg=f"evaluation {i}")
    _assert_same_states(_state(model_c), _state(lone_c), "evaluated model")


# -- 2. a Session beside a graph builder and an eager trainer ------------------------------------
def test_session_run_beside_a_graph_builder_and_an_eager_trainer_matches_sequential():
    """The Session thread enters its graph, then the builder enters its own one and keeps
    building and running fresh graphs while the Session thread builds its graph (inside its
    block) and trains with it; an eager trainer runs beside both."""
    steps = 100
    session_batches, eager_batches = _batches(20), _batches(21)
    xg = np.random.default_rng(22).standard_normal((5, IN)).astype(np.float32)

    model_s, model_g, model_e = _mlp(20, batchnorm=True), _mlp(21), _mlp(22, batchnorm=True)
    barrier = threading.Barrier(3, timeout=EVENT_TIMEOUT)
    session_entered, builder_entered = threading.Event(), threading.Event()
    done = threading.Event()
    done_count = [0]
    lock = threading.Lock()
    results: dict[str, list] = {"built": []}

    def finished() -> None:
        with lock:
            done_count[0] += 1
            if done_count[0] == 2:
                done.set()

    def build_and_run(entered: threading.Event | None = None) -> np.ndarray:
        with st.Graph() as g:
            if entered is not None:
                entered.set()
            x = st.placeholder((None, IN), name="x")
            out = (model_g(x).relu() * 3.0).sum(axes=(1,))
            runs = st.Variable(np.zeros((), np.float32), trainable=False, name="runs")
            count = st.assign_add(runs, st.constant(np.float32(1.0)))
            assert st.get_default_graph() is g
            assert out.shape == (None,) and g.placeholders == [x] and g.variables == [runs]
            sess = st.Session()
            value, _ = sess.run([out, count], {x: xg})
            value2, _ = sess.run([out, count], {x: xg})
            np.testing.assert_array_equal(value, value2)
            assert float(sess.run(runs)) == 2.0  # each run's assign reached this Session
            return np.array(value)

    def session_thread() -> None:
        def entered() -> None:  # inside its graph block: let the builder enter its own graph
            session_entered.set()
            _wait(builder_entered, "the builder's graph block")

        barrier.wait()
        try:
            results["session"] = _session_training(model_s, session_batches, steps, entered)
        finally:
            finished()

    def builder() -> None:
        loop = _Loop(cap=1000, seconds=30.0, stop=done)
        barrier.wait()
        _wait(session_entered, "the Session thread's graph block")
        loop.start()
        results["built"].append(build_and_run(builder_entered))
        while loop.more(len(results["built"])):
            results["built"].append(build_and_run())

    def trainer() -> None:
        barrier.wait()
        try:
            results["eager"] = _eager_training(model_e, eager_batches, steps)
        finally:
            finished()

    _run_threads({"session": session_thread, "builder": builder, "trainer": trainer})

    lone_s, lone_g, lone_e = _mlp(20, batchnorm=True), _mlp(21), _mlp(22, batchnorm=True)
    lone_session = _session_training(lone_s, session_batches, steps)
    with st.Graph():
        x = st.placeholder((None, IN), name="x")
        lone_built = st.Session().run((lone_g(x).relu() * 3.0).sum(axes=(1,)), {x: xg})
    lone_eager = _eager_training(lone_e, eager_batches, steps)

    losses, counter = results["session"]
    assert counter == steps == lone_session[1]
    _assert_same_lists(losses, lone_session[0], "Session losses")
    _assert_same_states(_state(model_s), _state(lone_s), "Session-trained model")
    for i, value in enumerate(results["built"]):
        np.testing.assert_array_equal(value, lone_built, err_msg=f"built graph {i}")
    _assert_same_states(_state(model_g), _state(lone_g), "graph builder's model")
    _assert_same_lists(results["eager"], lone_eager, "eager losses")
    _assert_same_states(_state(model_e), _state(lone_e), "eager-trained model")


# -- 3. the stress test -----------------------------------------------------------------------
def test_stress_eager_jit_and_session_threads_match_a_sequential_replay():
    """4 threads (eager training, two jitted training steps, Session training) for up to
    ``NEEDLE_STRESS_SECONDS``; both jit threads also call the SAME pure jitted function on
    their own inputs. Then the recorded number of steps of each is replayed sequentially."""
    cap = int(500 * STRESS_SECONDS)  # steps per thread; the deadline usually binds first
    data = {name: _batches(seed) for name, seed in
            (("eager", 30), ("jit1", 31), ("jit2", 32), ("session", 33))}
    seeds = {"eager": 40, "jit1": 41, "jit2": 42, "session": 43}
    rng = np.random.default_rng(34)
    w = rng.standard_normal((IN, 5)).astype(np.float32)
    # different and shared shapes: calls of the shared function hit the same and other plans
    shared_inputs = {
        "jit1": [(rng.standard_normal((n, IN)).astype(np.float32), w) for n in (16, 4, 7)],
        "jit2": [(rng.standard_normal((n, IN)).astype(np.float32), w) for n in (16, 12, 7)],
    }
    shared = ndl.jit(lambda x, w: (x @ w).relu().sum())

    models = {name: _mlp(seed, batchnorm=True) for name, seed in seeds.items()}
    barrier = threading.Barrier(4, timeout=EVENT_TIMEOUT)
    results: dict[str, object] = {}
    shared_out: dict[str, list] = {"jit1": [], "jit2": []}

    def worker(name: str) -> Callable[[], None]:
        def run() -> None:
            loop = _Loop(cap=cap, seconds=STRESS_SECONDS)
            barrier.wait()
            loop.start()
            if name == "eager":
                results[name] = _eager_training(models[name], data[name], loop)
            elif name == "session":
                results[name] = _session_training(models[name], data[name], loop)
            else:
                results[name] = _jit_training(models[name], data[name], loop, shared,
                                              shared_inputs[name], shared_out[name])[0]
        return run

    start = time.monotonic()
    _run_threads({name: worker(name) for name in seeds}, timeout=STRESS_SECONDS + JOIN_TIMEOUT)
    elapsed = time.monotonic() - start
    counts = {name: len(results[name] if name != "session" else results[name][0])
              for name in seeds}
    print(f"stress: {elapsed:.1f} s in threads, steps per thread: {counts}, shared pure "
          f"function: {shared.explain().traces} traces")
    assert all(n > 0 for n in counts.values()), counts

    # replay the same number of steps sequentially on fresh identical models
    for name, seed in seeds.items():
        model = _mlp(seed, batchnorm=True)
        if name == "eager":
            losses = _eager_training(model, data[name], counts[name])
        elif name == "session":
            losses, counter = _session_training(model, data[name], counts[name])
            assert results[name][1] == counter == counts[name]
            results[name] = results[name][0]
        else:
            losses, step = _jit_training(model, data[name], counts[name])
            assert step.explain().traces == 1
        _assert_same_lists(results[name], losses, f"{name} losses")
        _assert_same_states(_state(models[name]), _state(model), f"{name} weights and stats")

    for name, outs in shared_out.items():
        assert len(outs) == counts[name]
        eager = [(ndl.Tensor(x) @ ndl.Tensor(w_)).relu().sum().numpy()
                 for x, w_ in shared_inputs[name]]
        for i, out in enumerate(outs):
            np.testing.assert_array_equal(out, eager[i % len(eager)],
                                          err_msg=f"{name}: shared call {i}")
    assert all(e.effects == 0 for e in shared.explain().cache_entries)


# -- 4. grad mode is per thread -------------------------------------------------------------------
def test_no_grad_in_one_thread_leaves_other_threads_grad_mode_alone():
    inside = threading.Event()
    checked = threading.Event()
    seen: dict[str, object] = {}

    def evaluator() -> None:
        with ndl.no_grad():
            seen["inside"] = ndl.is_grad_enabled()
            inside.set()
            _wait(checked, "the main thread's check")
            seen["still_inside"] = ndl.is_grad_enabled()
        seen["after"] = ndl.is_grad_enabled()

    def main_checks() -> None:
        _wait(inside, "the evaluator's no_grad block")
        try:
            seen["main"] = ndl.is_grad_enabled()
            x = ndl.Tensor(np.arange(3, dtype=np.float32))
            y = (x * x).sum()
            y.backward()  # fails if this thread's ops recorded no graph
            seen["grad"] = x.grad.numpy().copy()
        finally:
            checked.set()

    _run_threads({"evaluator": evaluator}, main=main_checks)
    assert seen["main"] is True
    np.testing.assert_array_equal(seen["grad"], [0.0, 2.0, 4.0])
    assert seen["inside"] is False and seen["still_inside"] is False
    assert seen["after"] is True
    assert ndl.is_grad_enabled()


def test_no_grad_decorator_called_from_two_threads_at_once_restores_each_threads_mode():
    entered = {name: threading.Event() for name in ("a", "b")}
    leave = {name: threading.Event() for name in ("a", "b")}
    left = {name: threading.Event() for name in ("a", "b")}
    seen: dict[str, object] = {}

    @ndl.no_grad()
    def evaluate(name: str) -> None:
        seen[f"{name} inside"] = ndl.is_grad_enabled()
        entered[name].set()
        _wait(leave[name], f"leave {name}")
        seen[f"{name} before leaving"] = ndl.is_grad_enabled()

    def thread_a() -> None:  # grad enabled outside
        evaluate("a")
        seen["a after"] = ndl.is_grad_enabled()
        left["a"].set()
        _wait(leave["b"], "b leaving")
        _wait(left["b"], "b left")
        seen["a at the end"] = ndl.is_grad_enabled()

    def thread_b() -> None:  # calls it from inside its own no_grad block
        _wait(entered["a"], "a inside")
        with ndl.no_grad():
            evaluate("b")
            seen["b after"] = ndl.is_grad_enabled()
        seen["b at the end"] = ndl.is_grad_enabled()
        left["b"].set()

    def order() -> None:
        # a enters, b enters, a leaves first (while b is inside), then b leaves
        _wait(entered["a"], "a inside")
        _wait(entered["b"], "b inside")
        leave["a"].set()
        _wait(left["a"], "a left")  # b is still inside evaluate
        leave["b"].set()

    _run_threads({"a": thread_a, "b": thread_b, "order": order})
    assert seen["a inside"] is False and seen["a before leaving"] is False
    assert seen["b inside"] is False and seen["b before leaving"] is False
    assert seen["a after"] is True, "thread a's grad mode was not restored"
    assert seen["a at the end"] is True
    assert seen["b after"] is False, "thread b left the decorated call outside its no_grad"
    assert seen["b at the end"] is True
    assert ndl.is_grad_enabled()


# -- 5. a trace in one thread does not capture another thread's ops ------------------------------
def test_a_trace_in_one_thread_does_not_capture_another_threads_ops():
    batch = _batches(50, count=1)[0]
    x_np = np.random.default_rng(51).standard_normal((3, 4)).astype(np.float32)

    # what the main thread's step gives when nothing else runs
    reference = _mlp(52)
    ref_losses = _eager_training(reference, [batch], 1)

    model = _mlp(52)
    opt = ndl.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    tracing_started = threading.Event()
    main_done = threading.Event()

    def traced(x):
        y = x * 2.0
        tracing_started.set()
        _wait(main_done, "the main thread's eager ops")  # the trace is active meanwhile
        return (y + 1.0).relu().sum()

    f = ndl.jit(traced)
    out: dict[str, np.ndarray] = {}

    def tracer() -> None:
        out["value"] = f(ndl.Tensor(x_np, requires_grad=False)).numpy().copy()

    def main_ops() -> None:
        _wait(tracing_started, "the trace to start")
        try:
            x, y = _tensors(batch)
            loss = nn.SoftmaxLoss()(model(x), y)
            opt.reset_grad()
            loss.backward()
            opt.step()
            out["loss"] = loss.numpy().copy()  # concrete: raises if it became a trace node
            out["sum"] = (ndl.Tensor(x_np) * 3.0).sum().numpy().copy()
        finally:
            main_done.set()

    _run_threads({"tracer": tracer}, main=main_ops)
    np.testing.assert_array_equal(out["loss"], ref_losses[0])
    np.testing.assert_allclose(out["sum"], (x_np * 3.0).sum(), rtol=1e-6)
    after_step = _state(model)
    _assert_same_states(after_step, _state(reference), "model after the main thread's step")
    report = f.explain()
    assert report.traces == 1 and report.num_cache_entries == 1
    assert report.cache_entries[0].effects == 0
    np.testing.assert_allclose(out["value"], np.maximum(x_np * 2.0 + 1.0, 0).sum(), rtol=1e-6)
    # replaying the plan changes no model (it recorded no other thread's opt.step())
    tracing_started.clear()
    for _ in range(3):
        again = f(ndl.Tensor(x_np, requires_grad=False)).numpy()
        np.testing.assert_array_equal(again, out["value"])
    assert f.explain().traces == 1
    _assert_same_states(_state(model), after_step, "model after replaying the plan")
