"""needle.data: datasets, transforms and the DataLoader (CMU needle's ``needle.data`` and more)."""

from .cifar import CIFAR10Dataset, load_cifar_batch
from .collate import default_collate
from .dataloader import DataLoader
from .datasets import Dataset, ImageDataset, NDArrayDataset
from .digits import DigitsDataset, load_digits_arrays
from .mnist import MNISTDataset, parse_mnist, read_idx
from .safe_pickle import RestrictedUnpickler, safe_load
from .text import Corpus, Dictionary, batchify, get_batch
from .transforms import (
    BatchRandomCrop,
    BatchRandomFlip,
    Compose,
    Normalize,
    RandomCrop,
    RandomFlipHorizontal,
    Transform,
)

__all__ = [
    "BatchRandomCrop", "BatchRandomFlip", "CIFAR10Dataset", "Compose", "Corpus", "DataLoader",
    "Dataset", "Dictionary", "DigitsDataset", "ImageDataset", "MNISTDataset", "NDArrayDataset",
    "Normalize",
    "RandomCrop", "RandomFlipHorizontal", "RestrictedUnpickler", "Transform", "batchify",
    "default_collate", "get_batch", "load_cifar_batch", "load_digits_arrays", "parse_mnist",
    "read_idx", "safe_load",
]
