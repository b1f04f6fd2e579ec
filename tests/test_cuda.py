"""The CuPy device: every op, a training step and the JIT give the CPU's results (GPU only)."""

from __future__ import annotations

import numpy as np
import pytest

import needle as ndl
import needle.nn as nn

from .op_table import all_cases

pytestmark = pytest.mark.skipif(not ndl.cuda().enabled(),
                                reason="needs CuPy and a GPU (ndl.cuda().enabled() is False)")

CASES = [c for c in all_cases() if c[0].op not in ("bernoulli_like", "store")]


@pytest.mark.parametrize(("case", "fn", "ref", "sample"), CASES,
                         ids=[f"{c[0].op}-{i}" for i, c in enumerate(CASES)])
def test_op_forward_and_gradient_match_the_cpu(case, fn, ref, sample):
    arrays = sample(np.random.default_rng(0))
    cpu = [ndl.Tensor(a, requires_grad=a.dtype.kind == "f") for a in arrays]
    gpu = [ndl.Tensor(a, device=ndl.cuda(), requires_grad=a.dtype.kind == "f") for a in arrays]
    out_cpu, out_gpu = fn(*cpu), fn(*gpu)
    assert out_gpu.device == ndl.cuda()
    np.testing.assert_allclose(out_gpu.numpy(), out_cpu.numpy(), rtol=1e-4, atol=1e-5)
    if case.differentiable:
        out_cpu.sum().backward()
        out_gpu.sum().backward()
        for c, g in zip(cpu, gpu):
            if c.grad is not None:
                np.testing.assert_allclose(g.grad.numpy(), c.grad.numpy(), rtol=1e-4,
                                           atol=1e-5)


def test_mixing_devices_is_a_clear_error():
    a = ndl.Tensor([1.0, 2.0])
    b = ndl.Tensor([1.0, 2.0], device=ndl.cuda())
    with pytest.raises(ValueError, match="different devices"):
        a + b


@pytest.mark.parametrize("jitted", [False, True])
def test_training_step_on_the_gpu_matches_the_cpu(jitted):
    results = []
    for device in (ndl.cpu(), ndl.cuda()):
        np.random.seed(0)
        model = nn.Sequential(nn.Linear(8, 16, device=device), nn.ReLU(),
                              nn.Linear(16, 3, device=device))
        opt = ndl.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        loss_fn = nn.SoftmaxLoss()

        def step(x, y, model=model, opt=opt, loss_fn=loss_fn):
            loss = loss_fn(model(x), y)
            opt.reset_grad()
            loss.backward()
            opt.step()
            return loss

        run = ndl.jit(step) if jitted else step
        rng = np.random.default_rng(1)
        for _ in range(5):
            x = ndl.Tensor(rng.standard_normal((4, 8)).astype(np.float32), device=device,
                           requires_grad=False)
            y = ndl.Tensor(rng.integers(0, 3, 4), device=device)
            run(x, y)
        results.append([p.numpy() for p in model.parameters()])
    for a, b in zip(*results):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_to_device_is_differentiable_both_ways():
    x = ndl.Tensor([1.0, 2.0])
    on_gpu = x.to(ndl.cuda())
    assert on_gpu.device == ndl.cuda()
    (on_gpu * 3.0).sum().backward()
    assert x.grad.device == ndl.cpu() and x.grad.numpy().tolist() == [3.0, 3.0]
    back = on_gpu.to(ndl.cpu())
    assert back.device == ndl.cpu() and back.numpy().tolist() == [1.0, 2.0]
