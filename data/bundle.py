"""build_data: a named data set -> train / val / test DeviceLoaders on the training device."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.arrays import Arrays, check_splits, split_indices
from data.loader import DeviceLoader
from data.sources import load_arrays

# The customary published per-channel statistics of the full training sets. Fixed constants
# keep normalisation identical across val_fraction/split_seed choices and across papers' code.
NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagewoof": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's
}
AUGMENT_BY_STEM = {"cifar": "crop_flip", "imagenet": "rrc_flip"}


@dataclass
class DataBundle:
    """The three loaders of one run and what the model needs to know about the data."""

    train: DeviceLoader
    val: DeviceLoader
    test: DeviceLoader
    num_classes: int
    classes: list[str]
    stem: str
    image_size: int
    name: str
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...], ...]:
    """Per-channel mean and std (in 0..1 units) of uint8 N x H x W x C images, chunked."""
    c = images.shape[-1]
    total, sq, count = np.zeros(c), np.zeros(c), 0
    # Chunks bound the float64 temporaries to a few hundred MB even for large sets.
    for lo in range(0, len(images), chunk):
        part = images[lo : lo + chunk].reshape(-1, c).astype(np.float64) / 255.0
        total += part.sum(0)
        sq += np.square(part).sum(0)
        count += len(part)
    if count == 0:
        return (0.5,) * c, (0.25,) * c
    mean = total / count
    std = np.sqrt(np.maximum(sq / count - mean**2, 0.0))
    # A constant channel would divide by zero; leave its scale alone instead.
    std = np.where(std < 1e-6, 1.0, std)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _to_device(images: np.ndarray, labels: np.ndarray, device: torch.device) -> tuple:
    return (
        torch.from_numpy(np.ascontiguousarray(images)).to(device),
        torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)).to(device),
    )


def build_data(
    name: str,
    root: str | Path = "./datasets",
    *,
    batch_size: int = 128,
    eval_batch_size: int = 512,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    device: str | torch.device = "cpu",
    download: bool = False,
    **kw: Any,
) -> DataBundle:
    """Load `name`, carve a seeded val split from its training set, put each split on device."""
    # Each split is stored on the device once, as uint8. The test split is the data set's own
    # (or its fixed holdout, see data.arrays.TEST_SPLIT_SEED) and never depends on split_seed.
    arrays: Arrays = load_arrays(name, root, download=download, **kw)
    check_splits(arrays, val_fraction, split_seed, name=name)
    device = torch.device(device)
    train_idx, val_idx = split_indices(len(arrays.train_labels), val_fraction, split_seed)
    # Index on the host so the device only ever holds each split once (no full-set copy).
    train_x, train_y = arrays.train_images[train_idx], arrays.train_labels[train_idx]
    val_x, val_y = arrays.train_images[val_idx], arrays.train_labels[val_idx]
    if name in NORMALIZATION:
        mean, std = NORMALIZATION[name]
    else:
        mean, std = channel_stats(train_x)
    common = dict(mean=mean, std=std, out_size=arrays.image_size)
    train = DeviceLoader(
        *_to_device(train_x, train_y, device),
        batch_size=batch_size,
        train=True,
        augment=AUGMENT_BY_STEM[arrays.stem],
        **common,
    )
    del train_x  # free the host copy before the next split is staged
    val = DeviceLoader(
        *_to_device(val_x, val_y, device), batch_size=eval_batch_size, train=False, **common
    )
    test = DeviceLoader(
        *_to_device(arrays.test_images, arrays.test_labels, device),
        batch_size=eval_batch_size,
        train=False,
        **common,
    )
    return DataBundle(
        train=train,
        val=val,
        test=test,
        num_classes=arrays.num_classes,
        classes=list(arrays.classes),
        stem=arrays.stem,
        image_size=arrays.image_size,
        name=name,
        mean=tuple(mean),
        std=tuple(std),
    )
