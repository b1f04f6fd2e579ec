"""Multi-head attention and a pre-norm Transformer layer."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import init, ops
from ..autograd import Tensor
from .basic import Dropout, LayerNorm1d, Linear, ReLU
from .module import Module, Parameter

__all__ = ["MultiHeadAttention", "TransformerLayer"]

#: added to the logits of masked positions; exp() of it is exactly 0 after the max shift, and
#: unlike -inf a fully masked row gives a uniform row instead of nan
MASK_VALUE = -1e9


def _dropout(module: Dropout, x: Tensor) -> Tensor:
    """Dropout that is skipped when p = 0: no mask draw and no multiply (as torch)."""
    return x if module.p == 0 else module(x)


def _apply_2d(layer: Module, x: Tensor) -> Tensor:
    """``layer`` on (B, L, D) as one (B*L, D) matrix, reshaped back to (B, L, out); the
    batch size may be unknown (None) in a declared graph."""
    b, length, width = x.shape
    out = layer(ops.reshape(x, (-1, width)))
    return ops.reshape(out, (-1 if b is None else b, length, out.shape[-1]))


def _as_array(mask: Any) -> np.ndarray:
    return mask.numpy() if isinstance(mask, Tensor) else np.asarray(mask)


def _additive(mask: Any, what: str) -> np.ndarray:
    """A float mask to add to the logits: bool True -> MASK_VALUE (blocked), floats as given."""
    mask = _as_array(mask)
    if mask.dtype.kind == "b":
        return np.where(mask, MASK_VALUE, 0.0)
    if mask.dtype.kind != "f":
        raise TypeError(f"MultiHeadAttention: {what} must be bool (True = blocked) or float "
                        f"(added to the logits), got {mask.dtype}")
    return mask.astype(np.float64)


class MultiHeadAttention(Module):
    """Multi-head scaled dot-product attention, as ``torch.nn.MultiheadAttention`` with
    ``batch_first=True``::

        q, k, v = query W_q + b_q, key W_k + b_k, value W_v + b_v     # split into heads
        A = softmax(q k^T / sqrt(head_dim) + mask)                    # (B, heads, T, S)
        out = concat_heads(dropout(A) v) W_o + b_o

    query (B, T, D), key and value (B, S, D) (None: self-attention on ``query``).
    ``in_proj_weight`` (D, 3D) holds [W_q | W_k | W_v] in needle's (in, out) layout, i.e. the
    transpose of torch's ``in_proj_weight``; ``in_proj_bias`` (3D,); ``out_proj`` is a Linear.
    With ``causal`` (or ``is_causal``) query position i sees key positions j <= i only.

    ``forward`` returns ``(out, weights)`` like torch: the attention weights (B, T, S)
    averaged over heads (or (B, heads, T, S)), or None when ``need_weights=False``.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 causal: bool = False, device: Any = None, dtype: str = "float32") -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"MultiHeadAttention: embed_dim {embed_dim} is not divisible by "
                             f"num_heads {num_heads}")
        self.embed_dim = int(embed_dim)
        self.num_heads = int(num_heads)
        self.head_dim = self.embed_dim // self.num_heads
        self.causal = bool(causal)
        d = self.embed_dim
        # torch's init: Xavier-uniform projections, zero biases
        self.in_proj_weight = Parameter(init.xavier_uniform(d, 3 * d, device=device, dtype=dtype))
        self.in_proj_bias = (Parameter(init.zeros(3 * d, device=device, dtype=dtype))
                             if bias else None)
        self.out_proj = Linear(d, d, bias=bias, device=device, dtype=dtype)
        if self.out_proj.bias is not None:  # (Linear made one: ``bias`` is true)
            self.out_proj.bias.data = np.zeros(self.out_proj.bias.shape, dtype=dtype)
        self.dropout = Dropout(dropout)

    # -- pieces ----------------------------------------------------------------------------------
    def _heads(self, x: Tensor) -> Tensor:
        """(B, L, D) -> (B, heads, L, head_dim)."""
        b, length = x.shape[0], x.shape[1]
        x = ops.reshape(x, (-1 if b is None else b, length, self.num_heads, self.head_dim))
        return ops.permute(x, (0, 2, 1, 3))

    def _project(self, x: Tensor, part: slice) -> Tensor:
        """x (B, L, D) times the ``part`` columns of in_proj (plus bias): (B, L, width)."""
        b, length, d = x.shape
        weight: Tensor
        bias: Tensor | None
        weight, bias = self.in_proj_weight, self.in_proj_bias
        if part != slice(None):
            weight = ops.getitem(weight, (slice(None), part))
            bias = None if bias is None else ops.getitem(bias, part)
        # one 2-D product: the weight gradient is a single (D, width) product, not per batch;
        # the bias is added in place into it (the ``linear`` op)
        rows = ops.reshape(x, (-1, d))
        out = rows @ weight if bias is None else ops.linear(rows, weight, bias)
        return ops.reshape(out, (-1 if b is None else b, length, out.shape[-1]))

    def _mask(self, batch: int | None, t: int, s: int, key_padding_mask: Any,
              attn_mask: Any, is_causal: bool) -> np.ndarray | None:
        """One additive mask broadcastable to (B, heads, T, S), or None."""
        total = None
        if self.causal or is_causal:
            total = np.triu(np.full((t, s), MASK_VALUE), k=1)
        if attn_mask is not None:
            extra = _additive(attn_mask, "attn_mask")
            if extra.shape == (t, s):
                pass
            elif extra.ndim == 3 and extra.shape[1:] == (t, s):
                # torch's (B * heads, T, S) layout
                extra = extra.reshape(-1, self.num_heads, t, s)
            else:
                raise ValueError(f"MultiHeadAttention: attn_mask must be ({t}, {s}) or "
                                 f"(batch * heads, {t}, {s}), got {extra.shape}")
            total = extra if total is None else total + extra
        if key_padding_mask is not None:
            pad = _additive(key_padding_mask, "key_padding_mask")
            if pad.ndim != 2 or pad.shape[1] != s or batch not in (None, pad.shape[0]):
                raise ValueError(f"MultiHeadAttention: key_padding_mask must be (batch, source) "
                                 f"= ({batch}, {s}), got {pad.shape}")
            pad = pad.reshape(-1, 1, 1, s)
            total = pad if total is None else total + pad
        return total

    def _fused(self, query: Tensor, key: Tensor, value: Tensor, mask: np.ndarray | None
               ) -> Tensor:
        """The output through the one ``attention`` op (no weights to return, no dropout on
        them): the heads stay strided views of the (B, L, D) projections."""
        b, t, d = query.shape
        if key is query and value is query:
            # one (B*T, D) @ (D, 3D) product; q, k, v are views of its (B, T, 3, D) result
            qkv = self._project(query, slice(None))
            q, k, v = ops.split(ops.reshape(qkv, (-1 if b is None else b, t, 3, d)), 2)
        else:
            q = self._project(query, slice(0, d))
            k = self._project(key, slice(d, 2 * d))
            v = self._project(value, slice(2 * d, 3 * d))
        masks = () if mask is None else (Tensor(mask, device=q.device, dtype=q.dtype,
                                                requires_grad=False),)
        context = ops.attention(q, k, v, *masks, heads=self.num_heads,
                                scale=1.0 / math.sqrt(self.head_dim))
        return _apply_2d(self.out_proj, context)

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, query: Tensor, key: Tensor | None = None, value: Tensor | None = None,
                key_padding_mask: Any = None, need_weights: bool = True, attn_mask: Any = None,
                average_attn_weights: bool = True, is_causal: bool = False
                ) -> tuple[Tensor, Tensor | None]:
        key = query if key is None else key
        value = key if value is None else value
        if len(query.shape) != 3 or query.shape[-1] != self.embed_dim:
            raise ValueError(f"MultiHeadAttention: expected query (batch, target, "
                             f"{self.embed_dim}), got {tuple(query.shape)}")
        if key.shape[-1] != self.embed_dim or value.shape[-1] != self.embed_dim:
            raise ValueError(f"MultiHeadAttention: key {tuple(key.shape)} and value "
                             f"{tuple(value.shape)} must end in embed_dim {self.embed_dim}")
        b, t, d = query.shape
        s = key.shape[1]
        if not need_weights and (self.dropout.p == 0 or not self.training):
            return self._fused(query, key, value, self._mask(
                b, t, s, key_padding_mask, attn_mask, is_causal)), None
        if key is query and value is query:
            # self-attention: one (B*T, D) @ (D, 3D) product for q, k and v together
            qkv = self._project(query, slice(None))
            qkv = ops.reshape(qkv, (-1 if b is None else b, t, 3, self.num_heads, self.head_dim))
            q, k, v = ops.split(ops.permute(qkv, (2, 0, 3, 1, 4)), 0)
        else:
            q = self._heads(self._project(query, slice(0, d)))
            k = self._heads(self._project(key, slice(d, 2 * d)))
            v = self._heads(self._project(value, slice(2 * d, 3 * d)))
        # scale q before the product (as torch): q is (T, hd) per head, the logits (T, S)
        scores = (q * (1.0 / math.sqrt(self.head_dim))) @ ops.transpose(k, (2, 3))
        mask = self._mask(b, t, s, key_padding_mask, attn_mask, is_causal)
        if mask is not None:
            scores = scores + Tensor(mask, device=scores.device, dtype=scores.dtype,
                                     requires_grad=False)
        probs = ops.softmax(scores, axis=-1)
        probs = _dropout(self.dropout, probs)
        context = ops.permute(probs @ v, (0, 2, 1, 3))  # (B, T, heads, head_dim)
        out = _apply_2d(self.out_proj, ops.reshape(context, (-1 if b is None else b, t, d)))
        if not need_weights:
            return out, None
        return out, (ops.mean(probs, axes=1) if average_attn_weights else probs)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"causal={self.causal}")


class TransformerLayer(Module):
    """A pre-norm Transformer encoder layer on (B, T, d_model)::

        x = x + dropout1(attn(norm1(x)))
        x = x + dropout2(linear2(dropout(relu(linear1(norm2(x))))))

    Same as ``torch.nn.TransformerEncoderLayer(norm_first=True, batch_first=True,
    activation="relu")``, with the same submodule names so weights can be copied across.
    """

    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int,
                 dropout: float = 0.1, causal: bool = False, eps: float = 1e-5,
                 device: Any = None, dtype: str = "float32") -> None:
        super().__init__()
        self.d_model = int(d_model)
        self.self_attn = MultiHeadAttention(d_model, num_heads, dropout=dropout, causal=causal,
                                            device=device, dtype=dtype)
        self.linear1 = Linear(d_model, dim_feedforward, device=device, dtype=dtype)
        self.activation = ReLU()
        self.dropout = Dropout(dropout)
        self.linear2 = Linear(dim_feedforward, d_model, device=device, dtype=dtype)
        self.norm1 = LayerNorm1d(d_model, eps=eps, device=device, dtype=dtype)
        self.norm2 = LayerNorm1d(d_model, eps=eps, device=device, dtype=dtype)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)

    def forward(self, x: Tensor, key_padding_mask: Any = None) -> Tensor:
        h = self.norm1(x)
        attended, _ = self.self_attn(h, h, h, key_padding_mask=key_padding_mask,
                                     need_weights=False)
        x = x + _dropout(self.dropout1, attended)
        h = _apply_2d(self.linear1, self.norm2(x))
        h = _apply_2d(self.linear2, _dropout(self.dropout, self.activation(h)))
        return x + _dropout(self.dropout2, h)
