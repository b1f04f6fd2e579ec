"""Data-only checkpoints: ``save(path, **items)`` / ``load(path)``, one atomic .npz file, no pickle.

>>> import needle as ndl
>>> ndl.save("ckpt.npz", model=model, optimizer=opt, epoch=3,
...          rng=ndl.checkpoint.rng_state())                           # doctest: +SKIP
>>> ckpt = ndl.load("ckpt.npz")                                        # doctest: +SKIP
>>> model.load_state_dict(ckpt["model"])                               # doctest: +SKIP
>>> ndl.checkpoint.set_rng_state(ckpt["rng"])                          # doctest: +SKIP
"""

from .api import checkpoint_info, format_info, load, save
from .archive import FORMAT_NAME, FORMAT_VERSION
from .errors import CheckpointError, CheckpointNotFoundError
from .rng import rng_state, set_rng_state

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "CheckpointError", "CheckpointNotFoundError",
           "checkpoint_info", "format_info", "load", "rng_state", "save", "set_rng_state"]
