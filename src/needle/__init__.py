"""needle: a small deep-learning framework (``import needle as ndl``).

One core (an op registry, a graph of Tensors, reverse-mode autodiff) serves eager autodiff,
declarative graphs, Caffe-style layers and a JIT.
"""

from . import (
    autograd,
    backend_ndarray,
    checkpoint,
    data,
    distributed,  # data-parallel training on MPI; mpi4py is imported only under mpirun
    function,
    init,
    jit,
    nn,
    onnx,  # ONNX export/import; the onnx package is imported only when called
    ops,
    optim,
    remote,  # remote Sessions and serving (gRPC is imported only when used)
)
from ._version import __version__
from .autograd import Tensor, TensorTuple, enable_grad, from_numpy, is_grad_enabled, no_grad
from .backend import Device, NDArray, cpu, cuda, default_device
from .checkpoint import CheckpointError, checkpoint_info, load, save
from .extend import register_op
from .ops import *
from .profiler import profile
from .program import ExportedProgram, export, load_program

# PyTorch users find custom functions as autograd.Function; function.py builds on autograd.py,
# so the package, above both, makes the name available there
autograd.Function, autograd.FunctionCtx = function.Function, function.FunctionCtx
