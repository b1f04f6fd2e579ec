"""Embedding and recurrent layers: RNNCell, RNN, LSTMCell, LSTM."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import init, ops
from ..autograd import Tensor
from .module import Module, Parameter

__all__ = ["LSTM", "RNN", "Embedding", "LSTMCell", "RNNCell"]


class Embedding(Module):
    """A lookup table: ``y[t, b] = weight[x[t, b]]``.

    Input (seq, batch) of integer ids (whole-valued floats work), output (seq, batch, dim).
    The weight (num_embeddings, embedding_dim) is drawn from N(0, 1). The gradient of the
    weight adds up the output adjoints of every position that used a row.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, device: Any = None,
                 dtype: str = "float32") -> None:
        super().__init__()
        self.num_embeddings = int(num_embeddings)
        self.embedding_dim = int(embedding_dim)
        self.weight = Parameter(init.randn(self.num_embeddings, self.embedding_dim,
                                           device=device, dtype=dtype))

    def forward(self, x: Any) -> Tensor:
        # one gather in every mode (eager, a Session's placeholder, a JIT trace): the ids stay
        # an input of the graph, and the take op checks they lie in [0, num_embeddings)
        ids = x if isinstance(x, Tensor) else Tensor(np.asarray(x), device=self.weight.device,
                                                     requires_grad=False)
        return ops.take(self.weight, ids, axis=0)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


def _uniform(shape: tuple, bound: float, device: Any, dtype: str) -> Parameter:
    return Parameter(init.rand(*shape, low=-bound, high=bound, device=device, dtype=dtype))


def _project_input(cell: RNNCell | LSTMCell, x: Tensor) -> Tensor:
    """``x W_ih + (b_ih + b_hh)``: the part of a step that does not depend on the state.
    One ``linear`` node for a matrix x (the bias added in place into the product's array)."""
    if cell.bias_ih is None:
        return x @ cell.W_ih
    bias = cell.bias_ih + cell.bias_hh
    if len(x.shape) == 2:
        return ops.linear(x, cell.W_ih, bias)
    return x @ cell.W_ih + bias


def _project_sequence(cell: RNNCell | LSTMCell, x: Tensor) -> list[Tensor]:
    """The input projections of all steps of x (seq, batch, in) as one matrix product
    (one weight-gradient product in backward instead of one per step), split by step."""
    seq, batch, width = x.shape
    out = _project_input(cell, ops.reshape(x, (-1, width)))
    out = ops.reshape(out, (seq, -1 if batch is None else batch, out.shape[-1]))
    return list(ops.split(out, 0))


def _zero_state(x: Tensor, hidden_size: int) -> Tensor:
    """Zeros (batch, hidden_size) on x's device and dtype, built from x with ops so that it
    also works while the batch size is unknown (a declared or traced graph)."""
    column = ops.zeros_like(ops.getitem(x, (slice(None), slice(0, 1))))
    return ops.broadcast_to(column, (x.shape[0], hidden_size))


def _lstm_state(x: Tensor, hidden_size: int, state: tuple | None) -> tuple:
    """``lstm_sequence``'s state inputs: ``()`` for a zero state (None or (None, None)),
    else ``(h, c)`` with a missing one made zeros like a row block of ``x``."""
    h, c = (None, None) if state is None else state
    if h is None and c is None:
        return ()
    h = _zero_state(x, hidden_size) if h is None else h
    c = _zero_state(x, hidden_size) if c is None else c
    return h, c


class RNNCell(Module):
    """One Elman RNN step: ``h' = act(x W_ih + b_ih + h W_hh + b_hh)``, act tanh or relu.

    x (batch, input_size), h (batch, hidden_size) or None (zeros) -> h' (batch, hidden_size).
    Every weight is uniform on (-k, k), k = 1/sqrt(hidden_size), drawn in the order
    W_ih, W_hh, bias_ih, bias_hh.
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 nonlinearity: str = "tanh", device: Any = None, dtype: str = "float32") -> None:
        super().__init__()
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"RNNCell: nonlinearity must be 'tanh' or 'relu', got "
                             f"{nonlinearity!r}")
        self.input_size = int(input_size)
        self.hidden_size = int(hidden_size)
        self.nonlinearity = nonlinearity
        k = 1.0 / math.sqrt(self.hidden_size)
        self.W_ih = _uniform((self.input_size, self.hidden_size), k, device, dtype)
        self.W_hh = _uniform((self.hidden_size, self.hidden_size), k, device, dtype)
        if bias:
            self.bias_ih: Parameter | None = _uniform((self.hidden_size,), k, device, dtype)
            self.bias_hh: Parameter | None = _uniform((self.hidden_size,), k, device, dtype)
        else:
            self.bias_ih = self.bias_hh = None

    def forward(self, x: Tensor, h: Tensor | None = None) -> Tensor:
        return self.step(_project_input(self, x), h)

    def step(self, x_proj: Tensor, h: Tensor | None = None) -> Tensor:
        """The step from a precomputed ``x_proj = x W_ih + b_ih + b_hh`` (batch, hidden)."""
        # a zero state still goes through W_hh so its gradient is zeros (not None), as in torch
        h = ops.zeros_like(x_proj) if h is None else h
        pre = x_proj + h @ self.W_hh
        return ops.tanh(pre) if self.nonlinearity == "tanh" else ops.relu(pre)

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, bias={self.bias_ih is not None}, "
                f"nonlinearity={self.nonlinearity!r}")


class LSTMCell(Module):
    """One LSTM step, gates in PyTorch's order (input, forget, cell, output)::

        i, f, g, o = split(x W_ih + b_ih + h W_hh + b_hh)      # each (batch, hidden)
        c' = sigmoid(f) * c + sigmoid(i) * tanh(g)
        h' = sigmoid(o) * tanh(c')

    ``forward(x, (h, c))`` returns ``(h', c')``; ``None`` (or a None item) means zeros.
    The step is one ``lstm_sequence`` node (a sequence of one step), not a dozen cell ops.
    W_ih (input, 4 hidden), W_hh (hidden, 4 hidden), biases (4 hidden,), all uniform on
    (-k, k), k = 1/sqrt(hidden_size), drawn in the order W_ih, W_hh, bias_ih, bias_hh.
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device: Any = None,
                 dtype: str = "float32") -> None:
        super().__init__()
        self.input_size = int(input_size)
        self.hidden_size = int(hidden_size)
        k = 1.0 / math.sqrt(self.hidden_size)
        four = 4 * self.hidden_size
        self.W_ih = _uniform((self.input_size, four), k, device, dtype)
        self.W_hh = _uniform((self.hidden_size, four), k, device, dtype)
        if bias:
            self.bias_ih: Parameter | None = _uniform((four,), k, device, dtype)
            self.bias_hh: Parameter | None = _uniform((four,), k, device, dtype)
        else:
            self.bias_ih = self.bias_hh = None

    def forward(self, x: Tensor, state: tuple | None = None) -> tuple[Tensor, Tensor]:
        return self.step(_project_input(self, x), state)

    def step(self, x_proj: Tensor, state: tuple | None = None) -> tuple[Tensor, Tensor]:
        """The step from a precomputed ``x_proj = x W_ih + b_ih + b_hh`` (batch, 4 hidden):
        one ``lstm_sequence`` node over a sequence of one step."""
        out = ops.lstm_sequence(ops.reshape(x_proj, (1, -1, 4 * self.hidden_size)), self.W_hh,
                                *_lstm_state(x_proj, self.hidden_size, state))
        return (ops.reshape(out[0], (-1, self.hidden_size)),
                ops.reshape(out[1], (-1, self.hidden_size)))

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, bias={self.bias_ih is not None}"


def _layer_states(h0: Tensor | None, num_layers: int, name: str) -> list:
    """The per-layer initial states of a (layers, batch, hidden) tensor (None: all None)."""
    if h0 is None:
        return [None] * num_layers
    if h0.shape[0] != num_layers:
        raise ValueError(f"{name}: initial state has {h0.shape[0]} layers, expected {num_layers} "
                         f"(shape (num_layers, batch, hidden), got {tuple(h0.shape)})")
    return list(ops.split(h0, 0))


def _check_input(x: Tensor, input_size: int, name: str) -> None:
    if len(x.shape) != 3 or x.shape[2] != input_size:
        raise ValueError(f"{name}: expected input (seq, batch, {input_size}), got shape "
                         f"{tuple(x.shape)}")


class RNN(Module):
    """A stack of ``num_layers`` RNNCells run over a sequence.

    ``forward(x, h0=None)``: x (seq, batch, input_size), h0 (num_layers, batch, hidden) or None
    (zeros); returns ``(output, h_n)``: the last layer's hidden states (seq, batch, hidden)
    and the last step's state of every layer (num_layers, batch, hidden).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 nonlinearity: str = "tanh", device: Any = None, dtype: str = "float32") -> None:
        super().__init__()
        self.input_size = int(input_size)
        self.hidden_size = int(hidden_size)
        self.num_layers = int(num_layers)
        self.rnn_cells = [
            RNNCell(self.input_size if layer == 0 else self.hidden_size, self.hidden_size,
                    bias=bias, nonlinearity=nonlinearity, device=device, dtype=dtype)
            for layer in range(self.num_layers)
        ]

    def forward(self, x: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_input(x, self.input_size, "RNN")
        states = _layer_states(h0, self.num_layers, "RNN")
        last = []
        for cell, h in zip(self.rnn_cells, states):
            outputs = []
            for x_proj in _project_sequence(cell, x):
                h = cell.step(x_proj, h)
                outputs.append(h)
            x = ops.stack(outputs, 0)
            last.append(h)
        return x, ops.stack(last, 0)


class LSTM(Module):
    """A stack of ``num_layers`` LSTMCells run over a sequence.

    ``forward(x, state=None)``: x (seq, batch, input_size), state ``(h0, c0)`` each
    (num_layers, batch, hidden), or None (zeros); returns ``(output, (h_n, c_n))`` with the
    last layer's hidden states (seq, batch, hidden) and the final h and c of every layer.
    A layer is one input projection for all steps and one ``lstm_sequence`` node for the
    recurrence (its loop runs in kernels/rnn.py), so the graph does not grow with seq.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 device: Any = None, dtype: str = "float32") -> None:
        super().__init__()
        self.input_size = int(input_size)
        self.hidden_size = int(hidden_size)
        self.num_layers = int(num_layers)
        self.lstm_cells = [
            LSTMCell(self.input_size if layer == 0 else self.hidden_size, self.hidden_size,
                     bias=bias, device=device, dtype=dtype)
            for layer in range(self.num_layers)
        ]

    def forward(self, x: Tensor, state: tuple | None = None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        _check_input(x, self.input_size, "LSTM")
        h0, c0 = (None, None) if state is None else state
        hs = _layer_states(h0, self.num_layers, "LSTM")
        cs = _layer_states(c0, self.num_layers, "LSTM")
        last_h, last_c = [], []
        for cell, h, c in zip(self.lstm_cells, hs, cs):
            # the input projections of all steps as one product, then the recurrence as one
            # lstm_sequence node (kernels/rnn.py): no per-step graph nodes
            x_proj = _project_input(cell, ops.reshape(x, (-1, x.shape[2])))
            x_proj = ops.reshape(x_proj, (x.shape[0], -1, 4 * self.hidden_size))
            layer_state = (() if h is None and c is None
                           else _lstm_state(x_proj[0], self.hidden_size, (h, c)))
            out = ops.lstm_sequence(x_proj, cell.W_hh, *layer_state)
            x = out[0]
            last_h.append(x[-1])
            last_c.append(out[1][-1])
        return x, (ops.stack(last_h, 0), ops.stack(last_c, 0))
