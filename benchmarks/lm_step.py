"""Language-model training steps: needle eager, needle ``ndl.jit`` and PyTorch eager, in one run.

Two workloads, the same sizes in both libraries, dropout 0:
- LSTM LM: Embedding(10,000, 128) -> 2-layer LSTM(128) over bptt 35 x batch 32 ->
  Linear(128, 10,000) -> softmax cross-entropy; SGD(lr 0.1).
- Transformer LM: token Embedding(10,000, 128) + learned positions Embedding(64, 128) ->
  2 pre-norm causal layers (d_model 128, 4 heads, feed-forward 512) -> LayerNorm ->
  Linear(128, 10,000) -> softmax cross-entropy, batch 16 x seq 64; Adam(lr 1e-3).
- LSTM layers only: the LSTM LM's 2-layer LSTM without the vocabulary-sized tail (embedding,
  head, loss), to see the recurrence apart from the head's matrix products.
One step = forward, loss, backward, optimizer update. Under ``ndl.jit`` the head's ``linear``
and the loss (with its gradient) become the fused vocabulary-head ops where
compiler/vocab_head_rewrite.py runs in the pass pipeline; eager runs the model as written.
Times are medians over rounds; a round runs each variant in turn (an untimed call, then
``repeat`` timed calls), so slow phases of the shared machine spread over all variants.
Ratios are needle / PyTorch eager.
Run: python benchmarks/lm_step.py [--rounds N] [--repeat N]
"""

from __future__ import annotations

# isort: off
import common  # first: it pins BLAS threads before NumPy and torch load

# isort: on
import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

import needle as ndl
from needle import nn, ops

VOCAB, DIM = 10_000, 128
LSTM_BPTT, LSTM_BATCH = 35, 32
TF_SEQ, TF_BATCH, TF_HEADS, TF_FF, TF_LAYERS = 64, 16, 4, 512, 2


# -- needle models -----------------------------------------------------------------------------
class NeedleLSTMLM(nn.Module):
    """Embedding -> 2-layer LSTM -> Linear, on (seq, batch) ids; logits (seq * batch, vocab)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, DIM)
        self.lstm = nn.LSTM(DIM, DIM, num_layers=2)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, ids: ndl.Tensor) -> ndl.Tensor:
        out, _ = self.lstm(self.embedding(ids))
        return self.head(ops.reshape(out, (-1, DIM)))


class NeedleTransformerLM(nn.Module):
    """Token + learned position embeddings -> causal pre-norm layers -> LayerNorm -> Linear,
    on (batch, seq) ids; logits (batch * seq, vocab)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, DIM)
        self.positions = nn.Embedding(TF_SEQ, DIM)
        self.layers = nn.Sequential(*[nn.TransformerLayer(DIM, TF_HEADS, TF_FF, dropout=0.0,
                                                          causal=True)
                                      for _ in range(TF_LAYERS)])
        self.norm = nn.LayerNorm1d(DIM)
        self.head = nn.Linear(DIM, VOCAB)
        self._position_ids = ndl.Tensor(np.arange(TF_SEQ)[None, :], requires_grad=False)

    def forward(self, ids: ndl.Tensor) -> ndl.Tensor:
        x = self.embedding(ids) + self.positions(self._position_ids)
        x = self.layers(x)
        return self.head(self.norm(ops.reshape(x, (-1, DIM))))


# -- the same in PyTorch -----------------------------------------------------------------------
class TorchLSTMLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(VOCAB, DIM)
        self.lstm = torch.nn.LSTM(DIM, DIM, num_layers=2)
        self.head = torch.nn.Linear(DIM, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embedding(ids))
        return self.head(out.reshape(-1, DIM))


class TorchTransformerLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(VOCAB, DIM)
        self.positions = torch.nn.Embedding(TF_SEQ, DIM)
        self.layers = torch.nn.ModuleList([
            torch.nn.TransformerEncoderLayer(DIM, TF_HEADS, TF_FF, dropout=0.0,
                                             batch_first=True, norm_first=True)
            for _ in range(TF_LAYERS)])
        self.norm = torch.nn.LayerNorm(DIM)
        self.head = torch.nn.Linear(DIM, VOCAB)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(TF_SEQ))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embedding(ids) + self.positions.weight[None]
        for layer in self.layers:
            x = layer(x, src_mask=self.mask, is_causal=True)
        return self.head(self.norm(x.reshape(-1, DIM)))


# -- steps -------------------------------------------------------------------------------------
def needle_step(model: nn.Module, optimizer: ndl.optim.Optimizer, jitted: bool
                ) -> Callable[[ndl.Tensor, ndl.Tensor], object]:
    loss_fn = nn.SoftmaxLoss()

    def step(ids: ndl.Tensor, targets: ndl.Tensor) -> ndl.Tensor:
        return optimizer.minimize(loss_fn(model(ids), targets))

    return ndl.jit(step) if jitted else step


def torch_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer
               ) -> Callable[[torch.Tensor, torch.Tensor], object]:
    def step(ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(ids), targets)
        loss.backward()
        optimizer.step()
        return loss

    return step


def median_times_in_rounds(fns: dict[str, Callable[[], object]], rounds: int, repeat: int,
                           pause: float = 0.5) -> dict[str, float]:
    """The median time of each callable over ``rounds`` rounds of ``repeat`` timed calls
    (each round: an idle pause and one untimed call per callable first)."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            time.sleep(pause)
            fn()
            for _ in range(repeat):
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in samples.items()}


def _workload(name: str, make_needle: Callable[[], nn.Module],
              make_torch: Callable[[], torch.nn.Module], ids: np.ndarray, targets: np.ndarray,
              needle_opt: Callable, torch_opt: Callable, rounds: int, repeat: int) -> dict:
    np.random.seed(0)
    torch.manual_seed(0)
    fns = {}
    x, y = ndl.Tensor(ids, requires_grad=False), ndl.Tensor(targets, requires_grad=False)
    for label, jitted in (("eager", False), ("jit", True)):
        model = make_needle()
        step = needle_step(model, needle_opt(model.parameters()), jitted)
        fns[label] = (lambda s: lambda: s(x, y))(step)
    t_model = make_torch()
    t_step = torch_step(t_model, torch_opt(t_model.parameters()))
    tx, ty = torch.from_numpy(ids), torch.from_numpy(targets)
    fns["torch"] = lambda: t_step(tx, ty)
    for fn in fns.values():  # warm up: traces, compiled plans, optimizer state
        fn()
        fn()
    med = median_times_in_rounds(fns, rounds, repeat)
    return {"benchmark": name, "needle eager": med["eager"], "needle jit": med["jit"],
            "pytorch eager": med["torch"], "eager / torch": med["eager"] / med["torch"],
            "jit / torch": med["jit"] / med["torch"]}


def lstm_row(rounds: int = 3, repeat: int = 5) -> dict:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, (LSTM_BPTT, LSTM_BATCH))
    targets = rng.integers(0, VOCAB, LSTM_BPTT * LSTM_BATCH)
    return _workload("LSTM LM step: bptt 35 x batch 32, 2-layer LSTM 128, vocab 10k, SGD "
                     "(s/step)", NeedleLSTMLM, TorchLSTMLM, ids, targets,
                     lambda p: ndl.optim.SGD(p, lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1),
                     rounds, repeat)


def lstm_layers_row(rounds: int = 3, repeat: int = 5) -> dict:
    """The LM's 2-layer LSTM alone (no embedding, head or loss): forward, ``sum(out * g)``,
    backward, SGD; what the fused ``lstm_sequence`` op speeds up, apart from the vocab tail."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((LSTM_BPTT, LSTM_BATCH, DIM)).astype(np.float32)
    g = rng.standard_normal((LSTM_BPTT, LSTM_BATCH, DIM)).astype(np.float32)
    np.random.seed(0)
    torch.manual_seed(0)
    xn, gn = ndl.Tensor(x, requires_grad=False), ndl.Tensor(g, requires_grad=False)
    fns: dict[str, Callable[[], object]] = {}
    for label, jitted in (("eager", False), ("jit", True)):
        lstm = nn.LSTM(DIM, DIM, num_layers=2)
        opt = ndl.optim.SGD(lstm.parameters(), lr=0.01)

        def step(a: ndl.Tensor, b: ndl.Tensor, lstm: nn.LSTM = lstm,
                 opt: ndl.optim.Optimizer = opt) -> object:
            return opt.minimize((lstm(a)[0] * b).sum())

        fn = ndl.jit(step) if jitted else step
        fns[label] = (lambda f: lambda: f(xn, gn))(fn)
    t_lstm = torch.nn.LSTM(DIM, DIM, num_layers=2)
    t_opt = torch.optim.SGD(t_lstm.parameters(), lr=0.01)
    tx, tg = torch.from_numpy(x), torch.from_numpy(g)

    def torch_lstm_step() -> None:
        t_opt.zero_grad()
        (t_lstm(tx)[0] * tg).sum().backward()
        t_opt.step()

    fns["torch"] = torch_lstm_step
    for fn in fns.values():
        fn()
        fn()
    med = median_times_in_rounds(fns, rounds, repeat)
    return {"benchmark": "LSTM layers only: 2-layer LSTM 128 over bptt 35 x batch 32, "
                         "sum(out * g), SGD (s/step)",
            "needle eager": med["eager"], "needle jit": med["jit"], "pytorch eager": med["torch"],
            "eager / torch": med["eager"] / med["torch"], "jit / torch": med["jit"] / med["torch"]}


def transformer_row(rounds: int = 3, repeat: int = 5) -> dict:
    rng = np.random.default_rng(1)
    ids = rng.integers(0, VOCAB, (TF_BATCH, TF_SEQ))
    targets = rng.integers(0, VOCAB, TF_BATCH * TF_SEQ)
    return _workload("Transformer LM step: batch 16 x seq 64, 2 causal pre-norm layers d128 "
                     "h4 ff512, vocab 10k, Adam (s/step)", NeedleTransformerLM,
                     TorchTransformerLM, ids, targets,
                     lambda p: ndl.optim.Adam(p, lr=1e-3),
                     lambda p: torch.optim.Adam(p, lr=1e-3), rounds, repeat)


def main(rounds: int = 3, repeat: int = 5) -> list[dict]:
    common.torch_threads()
    return [lstm_row(rounds, repeat), lstm_layers_row(rounds, repeat),
            transformer_row(rounds, repeat)]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(f"{common.machine()}\n")
    print(common.markdown_table(main(args.rounds, args.repeat)))
