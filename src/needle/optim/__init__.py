"""needle.optim: optimizers, gradient clipping and learning-rate schedules."""

from . import lr_scheduler
from .adam import Adam, AdamW, adam_update
from .clip import clip_grad_norm
from .optimizer import Optimizer, coupled_weight_decay, decoupled_weight_decay
from .sgd import SGD, sgd_update

__all__ = [
    "SGD", "Adam", "AdamW", "Optimizer", "adam_update", "clip_grad_norm",
    "coupled_weight_decay", "decoupled_weight_decay", "lr_scheduler", "sgd_update",
]
