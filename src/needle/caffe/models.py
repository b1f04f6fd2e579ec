"""Ready-made Net specs: the MLP-ResNet of the needle course, written with Caffe layers."""

from __future__ import annotations

__all__ = ["mlp_resnet_spec"]


def mlp_resnet_spec(dim: int, hidden_dim: int = 100, num_classes: int = 10,
                    num_blocks: int = 3, drop_prob: float = 0.1,
                    moving_average_fraction: float = 0.999, accuracy: bool = False) -> list:
    """The MLP-ResNet as a Net spec (inputs ``data`` (N, dim) and ``label`` (N,))::

        InnerProduct(hidden) -> ReLU
        -> num_blocks x [ x + (InnerProduct(hidden/2) -> BatchNorm+Scale -> ReLU -> Dropout
                              -> InnerProduct(hidden) -> BatchNorm+Scale) -> ReLU ]
        -> InnerProduct(num_classes) -> SoftmaxWithLoss  (and Accuracy if asked)

    Each residual sum is an ``Eltwise`` SUM of the block's output and its input; ReLU,
    BatchNorm, Scale and Dropout run in place. The trainable blobs come in the order of the
    ``nn`` version's ``parameters()`` (Linear weight, bias; BatchNorm1d weight, bias; ...).
    """
    half = hidden_dim // 2
    spec: list = [
        {"name": "input", "type": "Input", "top": ["data", "label"],
         "shape": [[None, dim], [None]]},
        {"name": "fc0", "type": "InnerProduct", "bottom": "data", "top": "fc0",
         "num_output": hidden_dim},
        {"name": "relu0", "type": "ReLU", "bottom": "fc0", "top": "fc0"},
    ]
    x = "fc0"
    for b in range(num_blocks):
        p = f"block{b}_"
        h, y = p + "h", p + "y"
        spec += [
            {"name": p + "fc1", "type": "InnerProduct", "bottom": x, "top": h,
             "num_output": half},
            {"name": p + "bn1", "type": "BatchNorm", "bottom": h, "top": h,
             "moving_average_fraction": moving_average_fraction},
            {"name": p + "scale1", "type": "Scale", "bottom": h, "top": h, "bias_term": True},
            {"name": p + "relu1", "type": "ReLU", "bottom": h, "top": h},
            {"name": p + "drop", "type": "Dropout", "bottom": h, "top": h,
             "dropout_ratio": drop_prob},
            {"name": p + "fc2", "type": "InnerProduct", "bottom": h, "top": y,
             "num_output": hidden_dim},
            {"name": p + "bn2", "type": "BatchNorm", "bottom": y, "top": y,
             "moving_average_fraction": moving_average_fraction},
            {"name": p + "scale2", "type": "Scale", "bottom": y, "top": y, "bias_term": True},
            {"name": p + "sum", "type": "Eltwise", "operation": "SUM", "bottom": [y, x],
             "top": p + "out"},
            {"name": p + "relu2", "type": "ReLU", "bottom": p + "out", "top": p + "out"},
        ]
        x = p + "out"
    spec += [
        {"name": "fc_out", "type": "InnerProduct", "bottom": x, "top": "logits",
         "num_output": num_classes},
        {"name": "loss", "type": "SoftmaxWithLoss", "bottom": ["logits", "label"],
         "top": "loss"},
    ]
    if accuracy:
        spec.append({"name": "accuracy", "type": "Accuracy", "bottom": ["logits", "label"],
                     "top": "accuracy"})
    return spec
