"""The host-side form of every data set (uint8 HWC arrays) and the seeded splits carved from it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# The held-out test split of sets that ship without one (npz, digits) is drawn with this fixed
# seed, never the run seed, so the test images are the same in every run and every trial.
TEST_SPLIT_SEED = 20240229
TEST_FRACTION = 0.2
MAX_CLASSES = 100_000  # far above any classification set (ImageNet-21k has 21,841)


class DataError(Exception):
    """A user-facing data problem; the message is one line naming the problem and the fix."""


@dataclass
class Arrays:
    """Train and test images (uint8, N x H x W x 3) with int64 labels, as loaded from disk."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str] = field(default_factory=list)
    stem: str = "cifar"
    image_size: int = 32

    @property
    def num_classes(self) -> int:
        """Number of classes (the length of `classes`)."""
        return len(self.classes)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random split of range(n) into sorted (train_idx, val_idx)."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(
            f"val_fraction={val_fraction} is outside [0, 1); pick e.g. 0.1 (or 0 for no "
            "validation split)"
        )
    n_val = int(round(n * val_fraction))
    if n > 0 and n_val >= n:
        raise DataError(
            f"val_fraction={val_fraction} of {n} training images leaves no training images; "
            "lower val_fraction"
        )
    perm = np.random.default_rng(seed).permutation(n)
    # Sorted so that the validation loader walks images in their on-disk order.
    return np.sort(perm[n_val:]).astype(np.int64), np.sort(perm[:n_val]).astype(np.int64)


def holdout_split(
    labels: np.ndarray, fraction: float = TEST_FRACTION
) -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified (train_idx, test_idx) for sets without a test split (seed never varies)."""
    rng = np.random.default_rng(TEST_SPLIT_SEED)
    test: list[np.ndarray] = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        # Stratified so every class keeps ~the same share in both splits, even in tiny sets.
        test.append(rng.permutation(members)[: int(round(len(members) * fraction))])
    test_idx = np.sort(np.concatenate(test)) if test else np.zeros(0, np.int64)
    train_mask = np.ones(len(labels), bool)
    train_mask[test_idx] = False
    return np.flatnonzero(train_mask).astype(np.int64), test_idx.astype(np.int64)


def check_splits(arrays: Arrays, val_fraction: float, split_seed: int, *, name: str,
                 need_val: bool = False, need_test: bool = False) -> None:
    """DataError, before any training, when the training split of `arrays` would be empty or
    a class would keep no training image. A search chooses on validation accuracy and tests
    what it chose (`need_val`, `need_test`): an empty validation or test split would fail
    every trial; one training run may leave them empty on purpose (--val-fraction 0)."""
    n = len(arrays.train_labels)
    train_idx, val_idx = split_indices(n, val_fraction, split_seed)
    if len(train_idx) == 0:
        raise DataError(f"{name} has no training image; add images")
    if need_val and len(val_idx) == 0:
        least = 1.0 / n if n else 1.0
        raise DataError(f"val_fraction {val_fraction} of the {n} training images of {name} "
                        "leaves no validation image, and a search chooses every trial on its "
                        f"validation accuracy; pass a val_fraction of at least {least:.3g}")
    if need_test and len(arrays.test_labels) == 0:
        raise DataError(f"{name} has no test image; add images (sets without a test split "
                        f"hold out {TEST_FRACTION:.0%} of each class)")
    present = np.unique(arrays.train_labels[train_idx])
    if len(present) < arrays.num_classes:
        missing = np.setdiff1d(np.arange(arrays.num_classes), present)
        shown = ", ".join(str(int(c)) for c in missing[:5]) + (", ..." if len(missing) > 5
                                                               else "")
        raise DataError(f"with val_fraction {val_fraction} and split_seed {split_seed}, class(es) "
                        f"{shown} of {name} keep no training image (they went to validation); "
                        "lower val_fraction, change split_seed, or add images of them")


def check_images(images: np.ndarray, what: str, fix: str) -> None:
    """Raise DataError unless `images` is uint8 N x H x W x 3 (the layout all code expects)."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        dtype = getattr(images, "dtype", type(images).__name__)
        raise DataError(f"{what} has dtype {dtype}, expected uint8 N x H x W x 3; {fix}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(
            f"{what} has shape {images.shape}, expected uint8 N x H x W x 3 (channels last); {fix}"
        )


def check_labels(labels: np.ndarray, n: int, what: str, fix: str) -> np.ndarray:
    """Return `labels` as int64 after checking it is 1-D, integer, non-negative and of length n."""
    if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "iu":
        dtype = getattr(labels, "dtype", type(labels).__name__)
        raise DataError(f"{what} has dtype {dtype}, expected integers of shape ({n},); {fix}")
    if labels.shape != (n,):
        raise DataError(f"{what} has shape {labels.shape}, expected ({n},) integers; {fix}")
    if n and labels.min() < 0:
        raise DataError(f"{what} holds negative labels, expected class indices 0..K-1; {fix}")
    if n and labels.max() >= MAX_CLASSES:
        # Checked before anything is made per class: one label of 10**12 would otherwise
        # ask for 10**12 class names.
        raise DataError(f"{what} holds the label {int(labels.max())}, but labels are class "
                        f"indices 0..K-1 with K at most {MAX_CLASSES:,}; {fix}")
    return labels.astype(np.int64)
