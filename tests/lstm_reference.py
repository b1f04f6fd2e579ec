"""The LSTM recurrence in PyTorch, step by step, and the op table's call forms of
``lstm_sequence`` / ``lstm_sequence_grad`` (each row's outputs flattened into one tensor)."""

from __future__ import annotations

import torch

from needle import ops


def torch_lstm(x_proj, w_hh, h0=None, c0=None):
    """(h_all, c_all, acts) of an LSTM over the projected input ``x_proj`` (seq, batch,
    4 hidden) in torch's gate order (i, f, g, o); no state means zeros."""
    hidden = w_hh.shape[1] // 4
    batch = x_proj.shape[1]
    h = torch.zeros(batch, hidden, dtype=x_proj.dtype) if h0 is None else h0
    c = torch.zeros(batch, hidden, dtype=x_proj.dtype) if c0 is None else c0
    hs, cs, acts = [], [], []
    for t in range(x_proj.shape[0]):
        i, f, g, o = (x_proj[t] + h @ w_hh).chunk(4, dim=1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = f * c + i * g
        h = o * torch.tanh(c)
        hs.append(h)
        cs.append(c)
        acts.append(torch.cat([i, f, g, o], 1))
    return torch.stack(hs), torch.stack(cs), torch.stack(acts)


def _flat_torch(items, scales=(1.0, 2.0, 3.0, 4.0)):
    return torch.cat([(t * s).reshape(-1) for t, s in zip(items, scales)])


def _flat_needle(items, scales=(1.0, 2.0, 3.0, 4.0)):
    return ops.concatenate([ops.reshape(t * s, (-1,)) for t, s in zip(items, scales)], 0)


def lstm_sequence_flat(x_proj, w_hh, *state):
    """needle: h_all, 2 c_all and 3 acts, flattened into one vector."""
    return _flat_needle(list(ops.lstm_sequence(x_proj, w_hh, *state)))


def torch_lstm_sequence_flat(x_proj, w_hh, *state):
    return _flat_torch(torch_lstm(x_proj, w_hh, *state))


def lstm_sequence_grad_flat(dh, dc, x_proj, w_hh, *rest, with_state=True, with_dacts=False):
    """needle: lstm_sequence_grad's adjoints (dx_proj, 2 dw_hh[, 3 dh0, 4 dc0]) flattened;
    ``rest`` is (h0, c0) with a state, then dacts."""
    state = list(rest[:2]) if with_state else []
    out = ops.lstm_sequence(x_proj, w_hh, *state)
    grads = ops.lstm_sequence_grad(dh, dc, x_proj, w_hh, out[0], out[1], out[2], *rest,
                                   with_state=with_state, with_dacts=with_dacts)
    return _flat_needle(list(grads))


def torch_lstm_sequence_grad_flat(dh, dc, x_proj, w_hh, *rest, with_state=True,
                                  with_dacts=False):
    """torch: the same adjoints by torch.autograd.grad (create_graph: differentiable)."""
    state = list(rest[:2]) if with_state else []
    seeds = [dh, dc] + ([rest[-1]] if with_dacts else [])
    wrt = [t if t.requires_grad else t.detach().requires_grad_(True)
           for t in [x_proj, w_hh, *state]]
    outs = torch_lstm(*wrt)[:len(seeds)]
    grads = torch.autograd.grad(outs, wrt, seeds, create_graph=True)
    return _flat_torch(grads)
