"""The op table's call forms of the vocabulary-head ops (core/ops_vocab_head.py) and their
PyTorch references (each row's outputs flattened into one tensor)."""

from __future__ import annotations

import numpy as np
import torch

import needle as ndl
from needle import nn, ops


def _ids(ids: np.ndarray) -> ndl.Tensor:
    return ndl.Tensor(ids, requires_grad=False)


def torch_losses(x, w, b, ids):
    """Per-row softmax cross-entropy of ``x @ w + b`` (torch)."""
    return torch.nn.functional.cross_entropy(x @ w + b, torch.tensor(ids), reduction="none")


def softmax_flat(x, w, b, ids):
    """needle: vocab_head_softmax's (losses, S) flattened into one vector."""
    out = ops.vocab_head_softmax(x, w, b, _ids(ids))
    return ops.concatenate([out[0], ops.reshape(out[1], (-1,))], 0)


def torch_softmax_flat(x, w, b, ids):
    z = x @ w + b
    s = torch.softmax(z, -1) - torch.nn.functional.one_hot(
        torch.tensor(ids), z.shape[1]).to(z.dtype)
    return torch.cat([torch_losses(x, w, b, ids), s.reshape(-1)])


def loss(x, w, b, ids):
    """needle: the per-row losses through vocab_head_softmax and vocab_head_loss."""
    return nn.linear_softmax_cross_entropy(x, w, b, _ids(ids))


_SCALES = {"x": 1.0, "w": 2.0, "b": 3.0}


def loss_grad_flat(x, w, b, g, ids, parts="xwb"):
    """needle: vocab_head_loss_grad's adjoints (those in ``parts``, scaled 1, 2, 3 so a
    swap shows) flattened into one vector."""
    out = ops.vocab_head_softmax(x, w, b, _ids(ids))
    grads = ops.vocab_head_loss_grad(x, w, b, _ids(ids), out[1], g, parts=parts)
    return ops.concatenate([ops.reshape(grads[k] * _SCALES[p], (-1,))
                            for k, p in enumerate(parts)], 0)


def torch_loss_grad_flat(x, w, b, g, ids, parts="xwb"):
    """torch: the same adjoints by torch.autograd.grad (create_graph: differentiable)."""
    # (inputs given without requires_grad, as the forward check does: leaves that have it)
    x, w, b = (t if t.requires_grad else t.detach().requires_grad_() for t in (x, w, b))
    inputs = {"x": x, "w": w, "b": b}
    wrt = [inputs[p] for p in parts]
    grads = torch.autograd.grad((torch_losses(x, w, b, ids) * g).sum(), wrt,
                                create_graph=True)
    return torch.cat([(d * _SCALES[p]).reshape(-1) for d, p in zip(grads, parts)])
