"""load_arrays: every supported data set, by name, as host-side uint8 HWC arrays."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from data.arrays import (
    MAX_CLASSES,
    Arrays,
    DataError,
    check_images,
    check_labels,
    holdout_split,
)
from data.cifar import CIFAR10, CIFAR100, load_cifar
from data.files import available_memory, not_a_regular_file
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


NPZ_KEYS = ("images", "labels", "test_images", "test_labels", "classes")


def check_npz_sizes(z: np.lib.npyio.NpzFile, path: Path, keys: list[str]) -> None:
    """DataError before any array is read when a member's header asks for more bytes than
    the member holds (a damaged or forged header), or the arrays need more memory than this
    machine has: the sizes come from the headers, not from reading the data."""
    need = 0
    for key in keys:
        try:
            info = z.zip.getinfo(f"{key}.npy")
            with z.zip.open(info) as f:
                version = np.lib.format.read_magic(f)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read(f)
        except Exception as exc:  # noqa: BLE001 - any damage to the header
            raise DataError(f"{path} has a damaged array '{key}' ({_reason(exc)}); write the "
                            f"file again ({NPZ_FORMAT})") from exc
        if dtype.hasobject:
            continue  # refused when read: object arrays need pickle
        size = math.prod(shape) * dtype.itemsize
        if size > info.file_size:
            raise DataError(f"{path} array '{key}' declares shape {shape} ({size:,} bytes) but "
                            f"holds {info.file_size:,}; write the file again ({NPZ_FORMAT})")
        need += size
    free = available_memory()
    if free is not None and need > free:
        raise DataError(f"{path} needs {need / 2**30:.1f} GB of memory to load, and this "
                        f"machine has {free / 2**30:.1f} GB available; use a smaller file or "
                        "a larger machine")


def load_npz(path: str | Path | None = None, *, image_size: int | None = None) -> Arrays:
    """A user .npz file; without test_images/test_labels a fixed 20% test split is held out."""
    if path is None:
        raise DataError(f"the npz data set needs path pointing at a .npz file; {NPZ_FORMAT}")
    path = Path(path).expanduser()
    problem = not_a_regular_file(path)
    if problem:
        raise DataError(f"{path} {problem}; point path at a .npz file ({NPZ_FORMAT})")
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
        check_npz_sizes(z, path, [k for k in NPZ_KEYS if k in keys])
        try:
            arrays = {
                k: z[k]
                for k in NPZ_KEYS
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
        names = np.asarray(arrays["classes"]).reshape(-1)
        if len(names) > MAX_CLASSES:
            raise DataError(f"{path} key 'classes' names {len(names):,} classes, more than "
                            f"{MAX_CLASSES:,}; save one name per class")
        # Names saved as bytes (numpy's S dtype) are text, not "b'cat'".
        classes = [c.decode("utf-8", "replace") if isinstance(c, bytes) else str(c)
                   for c in names.tolist()]
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
