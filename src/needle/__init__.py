"""needle: a small deep-learning framework (``import needle as ndl``).

One core (an op registry, a graph of Tensors, reverse-mode autodiff) serves eager autodiff,
declarative graphs, Caffe-style layers and a JIT.
"""

from . import autograd, backend_ndarray, checkpoint, data, init, jit, nn, ops, optim
from .autograd import Tensor, TensorTuple, enable_grad, from_numpy, is_grad_enabled, no_grad
from .backend import Device, NDArray, cpu, cuda, default_device
from .backend.allocator import tune_malloc
from .checkpoint import CheckpointError, checkpoint_info, load, save
from .ops import *

__version__ = "0.1.0"

# Keep freed multi-megabyte arrays mapped between training steps (glibc; opt out with
# NEEDLE_MALLOC_TUNING=0): see needle/backend/allocator.py for what and why.
tune_malloc()
