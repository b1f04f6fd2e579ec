"""kernels/blas_threads.py: BLAS held on one thread process-wide, counted across threads. Two
threads' holds overlap without one's release cutting the other's short, the first count comes
back after the last release (also after an error), nested holds count once, and where the
count cannot be set nothing is held."""

from __future__ import annotations

import threading

import pytest

from needle.kernels import blas_threads


@pytest.fixture(autouse=True)
def _two_threads():
    functions = blas_threads._count_functions()
    if functions is None:
        pytest.skip("BLAS's thread count cannot be set here (no OpenBLAS, no threadpoolctl)")
    before = functions[0]()
    functions[1](2)
    yield
    functions[1](before)


def _in_thread(body, *events):
    worker = threading.Thread(target=body, args=events, daemon=True)
    worker.start()
    return worker


def test_overlapping_holds_on_two_threads():
    """A takes the hold, B takes it, A lets go: still one thread (B holds); B lets go: two."""
    a_in, b_in, a_out, b_out = (threading.Event() for _ in range(4))
    seen = {}

    def a(a_in, b_in, a_out):
        with blas_threads.hold():
            seen["a"] = (blas_threads.held(), blas_threads.count())
            a_in.set()
            assert b_in.wait(30)
        a_out.set()

    def b(a_in, b_in, a_out, b_out):
        assert a_in.wait(30)
        with blas_threads.hold():
            b_in.set()
            assert a_out.wait(30)
            seen["b after a left"] = (blas_threads.held(), blas_threads.count())
        b_out.set()

    workers = [_in_thread(a, a_in, b_in, a_out), _in_thread(b, a_in, b_in, a_out, b_out)]
    for worker in workers:
        worker.join(60)
    assert b_out.is_set()
    assert seen == {"a": (True, 1), "b after a left": (True, 1)}
    assert blas_threads.count() == 2 and not blas_threads.held()


def test_nested_holds_count_once_and_an_error_restores():
    with pytest.raises(RuntimeError), blas_threads.hold():
        with blas_threads.hold():
            assert blas_threads.count() == 1
        assert blas_threads.count() == 1 and blas_threads.held()
        raise RuntimeError("inside")
    assert blas_threads.count() == 2 and not blas_threads.held()
    assert blas_threads.restore_count() == 2


def test_threads_lent_only_to_the_only_holder():
    with blas_threads.lend_threads() as lent:  # not holding: nothing to lend
        assert not lent
    with blas_threads.hold():
        with blas_threads.lend_threads() as lent:
            assert lent and blas_threads.count() == 2
        assert blas_threads.count() == 1
        holding, done = threading.Event(), threading.Event()

        def other(holding, done):
            with blas_threads.hold():
                holding.set()
                done.wait(30)

        worker = _in_thread(other, holding, done)
        assert holding.wait(30)
        with blas_threads.lend_threads() as lent:
            assert not lent and blas_threads.count() == 1
        done.set()
        worker.join(60)
        assert blas_threads.count() == 1
    assert blas_threads.count() == 2


def test_nothing_held_where_the_count_cannot_be_set(monkeypatch):
    monkeypatch.setattr(blas_threads, "_count_functions", lambda: None)
    assert not blas_threads.available()
    with blas_threads.hold():
        assert not blas_threads.held()
