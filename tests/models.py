"""Small models shared by the export tests (programs, ONNX): language models on token ids."""

from __future__ import annotations

import needle.nn as nn


class LSTMLanguageModel(nn.Module):
    """Embedding -> 2-layer LSTM -> Linear on (seq, batch) ids."""

    def __init__(self, vocab: int = 13, dim: int = 8, hidden: int = 6) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, num_layers=2)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids):
        out, _ = self.lstm(self.embedding(ids))
        return self.head(out)


class TransformerLanguageModel(nn.Module):
    """Embedding -> causal TransformerLayer -> Linear on (batch, seq) ids."""

    def __init__(self, vocab: int = 13, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.layer = nn.TransformerLayer(dim, heads, 16, dropout=0.1, causal=True)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):
        return self.head(self.layer(self.embedding(ids)))
