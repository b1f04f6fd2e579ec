"""Attention run whole per (batch, head) slab on numba's prange threads
(kernels/attention.py ``_attention_by_slabs``, numba_parallel_attention.attention_slabs and
attention_grad_slabs): the same bits as the NumPy-ordered path (batched products, then the
softmax loops) on packed and separate projections, with and without a causal mask, BLAS held
or not; the cases NumPy's matmul multiplies otherwise (syrk, one-row dims) and the masks the
kernel does not take fall back; values against PyTorch; and the jitted op equals eager."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import needle as ndl
from needle import nn, ops
from needle.backend import parallel_loops
from needle.kernels import attention, blas_policy, blas_threads

pytest.importorskip("numba")


def _slabs_available() -> bool:
    return bool(parallel_loops.parallel_threads()) and attention.LOOPS.module() is not None \
        and blas_threads.available() and attention.PARALLEL_LOOPS.module() is not None


needs_slabs = pytest.mark.skipif(not _slabs_available(),
                                 reason="prange, numba or NumPy's OpenBLAS not available")


def _inputs(b, t, s, heads, dk, dv, packed, seed=0):
    rng = np.random.default_rng(seed)
    if packed:  # q, k, v as strided views of one (B, T, 3, D) projection (self-attention)
        qkv = rng.standard_normal((b, t, 3, heads * dk)).astype(np.float32)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
        q = rng.standard_normal((b, t, heads * dk)).astype(np.float32)
        k = rng.standard_normal((b, s, heads * dk)).astype(np.float32)
        v = rng.standard_normal((b, s, heads * dv)).astype(np.float32)
    g = rng.standard_normal((b, t, v.shape[2])).astype(np.float32)
    return q, k, v, g


def _both_paths(monkeypatch, q, k, v, g, mask, heads, scale):
    """(slab results, NumPy-ordered results, slab runs): forward output and the adjoints."""
    def run():
        out = attention.attention(q, k, v, mask, heads, scale)
        return [out, *attention.attention_grad(g, q, k, v, mask, heads, scale)]

    before = attention.SLAB_RUNS[0]
    slabs = run()
    ran = attention.SLAB_RUNS[0] - before
    with monkeypatch.context() as m:
        m.setattr(attention, "SLABS", False)
        plain = run()
    return slabs, plain, ran


CASES = [  # b, t, s, heads, dk, dv, packed (each with 2^16+ logits: the slabs' threshold)
    (16, 64, 64, 4, 32, 32, True),    # the LM benchmark's layer
    (11, 45, 45, 3, 16, 16, True),
    (15, 40, 57, 2, 12, 20, False),    # t != s, dk != dv: every product's flags differ
    (8, 70, 33, 4, 8, 5, False),       # an odd head width
]


@needs_slabs
@pytest.mark.parametrize("held", [True, False], ids=["held", "free"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "nomask"])
@pytest.mark.parametrize("case", CASES)
def test_slabs_give_the_bits_of_the_batched_products(monkeypatch, case, causal, held):
    b, t, s, heads, dk, dv, packed = case
    q, k, v, g = _inputs(b, t, s, heads, dk, dv, packed)
    mask = np.triu(np.full((t, s), -1e9, np.float32), 1) if causal else None
    scale = 1.0 / math.sqrt(dk)
    if held:  # inside a jitted plan's hold (BLAS on one thread)
        with blas_policy.hold_one_thread():
            slabs, plain, ran = _both_paths(monkeypatch, q, k, v, g, mask, heads, scale)
    else:
        slabs, plain, ran = _both_paths(monkeypatch, q, k, v, g, mask, heads, scale)
    assert ran == 2  # forward and backward both ran by slabs
    assert len(slabs) == len(plain) == 5
    for got, want in zip(slabs, plain):
        if want is None:
            assert got is None and not causal
        else:
            assert got.shape == want.shape and got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)


@needs_slabs
def test_slabs_match_torch():
    b, t, heads, d = 8, 48, 4, 16
    q, k, v, g = _inputs(b, t, t, heads, d, d, packed=True, seed=3)
    mask = np.triu(np.full((t, t), -1e9, np.float32), 1)
    before = attention.SLAB_RUNS[0]
    out = attention.attention(q, k, v, mask, heads, 0.25)
    dq, dk, dv, dmask = attention.attention_grad(g, q, k, v, mask, heads, 0.25)
    assert attention.SLAB_RUNS[0] - before == 2
    tq, tk, tv = (torch.tensor(np.ascontiguousarray(a), dtype=torch.float64,
                               requires_grad=True) for a in (q, k, v))
    tmask = torch.tensor(mask, dtype=torch.float64, requires_grad=True)

    def split(x):
        return x.reshape(b, t, heads, d).transpose(1, 2)

    logits = 0.25 * split(tq) @ split(tk).transpose(-1, -2) + tmask
    ref = (torch.softmax(logits, -1) @ split(tv)).transpose(1, 2).reshape(b, t, heads * d)
    (ref * torch.tensor(g, dtype=torch.float64)).sum().backward()
    np.testing.assert_allclose(out, ref.detach().numpy(), rtol=1e-4, atol=1e-5)
    for mine, theirs in zip((dq, dk, dv), (tq, tk, tv)):
        np.testing.assert_allclose(mine, theirs.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dmask.sum(axis=(0, 1)), tmask.grad.numpy(), rtol=1e-4,
                               atol=1e-5)


@needs_slabs
@pytest.mark.parametrize("case", ["q_is_k", "padding_mask", "float64", "numpy_scale",
                                  "one_row"])
def test_what_the_slabs_do_not_take_runs_the_batched_path(monkeypatch, case):
    b, t, heads, d = 8, 48, 4, 16
    q, k, v, g = _inputs(b, t, t, heads, d, d, packed=False, seed=1)
    mask = np.triu(np.full((t, t), -1e9, np.float32), 1)
    scale = 0.25
    if case == "q_is_k":  # NumPy multiplies a_h @ a_h^T by syrk: other bits than gemm
        k = q
    elif case == "padding_mask":  # one mask row set per batch: not a (T, S) for all slabs
        mask = np.where(np.random.default_rng(0).random((b, 1, 1, t)) < 0.3, -1e9,
                        0.0).astype(np.float32)
    elif case == "float64":
        q, k, v, g = (a.astype(np.float64) for a in (q, k, v, g))
    elif case == "numpy_scale":  # NumPy's ``dq *= np.float64(...)`` multiplies in float64
        scale = np.float64(0.25)
    else:  # 1-row products are NumPy's gemv / dot calls
        q, g = q[:, :1], g[:, :1]
        mask = mask[:1]
    slabs, plain, ran = _both_paths(monkeypatch, q, k, v, g, mask, heads, scale)
    assert ran == 0
    for got, want in zip(slabs, plain):
        np.testing.assert_array_equal(got, want)


@needs_slabs
def test_jitted_training_steps_equal_eager_ones_by_slabs():
    b, t, heads, d = 4, 64, 4, 16
    start = np.random.default_rng(5).standard_normal((b, t, 3 * heads * d)).astype(np.float32)
    mask = ndl.Tensor(np.triu(np.full((t, t), -1e9, np.float32), 1), requires_grad=False)

    def make():
        w = nn.Parameter(ndl.Tensor(start.copy()))
        opt = ndl.optim.SGD([w], lr=0.1)

        def step():
            q, k, v = ops.split(ops.reshape(w, (b, t, 3, heads * d)), 2)
            out = ops.attention(q, k, v, mask, heads=heads, scale=0.25)
            return opt.minimize((out * out).sum())

        return w, step

    before = attention.SLAB_RUNS[0]
    eager_w, eager_step = make()
    for _ in range(3):
        eager_step()
    assert attention.SLAB_RUNS[0] - before == 6
    jit_w, step = make()
    jitted = ndl.jit(step)
    for _ in range(3):
        jitted()
    assert attention.SLAB_RUNS[0] - before >= 10  # (tracing may run the ops eagerly once)
    np.testing.assert_array_equal(jit_w.numpy(), eager_w.numpy())


@needs_slabs
def test_packed_projections_get_gradients_in_one_buffer_that_stack_hands_on():
    from needle.core.ops_shape import Stack

    b, t, heads, d = 8, 48, 4, 16
    q, k, v, g = _inputs(b, t, t, heads, d, d, packed=True, seed=4)
    dq, dk, dv, _ = attention.attention_grad(g, q, k, v, None, heads, 0.25)
    stacked = Stack(2).compute((dq, dk, dv))
    assert stacked is dq.base and stacked.shape == (b, t, 3, heads * d)
    np.testing.assert_array_equal(stacked, np.stack([dq, dk, dv], axis=2))
    # separate projections: separate C-contiguous arrays, as before
    q2, k2, v2 = (np.ascontiguousarray(a) for a in (q, k, v))
    grads = attention.attention_grad(g, q2, k2, v2, None, heads, 0.25)
    assert all(a.flags.c_contiguous for a in grads[:3])
    assert not np.shares_memory(grads[0], grads[1])
    for mine, want in zip(grads, (dq, dk, dv)):
        np.testing.assert_array_equal(mine, want)


def test_stack_copies_unless_given_a_buffers_slices_in_order():
    from needle.core.ops_shape import Stack

    buf = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5).copy()
    parts = [buf[:, :, i] for i in range(4)]
    assert Stack(2).compute(parts) is buf
    assert Stack(-2).compute(parts) is buf
    for arrays, axis in [(parts[::-1], 2), (parts[:3], 2), (parts, 1), (parts, 0),
                         ([p.copy() for p in parts], 2),
                         ([buf[:, :, i, 1:] for i in range(4)], 2)]:
        got = Stack(axis).compute(arrays)
        assert got is not buf and not np.shares_memory(got, buf)
        np.testing.assert_array_equal(got, np.stack(arrays, axis=axis))
    view = buf[:1]  # slices of a view (not the owner): copied
    got = Stack(2).compute([view[:, :, i] for i in range(4)])
    assert not np.shares_memory(got, buf)
