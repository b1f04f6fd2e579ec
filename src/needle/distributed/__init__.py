"""needle.distributed: data-parallel training across processes and machines, on MPI.

Launch one process per replica with ``mpirun -n 4 python train.py`` (needs the extra:
``pip install 'needle[distributed]'``). Without ``mpirun`` a program is a world of one and
every call here still works (mpi4py is not imported).

- :func:`init`, :func:`rank`, :func:`world_size`, :func:`barrier`: the process group.
- :func:`all_reduce`, :func:`broadcast`, :func:`all_gather`, :func:`reduce_scatter`:
  collectives on Tensors, registered ops (eager, Session, ``ndl.jit``; differentiable).
- :class:`DistributedDataParallel`: averages gradients across ranks in buckets, overlapped
  with backward.
- :class:`DistributedSampler`: each rank's share of a dataset.
- ``nn.SyncBatchNorm``: BatchNorm with the statistics of the global batch.

Every wait for other ranks has a deadline (``init(timeout=...)``,
``NEEDLE_DISTRIBUTED_TIMEOUT``): a rank that died or hangs makes the others stop with one
line on stderr instead of hanging.
"""

from .collectives import all_gather, all_reduce, broadcast, reduce_scatter
from .comm import abort, barrier, communicator, init, is_initialized, rank, world_size
from .ddp import DistributedDataParallel, broadcast_state
from .sampler import DistributedSampler

__all__ = ["DistributedDataParallel", "DistributedSampler", "abort", "all_gather",
           "all_reduce", "barrier", "broadcast", "broadcast_state", "communicator", "init",
           "is_initialized", "rank", "reduce_scatter", "world_size"]
