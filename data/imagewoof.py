"""Imagewoof (fast.ai layout: train/ and val/ folders of JPEGs per wnid) decoded once to a cache.

Every JPEG is decoded once, resized (shorter side to cache_size) and centre-cropped to a square,
and the uint8 result is cached next to the images. Later runs and trials load that array
instead of decoding ~13k JPEGs again; the cache is keyed by cache_size and by the list of image
files with their sizes, so adding, removing or replacing an image rebuilds it.

With download=True and no folder found, the 320-px release is fetched by data.download.fetch,
checked as fastai checks it (file size and md5 of the first MiB; the full-file checksums
published for it differ between releases).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from data.arrays import Arrays, DataError
from data.download import Archive, fetch

URL = "https://s3.amazonaws.com/fast-ai-imageclas/imagewoof2-320.tgz"
FOLDERS = ("imagewoof2-320", "imagewoof2", "imagewoof2-160")
SMALL_FOLDER, SMALL_SIDE = "imagewoof2-160", 160  # the release whose shorter side is 160 px
EXTENSIONS = (".jpeg", ".jpg", ".png")
WNID_NAMES = {
    "n02086240": "Shih-Tzu",
    "n02087394": "Rhodesian ridgeback",
    "n02088364": "beagle",
    "n02089973": "English foxhound",
    "n02093754": "Border terrier",
    "n02096294": "Australian terrier",
    "n02099601": "golden retriever",
    "n02105641": "Old English sheepdog",
    "n02111889": "Samoyed",
    "n02115641": "dingo",
}


def check_extracted(folder: Path) -> str | None:
    """None if folder has train/ and val/, each with exactly the 10 non-empty class folders."""
    for split in ("train", "val"):
        if not (folder / split).is_dir():
            return f"has no {folder.name}/{split} folder"
        found = {p.name for p in (folder / split).iterdir() if p.is_dir()}
        if found != set(WNID_NAMES):
            extra = sorted(found - set(WNID_NAMES))[:3]
            lacking = sorted(set(WNID_NAMES) - found)[:3]
            return (
                f"has {len(found)} class folders in {folder.name}/{split}, not the 10 Imagewoof "
                f"classes (missing {lacking}, unexpected {extra})"
            )
        empty = sorted(w for w in found if not any((folder / split / w).iterdir()))
        if empty:
            return f"has empty class folders in {folder.name}/{split} ({', '.join(empty[:3])})"
    return None


ARCHIVE = Archive(
    title="Imagewoof",
    url=URL,
    filename="imagewoof2-320.tgz",
    folder="imagewoof2-320",
    contents="train/<wnid>/*.JPEG and val/<wnid>/*.JPEG for the 10 Imagewoof classes",
    size=328387740,
    head_md5="7a1fd92672a559a85de76e4810a20c21",
    check=check_extracted,
)


def find_folder(root: Path, path: str | Path | None) -> Path | None:
    """The first candidate folder that holds both train/ and val/, or None."""
    if path is not None:
        candidates = [Path(path).expanduser()]
    else:
        candidates = [root / name for name in FOLDERS] + [root]
    for folder in candidates:
        if (folder / "train").is_dir() and (folder / "val").is_dir():
            return folder
    return None


def _list_split(split_dir: Path, wnids: list[str]) -> list[tuple[Path, int]]:
    """(file, label) for every image under split_dir/<wnid>/, in sorted order."""
    known = {w: i for i, w in enumerate(wnids)}
    files: list[tuple[Path, int]] = []
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        if class_dir.name not in known:
            raise DataError(
                f"{class_dir} is a class folder that {split_dir.parent / 'train'} lacks; "
                "remove it or add the same class to train/"
            )
        images = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in EXTENSIONS)
        files += [(p, known[class_dir.name]) for p in images]
    return files


def _fingerprint(folder: Path, files: list[tuple[Path, int]], cache_size: int) -> str:
    """Hash of cache_size and every image's relative path and byte size."""
    digest = hashlib.sha1(f"cache_size={cache_size}".encode())
    for path, label in files:
        digest.update(f"\n{path.relative_to(folder)}\t{path.stat().st_size}\t{label}".encode())
    return digest.hexdigest()


def _decode(path: Path, size: int) -> np.ndarray:
    """One image -> uint8 size x size x 3: shorter side resized to size, then centre-cropped."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            # draft() lets libjpeg decode at 1/2, 1/4 or 1/8 scale while staying >= size.
            img.draft("RGB", (size, size))
            img = img.convert("RGB")
            w, h = img.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            # PIL's resize filters over the whole footprint, i.e. it antialiases when shrinking.
            img = img.resize((nw, nh), Image.Resampling.BILINEAR)
            left, top = (nw - size) // 2, (nh - size) // 2
            return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
    except OSError as exc:  # PIL.UnidentifiedImageError and truncated files are OSErrors
        raise DataError(
            f"cannot decode {path} ({' '.join(str(exc).split())}); delete or replace the file"
        ) from exc


def _decode_all(files: list[tuple[Path, int]], size: int) -> tuple[np.ndarray, np.ndarray]:
    images = np.empty((len(files), size, size, 3), np.uint8)

    def work(i: int) -> None:
        images[i] = _decode(files[i][0], size)

    # PIL releases the GIL while decoding and resizing, so threads scale with the cores.
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(work, range(len(files))))
    return images, np.array([label for _, label in files], dtype=np.int64)


def _read_cache(cache: Path, fingerprint: str) -> dict[str, np.ndarray] | None:
    """The cached arrays if the cache exists and matches the folder, else None."""
    if not cache.is_file():
        return None
    try:
        with np.load(cache) as z:
            if str(z["fingerprint"]) != fingerprint:
                return None
            return {k: z[k] for k in z.files}
    except Exception:  # a damaged or foreign cache file is simply rebuilt
        return None


def _write_cache(cache: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write the cache atomically (temp file + os.replace) so readers never see half a file."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=cache.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, cache)
    except OSError as exc:  # e.g. a read-only data folder: train anyway, decode again next time
        warnings.warn(f"could not write the Imagewoof cache {cache}: {exc}", stacklevel=3)
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def load_imagewoof(
    root: str | Path,
    *,
    download: bool = False,
    path: str | Path | None = None,
    cache_size: int = 256,
    image_size: int = 224,
) -> Arrays:
    """Imagewoof train (train/) and test (val/) images, decoded once and cached at cache_size."""
    root = Path(root).expanduser()
    if image_size > cache_size:
        raise DataError(
            f"image_size={image_size} is larger than cache_size={cache_size}; raise cache_size "
            "or lower image_size"
        )
    folder = find_folder(root, path)
    if folder is None and download and path is None:
        fetch(ARCHIVE, root)
        folder = find_folder(root, None)
    if folder is None:
        where = Path(path) if path is not None else root / FOLDERS[0]
        # A download never overwrites an existing (incomplete) imagewoof2-320 folder.
        fix = (
            f"delete {where} to download it again (downloads are on unless --no-download)"
            if path is None and where.exists()
            else "drop --no-download to download it, or run the smoke search (--smoke, the "
            "bundled digits)"
        )
        raise DataError(
            f"Imagewoof not found under {where} (expected train/<wnid>/*.JPEG and "
            f"val/<wnid>/*.JPEG); {fix}, or extract {URL} under {root} by hand, or point path at "
            "a folder holding train/ and val/"
        )
    if folder.name == SMALL_FOLDER and cache_size > SMALL_SIDE:
        warnings.warn(
            f"found the 160-px Imagewoof release in {folder}, not imagewoof2-320: its images are "
            f"upsampled to the requested {cache_size} px (cache_size), so they are blurrier than "
            f"the 320-px release; to use that one, move {folder} away (downloads are on "
            f"unless --no-download), or extract {URL} under {root}",
            UserWarning,
            stacklevel=3,
        )
    wnids = sorted(p.name for p in (folder / "train").iterdir() if p.is_dir())
    train_files = _list_split(folder / "train", wnids)
    test_files = _list_split(folder / "val", wnids)
    if not train_files:
        raise DataError(
            f"{folder / 'train'} holds no images (expected train/<wnid>/*.JPEG); check the folder"
        )
    fingerprint = _fingerprint(folder, train_files + test_files, cache_size)
    cache = folder / f"imagewoof-cache-{cache_size}px.npz"
    cached = _read_cache(cache, fingerprint)
    if cached is None:
        train_images, train_labels = _decode_all(train_files, cache_size)
        test_images, test_labels = _decode_all(test_files, cache_size)
        cached = dict(
            train_images=train_images,
            train_labels=train_labels,
            test_images=test_images,
            test_labels=test_labels,
            wnids=np.array(wnids),
            fingerprint=np.array(fingerprint),
        )
        _write_cache(cache, cached)
    classes = [WNID_NAMES.get(w, w) for w in wnids]
    return Arrays(
        cached["train_images"],
        cached["train_labels"].astype(np.int64),
        cached["test_images"],
        cached["test_labels"].astype(np.int64),
        classes,
        "imagenet",
        image_size,
    )
