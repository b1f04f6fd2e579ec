"""The process group: who we are (rank, world size) and the collectives on NumPy arrays.

One communicator per process, as MPI has one world per process: :func:`init` makes it. A
process started without a launcher (no ``mpirun``) is a world of one and never imports mpi4py
(cheap, and needle works without the ``distributed`` extra). Under ``mpirun`` the world is
MPI's ``COMM_WORLD`` through mpi4py.

Every wait has a deadline: a collective that does not complete within ``timeout`` seconds
(a rank died, hangs, or took another branch) prints one line naming the rank and the
collective on stderr and aborts the whole job (``MPI_Abort``), so no rank hangs forever.
Waiting polls ``Request.Test()``, which also drives Open MPI's progress of non-blocking
collectives (it has no progress thread).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from typing import Any

import numpy as np

from ..backend import cpu_threads
from ..core import context

#: environment variables the common MPI launchers set in every process they start
_LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "PMI_RANK",
                  "MPI_LOCALNRANKS", "MV2_COMM_WORLD_SIZE")
#: seconds a collective may wait for the other ranks (NEEDLE_DISTRIBUTED_TIMEOUT overrides)
DEFAULT_TIMEOUT = 300.0

#: seconds a wait polls without sleeping (sleep(0) yields the core) before backing off
_SPIN_SECONDS = 0.05

EXTRA_HINT = "pip install 'needle[distributed]' (mpi4py and Open MPI)"


def launched_by_mpi() -> bool:
    """Whether an MPI launcher (``mpirun``, ``mpiexec``, ``srun --mpi``) started this process."""
    return any(name in os.environ for name in _LAUNCHER_VARS)


def import_mpi() -> Any:
    """mpi4py's ``MPI`` module, or one ImportError naming the extra to install."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(f"needle.distributed needs mpi4py under mpirun: {EXTRA_HINT} "
                          f"({exc})") from None
    return MPI


class LocalCommunicator:
    """A world of one process: every collective returns its input's values."""

    rank = 0
    size = 1
    timeout = DEFAULT_TIMEOUT

    def allreduce(self, array: Any, op: str = "sum") -> Any:
        return np.array(array, copy=True)

    def iallreduce(self, buffer: Any) -> Any:
        return _DoneRequest()

    def broadcast(self, array: Any, root: int = 0) -> Any:
        _check_root(root, 1)
        return np.array(array, copy=True)

    def reduce(self, array: Any, root: int = 0) -> Any:
        _check_root(root, 1)
        return np.array(array, copy=True)

    def allgather(self, array: Any) -> Any:
        return np.array(array, copy=True)

    def reduce_scatter(self, array: Any) -> Any:
        return np.array(array, copy=True)

    def barrier(self) -> None:
        return None

    def wait(self, request: Any, what: str = "") -> None:
        return None

    def allreduce_object_sum(self, values: list[float]) -> list[float]:
        return list(values)

    def abort(self, message: str, code: int = 1) -> None:
        raise RuntimeError(message)


class _DoneRequest:
    """A request that is already complete (a world of one)."""

    def Test(self) -> bool:  # noqa: N802 - MPI's name
        return True


def _check_root(root: int, size: int) -> None:
    if not 0 <= int(root) < size:
        raise ValueError(f"needle.distributed: root {root} is not a rank of a world of {size}")


class MPICommunicator:
    """MPI's ``COMM_WORLD``: blocking collectives are non-blocking ones waited on with a
    deadline."""

    def __init__(self, timeout: float) -> None:
        self.MPI = import_mpi()
        self.comm = self.MPI.COMM_WORLD
        self.rank = int(self.comm.Get_rank())
        self.size = int(self.comm.Get_size())
        self.timeout = float(timeout)
        self._ops = {"sum": self.MPI.SUM, "max": self.MPI.MAX, "min": self.MPI.MIN}

    # -- waiting with a deadline -------------------------------------------------------------
    def wait(self, request: Any, what: str = "a collective") -> None:
        """Wait for ``request``; past the deadline print one line and abort the job."""
        if request.Test():
            return
        start = time.monotonic()
        deadline = start + self.timeout
        # each Test() moves the collective's next round along: poll hard (yielding the core
        # to the other ranks) for a while, then back off to a millisecond between polls
        spin_until = start + _SPIN_SECONDS
        delay = 0.0
        while not request.Test():
            now = time.monotonic()
            if now > deadline:
                self.abort(f"needle.distributed: rank {self.rank} of {self.size}: {what} did "
                           f"not complete within {self.timeout:g} s: another rank failed, "
                           "hangs, or did not call the same collectives; aborting the job")
            if now > spin_until:
                delay = min(max(delay * 2, 1e-5), 1e-3)
            time.sleep(delay)

    def abort(self, message: str, code: int = 1) -> None:
        """Print ``message`` on stderr and end every rank of the job."""
        sys.stdout.flush()
        print(message, file=sys.stderr, flush=True)
        self.comm.Abort(code)

    # -- collectives -------------------------------------------------------------------------
    def allreduce(self, array: Any, op: str = "sum") -> Any:
        out = np.array(array, copy=True, order="C")
        self.wait(self.comm.Iallreduce(self.MPI.IN_PLACE, out, op=self._ops[op]),
                  f"all_reduce({op}) of {out.shape} {out.dtype}")
        return out

    def iallreduce(self, buffer: Any) -> Any:
        """Start summing the contiguous ``buffer`` in place across ranks; returns the request."""
        return self.comm.Iallreduce(self.MPI.IN_PLACE, buffer, op=self.MPI.SUM)

    def broadcast(self, array: Any, root: int = 0) -> Any:
        _check_root(root, self.size)
        out = np.array(array, copy=True, order="C")
        self.wait(self.comm.Ibcast(out, root=int(root)),
                  f"broadcast of {out.shape} {out.dtype} from rank {root}")
        return out

    def reduce(self, array: Any, root: int = 0) -> Any:
        """The sum over ranks on ``root``; zeros elsewhere."""
        _check_root(root, self.size)
        send = np.ascontiguousarray(array)
        out = np.zeros_like(send)
        self.wait(self.comm.Ireduce(send, out, op=self.MPI.SUM, root=int(root)),
                  f"reduce of {send.shape} {send.dtype} to rank {root}")
        return out

    def allgather(self, array: Any) -> Any:
        """Every rank's array, concatenated along axis 0 in rank order."""
        send = np.ascontiguousarray(array)
        out = np.empty((send.shape[0] * self.size, *send.shape[1:]), dtype=send.dtype)
        self.wait(self.comm.Iallgather(send, out), f"all_gather of {send.shape} {send.dtype}")
        return out

    def reduce_scatter(self, array: Any) -> Any:
        """The sum over ranks of ``array``, of which this rank keeps its block of axis 0."""
        send = np.ascontiguousarray(array)
        if send.ndim == 0 or send.shape[0] % self.size:
            raise ValueError(f"reduce_scatter: axis 0 of shape {send.shape} does not split "
                             f"into {self.size} equal blocks (one per rank)")
        block = send.shape[0] // self.size
        out = np.empty((block, *send.shape[1:]), dtype=send.dtype)
        self.wait(self.comm.Ireduce_scatter_block(send, out, op=self.MPI.SUM),
                  f"reduce_scatter of {send.shape} {send.dtype}")
        return out

    def barrier(self) -> None:
        self.wait(self.comm.Ibarrier(), "barrier")

    def allreduce_object_sum(self, values: list[float]) -> list[float]:
        """Sums of a few Python numbers over ranks (float64)."""
        return [float(v) for v in self.allreduce(np.asarray(values, dtype=np.float64))]


# The process's communicator: one per process, as MPI's world is (not per thread).
_WORLD: list[Any] = []


def _stopped_by_launcher(signum: int, frame: Any) -> None:
    """SIGTERM from mpirun (another rank died): one clear line, then exit."""
    comm = _WORLD[0] if _WORLD else None
    where = f"rank {comm.rank} of {comm.size}" if comm is not None else "this rank"
    print(f"needle.distributed: {where}: stopped by the launcher (SIGTERM): another rank "
          "failed; see its error above", file=sys.stderr, flush=True)
    os._exit(1)


#: variables by which a user sets thread counts: when one is set, share_cpus leaves them be
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "NEEDLE_NUM_THREADS")


def share_cpus() -> int:
    """With several ranks on this machine, give each its share of the CPUs: needle's op
    threads and BLAS's (through threadpoolctl, where installed). Returns the share.

    Measured: 3 ranks on 2 cores, each with OpenBLAS's default pool (whose workers spin
    after every product), took 1-3 s for an 8-layer MLP's backward that takes 20 ms with
    one BLAS thread each. A thread count set by the user (``OMP_NUM_THREADS``,
    ``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS``, ``NEEDLE_NUM_THREADS``) is left alone.
    """
    local = 1
    for name in ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_LOCAL_SIZE"):
        if os.environ.get(name, "").isdigit():
            local = int(os.environ[name])
            break
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)
    share = max(1, cpus // max(local, 1))
    if local <= 1 or any(os.environ.get(name) for name in _THREAD_VARS):
        return cpus
    cpu_threads.NUM_THREADS = min(cpu_threads.NUM_THREADS, share)
    control = cpu_threads.blas_control()
    if control is not None:
        control.limit(limits=share)  # process-wide, for the rest of the run
    return share


def init(timeout: float | None = None) -> Any:
    """Join the process group (idempotent); returns the communicator.

    Without an MPI launcher this is a world of one (mpi4py is not imported). Under ``mpirun``
    mpi4py must be installed (``needle[distributed]``), and ranks sharing a machine share its
    CPUs (:func:`share_cpus`). ``timeout`` (seconds; default the
    ``NEEDLE_DISTRIBUTED_TIMEOUT`` variable, else 300) bounds every wait for other ranks.
    """
    if timeout is None:
        timeout = float(os.environ.get("NEEDLE_DISTRIBUTED_TIMEOUT", DEFAULT_TIMEOUT))
    if timeout <= 0:
        raise ValueError(f"needle.distributed.init: timeout must be positive, got {timeout}")
    if _WORLD:
        _WORLD[0].timeout = float(timeout)
        return _WORLD[0]
    if launched_by_mpi():
        comm: Any = MPICommunicator(timeout)
        share_cpus()
        if comm.size > 1 and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            with contextlib.suppress(ValueError):  # not the main thread: keep the default
                signal.signal(signal.SIGTERM, _stopped_by_launcher)
    else:
        comm = LocalCommunicator()
        comm.timeout = float(timeout)
    _WORLD.append(comm)
    return comm


def communicator() -> Any:
    """The process's communicator (made by :func:`init` on first use)."""
    return _WORLD[0] if _WORLD else init()


def is_initialized() -> bool:
    """Whether :func:`init` has run in this process."""
    return bool(_WORLD)


def rank() -> int:
    """This process's rank, 0 .. world_size() - 1."""
    return communicator().rank


def world_size() -> int:
    """The number of processes in the group (1 without mpirun)."""
    return communicator().size


def barrier() -> None:
    """Wait until every rank gets here (with the deadline of :func:`init`)."""
    communicator().barrier()


def abort(message: str, code: int = 1) -> None:
    """Print ``message`` and end every rank of the job (raises RuntimeError in a world of 1)."""
    communicator().abort(message, code)


# the core's collective ops reach the communicator through this service (core imports no
# library package)
context.provide("communicator", communicator)

__all__ = ["DEFAULT_TIMEOUT", "LocalCommunicator", "MPICommunicator", "abort", "barrier",
           "communicator", "init", "is_initialized", "launched_by_mpi", "rank", "world_size"]
