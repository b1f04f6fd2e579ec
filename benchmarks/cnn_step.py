"""A small CNN training step and one strided conv layer, needle eager vs PyTorch eager, in one run.

Model (the same in both, NCHW, padding 1 everywhere):
    Conv(3->16, k3) -> BatchNorm2d -> ReLU
    Conv(16->32, k3) -> BatchNorm2d -> ReLU
    Conv(32->64, k3) -> BatchNorm2d -> ReLU
    global average pool -> Linear(64, 10) -> softmax cross-entropy
on a batch of 64 random 3x32x32 images; one step = forward, backward, Adam(lr 1e-3) update.
Two rows: strides (1, 1, 1), the model as issue #3 states it (no strides given; the PyTorch
time it quotes, 0.095 s/step, is this model's), and strides (1, 2, 2), a downsampling variant
that puts the strided conv gradient on the hot path (the row of earlier BENCHMARKS.md tables).
A third row trains needle's own `apps.models.ResidualCNN` (16, 64 and 128 channels with 2x2
max pooling after each, a residual block, bias-free convs: Winograd and im2col convolutions
and max pooling in one model) beside the same model in PyTorch, on 32x32x3 and on
MNIST-size 28x28x1 images. The last rows time one conv layer alone (N64, C32->64, 32x32,
k3, stride 1 and stride 2), forward and forward+backward.
With ``--jit`` it times instead the three training steps (strides 1,1,1; 1,2,2; ResidualCNN
32x32x3) jitted: ``ndl.jit`` of the needle step (a hot plan: called ``FUSE_AFTER_CALLS`` times
first, so its elementwise regions are fused, as in training) beside ``torch.compile`` of the
same PyTorch step and PyTorch eager (torch.compile takes ~1 min to compile the three;
``--no-compile`` leaves it out).
Run: python benchmarks/cnn_step.py [--jit [--no-compile]]
"""

from __future__ import annotations

import sys

# isort: off
import common  # first: it pins BLAS threads before NumPy and torch load

# isort: on
import numpy as np
import torch

import needle as ndl
from needle import nn, ops
from needle.compiler import fusion

BATCH, CLASSES = 64, 10
CHANNELS = (3, 16, 32, 64)
#: (label, strides of the three convs)
CONFIGS = [("strides 1,1,1 (as issue #3 states it)", (1, 1, 1)),
           ("strides 1,2,2", (1, 2, 2))]


class NeedleCNN(nn.Module):
    """The benchmark CNN in needle (nn.Conv pads k // 2, i.e. 1 for k = 3)."""

    def __init__(self, strides: tuple = (1, 1, 1)) -> None:
        super().__init__()
        layers = []
        for c_in, c_out, s in zip(CHANNELS[:-1], CHANNELS[1:], strides):
            layers += [nn.Conv(c_in, c_out, 3, stride=s), nn.BatchNorm2d(c_out), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(CHANNELS[-1], CLASSES)

    def forward(self, x: ndl.Tensor) -> ndl.Tensor:
        pooled = ops.mean(self.features(x), axes=(2, 3))
        return self.head(pooled)


def torch_cnn(strides: tuple = (1, 1, 1)) -> torch.nn.Module:
    layers = []
    for c_in, c_out, s in zip(CHANNELS[:-1], CHANNELS[1:], strides):
        layers += [torch.nn.Conv2d(c_in, c_out, 3, stride=s, padding=1),
                   torch.nn.BatchNorm2d(c_out), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(CHANNELS[-1], CLASSES))


def _train_step_row(name: str, model: nn.Module, images: np.ndarray, t_model: torch.nn.Module,
                    t_images: np.ndarray, labels: np.ndarray) -> dict:
    """One Adam(lr 1e-3) training step of each model on the same batch, best of rounds."""
    opt = ndl.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.SoftmaxLoss()
    x, y = ndl.from_numpy(images), ndl.from_numpy(labels)

    def needle_step():
        opt.minimize(loss_fn(model(x), y))

    t_opt = torch.optim.Adam(t_model.parameters(), lr=1e-3)
    tx, ty = torch.from_numpy(t_images), torch.from_numpy(labels)

    def torch_step():
        t_opt.zero_grad()
        torch.nn.functional.cross_entropy(t_model(tx), ty).backward()
        t_opt.step()

    needle_step(), torch_step()  # warm up (allocations, optimizer state)
    best = common.best_times_in_rounds({"needle": needle_step, "torch": torch_step},
                                       repeat=8)
    n_t, t_t = best["needle"], best["torch"]
    return {"benchmark": name, "needle": n_t, "pytorch": t_t, "ratio": n_t / t_t}


def step_row(label: str, strides: tuple) -> dict:
    rng = np.random.default_rng(0)
    images = rng.standard_normal((BATCH, 3, 32, 32)).astype(np.float32)
    labels = rng.integers(0, CLASSES, BATCH)
    np.random.seed(0)
    model = NeedleCNN(strides)
    torch.manual_seed(0)
    return _train_step_row(f"CNN train step, batch 64 of 3x32x32, {label} (s/step)", model,
                           images, torch_cnn(strides), images, labels)


class TorchResidualCNN(torch.nn.Module):
    """apps.models.ResidualCNN in PyTorch: ConvBN(3, w), pool, ConvBN(w, 4w), pool,
    ConvBN(4w, 8w), pool, Residual(ConvBN(8w, 8w)), global average pool, Linear(8w, 10);
    ConvBN is a bias-free 3x3 conv, BatchNorm2d and ReLU; pool is 2x2 max pooling."""

    def __init__(self, width: int = 16, in_channels: int = 3) -> None:
        super().__init__()

        def conv_bn(c_in: int, c_out: int) -> torch.nn.Module:
            return torch.nn.Sequential(torch.nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False),
                                       torch.nn.BatchNorm2d(c_out, momentum=0.5),
                                       torch.nn.ReLU())

        w = width
        pool = torch.nn.MaxPool2d(2)
        self.features = torch.nn.Sequential(conv_bn(in_channels, w), pool, conv_bn(w, 4 * w), pool,
                                            conv_bn(4 * w, 8 * w), pool)
        self.block = conv_bn(8 * w, 8 * w)
        self.head = torch.nn.Linear(8 * w, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = x + self.block(x)
        return self.head(x.mean(dim=(2, 3)))


def residual_row(size: int = 32, channels: int = 3) -> dict:
    """needle's ResidualCNN (NHWC input, as its data pipeline gives it) vs the same model in
    PyTorch (NCHW input, its native layout): CIFAR-size 32x32x3 images, or MNIST-size 28x28x1
    (the command line's ``--model cnn``)."""
    from needle.apps.models import ResidualCNN

    rng = np.random.default_rng(0)
    images = rng.standard_normal((BATCH, size, size, channels)).astype(np.float32)
    labels = rng.integers(0, CLASSES, BATCH)
    np.random.seed(0)
    model = ResidualCNN(channels)
    torch.manual_seed(0)
    return _train_step_row(
        f"ResidualCNN train step (apps.models), batch 64 of {size}x{size}x{channels} (s/step)",
        model, images, TorchResidualCNN(in_channels=channels),
        images.transpose(0, 3, 1, 2).copy(), labels)


def conv_layer_rows(stride: int) -> list[dict]:
    """One conv op (NHWC in needle, NCHW in torch), forward and forward+backward; stride 1
    takes needle's Winograd path (with numba), stride 2 im2col."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((64, 32, 32, 32)).astype(np.float32)
    w = rng.standard_normal((3, 3, 32, 64)).astype(np.float32) * 0.05
    na, nw = ndl.Tensor(a), ndl.Tensor(w)
    ta = torch.tensor(a.transpose(0, 3, 1, 2).copy(), requires_grad=True)
    tw = torch.tensor(w.transpose(3, 2, 0, 1).copy(), requires_grad=True)

    def needle_fwd():
        with ndl.no_grad():
            ops.conv(na, nw, stride=stride, padding=1)

    def torch_fwd():
        with torch.no_grad():
            torch.nn.functional.conv2d(ta, tw, stride=stride, padding=1)

    def needle_step():
        na.grad = nw.grad = None
        ops.conv(na, nw, stride=stride, padding=1).sum().backward(create_graph=False)

    def torch_step():
        ta.grad = tw.grad = None
        torch.nn.functional.conv2d(ta, tw, stride=stride, padding=1).sum().backward()

    rows = []
    label = f"conv N64 C32->64 32x32 k3 s{stride}"
    for name, n_fn, t_fn in [(f"{label} fwd (ms)", needle_fwd, torch_fwd),
                             (f"{label} fwd+bwd (ms)", needle_step, torch_step)]:
        n_fn(), t_fn()
        best = common.best_times_in_rounds({"needle": n_fn, "torch": t_fn}, repeat=8)
        n_t, t_t = best["needle"] * 1e3, best["torch"] * 1e3
        rows.append({"benchmark": name, "needle": n_t, "pytorch": t_t, "ratio": n_t / t_t})
    return rows


def _jit_row(name: str, model: nn.Module, images: np.ndarray, t_model: torch.nn.Module,
             t_images: np.ndarray, labels: np.ndarray, compile_torch: bool) -> dict:
    """One Adam(lr 1e-3) training step: ``ndl.jit`` of needle's step, ``torch.compile`` of
    PyTorch's (where it works) and PyTorch eager, best of alternating rounds."""
    opt = ndl.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.SoftmaxLoss()
    x, y = ndl.from_numpy(images), ndl.from_numpy(labels)

    @ndl.jit
    def needle_step(x: ndl.Tensor, y: ndl.Tensor) -> ndl.Tensor:
        return opt.minimize(loss_fn(model(x), y))

    t_opt = torch.optim.Adam(t_model.parameters(), lr=1e-3)
    tx, ty = torch.from_numpy(t_images), torch.from_numpy(labels)

    def torch_step() -> torch.Tensor:
        t_opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(t_model(tx), ty)
        loss.backward()
        t_opt.step()
        return loss

    fns = {"jit": lambda: needle_step(x, y), "torch": torch_step}
    if compile_torch:
        try:
            compiled = torch.compile(torch_step)
            compiled()  # compiles here (forward, backward and the optimizer step)
            fns["compiled"] = compiled
        except Exception as exc:  # noqa: BLE001 - no C++ compiler, unsupported platform, ...
            print(f"torch.compile unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
    for fn in fns.values():
        fn()  # warm up: the jit traces and compiles, optimizer state, allocations
    for _ in range(fusion.FUSE_AFTER_CALLS):
        fns["jit"]()  # a hot plan, as in training: its elementwise regions fused
    best = common.best_times_in_rounds(fns, rounds=3, repeat=4, pause=0.5)
    jit_t, torch_t, compiled_t = best["jit"], best["torch"], best.get("compiled")
    return {"benchmark": name, "needle jit": jit_t,
            "torch.compile": "n/a" if compiled_t is None else compiled_t,
            "pytorch eager": torch_t,
            "jit / torch.compile": "n/a" if compiled_t is None else jit_t / compiled_t,
            "jit / pytorch eager": jit_t / torch_t}


def jit_rows(compile_torch: bool = True) -> list[dict]:
    """The three CNN training steps jitted (issue #20: ndl.jit <= 0.8x torch.compile)."""
    from needle.apps.models import ResidualCNN

    common.torch_threads()
    rows = []
    rng = np.random.default_rng(0)
    labels = rng.integers(0, CLASSES, BATCH)
    for label, strides in CONFIGS:
        images = np.random.default_rng(0).standard_normal((BATCH, 3, 32, 32)).astype(np.float32)
        np.random.seed(0)
        model = NeedleCNN(strides)
        torch.manual_seed(0)
        rows.append(_jit_row(f"CNN train step, jitted, {label.split(' (')[0]} (s/step)", model,
                             images, torch_cnn(strides), images, labels, compile_torch))
    images = rng.standard_normal((BATCH, 32, 32, 3)).astype(np.float32)
    np.random.seed(0)
    model = ResidualCNN(3)
    torch.manual_seed(0)
    rows.append(_jit_row("ResidualCNN train step, jitted, 32x32x3 (s/step)", model, images,
                         TorchResidualCNN(), images.transpose(0, 3, 1, 2).copy(), labels,
                         compile_torch))
    return rows


def main() -> list[dict]:
    common.torch_threads()
    return ([step_row(label, strides) for label, strides in CONFIGS]
            + [residual_row(), residual_row(28, 1)]
            + conv_layer_rows(1) + conv_layer_rows(2))


if __name__ == "__main__":
    print(common.machine())
    if "--jit" in sys.argv:
        print(common.markdown_table(jit_rows(compile_torch="--no-compile" not in sys.argv)))
    else:
        print(common.markdown_table(main()))
