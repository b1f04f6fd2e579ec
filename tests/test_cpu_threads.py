"""needle's CPU threads (backend/cpu_threads.py) and the im2col convolutions split by images.

A split convolution computes each image's rows with the same products as the whole one, so
its results match the unsplit op's; BLAS runs on one thread inside the split and gets its
own thread count back after it.
"""

from __future__ import annotations

import numpy as np
import pytest

from needle.backend import cpu_threads
from needle.core.ops_conv import Conv, ConvInputGrad, ConvWeightGrad
from needle.kernels import blas_threads, cpu_kernels
from needle.kernels import conv as conv_kernels

needs_blas_control = pytest.mark.skipif(cpu_threads.blas_control() is None,
                                        reason="threadpoolctl is not installed")

# (N, H, W, C_in, C_out, kernel, stride, padding, channels-first input): strided, 1x1, 5x5,
# odd batch sizes and the NCHW-stored input the first layer of a CNN gets
CASES = [(7, 12, 12, 5, 6, 3, 2, 1, False), (6, 9, 11, 4, 3, 1, 1, 0, False),
         (5, 13, 13, 3, 4, 5, 2, 2, False), (9, 20, 20, 3, 8, 3, 1, 1, True)]


def _problem(case, seed=0):
    n, h, w, c_in, c_out, k, stride, padding, channels_first = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, h, w, c_in)).astype(np.float32)
    if channels_first:  # NCHW memory seen through an NHWC permute, as nn.Conv passes it
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)
    kernel = rng.standard_normal((k, k, c_in, c_out)).astype(np.float32)
    ho, wo = (conv_kernels._out_size(d, k, stride, padding) for d in (h, w))
    g = rng.standard_normal((n, ho, wo, c_out)).astype(np.float32)
    return x, kernel, g, stride, padding


def _all_three(x, kernel, g, stride, padding):
    k = kernel.shape[0]
    return (Conv(stride, padding).compute(x, kernel),
            ConvInputGrad(stride, padding, x.shape[1:3]).compute(g, kernel),
            ConvWeightGrad((k, k), stride, padding).compute(x, g))


@needs_blas_control
@pytest.mark.parametrize("case", CASES)
def test_split_convolutions_match_the_whole_ones(case, monkeypatch):
    x, kernel, g, stride, padding = _problem(case)
    monkeypatch.setattr(cpu_threads, "NUM_THREADS", 1)
    whole = _all_three(x, kernel, g, stride, padding)
    split_calls = []
    original = cpu_threads.in_parallel
    monkeypatch.setattr(cpu_threads, "in_parallel",
                        lambda *a: split_calls.append(a[2]) or original(*a))
    monkeypatch.setattr(cpu_threads, "NUM_THREADS", 3)
    monkeypatch.setattr(conv_kernels, "SPLIT_MIN_MACS", 0)
    split = _all_three(x, kernel, g, stride, padding)
    # each op was split (conv_input_grad only on its compiled col2im path)
    assert len(split_calls) == (3 if cpu_kernels.enabled(np.float32) else 2)
    np.testing.assert_array_equal(split[0], whole[0])  # rows of the same product
    np.testing.assert_array_equal(split[1], whole[1])
    # the kernel gradient sums per-chunk products: equal to rounding
    np.testing.assert_allclose(split[2], whole[2], rtol=1e-5, atol=1e-4)


@needs_blas_control
def test_blas_gets_its_thread_count_back_after_a_split(monkeypatch):
    before = [lib["num_threads"] for lib in cpu_threads.blas_control().info()]
    seen = []
    original = cpu_threads.in_parallel

    def spy(*args):
        seen.append([lib["num_threads"] for lib in cpu_threads.blas_control().info()])
        return original(*args)

    monkeypatch.setattr(cpu_threads, "in_parallel", spy)
    monkeypatch.setattr(cpu_threads, "NUM_THREADS", 2)
    monkeypatch.setattr(conv_kernels, "SPLIT_MIN_MACS", 0)
    x, kernel, _, stride, padding = _problem(CASES[0])
    Conv(stride, padding).compute(x, kernel)
    assert before and seen and seen[0] == [1] * len(before)  # one BLAS thread inside
    assert [lib["num_threads"] for lib in cpu_threads.blas_control().info()] == before


@needs_blas_control
def test_any_thread_splits(monkeypatch):
    """BLAS's hold is process-wide (kernels/blas_threads.py): a conv called from another
    thread (a served Session's) splits as one on the main thread does."""
    import threading

    monkeypatch.setattr(cpu_threads, "NUM_THREADS", 2)
    found = []
    worker = threading.Thread(target=lambda: found.append(conv_kernels._image_chunks(
        8, 10**9, np.zeros(1))))
    worker.start()
    worker.join(10)
    assert found == [conv_kernels._image_chunks(8, 10**9, np.zeros(1))] and found[0]


def test_without_blas_control_nothing_is_split(monkeypatch):
    monkeypatch.setattr(blas_threads, "available", lambda: False)
    monkeypatch.setattr(cpu_threads, "NUM_THREADS", 4)
    monkeypatch.setattr(conv_kernels, "SPLIT_MIN_MACS", 0)
    assert conv_kernels._image_chunks(8, 10**9, np.zeros(1)) is None


def test_chunks_cover_every_image_once(monkeypatch):
    monkeypatch.setattr(blas_threads, "available", lambda: True)
    monkeypatch.setattr(cpu_threads, "NUM_THREADS", 3)
    chunks = conv_kernels._image_chunks(7, 10**9, np.zeros(1))
    assert chunks[0][0] == 0 and chunks[-1][1] == 7 and len(chunks) == 6
    assert all(e > s for s, e in chunks)
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    assert conv_kernels._image_chunks(7, 10, np.zeros(1)) is None  # too small to pay
    assert conv_kernels._image_chunks(1, 10**9, np.zeros(1)) is None  # one image


def test_an_error_in_a_worker_reaches_the_caller():
    def work(shared):
        for item in shared:
            if item == 3:
                raise ValueError("bad item 3")
        return "done"

    with pytest.raises(ValueError, match="bad item 3"):
        cpu_threads.in_parallel(work, range(6), 2)
