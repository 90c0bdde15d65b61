"""load_arrays: every supported data set, by name, as host-side uint8 HWC arrays."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from data.arrays import Arrays, DataError, check_images, check_labels, holdout_split
from data.cifar import CIFAR10, CIFAR100, load_cifar
from data.imagewoof import load_imagewoof

DATASETS = ("cifar10", "cifar100", "imagewoof", "npz", "digits")

# Images up to this side are treated as CIFAR-like (3x3 stem, pad-crop); larger as ImageNet-like.
CIFAR_STEM_MAX_SIZE = 64

NPZ_FORMAT = (
    "save it with numpy.savez(path, images=uint8 N x H x W x 3, labels=int N, "
    "[classes=str K], [test_images=..., test_labels=...])"
)


def _with_holdout(
    images: np.ndarray, labels: np.ndarray, classes: list[str], stem: str, image_size: int
) -> Arrays:
    """Arrays whose test split is the fixed 20% holdout (data.arrays.TEST_SPLIT_SEED)."""
    train_idx, test_idx = holdout_split(labels)
    return Arrays(
        images[train_idx],
        labels[train_idx],
        images[test_idx],
        labels[test_idx],
        classes,
        stem,
        image_size,
    )


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:120]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def check_classes(
    labels: np.ndarray, test_labels: np.ndarray | None, num_classes: int, path: Path
) -> None:
    """DataError unless the training labels use every class 0..K-1 (a head of K outputs) and
    the test labels only classes seen in training; a warning for a one-class set."""
    present = np.unique(labels)
    if len(present) == 0:
        raise DataError(f"{path} has no training images; {NPZ_FORMAT}")
    missing = np.setdiff1d(np.arange(num_classes), present)
    if len(missing):
        shown = ", ".join(str(int(c)) for c in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DataError(
            f"{path} key 'labels' leaves classes {shown} of 0..{num_classes - 1} without a "
            f"training image ({len(present)} distinct labels, largest {int(present[-1])}); "
            "number the classes densely 0..K-1 (e.g. labels = np.unique(labels, "
            "return_inverse=True)[1]), and name only those in 'classes'"
        )
    if test_labels is not None:
        unseen = np.setdiff1d(np.unique(test_labels), present)
        if len(unseen):
            shown = ", ".join(str(int(c)) for c in unseen[:5])
            raise DataError(
                f"{path} key 'test_labels' holds classes never seen in training ({shown}); "
                "drop those test images, or add training images of those classes"
            )
    if num_classes == 1:
        warnings.warn(
            f"{path} has a single class ({len(labels)} images of label 0): every prediction is "
            "right, so accuracy says nothing; add images of other classes",
            UserWarning,
            stacklevel=3,
        )


def load_npz(path: str | Path | None = None, *, image_size: int | None = None) -> Arrays:
    """A user .npz file; without test_images/test_labels a fixed 20% test split is held out."""
    if path is None:
        raise DataError(f"the npz data set needs path pointing at a .npz file; {NPZ_FORMAT}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path} not found; point path at a .npz file ({NPZ_FORMAT})")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as exc:  # not a zip, truncated, a pickle, ...
        raise DataError(
            f"{path} is not a readable .npz file ({type(exc).__name__}); {NPZ_FORMAT}"
        ) from exc
    with z:
        keys = set(z.files)
        for key in ("images", "labels"):
            if key not in keys:
                raise DataError(f"{path} has no '{key}' array (found {sorted(keys)}); {NPZ_FORMAT}")
        if ("test_images" in keys) != ("test_labels" in keys):
            raise DataError(
                f"{path} has only one of 'test_images'/'test_labels'; save both or neither"
            )
        try:
            arrays = {
                k: z[k]
                for k in ("images", "labels", "test_images", "test_labels", "classes")
                if k in keys
            }
        except ValueError as exc:  # object arrays need pickle, which is refused on purpose
            if "pickle" not in str(exc).lower():  # a damaged header, not an object array
                raise DataError(
                    f"{path} has a damaged array ({_reason(exc)}); write the file again "
                    f"({NPZ_FORMAT})"
                ) from exc
            raise DataError(
                f"{path} holds an object array ({exc}); save classes as np.array(list_of_str) "
                "and images/labels as numeric arrays"
            ) from exc
        except Exception as exc:  # a bad CRC, a truncated or undecompressable member, ...
            raise DataError(
                f"{path} has a damaged array ({_reason(exc)}); write the file again "
                f"({NPZ_FORMAT})"
            ) from exc
    images = arrays["images"]
    check_images(images, f"{path} key 'images'", NPZ_FORMAT)
    labels = check_labels(arrays["labels"], len(images), f"{path} key 'labels'", NPZ_FORMAT)
    if "test_images" in arrays:
        test_images = arrays["test_images"]
        check_images(test_images, f"{path} key 'test_images'", NPZ_FORMAT)
        if test_images.shape[1:] != images.shape[1:]:
            raise DataError(
                f"{path} key 'test_images' has images of shape {test_images.shape[1:]} but "
                f"'images' has {images.shape[1:]}; save both at the same size"
            )
        test_labels = check_labels(
            arrays["test_labels"], len(test_images), f"{path} key 'test_labels'", NPZ_FORMAT
        )
    else:
        test_images = test_labels = None
    if "classes" in arrays:
        classes = [str(c) for c in np.asarray(arrays["classes"]).reshape(-1)]
        top = max(int(labels.max(initial=-1)),
                  -1 if test_labels is None else int(test_labels.max(initial=-1)))
        if top >= len(classes):
            raise DataError(
                f"{path} key 'classes' names {len(classes)} classes but the labels reach {top}; "
                "save one name per class"
            )
    else:
        classes = [str(i) for i in range(int(labels.max(initial=-1)) + 1)]
    check_classes(labels, test_labels, len(classes), path)
    side = min(images.shape[1], images.shape[2])
    image_size = side if image_size is None else int(image_size)
    if not 0 < image_size <= side:
        raise DataError(
            f"image_size={image_size} does not fit the {side}-px images of {path}; "
            f"pick image_size <= {side}"
        )
    stem = "cifar" if side <= CIFAR_STEM_MAX_SIZE else "imagenet"
    if test_images is None:
        return _with_holdout(images, labels, classes, stem, image_size)
    return Arrays(images, labels, test_images, test_labels, classes, stem, image_size)


def load_digits_arrays() -> Arrays:
    """sklearn's bundled 8x8 digits, scaled to uint8, upsampled to 32x32 RGB, fixed 20% test."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are 0..16; stretch them to the 0..255 range of real images.
    x = torch.from_numpy(digits.images.astype(np.float32) * (255.0 / 16.0))[:, None]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    gray = x.round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()
    images = np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=-1))
    labels = digits.target.astype(np.int64)
    return _with_holdout(images, labels, [str(i) for i in range(10)], "cifar", 32)


def load_arrays(name: str, root: str | Path, *, download: bool = False, **kw: Any) -> Arrays:
    """Load data set `name` (one of DATASETS) from root; kw are the set's own options."""
    # Options left at None are dropped, so callers can pass one generic set of options.
    kw = {k: v for k, v in kw.items() if v is not None}
    allowed = {
        "cifar10": set(),
        "cifar100": set(),
        "imagewoof": {"path", "cache_size", "image_size"},
        "npz": {"path", "image_size"},
        "digits": set(),
    }
    if name not in allowed:
        raise DataError(f"unknown data set '{name}'; choose one of {', '.join(DATASETS)}")
    unknown = sorted(set(kw) - allowed[name])
    if unknown:
        raise DataError(
            f"data set '{name}' takes no option(s) {', '.join(unknown)}; allowed: "
            f"{', '.join(sorted(allowed[name])) or 'none'}"
        )
    if name == "cifar10":
        return load_cifar(CIFAR10, root, download=download)
    if name == "cifar100":
        return load_cifar(CIFAR100, root, download=download)
    if name == "imagewoof":
        return load_imagewoof(root, download=download, **kw)
    if name == "npz":
        return load_npz(**kw)
    return load_digits_arrays()
