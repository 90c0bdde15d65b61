"""Data sets as uint8 arrays, and device-resident loaders that batch and augment on the device.

This package never imports ray, mlflow or optuna, so it can be used and tested alone.
"""

from data.arrays import Arrays, DataError, check_splits, split_indices
from data.bundle import DataBundle, build_data
from data.loader import DeviceLoader
from data.sources import DATASETS, load_arrays

__all__ = [
    "DATASETS",
    "Arrays",
    "DataBundle",
    "DataError",
    "DeviceLoader",
    "build_data",
    "check_splits",
    "load_arrays",
    "split_indices",
]
