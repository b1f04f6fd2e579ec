"""Node kinds the front-ends make themselves are registered (internal) and each is exercised
here, in the mode that makes it, against values computed independently."""

from __future__ import annotations

import numpy as np

import needle as ndl
import needle.nn as nn
import needle.static as st
from needle.core.registry import REGISTRY
from needle.function import Function

from .helpers import sum_loss_step


def _assign():
    with st.Graph():
        v = st.Variable(np.float32(1.0))
        sess = st.Session()
        sess.run(st.assign_add(v, np.float32(2.0)))
        assert sess.run(v) == 3.0


def _print(capsys):
    with st.Graph():
        x = st.placeholder((2,))
        out = st.Session().run(st.print_(x * 2.0, "doubled"), {x: np.ones(2, np.float32)})
    np.testing.assert_array_equal(out, [2.0, 2.0])
    assert "doubled" in capsys.readouterr().out


def _group_and_with_dependencies():
    with st.Graph():
        a, b = st.Variable(np.float32(0.0)), st.Variable(np.float32(0.0))
        sess = st.Session()
        sess.run(st.group(st.assign(a, np.float32(1.0)), st.assign(b, np.float32(2.0))))
        after = st.with_dependencies([st.assign_add(a, np.float32(5.0))], b * 1.0)
        assert sess.run(after) == 2.0 and sess.run(a) == 6.0


def _cond_and_while_loop():
    with st.Graph():
        x = st.placeholder(())
        picked = st.cond(x > 0, lambda: x * 10.0, lambda: x - 10.0)
        (total,) = st.while_loop(lambda s: s < 100.0, lambda s: (s * 2.0,), (x,))
        sess = st.Session()
        assert sess.run(picked, {x: np.float32(2.0)}) == 20.0
        assert sess.run(picked, {x: np.float32(-2.0)}) == -12.0
        assert sess.run(total, {x: np.float32(3.0)}) == 192.0


def _jit_call_and_apply_updates():
    np.random.seed(0)
    model = nn.Linear(3, 1)
    w0 = model.weight.numpy().copy()
    opt = ndl.optim.SGD(model.parameters(), lr=0.5)

    step = ndl.jit(sum_loss_step(model, opt))

    x = np.ones((2, 3), np.float32)
    step(x)
    ops = {s.op.name for s in step.lower(x).steps}
    assert "apply_updates" in ops
    # d(sum(x @ w + b))/dw = x.sum(0) per output: w1 = w0 - 0.5 * 2
    np.testing.assert_allclose(model.weight.numpy(), w0 - 1.0, rtol=1e-6)


class _Cube(Function):
    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return a ** 3

    @staticmethod
    def backward(ctx, out_grad):
        (a,) = ctx.saved_tensors
        return out_grad * 3 * a ** 2


def _function_and_backward():
    x = ndl.Tensor(np.array([1.0, 2.0], np.float32))
    y = _Cube.apply(x)
    assert REGISTRY["function"].cls is type(y.op)  # named "function:_Cube" per class
    y.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [3.0, 12.0], rtol=1e-6)


def _arm_gradient_hook():
    """DistributedDataParallel's node in a jitted forward whose backward runs eagerly: every
    replay of the plan arms the reducer once (a world of one makes none: a stand-in counts)."""
    from needle.autograd import make_from_op
    from needle.distributed.reducer import ArmGradientHook

    class Reducer:
        calls = 0

        def arm(self):
            self.calls += 1

    reducer = Reducer()

    def forward(x):
        y = x * 2.0
        make_from_op(ArmGradientHook(reducer), (y,))  # an effect: kept though nothing reads it
        return y

    fn = ndl.jit(forward)
    x = np.ones(2, np.float32)
    for _ in range(3):
        np.testing.assert_array_equal(fn(x).numpy(), [2.0, 2.0])
    assert reducer.calls == 3
    assert "arm_gradient_hook" in {s.op.name for s in fn.lower(x).steps}


CASES = {"assign": _assign, "print": _print, "group": _group_and_with_dependencies,
         "with_dependencies": _group_and_with_dependencies, "cond": _cond_and_while_loop,
         "while_loop": _cond_and_while_loop, "jit_call": _jit_call_and_apply_updates,
         "apply_updates": _jit_call_and_apply_updates, "function": _function_and_backward,
         "function_backward": _function_and_backward,
         "arm_gradient_hook": _arm_gradient_hook}


def test_every_internal_node_kind_is_registered_and_has_a_case():
    internal = {name for name, record in REGISTRY.items() if record.internal}
    assert internal == set(CASES)


def test_internal_node_kinds_compute_what_they_should(capsys):
    for case in dict.fromkeys(CASES.values()):  # each function once
        if case is _print:
            case(capsys)
        else:
            case()


def test_internal_ops_have_no_public_function():
    assert not hasattr(ndl.ops, "jit_call") and not hasattr(ndl.ops, "apply_updates")
