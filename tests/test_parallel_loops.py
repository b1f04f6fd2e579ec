"""numba's parallel loops on TBB (backend/parallel_loops.py): picked when the tbb wheel is
installed, the same bits as the serial loop, safe for two threads at once and after fork()."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

numba = pytest.importorskip("numba")
from numba import prange  # noqa: E402

from needle.backend import cpu_threads, parallel_loops  # noqa: E402


def _tbb_installed() -> bool:
    try:
        from importlib.metadata import version
        version("tbb")
    except Exception:  # noqa: BLE001 (PackageNotFoundError)
        return False
    return os.environ.get("NEEDLE_NUMBA", "1") != "0"


def _blocked_square_sums(x, out, blocks):
    """Per-block sums of squares, each block in order: the same bits however it is split."""
    n = x.size
    size = -(-n // blocks)
    for b in prange(blocks):
        total = 0.0
        for i in range(b * size, min(n, (b + 1) * size)):
            total += x[i] * x[i]
        out[b] = total


def _serial(x, blocks):
    size = -(-x.size // blocks)
    out = np.empty(blocks)
    for b in range(blocks):
        total = 0.0
        for v in x[b * size:(b + 1) * size].tolist():
            total += v * v
        out[b] = total
    return out


@pytest.mark.skipif(not _tbb_installed(), reason="the tbb wheel (fast extra) is not installed")
def test_tbb_is_numbas_layer_when_the_wheel_is_installed(monkeypatch):
    monkeypatch.setattr(cpu_threads, "NUM_THREADS", 2)
    assert parallel_loops.tbb_layer()
    assert numba.threading_layer() == "tbb"
    assert parallel_loops.parallel_threads() == min(2, numba.config.NUMBA_NUM_THREADS)


def test_one_thread_means_no_parallel_loops(monkeypatch):
    monkeypatch.setattr(cpu_threads, "NUM_THREADS", 1)
    assert parallel_loops.parallel_threads() == 0


@pytest.mark.skipif(not _tbb_installed(), reason="the tbb wheel (fast extra) is not installed")
def test_parallel_loop_bits_threads_and_fork(monkeypatch):
    monkeypatch.setattr(cpu_threads, "NUM_THREADS", 2)
    assert parallel_loops.parallel_threads() >= 2
    kernel = parallel_loops.njit_parallel(_blocked_square_sums)
    x = np.random.default_rng(0).standard_normal(100_003)
    want = _serial(x, 7)
    out = np.empty(7)
    kernel(x, out, 7)
    np.testing.assert_array_equal(out, want)

    # two Python threads in parallel loops at once (the workqueue layer aborts here)
    results, errors = [], []

    def run() -> None:
        try:
            mine = np.empty(7)
            for _ in range(20):
                kernel(x, mine, 7)
            results.append(mine)
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(results) == 2
    for mine in results:
        np.testing.assert_array_equal(mine, want)

    # a forked child runs parallel loops too (GNU OpenMP's layer kills it)
    if not hasattr(os, "fork"):
        return
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            child = np.empty(7)
            kernel(x, child, 7)
            os._exit(0 if np.array_equal(child, want) else 3)
        finally:
            os._exit(4)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_turned_off_by_environment():
    code = ("from needle.backend import parallel_loops, cpu_threads; cpu_threads.NUM_THREADS = 2;"
            "print(parallel_loops.parallel_threads())")
    env = dict(os.environ, NEEDLE_PARALLEL_LOOPS="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "0"
