"""kernels/blas_policy.py: OpenBLAS held on one thread for a jitted plan's run, its large
float32 products split into row or column blocks on numba's TBB threads. The blocks give
NumPy's bits (uneven blocks, every transpose the ops use), the thread count comes back (also
after an error), a nested hold does nothing, a jitted plan splits its large products on any
thread with the main thread's bits, and small, float64 and x @ x.T products are left to
NumPy."""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import pytest

import needle as ndl
from needle.backend import cpu_threads, parallel_loops
from needle.kernels import blas_policy, blas_threads, openblas_gemm

pytest.importorskip("numba")


def _threads() -> int:
    return blas_threads.count()


@pytest.fixture(autouse=True)
def _two_threads(monkeypatch):
    monkeypatch.setattr(cpu_threads, "NUM_THREADS", 2)
    monkeypatch.setattr(blas_policy, "ENABLED", True)
    if not parallel_loops.parallel_threads():
        pytest.skip("numba's parallel loops do not run on TBB here (tbb wheel missing?)")
    if openblas_gemm.gemm(np.float32) is None or openblas_gemm.symbols(
            "openblas_set_num_threads") is None:
        pytest.skip("NumPy's BLAS is not an OpenBLAS that threadpoolctl finds")
    functions = blas_threads._count_functions()
    before = functions[0]()
    functions[1](2)  # (the policy holds only a BLAS that threads)
    yield
    functions[1](before)


# (a's shape, b's shape, transpose a, transpose b): the vocabulary head's x @ w (column
# blocks), S @ w^T and x^T @ S, an LSTM's input projection and its weight gradient, a
# Transformer's feed-forward; sizes giving blocks of uneven size
CASES = [((1001, 68), (68, 3001), False, False),
         ((1001, 3001), (67, 3001), False, True),
         ((1001, 68), (1001, 3001), True, False),
         ((1120, 128), (128, 512), False, False),
         ((1088, 128), (1088, 512), True, False),
         ((1000, 129), (515, 129), False, True)]


def _operands(case):
    a_shape, b_shape, trans_a, trans_b = case
    rng = np.random.default_rng(a_shape[0] + 7 * b_shape[1])
    a = rng.standard_normal(a_shape).astype(np.float32)
    b = rng.standard_normal(b_shape).astype(np.float32)
    return a, b, trans_a, trans_b


@pytest.mark.parametrize("case", CASES, ids=["head", "head-dx", "head-dw", "lstm-x", "lstm-dw",
                                             "ff-t"])
def test_blocks_give_numpys_bits(case):
    a, b, trans_a, trans_b = _operands(case)
    # NOTE: OpenBLAS on two threads may give other bits than on one (its split of M at a
    # row that is no multiple of its kernel's tile: S @ w^T here); the blocks start on
    # multiples of 64 lines and give the one-thread bits
    with blas_threads.hold():
        want = np.matmul(a.T if trans_a else a, b.T if trans_b else b)
    before = blas_policy.CALLS[0]
    with blas_policy.hold_one_thread():
        assert blas_policy.held() and _threads() == 1
        got = blas_policy.transposed_matmul(a, b, trans_a, trans_b)
    assert blas_policy.CALLS[0] == before + 1  # the blocked path ran ...
    assert blas_policy._LOOPS.module().gemm_blocks.signatures  # ... compiled by numba
    assert np.array_equal(got, want)
    assert not blas_policy.held() and _threads() == 2


def test_into_a_given_array():
    a, b, _, _ = _operands(CASES[0])
    out = np.full((a.shape[0], b.shape[1]), np.nan, np.float32)
    with blas_policy.hold_one_thread():
        assert blas_policy.matmul(a, b, out=out) is out
    with blas_threads.hold():
        assert np.array_equal(out, a @ b)


def test_thread_count_restored_after_an_error_and_nested_holds():
    with pytest.raises(RuntimeError), blas_policy.hold_one_thread():
        with blas_policy.hold_one_thread():  # nested: a no-op, the outer one restores
            assert _threads() == 1
        assert _threads() == 1 and blas_policy.held()
        raise RuntimeError("inside")
    assert _threads() == 2 and not blas_policy.held()


def test_a_hold_on_another_thread_and_none_when_off(monkeypatch):
    seen = []

    def other_thread():
        with blas_policy.hold_one_thread():
            seen.append((blas_policy.held(), _threads()))

    worker = threading.Thread(target=other_thread)
    worker.start()
    worker.join()
    assert seen == [(True, 1)] and _threads() == 2 and not blas_policy.held()
    monkeypatch.setattr(blas_policy, "ENABLED", False)
    with blas_policy.hold_one_thread():
        assert not blas_policy.held() and _threads() == 2


def test_left_to_numpy_small_float64_and_self_products():
    before = blas_policy.CALLS[0]
    rng = np.random.default_rng(3)
    small = rng.standard_normal((64, 64)).astype(np.float32)
    wide = rng.standard_normal((512, 2048))  # float64: dgemm blocks do not keep its bits
    x = rng.standard_normal((2048, 2048)).astype(np.float32)
    with blas_policy.hold_one_thread():
        results = [blas_policy.matmul(small, small), blas_policy.matmul(wide, wide.T),
                   blas_policy.matmul(x, x.T)]  # NumPy's syrk
    assert blas_policy.CALLS[0] == before
    with blas_threads.hold():
        wants = [small @ small, wide @ wide.T, x @ x.T]
    for got, want in zip(results, wants):
        assert np.array_equal(got, want)


def _plan_case():
    """(jitted step, eager step, its inputs): a linear layer and a product by w^T, large
    enough to split."""
    rng = np.random.default_rng(4)
    x = ndl.Tensor(rng.standard_normal((1120, 128)).astype(np.float32), requires_grad=False)
    w = ndl.Tensor(rng.standard_normal((128, 512)).astype(np.float32), requires_grad=True)
    b = ndl.Tensor(rng.standard_normal((1, 512)).astype(np.float32), requires_grad=True)

    def step(x, w, b):
        y = ndl.ops.linear(x, w, b)
        y = ndl.ops.matmul(ndl.ops.relu(y), ndl.ops.transpose(w))
        return (y * y).sum()

    return ndl.jit(step), step, (x, w, b)


def _grads(fn, x, w, b):
    for t in (w, b):
        t.grad = None
    loss = fn(x, w, b)
    loss.backward()
    return loss.numpy(), w.grad.numpy(), b.grad.numpy()


def test_a_jitted_plan_holds_blas_and_splits_its_large_products():
    jitted, step, inputs = _plan_case()
    with blas_threads.hold():  # (the bits of OpenBLAS's one-thread products)
        want = _grads(step, *inputs)
    for _ in range(2):
        before = blas_policy.CALLS[0]
        got = _grads(jitted, *inputs)
        assert blas_policy.CALLS[0] > before  # the plans' large products ran as blocks
        assert _threads() == 2
        for have, expected in zip(got, want):
            assert np.array_equal(have, expected)


def test_a_jitted_plan_on_another_thread_gives_the_main_threads_bits():
    """A Session or plan run on a server thread holds BLAS too (before, only the main thread
    could: its products kept OpenBLAS's two-thread bits and never split)."""
    jitted, step, inputs = _plan_case()
    with blas_threads.hold():
        want = _grads(step, *inputs)
    _grads(jitted, *inputs)  # compiled on this thread
    results = []

    def run():
        before = blas_policy.CALLS[0]
        results.append((_grads(jitted, *inputs), blas_policy.CALLS[0] - before))

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    (got, splits), = results
    assert splits > 0 and _threads() == 2
    for have, expected in zip(got, want):
        assert np.array_equal(have, expected)


def _spy_on_products(monkeypatch) -> list:
    """The (held, BLAS threads) of every product that reaches blas_policy._product."""
    seen: list = []
    product = blas_policy._product

    def spy(*args):
        seen.append((blas_policy.held(), _threads()))
        return product(*args)

    monkeypatch.setattr(blas_policy, "_product", spy)
    return seen


def test_an_eager_product_holds_blas_for_itself(monkeypatch):
    monkeypatch.setattr(blas_policy, "EAGER", True)  # (the default)
    monkeypatch.setattr(blas_policy, "EAGER_MIN_MACS", 1 << 16)  # (the small one too)
    a, b, _, _ = _operands(CASES[3])
    seen = _spy_on_products(monkeypatch)
    before = blas_policy.CALLS[0]
    got = blas_policy.matmul(a, b)  # large: blocks
    small = blas_policy.matmul(a[:64, :64], b[:64, :64])  # 262k multiply-adds: one thread
    assert blas_policy.CALLS[0] == before + 1
    assert seen == [(True, 1), (True, 1)] and _threads() == 2 and not blas_policy.held()
    with blas_threads.hold():
        assert np.array_equal(got, a @ b)
        assert np.array_equal(small, a[:64, :64] @ b[:64, :64])
    monkeypatch.setattr(blas_policy, "EAGER", False)
    seen.clear()
    before = blas_policy.CALLS[0]
    assert np.array_equal(blas_policy.matmul(a, b), np.matmul(a, b))
    assert seen == [] and blas_policy.CALLS[0] == before  # NumPy's own product: no hold


def test_by_default_only_large_eager_products_hold_blas(monkeypatch):
    """Eager products of ``EAGER_MIN_MACS`` or more (those that split) hold BLAS and run as
    blocks, with the bits a jitted plan's held run gives them; smaller ones keep OpenBLAS's
    threads (held, the MLP-ResNet's eager epoch took 1.11x)."""
    assert blas_policy.EAGER and blas_policy.EAGER_MIN_MACS == blas_policy.MIN_MACS
    a, b, _, _ = _operands(CASES[3])  # 1120 x 128 x 512: 73M multiply-adds
    seen = _spy_on_products(monkeypatch)
    before = blas_policy.CALLS[0]
    got = blas_policy.matmul(a, b)
    small = blas_policy.matmul(a[:100, :128], b[:, :100])  # 1.3M multiply-adds
    assert blas_policy.CALLS[0] == before + 1 and seen == [(True, 1)] and _threads() == 2
    with blas_threads.hold():
        assert np.array_equal(got, a @ b)
    assert np.array_equal(small, np.matmul(a[:100, :128], b[:, :100]))


def test_a_kernel_hold_inside_a_plan_hold_leaves_it_held():
    with blas_policy.hold_one_thread():
        with blas_threads.hold():  # (a convolution's, inside a jitted plan's run)
            assert _threads() == 1
        assert _threads() == 1 and blas_policy.held()
    assert _threads() == 2


def test_large_float64_products_keep_openblas_threads_while_held(monkeypatch):
    seen = []
    original = np.matmul

    def spy(*args, **kwargs):
        seen.append(_threads())
        return original(*args, **kwargs)

    wide = np.random.default_rng(6).standard_normal((1024, 1024))
    with blas_policy.hold_one_thread():
        monkeypatch.setattr(blas_policy.np, "matmul", spy)
        got = blas_policy.matmul(wide, wide[:, ::-1].copy())  # float64: no blocks
        blas_policy.matmul(wide[:64, :64], wide[:64, :64])  # small: the held thread
        assert _threads() == 1
    monkeypatch.undo()
    assert seen == [2, 1]
    assert np.array_equal(got, wide @ wide[:, ::-1].copy())


def test_no_threads_lent_while_another_thread_holds(monkeypatch):
    """A large float64 product gets OpenBLAS's threads back only where no other thread holds
    BLAS: lent, the other thread's products would run threaded under its hold."""
    seen = []
    original = np.matmul

    def spy(*args, **kwargs):
        seen.append(_threads())
        return original(*args, **kwargs)

    holding, done = threading.Event(), threading.Event()

    def other_thread():
        with blas_threads.hold():
            holding.set()
            done.wait(30)

    worker = threading.Thread(target=other_thread)
    worker.start()
    try:
        assert holding.wait(30)
        wide = np.random.default_rng(7).standard_normal((1024, 1024))
        with blas_policy.hold_one_thread():
            monkeypatch.setattr(blas_policy.np, "matmul", spy)
            blas_policy.matmul(wide, wide[:, ::-1].copy())
            monkeypatch.undo()
        assert seen == [1] and _threads() == 1  # the other thread still holds
    finally:
        done.set()
        worker.join()
    assert _threads() == 2


def test_only_plans_with_large_products_hold_blas(monkeypatch):
    """A plan whose products are all small keeps OpenBLAS's own threads (held, its products
    ran on one core: the jitted MLP-ResNet epoch 1.06-1.14x); one with a product that
    splits holds it."""
    entered = []
    real = blas_policy.hold_one_thread

    @contextlib.contextmanager
    def spy():
        entered.append(True)
        with real():
            yield

    monkeypatch.setattr(blas_policy, "hold_one_thread", spy)
    rng = np.random.default_rng(0)

    def operands(m, k, n):
        return (ndl.Tensor(rng.standard_normal((m, k)).astype(np.float32)),
                ndl.Tensor(rng.standard_normal((k, n)).astype(np.float32)))

    product = ndl.jit(lambda a, b: (a @ b).sum())
    product(*operands(64, 64, 64))
    assert entered == []
    a, b = operands(512, 256, 512)  # 2^26 multiply-adds
    got = product(a, b)
    assert entered == [True]
    np.testing.assert_allclose(got.numpy(), (a.numpy() @ b.numpy()).sum(), rtol=1e-4)
