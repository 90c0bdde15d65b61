"""CIFAR-10/100 from the extracted "python version" folder (pickle batches), downloaded on request.

The pickle batches are read here rather than through torchvision.datasets.CIFAR10 because the
latter insists on the md5 of the official files; reading the format directly lets hand-placed or
test-written folders take the exact code path users run. Downloading, verifying (md5 of the
archive) and extracting are done by data.download.fetch.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from data.arrays import Arrays, DataError
from data.download import Archive, fetch


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant lives on disk and which pickle keys hold its labels and names."""

    title: str
    folder: str
    url: str
    archive_md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str

    @property
    def files(self) -> tuple[str, ...]:
        """Every file the extracted folder must contain."""
        return (*self.train_files, *self.test_files, self.meta_file)


CIFAR10 = CifarLayout(
    title="CIFAR-10",
    folder="cifar-10-batches-py",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    archive_md5="c58f30108f718f92721af3b95e74349a",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    meta_file="batches.meta",
    label_key="labels",
    names_key="label_names",
)
CIFAR100 = CifarLayout(
    title="CIFAR-100",
    folder="cifar-100-python",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    archive_md5="eb9058c3a382ffc7106e4002c42a8d85",
    train_files=("train",),
    test_files=("test",),
    meta_file="meta",
    label_key="fine_labels",
    names_key="fine_label_names",
)


def _one_line(exc: BaseException) -> str:
    """Exception text squeezed onto one line (messages of DataError stay single-line)."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _expected(layout: CifarLayout) -> str:
    if layout is CIFAR10:
        return "data_batch_1..5, test_batch, batches.meta"
    return ", ".join(layout.files)


def check_extracted(layout: CifarLayout, folder: Path) -> str | None:
    """None if the extracted folder holds every batch file of layout, else what is missing."""
    missing = [f for f in layout.files if not (folder / f).is_file()]
    if missing:
        return f"lacks {', '.join(missing)} in {layout.folder}"
    return None


def archive(layout: CifarLayout) -> Archive:
    """The official archive of layout for data.download.fetch, checked by its md5."""
    return Archive(
        title=layout.title,
        url=layout.url,
        filename=Path(layout.url).name,
        folder=layout.folder,
        contents=_expected(layout),
        md5=layout.archive_md5,
        check=partial(check_extracted, layout),
    )


CIFAR10_ARCHIVE = archive(CIFAR10)
CIFAR100_ARCHIVE = archive(CIFAR100)


# The only globals a CIFAR python-version file may name: numpy's array, dtype and scalar
# rebuilders, under numpy 1.x (numpy.core) and 2.x (numpy._core) paths. The official files are
# Python 2 pickles that use _reconstruct/ndarray/dtype; pickle protocol 4 (Python 3 default up to
# 3.13) does the same, protocol 5 (default from 3.14) rebuilds arrays through _frombuffer, and
# numpy scalars go through scalar. Names map to the objects directly, so nothing is imported
# while loading (and numpy 2 does not warn about the numpy.core alias).
_RECONSTRUCT = np.empty(0).__reduce__()[0]
_SCALAR = np.float64(0).__reduce__()[0]
_FROMBUFFER = np.empty(1).__reduce_ex__(5)[0]
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{
        (f"{core}.multiarray", name): obj
        for core in ("numpy.core", "numpy._core")
        for name, obj in (("_reconstruct", _RECONSTRUCT), ("scalar", _SCALAR))
    },
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
}


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global outside _ALLOWED_GLOBALS."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.qualname = f"{module}.{name}"


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that builds only dicts, lists, str/bytes, numbers and numpy arrays/dtypes.

    Every class or function a pickle names goes through find_class, so refusing all but the numpy
    rebuilders means a planted batch file cannot run code (the weights_only=True stance).
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(module, name) from None


def _unpickle(path: Path, layout: CifarLayout) -> dict[str, Any]:
    """Load one pickle file with str keys (the official files are Python 2 pickles)."""
    fix = f"delete {path.parent} to download it again (downloads are on unless --no-download)"
    try:
        with open(path, "rb") as f:
            # latin1 decodes the Python 2 pickles (numpy arrays included), as torchvision does.
            entry = _CifarUnpickler(f, encoding="latin1").load()
    except _RefusedGlobal as exc:
        # repr keeps a crafted name (newlines, control characters) on one line.
        raise DataError(
            f"{path} is not a plain {layout.title} pickle: refused to load the global "
            f"{exc.qualname[:200]!r} (only dicts, lists, strings, numbers and numpy arrays are "
            f"allowed, as in the official files); delete {path.parent} and re-extract the "
            "official archive (downloads are on unless --no-download)"
        ) from None
    except Exception as exc:  # any unpickling failure means a damaged or foreign file
        raise DataError(
            f"{path} is not a readable {layout.title} pickle ({_one_line(exc)}); {fix}"
        ) from exc
    if not isinstance(entry, dict):
        raise DataError(f"{path} holds a {type(entry).__name__}, not a {layout.title} dict; {fix}")
    # Files written by Python 3 with bytes keys (b"data") read the same as the official ones.
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}


def _read_batch(path: Path, layout: CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (uint8 N x 32 x 32 x 3 HWC images, int64 labels)."""
    entry = _unpickle(path, layout)
    fix = f"delete {path.parent} to download it again (downloads are on unless --no-download)"
    for key in ("data", layout.label_key):
        if key not in entry:
            raise DataError(f"{path} has no '{key}' entry; {fix}")
    data = np.asarray(entry["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(
            f"{path} 'data' is {data.dtype} {data.shape}, expected uint8 N x 3072; {fix}"
        )
    labels = np.asarray(entry[layout.label_key], dtype=np.int64)
    if labels.shape != (len(data),):
        raise DataError(f"{path} has {len(labels)} labels for {len(data)} images; {fix}")
    # Rows are CHW-flattened (1024 red, 1024 green, 1024 blue values); the project keeps HWC.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _read_split(
    folder: Path, files: tuple[str, ...], layout: CifarLayout
) -> tuple[np.ndarray, ...]:
    batches = [_read_batch(folder / name, layout) for name in files]
    images = np.ascontiguousarray(np.concatenate([b[0] for b in batches]))
    return images, np.concatenate([b[1] for b in batches])


def load_cifar(layout: CifarLayout, root: str | Path, *, download: bool = False) -> Arrays:
    """Read an extracted CIFAR python folder under root (downloading it first if asked)."""
    root = Path(root).expanduser()
    folder = root / layout.folder
    if download and not folder.exists():
        fetch(archive(layout), root)
    missing = [f for f in layout.files if not (folder / f).is_file()]
    if missing:
        # A folder that exists is never overwritten by a download: it has to go first.
        fix = (
            f"delete {folder} to download it again (downloads are on unless --no-download)"
            if folder.exists()
            else "drop --no-download to download it, or run the smoke search (--smoke, the "
            "bundled digits)"
        )
        raise DataError(
            f"{layout.title} not found under {folder} (expected {_expected(layout)}; missing "
            f"{', '.join(missing)}); {fix}, or place the extracted python version there by hand "
            f"from {layout.url}"
        )
    train_images, train_labels = _read_split(folder, layout.train_files, layout)
    test_images, test_labels = _read_split(folder, layout.test_files, layout)
    meta = _unpickle(folder / layout.meta_file, layout)
    if layout.names_key not in meta:
        raise DataError(
            f"{folder / layout.meta_file} has no '{layout.names_key}' entry; delete {folder} to "
            "download it again (downloads are on unless --no-download)"
        )
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[layout.names_key]]
    top = int(max(train_labels.max(initial=-1), test_labels.max(initial=-1)))
    if top >= len(classes):
        raise DataError(
            f"{folder} has label {top} but only {len(classes)} class names in "
            f"{layout.meta_file}; delete {folder} to download it again (downloads are on "
            "unless --no-download)"
        )
    return Arrays(train_images, train_labels, test_images, test_labels, classes, "cifar", 32)
