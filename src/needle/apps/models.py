"""The models the command line trains: an MLP-ResNet, a small residual CNN, a linear model."""

from __future__ import annotations

import numpy as np

from .. import nn, ops
from ..autograd import Tensor

MODEL_NAMES = ("mlp-resnet", "cnn", "linear")


def residual_block(dim: int, hidden: int, drop_prob: float = 0.1) -> nn.Module:
    """needle's MLP-ResNet block: ReLU(x + BN(Linear(Dropout(ReLU(BN(Linear(x))))))."""
    return nn.Sequential(
        nn.Residual(nn.Sequential(
            nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(drop_prob),
            nn.Linear(hidden, dim), nn.BatchNorm1d(dim))),
        nn.ReLU())


class MLPResNet(nn.Module):
    """Flatten, Linear(in, hidden), ReLU, blocks x ResidualBlock(hidden, hidden // 2), Linear."""

    def __init__(self, in_features: int, hidden: int = 100, num_blocks: int = 3,
                 num_classes: int = 10, drop_prob: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(),
            *[residual_block(hidden, hidden // 2, drop_prob) for _ in range(num_blocks)],
            nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


#: BatchNorm momentum of the CNN's layers (PyTorch's default is 0.1). Evaluation uses the
#: running statistics, an exponential average whose mean lag is (1 - m) / m steps: 9 at 0.1,
#: 1 at 0.5. Adam at lr 2e-3 turns a conv's weights by ~0.5% a step, which moves the deepest
#: BatchNorm's input mean by ~0.02 std a step, so at 0.1 the running mean trailed the network it
#: normalizes by ~0.17 std, and test accuracy at the end of an epoch fell 1.5-3.5 points below
#: what statistics of the epoch's final weights give (MNIST, 5 epochs: 96.85% at 0.1, 98.35% at
#: 0.5, 98.4% with exact statistics). Averaging fewer batches costs little: a batch of 64
#: images estimates a channel's mean to ~0.02 std here.
CNN_BN_MOMENTUM = 0.5


class ConvBN(nn.Module):
    """3x3 Conv -> BatchNorm2d -> ReLU on NCHW input.

    The conv has no bias: the BatchNorm right after it subtracts each channel's mean, which
    cancels a bias exactly (its gradient is 0), so a bias would only cost an add per step.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1,
                 momentum: float = CNN_BN_MOMENTUM) -> None:
        super().__init__()
        self.conv = nn.Conv(c_in, c_out, 3, stride=stride, bias=False)
        self.bn = nn.BatchNorm2d(c_out, momentum=momentum)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.bn.forward_relu(self.conv(x), self.relu)  # (one node in eager training)


class HalvingMaxPool(nn.MaxPool2d):
    """2x2 max pooling, stride 2; a map already smaller than 2x2 passes through unchanged (so
    the same network takes 8x8 digits, which reach 1x1, and 28x28 or 32x32 images)."""

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x: Tensor) -> Tensor:
        if len(x.shape) == 4 and x.shape[2] is not None and x.shape[3] is not None \
                and min(x.shape[2], x.shape[3]) < self.kernel_size:
            return x
        return super().forward(x)


class ResidualCNN(nn.Module):
    """A small CNN for NHWC images of any size (digits 8x8, MNIST 28x28, CIFAR-10 32x32).

    NHWC -> NCHW, ConvBN(c, w), pool, ConvBN(w, 4w), pool, ConvBN(4w, 8w), pool,
    Residual(ConvBN(8w, 8w)), global average pool, Linear(8w, classes); w = ``width``, pool =
    ``HalvingMaxPool``: 28x28 -> 14 -> 7 -> 3 (8x8 -> 4 -> 2 -> 1).

    Each unit of the last feature map sees all of a 28x28 image (receptive field 38 px: three
    poolings, then the residual 3x3 conv on the 3x3 map), so the global average pool averages
    features of whole digits. The CNN this replaced pooled a 14x14 map of units that saw 11x11
    pixels each, a bag of digit fragments without their layout: it reached 38% test accuracy
    after one epoch on 8,000 MNIST images and 87% after five (PyTorch trained it no better).
    """

    def __init__(self, in_channels: int, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            ConvBN(in_channels, w), HalvingMaxPool(),
            ConvBN(w, 4 * w), HalvingMaxPool(),
            ConvBN(4 * w, 8 * w), HalvingMaxPool(),
            nn.Residual(ConvBN(8 * w, 8 * w)))
        self.head = nn.Linear(8 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = ops.permute(x, (0, 3, 1, 2))  # the data pipeline is NHWC, nn.Conv is NCHW
        pooled = ops.mean(self.features(x), axes=(2, 3))
        return self.head(pooled)


class LinearModel(nn.Module):
    """Multinomial logistic regression on the flattened image."""

    def __init__(self, in_features: int, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def build_model(name: str, image_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """A fresh model ``name`` for H x W x C images (draws its weights from NumPy's RNG)."""
    in_features = int(np.prod(image_shape))
    if name == "mlp-resnet":
        return MLPResNet(in_features, num_classes=num_classes)
    if name == "cnn":
        return ResidualCNN(image_shape[-1], num_classes=num_classes)
    if name == "linear":
        return LinearModel(in_features, num_classes=num_classes)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
