"""numba ``prange`` loop for the Winograd kernel gradient (kernels/winograd.py
``_chunked_weight_grad``) on numba's TBB layer (backend/parallel_loops.py; imported only
where it runs).

The tiles are cut into ``parts.shape[0]`` chunks of whole blocks, fixed by the shape (chunk
``c`` holds blocks ``n_blocks * c // chunks`` to ``n_blocks * (c + 1) // chunks``); each
chunk is one call of the serial loop numba_winograd.weight_grad_chunk into its own float32
partial ``parts[c]``, which the caller adds up in chunk order: the same bits on any thread
count, and the same as the caller's path without prange (the same chunks, one at a time or
on needle's threads).
"""

from __future__ import annotations

import numba
from numba import prange

from ..backend.parallel_loops import njit_parallel
from . import numba_winograd


def _weight_grad_chunks(gemm, x, g, padding, tiles_h, tiles_w, block, n_tiles, parts,
                        v_buffers, g_buffers, alpha, beta):
    """parts[c] = chunk c's share of dU (numba_winograd.weight_grad_chunk), each chunk on one
    TBB thread with that thread's scratch rows of ``v_buffers`` and ``g_buffers``."""
    chunks = parts.shape[0]
    n_blocks = -(-n_tiles // block)
    for c in prange(chunks):
        first = n_blocks * c // chunks * block
        end = min(n_blocks * (c + 1) // chunks * block, n_tiles)
        thread = numba.get_thread_id()
        numba_winograd.weight_grad_chunk(gemm, x, g, padding, tiles_h, tiles_w, first, end,
                                         block, parts[c], v_buffers[thread], g_buffers[thread],
                                         alpha, beta)


weight_grad = njit_parallel(_weight_grad_chunks)
