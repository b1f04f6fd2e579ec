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


class ConvBN(nn.Module):
    """Conv -> BatchNorm2d -> ReLU on NCHW input."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv(c_in, c_out, 3, stride=stride)
        self.bn = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


class ResidualCNN(nn.Module):
    """A small residual CNN for NHWC images of any size (digits, MNIST, CIFAR-10).

    NHWC -> NCHW, ConvBN(c, 16), Residual(ConvBN(16, 16)), ConvBN(16, 32, stride 2),
    Residual(ConvBN(32, 32)), global average pool, Linear(32, classes).
    """

    def __init__(self, in_channels: int, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            ConvBN(in_channels, width), nn.Residual(ConvBN(width, width)),
            ConvBN(width, 2 * width, stride=2), nn.Residual(ConvBN(2 * width, 2 * width)))
        self.head = nn.Linear(2 * width, num_classes)

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
