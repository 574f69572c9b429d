"""Data layer: IDX / CIFAR / ImageFolder readers, in-memory ImageDataset, deterministic loaders."""
from .catalog import DATASETS, SPLIT_SEED, Splits, list_datasets, load, load_splits
from .datasets import ImageDataset
from .errors import DatasetError
from .idx import read_idx
from .loader import BatchLoader, EpochLoader, TorchLoader, as_loader
from .transforms import Augment

__all__ = [
    "DATASETS",
    "Augment",
    "BatchLoader",
    "DatasetError",
    "EpochLoader",
    "ImageDataset",
    "TorchLoader",
    "as_loader",
    "list_datasets",
    "load",
    "load_splits",
    "SPLIT_SEED",
    "read_idx",
    "Splits",
]
