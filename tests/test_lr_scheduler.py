"""needle.optim.lr_scheduler: learning rates vs torch.optim.lr_scheduler, state dicts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import needle.nn as nn
from needle import optim
from needle.optim import lr_scheduler as sched

BASE_LR = 0.1
EPOCHS = 60


def _needle_opt(lr=BASE_LR):
    return optim.SGD([nn.Parameter(np.zeros(2, np.float32))], lr=lr)


def _torch_opt(lr=BASE_LR):
    return torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=lr)


def _needle_lrs(make, epochs=EPOCHS):
    opt = _needle_opt()
    s = make(opt)
    lrs = [s.get_last_lr()[0]]
    assert opt.lr == lrs[0]
    for _ in range(epochs):
        opt.step()
        s.step()
        lrs.append(s.get_last_lr()[0])
        assert opt.lr == lrs[-1]
    return lrs


def _torch_lrs(make, epochs=EPOCHS):
    opt = _torch_opt()
    s = make(opt)
    lrs = [s.get_last_lr()[0]]
    for _ in range(epochs):
        opt.step()
        s.step()
        lrs.append(s.get_last_lr()[0])
    return lrs


T = torch.optim.lr_scheduler

CASES = {
    "step": (lambda o: sched.StepLR(o, step_size=7, gamma=0.5),
             lambda o: T.StepLR(o, step_size=7, gamma=0.5)),
    "multistep": (lambda o: sched.MultiStepLR(o, milestones=[30, 10, 45], gamma=0.3),
                  lambda o: T.MultiStepLR(o, milestones=[10, 30, 45], gamma=0.3)),
    "exponential": (lambda o: sched.ExponentialLR(o, gamma=0.93),
                    lambda o: T.ExponentialLR(o, gamma=0.93)),
    "cosine": (lambda o: sched.CosineAnnealingLR(o, T_max=20),
               lambda o: T.CosineAnnealingLR(o, T_max=20)),
    "cosine_eta_min": (lambda o: sched.CosineAnnealingLR(o, T_max=25, eta_min=0.01),
                       lambda o: T.CosineAnnealingLR(o, T_max=25, eta_min=0.01)),
    "linear": (lambda o: sched.LinearLR(o, start_factor=0.25, end_factor=0.9, total_iters=12),
               lambda o: T.LinearLR(o, start_factor=0.25, end_factor=0.9, total_iters=12)),
    "linear_default": (lambda o: sched.LinearLR(o), lambda o: T.LinearLR(o)),
    "warmup": (lambda o: sched.LinearWarmup(o, warmup_steps=10, start_factor=0.1),
               lambda o: T.LinearLR(o, start_factor=0.1, end_factor=1.0, total_iters=10)),
    "warmup_then_cosine": (
        lambda o: sched.SequentialLR(o, [sched.LinearWarmup(o, 5, start_factor=0.2),
                                         sched.CosineAnnealingLR(o, T_max=30, eta_min=1e-3)],
                                     milestones=[5]),
        lambda o: T.SequentialLR(o, [T.LinearLR(o, start_factor=0.2, total_iters=5),
                                     T.CosineAnnealingLR(o, T_max=30, eta_min=1e-3)],
                                 milestones=[5])),
    "three_phases": (
        lambda o: sched.SequentialLR(o, [sched.ExponentialLR(o, gamma=0.9),
                                         sched.StepLR(o, step_size=4, gamma=0.5),
                                         sched.CosineAnnealingLR(o, T_max=10)],
                                     milestones=[8, 20]),
        lambda o: T.SequentialLR(o, [T.ExponentialLR(o, gamma=0.9),
                                     T.StepLR(o, step_size=4, gamma=0.5),
                                     T.CosineAnnealingLR(o, T_max=10)],
                                 milestones=[8, 20])),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_learning_rates_match_torch(case):
    ours, theirs = CASES[case]
    a, b = _needle_lrs(ours), _torch_lrs(theirs)
    assert len(a) == len(b) == EPOCHS + 1
    # torch updates most schedules recursively, so only float rounding may differ
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-15)


def test_warmup_from_zero():
    lrs = _needle_lrs(lambda o: sched.LinearWarmup(o, warmup_steps=4), epochs=6)
    np.testing.assert_allclose(lrs, [0.0, 0.025, 0.05, 0.075, 0.1, 0.1, 0.1], rtol=1e-12)


def test_bad_arguments_raise():
    opt = _needle_opt()
    with pytest.raises(ValueError, match="start_factor"):
        sched.LinearLR(opt, start_factor=0.0)
    with pytest.raises(ValueError, match="T_max"):
        sched.CosineAnnealingLR(opt, T_max=0)
    with pytest.raises(ValueError, match="milestones"):
        sched.SequentialLR(opt, [sched.StepLR(opt, 3)], milestones=[2])
    with pytest.raises(ValueError, match="another optimizer"):
        sched.SequentialLR(opt, [sched.StepLR(_needle_opt(), 3)], milestones=[])
    with pytest.raises(TypeError, match="needle Optimizer"):
        sched.StepLR(_torch_opt(), 3)


def _is_plain(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_is_plain(v) for v in value)
    return isinstance(value, int | float | bool | str)


@pytest.mark.parametrize("case", ["step", "cosine_eta_min", "warmup_then_cosine"])
def test_scheduler_state_dict_resume(case):
    make = CASES[case][0]
    straight = _needle_lrs(make, epochs=20)

    opt = _needle_opt()
    s = make(opt)
    for _ in range(9):
        opt.step()
        s.step()
    opt_state, s_state = opt.state_dict(), s.state_dict()
    assert _is_plain(s_state)

    opt2 = _needle_opt(lr=7.0)  # a different lr: the loads must restore the schedule
    s2 = make(opt2)
    opt2.load_state_dict(opt_state)
    s2.load_state_dict(s_state)
    resumed = [s2.get_last_lr()[0]]
    assert opt2.lr == resumed[0]
    for _ in range(11):
        opt2.step()
        s2.step()
        resumed.append(opt2.lr)
    assert resumed == straight[9:]


def test_scheduled_adam_matches_torch():
    """Adam driven by StepLR: the scheduler's lr reaches the update as torch's does."""
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((4, 3)).astype(np.float32)
    grads = [rng.standard_normal((4, 3)).astype(np.float32) for _ in range(15)]

    p = nn.Parameter(w0)
    opt = optim.Adam([p], lr=0.05)
    s = sched.StepLR(opt, step_size=4, gamma=0.5)
    tp = torch.tensor(w0, requires_grad=True)
    topt = torch.optim.Adam([tp], lr=0.05)
    ts = T.StepLR(topt, step_size=4, gamma=0.5)
    for g in grads:
        p.grad = nn.Parameter(g, requires_grad=False)
        tp.grad = torch.tensor(g)
        opt.step()
        topt.step()
        s.step()
        ts.step()
    np.testing.assert_allclose(p.numpy(), tp.detach().numpy(), rtol=1e-5, atol=1e-5)
