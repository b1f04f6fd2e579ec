"""needle.caffe: the Caffe-style front-end (Blob, Layer, Net from a spec, solvers) on needle's core.

``import needle.caffe as cf``. A layer is an op whose gradient is its own backward: the
built-in layers are written with needle ops (backward by the same autodiff as eager mode),
``cf.OpLayer`` turns any registry op into a layer, and ``cf.check_gradient`` verifies a
hand-written backward by finite differences. ``cf.as_module`` and ``cf.Net.from_module``
cross over to ``needle.nn``. See docs/caffe.md.
"""

from .blob import Blob, fill
from .bridge import LayerModule, as_module, lower_module
from .gradient_check import GradientCheckError, GradientCheckReport, check_gradient
from .inference import NetExportError, NetFunction
from .layer import (
    LAYER_TYPES,
    FunctionLayer,
    Layer,
    LayerError,
    OpLayer,
    TensorLayer,
    register_layer,
)
from .layers import (
    Accuracy,
    BatchNorm,
    Concat,
    Convolution,
    Dropout,
    Eltwise,
    EuclideanLoss,
    Flatten,
    InnerProduct,
    MemoryData,
    Pooling,
    ReLU,
    Scale,
    Sigmoid,
    Softmax,
    SoftmaxWithLoss,
    Split,
    TanH,
)
from .models import mlp_resnet_spec
from .net import Net, NetSpecError, parse_spec
from .solver import (
    LR_POLICIES,
    AdamSolver,
    SGDSolver,
    Solver,
    learning_rate,
    sgd_caffe_update,
)

__all__ = [
    "LAYER_TYPES", "LR_POLICIES", "Accuracy", "AdamSolver", "BatchNorm", "Blob", "Concat",
    "Convolution", "Dropout", "Eltwise", "EuclideanLoss", "Flatten", "FunctionLayer",
    "GradientCheckError", "GradientCheckReport", "InnerProduct", "Layer", "LayerError",
    "LayerModule", "MemoryData", "Net", "NetExportError", "NetFunction", "NetSpecError",
    "OpLayer", "Pooling", "ReLU", "SGDSolver", "Scale", "Sigmoid", "Softmax", "SoftmaxWithLoss",
    "Solver", "Split", "TanH", "TensorLayer",
    "as_module", "check_gradient", "fill", "learning_rate", "lower_module", "mlp_resnet_spec",
    "parse_spec", "register_layer", "sgd_caffe_update",
]
