"""Recurrent ops: a whole LSTM layer over a sequence as one node, forward and backward.

``lstm_sequence`` replaces the ~15 nodes per time step of the textbook cell (a matrix
product, a split, three sigmoids, two tanhs, products and sums) and ``lstm_sequence_grad``
their ~30 adjoint nodes: the step-by-step loop runs inside ``kernels/rnn.py``. Their own
gradients (second order) are those of the step-by-step composite (``lstm_composite``),
derived by the same autodiff, as for ``normalize_grad``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..kernels import blas_policy, rnn
from .context import GradMode
from .registry import Aval, F, Op, ShapeError, fmt_shape, register


def _same(a: Any, b: Any) -> bool:
    """Two dims agree (an unknown dim, None, agrees with anything)."""
    return a is None or b is None or a == b


def _check_lstm_shapes(op: str, x_proj: Aval, w_hh: Aval, state: tuple) -> int:
    """The hidden size, or a ShapeError naming what does not fit."""
    if (len(w_hh.shape) != 2 or w_hh.shape[1] is None or w_hh.shape[1] % 4
            or not _same(w_hh.shape[0], w_hh.shape[1] // 4)):
        raise ShapeError(f"{op}: w_hh must be (hidden, 4 * hidden), got {fmt_shape(w_hh.shape)}")
    hidden = w_hh.shape[1] // 4
    if len(x_proj.shape) != 3 or not _same(x_proj.shape[2], 4 * hidden):
        raise ShapeError(f"{op}: x_proj must be (seq, batch, {4 * hidden}) for w_hh "
                         f"{fmt_shape(w_hh.shape)}, got {fmt_shape(x_proj.shape)}")
    if len(state) not in (0, 2):
        raise ShapeError(f"{op}: the state is (h0, c0) or nothing (zeros), got {len(state)} "
                         "arrays")
    for name, aval in zip(("h0", "c0"), state):
        if (len(aval.shape) != 2 or not _same(aval.shape[0], x_proj.shape[1])
                or not _same(aval.shape[1], hidden)):
            raise ShapeError(f"{op}: {name} must be (batch, hidden) = "
                             f"{fmt_shape((x_proj.shape[1], hidden))}, got "
                             f"{fmt_shape(aval.shape)}")
    return hidden


def lstm_composite(x_proj: Any, w_hh: Any, h0: Any = None, c0: Any = None
                   ) -> tuple[Any, Any, Any]:
    """``lstm_sequence`` step by step with elementary ops: ``(h_all, c_all, acts)``.

    A zero state (``h0``, ``c0`` None) drops out of the first step: no ``h0 W_hh``, and
    ``c = i * g``.
    """
    hidden = w_hh.shape[1] // 4
    h, c = h0, c0
    hs, cs, acts = [], [], []
    for x_t in F.split(x_proj, 0):
        pre = x_t if h is None else x_t + F.matmul(h, w_hh)
        gates = F.split(F.reshape(pre, (-1, 4, hidden)), 1)
        i, f, g, o = (F.sigmoid(gates[0]), F.sigmoid(gates[1]), F.tanh(gates[2]),
                      F.sigmoid(gates[3]))
        c = i * g if c is None else f * c + i * g
        h = o * F.tanh(c)
        hs.append(h)
        cs.append(c)
        acts.append(F.reshape(F.stack([i, f, g, o], 1), (-1, 4 * hidden)))
    return F.stack(hs, 0), F.stack(cs, 0), F.stack(acts, 0)


def _is_zeros(node: Any) -> bool:
    """Whether ``node`` is a ``full_like(..., 0)`` (the engine's adjoint of an unused item)."""
    op = node.op
    return op is not None and op.name == "full_like" and op.fill_value == 0


def _tuple_items(value: Any, count: int) -> list:
    """The items of a TensorTuple adjoint, without a tuple_get_item node where it is a
    ``make_tuple`` (as the autodiff engine builds it)."""
    if value.op is not None and value.op.name == "make_tuple":
        return list(value.inputs)
    return [value[i] for i in range(count)]


@register("lstm_sequence", inputs=("x_proj", "w_hh", "*state"))
class LSTMSequence(Op):
    """An LSTM layer over a sequence, gates in PyTorch's order (input, forget, cell, output)::

        for t: i, f, g, o = split(x_proj[t] + h W_hh)       # sigmoid, sigmoid, tanh, sigmoid
               c = f * c + i * g;  h = o * tanh(c)

    ``x_proj`` (seq, batch, 4 hidden) is the input's projection ``x W_ih + b_ih + b_hh`` for
    every step at once; ``w_hh`` (hidden, 4 hidden); ``state`` is ``h0, c0`` (batch, hidden),
    or nothing for zeros. Returns the tuple ``(h_all, c_all, acts)``: h and c after every
    step (seq, batch, hidden) and the activated gates (seq, batch, 4 hidden), which the
    backward reuses.
    """

    returns_tuple = True

    def compute(self, x_proj, w_hh, *state):
        return rnn.lstm_forward(x_proj, w_hh, *state)

    def gradient(self, out_grad, node):
        dh_all, dc_all, dacts = _tuple_items(out_grad, 3)
        x_proj, w_hh, *state = node.inputs
        with_dacts = not _is_zeros(dacts)
        grads = F.lstm_sequence_grad(dh_all, dc_all, x_proj, w_hh, node[0], node[1], node[2],
                                     *state, *((dacts,) if with_dacts else ()),
                                     with_state=bool(state), with_dacts=with_dacts)
        return tuple(grads[i] for i in range(2 + len(state)))

    def infer(self, x_proj: Aval, w_hh: Aval, *state: Aval) -> tuple:
        hidden = _check_lstm_shapes(self.name, x_proj, w_hh, state)
        dtype = np.result_type(x_proj.dtype, w_hh.dtype, *(a.dtype for a in state))
        seq, batch = x_proj.shape[0], x_proj.shape[1]
        h_or_c = Aval((seq, batch, hidden), dtype)
        return (h_or_c, h_or_c, Aval((seq, batch, 4 * hidden), dtype))


@register("lstm_sequence_grad",
          inputs=("dh_all", "dc_all", "x_proj", "w_hh", "h_all", "c_all", "acts", "*rest"))
class LSTMSequenceGrad(Op):
    """The adjoint of ``lstm_sequence``: ``(dx_proj, dw_hh)``, and ``dh0, dc0`` where it had
    a state, for the output adjoints ``dh_all``, ``dc_all`` and (``with_dacts``) ``dacts``,
    given the forward's inputs and its outputs ``h_all``, ``c_all``, ``acts``.

    ``rest`` is ``h0, c0`` (``with_state``) then ``dacts`` (``with_dacts``); absent ones are
    zeros. NOTE: ``h_all``, ``c_all`` and ``acts`` must be ``lstm_sequence``'s outputs for
    these inputs: the second-order gradient is the step-by-step composite's in ``x_proj``,
    ``w_hh`` and the state, which already accounts for them (none flows to them directly).
    """

    returns_tuple = True

    def __init__(self, with_state: bool = False, with_dacts: bool = False) -> None:
        self.with_state = bool(with_state)
        self.with_dacts = bool(with_dacts)

    def _split_rest(self, rest: Any) -> tuple[list, list]:
        """``rest`` as (state, [dacts] or [])."""
        n = 2 if self.with_state else 0
        if len(rest) != n + self.with_dacts:
            raise ShapeError(f"{self.name}: with_state={self.with_state}, "
                             f"with_dacts={self.with_dacts} take {n + self.with_dacts} "
                             f"trailing inputs, got {len(rest)}")
        return list(rest[:n]), list(rest[n:])

    def large_products(self, node: Any) -> bool:
        """Whether dw_hh's all-steps product (T*B, H) x (H, 4H) is one a held plan run
        splits (kernels/blas_policy; jit/compiled.py)."""
        h_all, w_hh = node.inputs[4], node.inputs[3]
        if len(h_all.shape) != 3 or len(w_hh.shape) != 2 or None in h_all.shape:
            return False
        return blas_policy.splits((h_all.shape[0] - 1) * h_all.shape[1], w_hh.shape[0],
                                  w_hh.shape[1])

    def compute(self, dh_all, dc_all, x_proj, w_hh, h_all, c_all, acts, *rest):
        state, dacts = self._split_rest(rest)
        grads = rnn.lstm_backward(dh_all, dc_all, dacts[0] if dacts else None, w_hh, h_all,
                                  c_all, acts, *state)
        return grads if state else grads[:2]

    def gradient(self, out_grad, node):
        from .autodiff import gradients

        dh_all, dc_all, x_proj, w_hh, _, _, _, *rest = node.inputs
        state, dacts = self._split_rest(rest)
        forward_inputs = [x_proj, w_hh, *state]
        seeds = [dh_all, dc_all, *dacts]
        # recorded even under backward(create_graph=False), as in NormalizeGrad.gradient
        with GradMode(True):
            outputs = list(lstm_composite(x_proj, w_hh, *state))[:len(seeds)]
            firsts = gradients(outputs, forward_inputs, seeds, stop_at_wrt=True)
        pairs = [(first, seed) for first, seed in
                 zip(firsts, _tuple_items(out_grad, len(forward_inputs))) if first is not None]
        wrt = [dh_all, dc_all, x_proj, w_hh, *state, *dacts]
        seconds = gradients([p[0] for p in pairs], wrt, [p[1] for p in pairs],
                            stop_at_wrt=True)
        return (*seconds[:4], None, None, None, *seconds[4:])

    def infer(self, dh_all: Aval, dc_all: Aval, x_proj: Aval, w_hh: Aval, h_all: Aval,
              c_all: Aval, acts: Aval, *rest: Aval) -> tuple:
        state, dacts = self._split_rest(rest)
        hidden = _check_lstm_shapes(self.name, x_proj, w_hh, tuple(state))
        seq, batch = x_proj.shape[0], x_proj.shape[1]
        for name, aval, width in (("dh_all", dh_all, hidden), ("dc_all", dc_all, hidden),
                                  ("h_all", h_all, hidden), ("c_all", c_all, hidden),
                                  ("acts", acts, 4 * hidden),
                                  *(("dacts", d, 4 * hidden) for d in dacts)):
            if len(aval.shape) != 3 or not all(
                    _same(a, b) for a, b in zip(aval.shape, (seq, batch, width))):
                raise ShapeError(f"{self.name}: {name} must be "
                                 f"{fmt_shape((seq, batch, width))}, got {fmt_shape(aval.shape)}")
        dtype = np.result_type(dh_all.dtype, x_proj.dtype, w_hh.dtype,
                               *(a.dtype for a in state))
        return (Aval(x_proj.shape, dtype), Aval(w_hh.shape, dtype),
                *(Aval(a.shape, dtype) for a in state))
