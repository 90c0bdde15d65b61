"""Tests for data/: real on-disk formats written small, read back through the users' code path."""

from __future__ import annotations

import io
import math
import os
import pickle
import re
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from data import (
    DATASETS,
    DataBundle,
    DataError,
    DeviceLoader,
    build_data,
    load_arrays,
    split_indices,
)
from data.loader import crop_flip, rrc_flip, rrc_theta

SHARED_NPZ = Path("/work/shared/data/cifar10-train-subset.npz")
CIFAR10_NAMES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def has_device_layout(x: torch.Tensor) -> bool:
    """channels_last on CUDA (where it is fast); plain NCHW elsewhere (see data/loader.py)."""
    fmt = torch.channels_last if x.is_cuda else torch.contiguous_format
    return x.is_contiguous(memory_format=fmt)


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    """HWC images -> the pickle format's CHW-flattened N x 3072 rows."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def write_cifar10(root: Path, per_batch: int = 20) -> dict[str, np.ndarray]:
    """Five train batches, a test batch and batches.meta, pickled with bytes keys (Python 3)."""
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    out: dict[str, list[np.ndarray]] = {"x": [], "y": []}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, per_batch)
        if name == "data_batch_1":
            x[0] = (10, 20, 30)  # distinct channel values pin down HWC vs CHW
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": _cifar_rows(x), b"labels": y.tolist(), b"batch_label": b"b"}, f)
        out["x"].append(x)
        out["y"].append(y)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in CIFAR10_NAMES]}, f)
    return {
        "train_x": np.concatenate(out["x"][:5]),
        "train_y": np.concatenate(out["y"][:5]),
        "test_x": out["x"][5],
        "test_y": out["y"][5],
    }


def write_cifar100(root: Path, n_train: int = 50, n_test: int = 10) -> dict[str, np.ndarray]:
    """train, test and meta files with str keys (as the official Python 2 pickles load)."""
    rng = np.random.default_rng(2)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    arrays = {}
    for name, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 100, n)
        record = {
            "data": _cifar_rows(x),
            "fine_labels": y.tolist(),
            "coarse_labels": (y // 5).tolist(),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(record, f)
        arrays[f"{name}_x"], arrays[f"{name}_y"] = x, y
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)]}, f)
    return arrays


def test_cifar10_round_trip(tmp_path: Path) -> None:
    ref = write_cifar10(tmp_path)
    arrays = load_arrays("cifar10", tmp_path)
    assert arrays.train_images.shape == (100, 32, 32, 3)
    assert arrays.train_images.dtype == np.uint8 and arrays.train_labels.dtype == np.int64
    np.testing.assert_array_equal(arrays.train_images, ref["train_x"])
    np.testing.assert_array_equal(arrays.train_labels, ref["train_y"])
    np.testing.assert_array_equal(arrays.test_images, ref["test_x"])
    np.testing.assert_array_equal(arrays.test_labels, ref["test_y"])
    assert arrays.train_images[0, 5, 7].tolist() == [10, 20, 30]
    assert arrays.classes == CIFAR10_NAMES and arrays.num_classes == 10
    assert (arrays.stem, arrays.image_size) == ("cifar", 32)


def test_cifar100_round_trip(tmp_path: Path) -> None:
    ref = write_cifar100(tmp_path)
    arrays = load_arrays("cifar100", tmp_path)
    np.testing.assert_array_equal(arrays.train_images, ref["train_x"])
    np.testing.assert_array_equal(arrays.train_labels, ref["train_y"])
    np.testing.assert_array_equal(arrays.test_images, ref["test_x"])
    np.testing.assert_array_equal(arrays.test_labels, ref["test_y"])
    assert arrays.num_classes == 100 and arrays.classes[7] == "class7"


@pytest.mark.parametrize(
    "name, folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")]
)
def test_cifar_missing_names_folder_and_fix(tmp_path: Path, name: str, folder: str) -> None:
    with pytest.raises(DataError) as err:
        load_arrays(name, tmp_path)
    message = str(err.value)
    assert str(tmp_path / folder) in message and "--no-download" in message
    assert "\n" not in message


def test_cifar_partial_or_corrupt_folder(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3"):
        load_arrays("cifar10", tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="missing data_batch_3"):
        load_arrays("cifar10", tmp_path)


class _Py2Pickler(pickle._Pickler):
    """Protocol 2 with bytes as Python 2 str opcodes, the shape of the official CIFAR pickles."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj: bytes) -> None:
        n = len(obj)
        short = n < 256
        head = (
            pickle.SHORT_BINSTRING + bytes([n])
            if short
            else pickle.BINSTRING + struct.pack("<i", n)
        )
        self.write(head + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def _dumps(obj: object, style: str) -> bytes:
    if style != "py2":
        return pickle.dumps(obj, protocol=int(style))
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # numpy 1.x module paths, as the official files name them.
    return buf.getvalue().replace(b"cnumpy._core.", b"cnumpy.core.")


@pytest.mark.parametrize("style", ["py2", "4", "5"])
def test_cifar_numpy_batches_load_under_restricted_unpickler(tmp_path: Path, style: str) -> None:
    ref = write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    batch = {
        b"data": _cifar_rows(ref["test_x"]),
        b"labels": [np.int64(v) for v in ref["test_y"]],  # numpy scalars rebuild too
        b"filenames": [b"a.png"] * len(ref["test_y"]),
        b"batch_label": b"testing batch 1 of 1",
    }
    (folder / "test_batch").write_bytes(_dumps(batch, style))
    meta = {b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(_dumps(meta, style))
    arrays = load_arrays("cifar10", tmp_path)
    np.testing.assert_array_equal(arrays.test_images, ref["test_x"])
    np.testing.assert_array_equal(arrays.test_labels, ref["test_y"])
    assert arrays.classes == CIFAR10_NAMES


class _Planted:
    """Pickles as a call that would create marker when unpickled by a plain pickle.load."""

    def __init__(self, marker: Path, how: str) -> None:
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "open":
            return (open, (str(self.marker), "w"))
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("how, refused", [("open", "io.open"), ("touch", "pathlib.Path.touch")])
def test_cifar_refuses_code_in_planted_batch(tmp_path: Path, how: str, refused: str) -> None:
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Planted(control, how)))
    assert control.exists()  # the payload really runs under a plain pickle.load
    ref = write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    marker = tmp_path / "pwned"
    batch = {
        b"data": _cifar_rows(ref["train_x"][:20]),
        b"labels": ref["train_y"][:20].tolist(),
        b"batch_label": _Planted(marker, how),
    }
    (folder / "data_batch_2").write_bytes(pickle.dumps(batch))
    for load in (
        lambda: load_arrays("cifar10", tmp_path),
        lambda: build_data("cifar10", tmp_path, batch_size=16, eval_batch_size=7),
    ):
        with pytest.raises(DataError) as err:
            load()
        message = str(err.value)
        assert "\n" not in message
        assert str(folder / "data_batch_2") in message and refused in message
        assert "refused" in message and "re-extract the official archive" in message
        assert not marker.exists()


def test_build_data_cifar10(tmp_path: Path) -> None:
    ref = write_cifar10(tmp_path)
    bundle = build_data("cifar10", tmp_path, batch_size=16, eval_batch_size=7, val_fraction=0.1)
    assert isinstance(bundle, DataBundle)
    assert (bundle.train.num_samples, bundle.val.num_samples, bundle.test.num_samples) == (
        90,
        10,
        20,
    )
    assert (bundle.num_classes, bundle.stem, bundle.image_size, bundle.name) == (
        10,
        "cifar",
        32,
        "cifar10",
    )
    assert bundle.train.augment == "crop_flip" and len(bundle.train) == 90 // 16
    # The test loader walks the test batch in order, normalised with the CIFAR-10 constants.
    xs, ys = zip(*bundle.test, strict=True)
    mean, std = torch.tensor(bundle.mean), torch.tensor(bundle.std)
    naive = (torch.from_numpy(ref["test_x"]).float() / 255 - mean) / std
    torch.testing.assert_close(torch.cat(xs), naive.permute(0, 3, 1, 2), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(torch.cat(ys).numpy(), ref["test_y"])


def test_unknown_dataset_lists_choices() -> None:
    with pytest.raises(DataError) as err:
        load_arrays("mnist", ".")
    assert all(name in str(err.value) for name in DATASETS)


# ---- Imagewoof -------------------------------------------------------------------------------

WOOF = {"n02086240": (220, 30, 30), "n02099601": (30, 200, 40), "n99999999": (40, 40, 210)}


def write_woof(folder: Path, n_train: int = 2, n_val: int = 1) -> None:
    """A fast.ai-style ImageFolder of solid-colour JPEGs (colour identifies the class)."""
    from PIL import Image

    for split, n in (("train", n_train), ("val", n_val)):
        for wnid, colour in WOOF.items():
            (folder / split / wnid).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                size = (90, 70) if i % 2 else (70, 100)  # landscape and portrait
                Image.new("RGB", size, colour).save(folder / split / wnid / f"{wnid}_{i}.JPEG")


def test_imagewoof_loads_caches_and_invalidates(tmp_path: Path) -> None:
    folder = tmp_path / "imagewoof2-320"
    write_woof(folder)
    arrays = load_arrays("imagewoof", tmp_path, cache_size=64, image_size=56)
    assert arrays.train_images.shape == (6, 64, 64, 3) and arrays.test_images.shape == (
        3,
        64,
        64,
        3,
    )
    assert arrays.classes == ["Shih-Tzu", "golden retriever", "n99999999"]
    assert arrays.train_labels.tolist() == [0, 0, 1, 1, 2, 2] and arrays.test_labels.tolist() == [
        0,
        1,
        2,
    ]
    assert (arrays.stem, arrays.image_size) == ("imagenet", 56)
    colours = np.array(list(WOOF.values()))
    for images, labels in (
        (arrays.train_images, arrays.train_labels),
        (arrays.test_images, arrays.test_labels),
    ):
        mean_colour = images.reshape(len(images), -1, 3).mean(1)
        assert np.abs(mean_colour - colours[labels]).max() < 8  # JPEG is lossy, not that lossy

    cache = folder / "imagewoof-cache-64px.npz"
    assert cache.is_file()
    stamp = cache.stat().st_mtime_ns
    again = load_arrays("imagewoof", tmp_path, cache_size=64, image_size=56)
    assert cache.stat().st_mtime_ns == stamp  # read, not rebuilt
    np.testing.assert_array_equal(again.train_images, arrays.train_images)
    np.testing.assert_array_equal(again.test_images, arrays.test_images)

    from PIL import Image

    Image.new("RGB", (80, 80), WOOF["n02099601"]).save(folder / "train/n02099601/extra.JPEG")
    grown = load_arrays("imagewoof", tmp_path, cache_size=64, image_size=56)
    assert len(grown.train_images) == 7 and grown.train_labels.tolist().count(1) == 3
    assert not [p for p in folder.iterdir() if p.suffix == ".tmp"]  # atomic write left no temp


def test_imagewoof_other_locations_and_missing(tmp_path: Path) -> None:
    write_woof(tmp_path / "mine", n_train=1)
    arrays = load_arrays(
        "imagewoof", tmp_path / "elsewhere", path=tmp_path / "mine", cache_size=32, image_size=32
    )
    assert arrays.train_images.shape == (3, 32, 32, 3)
    # root itself may hold train/ and val/
    assert (
        len(load_arrays("imagewoof", tmp_path / "mine", cache_size=32, image_size=32).classes) == 3
    )
    with pytest.raises(DataError) as err:
        load_arrays("imagewoof", tmp_path / "none")
    assert "imagewoof2-320" in str(err.value) and "--no-download" in str(err.value)
    with pytest.raises(DataError, match="cache_size"):
        load_arrays("imagewoof", tmp_path / "mine", cache_size=32, image_size=48)


def test_imagewoof_160_fallback_warns_once(tmp_path: Path) -> None:
    write_woof(tmp_path / "imagewoof2-160", n_train=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        arrays = load_arrays("imagewoof", tmp_path)  # default cache_size 256 > 160
    assert arrays.train_images.shape[1:] == (256, 256, 3)
    assert [w.category for w in caught] == [UserWarning]
    text = str(caught[0].message)
    assert "\n" not in text and str(tmp_path / "imagewoof2-160") in text
    assert "160-px Imagewoof release" in text and "upsampled to the requested 256 px" in text
    assert "--no-download" in text and "imagewoof2-320.tgz" in text
    # Not upsampled (cache at most 160 px), or the 320-px release: nothing to say.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_arrays("imagewoof", tmp_path, cache_size=160, image_size=128)
        (tmp_path / "imagewoof2-160").rename(tmp_path / "imagewoof2-320")
        load_arrays("imagewoof", tmp_path, download=True)
    assert caught == []


def test_build_data_imagewoof(tmp_path: Path) -> None:
    write_woof(tmp_path / "imagewoof2-320", n_train=4)
    bundle = build_data(
        "imagewoof", tmp_path, batch_size=4, val_fraction=0.25, cache_size=64, image_size=48
    )
    assert bundle.stem == "imagenet" and bundle.train.augment == "rrc_flip"
    x, y = next(iter(bundle.train))
    assert x.shape == (4, 3, 48, 48) and has_device_layout(x)
    # Eval is a centre crop of the cached image: a slice, no resampling.
    arrays = load_arrays("imagewoof", tmp_path, cache_size=64, image_size=48)
    x_test = torch.cat([x for x, _ in bundle.test])
    mean, std = torch.tensor(bundle.mean), torch.tensor(bundle.std)
    naive = (torch.from_numpy(arrays.test_images[:, 8:56, 8:56]).float() / 255 - mean) / std
    torch.testing.assert_close(x_test, naive.permute(0, 3, 1, 2), atol=1e-5, rtol=0)


# ---- npz and digits --------------------------------------------------------------------------


def test_npz_with_and_without_test_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (50, 16, 16, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(5), 10)
    np.savez(tmp_path / "a.npz", images=images, labels=labels, classes=np.array(list("abcde")))
    first = load_arrays("npz", tmp_path, path=tmp_path / "a.npz")
    assert first.classes == list("abcde") and (first.stem, first.image_size) == ("cifar", 16)
    assert len(first.train_images) == 40 and len(first.test_images) == 10
    assert np.bincount(first.test_labels).tolist() == [2] * 5  # stratified holdout
    second = load_arrays("npz", tmp_path, path=tmp_path / "a.npz")
    np.testing.assert_array_equal(first.test_images, second.test_images)  # fixed seed

    test_x = rng.integers(0, 256, (7, 16, 16, 3), dtype=np.uint8)
    np.savez(
        tmp_path / "b.npz",
        images=images,
        labels=labels,
        test_images=test_x,
        test_labels=np.arange(7) % 5,
    )
    both = load_arrays("npz", tmp_path, path=str(tmp_path / "b.npz"))
    np.testing.assert_array_equal(both.train_images, images)
    np.testing.assert_array_equal(both.test_images, test_x)
    assert both.classes == ["0", "1", "2", "3", "4"]


@pytest.mark.parametrize(
    "arrays, key",
    [
        ({"images": np.zeros((4, 8, 8, 3), np.float32), "labels": np.zeros(4, int)}, "images"),
        ({"images": np.zeros((4, 8, 8), np.uint8), "labels": np.zeros(4, int)}, "images"),
        ({"images": np.zeros((4, 8, 8, 3), np.uint8)}, "labels"),
        ({"images": np.zeros((4, 8, 8, 3), np.uint8), "labels": np.zeros(3, int)}, "labels"),
        ({"labels": np.zeros(4, int)}, "images"),
    ],
)
def test_npz_malformed_names_key(tmp_path: Path, arrays: dict, key: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=f"'{key}'"):
        load_arrays("npz", tmp_path, path=tmp_path / "bad.npz")


def test_npz_needs_existing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="path"):
        load_arrays("npz", tmp_path)
    with pytest.raises(DataError, match="nope.npz does not exist"):
        load_arrays("npz", tmp_path, path=tmp_path / "nope.npz")
    with pytest.raises(DataError, match="is a folder, not a file"):
        load_arrays("npz", tmp_path, path=tmp_path)
    with pytest.raises(DataError, match="/dev/zero is a character device, not a file"):
        load_arrays("npz", tmp_path, path="/dev/zero")
    fifo = tmp_path / "pipe.npz"
    os.mkfifo(fifo)  # reading it would wait for a writer for ever
    with pytest.raises(DataError, match="is a FIFO"):
        load_arrays("npz", tmp_path, path=fifo)


def test_npz_headers_and_labels_are_checked_before_memory_is_spent(tmp_path: Path) -> None:
    """A header that declares a huge array, or one label of 10**12, is refused from the
    sizes alone: nothing is allocated per element or per class."""
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                  "shape": (10**9, 32, 32, 3)})
    labels = io.BytesIO()
    np.save(labels, np.zeros(10, np.int64))
    forged = tmp_path / "forged.npz"
    with zipfile.ZipFile(forged, "w") as z:
        z.writestr("images.npy", header.getvalue() + b"\0" * 64)
        z.writestr("labels.npy", labels.getvalue())
    with pytest.raises(DataError, match=r"declares shape \(1000000000, 32, 32, 3\)"):
        load_arrays("npz", tmp_path, path=forged)
    rng = np.random.default_rng(0)
    huge = tmp_path / "huge-label.npz"
    np.savez(huge, images=rng.integers(0, 255, (20, 32, 32, 3), dtype=np.uint8),
             labels=np.array([0] * 19 + [10**12]))
    with pytest.raises(DataError, match=r"holds the label 1000000000000, but labels are class "
                                         r"indices 0..K-1 with K at most 100,000"):
        load_arrays("npz", tmp_path, path=huge)


def test_class_names_saved_as_bytes_are_text(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "bytes.npz"
    np.savez(path, images=rng.integers(0, 255, (20, 32, 32, 3), dtype=np.uint8),
             labels=np.arange(20) % 2, classes=np.array([b"cat", b"dog"]))
    assert load_arrays("npz", tmp_path, path=path).classes == ["cat", "dog"]


def test_a_split_without_validation_images_or_a_class_in_training_is_refused(tmp_path):
    from data import check_splits, split_indices

    rng = np.random.default_rng(0)
    path = tmp_path / "small.npz"
    # Class 2 has one image: too few to be held out for testing, so it trains, unless a
    # validation split takes it.
    np.savez(path, images=rng.integers(0, 255, (61, 32, 32, 3), dtype=np.uint8),
             labels=np.array([0] * 30 + [1] * 30 + [2]))
    arrays = load_arrays("npz", tmp_path, path=path)
    check_splits(arrays, 0.1, 0, name="small", need_val=True, need_test=True)
    with pytest.raises(DataError, match="leaves no validation image, and a search chooses"):
        check_splits(arrays, 0.001, 0, name="small", need_val=True)
    check_splits(arrays, 0.0, 0, name="small")  # one run may train without validation
    n = len(arrays.train_labels)
    seed = next(s for s in range(200)
                if 2 in arrays.train_labels[split_indices(n, 0.5, s)[1]])
    with pytest.raises(DataError, match=r"class\(es\) 2 of small keep no training image"):
        check_splits(arrays, 0.5, seed, name="small")


@pytest.mark.skipif(not SHARED_NPZ.is_file(), reason="shared CIFAR-10 subset not present")
def test_shared_cifar10_subset() -> None:
    arrays = load_arrays("npz", ".", path=SHARED_NPZ)
    total = np.concatenate([arrays.train_images, arrays.test_images])
    assert total.shape == (5085, 32, 32, 3) and arrays.num_classes == 10
    assert len(arrays.test_images) == 1017  # the fixed 20% holdout


def test_digits() -> None:
    arrays = load_arrays("digits", "unused")
    assert arrays.train_images.dtype == np.uint8 and arrays.train_images.shape[1:] == (32, 32, 3)
    assert arrays.classes == [str(i) for i in range(10)] and (arrays.stem, arrays.image_size) == (
        "cifar",
        32,
    )
    assert len(arrays.train_images) + len(arrays.test_images) == 1797
    assert abs(len(arrays.test_images) / 1797 - 0.2) < 0.01 and arrays.train_images.max() > 200
    np.testing.assert_array_equal(arrays.test_labels, load_arrays("digits", ".").test_labels)


def test_build_data_npz_splits_and_stats(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (60, 8, 8, 3), dtype=np.uint8)
    images[..., 2] //= 4  # a darker blue channel, visible in the computed stats
    np.savez(tmp_path / "c.npz", images=images, labels=np.arange(60) % 3)
    a = build_data("npz", tmp_path, path=tmp_path / "c.npz", val_fraction=0.25, split_seed=0)
    b = build_data("npz", tmp_path, path=tmp_path / "c.npz", val_fraction=0.25, split_seed=1)
    assert (a.train.num_samples, a.val.num_samples, a.test.num_samples) == (36, 12, 12)
    assert not torch.equal(a.val.images, b.val.images) and torch.equal(a.test.images, b.test.images)
    train = a.train.images.double() / 255
    torch.testing.assert_close(torch.tensor(a.mean, dtype=torch.double), train.mean((0, 1, 2)))
    torch.testing.assert_close(
        torch.tensor(a.std, dtype=torch.double), train.std((0, 1, 2), correction=0)
    )
    assert a.mean[2] < a.mean[0] / 2


# ---- split_indices ---------------------------------------------------------------------------


def test_split_indices() -> None:
    train, val = split_indices(100, 0.2, seed=7)
    assert len(train) == 80 and len(val) == 20
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(100))
    again = split_indices(100, 0.2, seed=7)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    assert not np.array_equal(val, split_indices(100, 0.2, seed=8)[1])
    train0, val0 = split_indices(10, 0.0, seed=0)
    assert len(val0) == 0 and train0.tolist() == list(range(10))
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(DataError):
            split_indices(10, bad, seed=0)


# ---- DeviceLoader ----------------------------------------------------------------------------


def naive_crop_flip(batch: np.ndarray, offsets: np.ndarray, flips: np.ndarray) -> np.ndarray:
    out = []
    for img, (oy, ox), flip in zip(batch, offsets, flips, strict=True):
        padded = np.pad(img, ((4, 4), (4, 4), (0, 0)))
        crop = padded[oy : oy + img.shape[0], ox : ox + img.shape[1]]
        out.append(crop[:, ::-1] if flip else crop)
    return np.stack(out)


def test_crop_flip_matches_naive_loop() -> None:
    rng = np.random.default_rng(5)
    batch = rng.integers(1, 256, (16, 32, 32, 3), dtype=np.uint8)
    offsets, flips = rng.integers(0, 9, (16, 2)), rng.random(16) < 0.5
    got = crop_flip(torch.from_numpy(batch), torch.from_numpy(offsets), torch.from_numpy(flips))
    np.testing.assert_array_equal(got.numpy(), naive_crop_flip(batch, offsets, flips))


def raw_loader(images: np.ndarray, **kw) -> DeviceLoader:
    """A loader with mean 0, std 1, so x * 255 gives back the raw pixel values."""
    n = len(images)
    return DeviceLoader(
        torch.from_numpy(images), torch.arange(n), mean=(0, 0, 0), std=(1, 1, 1), **kw
    )


def test_crop_flip_loader_windows_are_valid_and_aligned() -> None:
    rng = np.random.default_rng(6)
    images = rng.integers(1, 256, (24, 32, 32, 3), dtype=np.uint8)  # no zeros except padding
    loader = raw_loader(images, batch_size=8, train=True, augment="crop_flip")
    # Every (offset, flip) window of each image, computed by the naive loop.
    grid = [(oy, ox, f) for oy in range(9) for ox in range(9) for f in (False, True)]
    seen = set()
    loader.set_epoch(0, 0)
    for x, y in loader:
        assert has_device_layout(x)
        got = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        # The label names the source image.
        for sample, label in zip(got, y.tolist(), strict=True):
            src = np.repeat(images[label : label + 1], len(grid), 0)
            windows = naive_crop_flip(
                src, np.array([g[:2] for g in grid]), np.array([g[2] for g in grid])
            )
            matches = np.flatnonzero((windows == sample).all((1, 2, 3)))
            assert len(matches) >= 1
            seen.add(grid[matches[0]])
    assert len(seen) > 5  # offsets and flips really vary


def test_loader_normalises_channels_last_and_eval_order() -> None:
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (21, 32, 32, 3), dtype=np.uint8)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    labels = torch.from_numpy(rng.integers(0, 10, 21))
    loader = DeviceLoader(
        torch.from_numpy(images), labels, batch_size=8, train=False, mean=mean, std=std, out_size=32
    )
    batches = list(loader)
    assert len(loader) == 3 and [len(y) for _, y in batches] == [8, 8, 5]
    x = torch.cat([x for x, _ in batches])
    assert has_device_layout(batches[0][0])
    assert x.dtype == torch.float32
    naive = (torch.from_numpy(images).float() / 255 - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(x, naive.permute(0, 3, 1, 2), atol=1e-5, rtol=0)
    assert torch.equal(torch.cat([y for _, y in batches]), labels)


def test_loader_is_deterministic_per_seed_and_epoch() -> None:
    images = np.random.default_rng(8).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)

    def epoch(loader: DeviceLoader, seed: int, e: int) -> list:
        loader.set_epoch(seed, e)
        return list(loader)

    a = raw_loader(images, batch_size=16, train=True, augment="crop_flip")
    b = raw_loader(images, batch_size=16, train=True, augment="crop_flip")  # a "resumed" run
    first = epoch(a, 3, 5)
    assert len(first) == 2 and all(len(y) == 16 for _, y in first)  # drop_last in training
    for (xa, ya), (xb, yb) in zip(first, epoch(b, 3, 5), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    order = torch.cat([y for _, y in first])
    assert len(set(order.tolist())) == 32  # no sample twice in an epoch
    assert not torch.equal(order, torch.cat([y for _, y in epoch(a, 3, 6)]))
    assert not torch.equal(order, torch.cat([y for _, y in epoch(a, 4, 5)]))
    # Without set_epoch, the next pass uses the next epoch.
    a.set_epoch(3, 5)
    list(a)
    assert torch.equal(torch.cat([y for _, y in a]), torch.cat([y for _, y in epoch(b, 3, 6)]))


def test_rrc_theta_identity_and_flip() -> None:
    images = np.random.default_rng(9).integers(0, 256, (2, 24, 24, 3), dtype=np.uint8)
    theta = rrc_theta(
        torch.ones(2), torch.zeros(2), torch.full((2, 2), 0.5), torch.tensor([False, True]), 24, 24
    )
    out = rrc_flip(torch.from_numpy(images), theta, 24).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(out[0], images[0], atol=1e-3)
    np.testing.assert_allclose(out[1], images[1][:, ::-1], atol=1e-3)


def test_rrc_flip_loader_shape_and_alignment() -> None:
    n = 12
    images = np.zeros((n, 40, 40, 3), np.uint8)
    images[..., 0] = (np.arange(n) * 20 + 10)[:, None, None]  # constant colour codes the label
    images[..., 1] = 255 - images[..., 0]
    images[..., 2] = 128
    loader = raw_loader(images, batch_size=5, train=True, augment="rrc_flip", out_size=32)
    batches = list(loader)
    assert len(batches) == 2 and batches[0][0].shape == (5, 3, 32, 32)
    for x, y in batches:
        assert has_device_layout(x)
        red = (y.float() * 20 + 10)[:, None, None]
        torch.testing.assert_close(x[:, 0] * 255, red.expand(-1, 32, 32), atol=1e-3, rtol=0)
    eval_loader = raw_loader(images, batch_size=5, train=False, out_size=32)
    x = torch.cat([x for x, _ in eval_loader])
    torch.testing.assert_close(
        x * 255, torch.from_numpy(images[:, 4:36, 4:36]).permute(0, 3, 1, 2).float()
    )


def test_loader_rejects_bad_arguments() -> None:
    images, labels = torch.zeros(4, 8, 8, 3, dtype=torch.uint8), torch.zeros(4, dtype=torch.long)
    kw = dict(batch_size=2, train=True, mean=(0, 0, 0), std=(1, 1, 1))
    with pytest.raises(DataError, match="augment"):
        DeviceLoader(images, labels, augment="mixup", **kw)
    with pytest.raises(DataError, match="uint8"):
        DeviceLoader(images.float(), labels, **kw)
    with pytest.raises(DataError, match="labels"):
        DeviceLoader(images, labels[:3], **kw)
    assert math.isclose(len(DeviceLoader(images[:1], labels[:1], **kw)), 1)  # one partial batch


def test_package_imports_no_tuning_stack() -> None:
    code = (
        "import sys, data; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow', 'optuna'}))"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
        check=True,
    )
    assert out.stdout.strip() == "[]"


def _labelled_npz(path: Path, labels, **more) -> Path:
    labels = np.asarray(labels, dtype=np.int64)
    images = np.zeros((len(labels), 8, 8, 3), np.uint8)
    np.savez(path, images=images, labels=labels, **more)
    return path


@pytest.mark.parametrize(
    "labels, more, match",
    [
        ([0, 1000, 2000] * 5, {}, "leaves classes 1, 2, 3, 4, 5, ... of 0..2000 without"),
        ([0, 2] * 5, {"classes": np.array(list("abc"))}, "leaves classes 1 of 0..2 without"),
        ([1, 2] * 5, {}, "leaves classes 0 of 0..2 without"),
        ([], {}, "has no training images"),
        (
            [0, 1] * 5,
            {"test_images": np.zeros((2, 8, 8, 3), np.uint8), "test_labels": np.array([1, 5])},
            "classes never seen in training (5)",
        ),
    ],
)
def test_npz_labels_must_number_the_training_classes_densely(
    tmp_path: Path, labels, more, match
) -> None:
    path = _labelled_npz(tmp_path / "l.npz", labels, **more)
    with pytest.raises(DataError, match=re.escape(match)):
        load_arrays("npz", tmp_path, path=path)


def test_npz_with_one_class_warns(tmp_path: Path) -> None:
    path = _labelled_npz(tmp_path / "one.npz", [0] * 10)
    with pytest.warns(UserWarning, match="single class") as caught:
        arrays = load_arrays("npz", tmp_path, path=path)
    assert len(caught) == 1 and arrays.classes == ["0"]


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_with_a_damaged_member_is_a_data_error(tmp_path: Path, compressed: bool) -> None:
    path = tmp_path / "d.npz"
    save = np.savez_compressed if compressed else np.savez
    rng = np.random.default_rng(0)
    save(path, images=rng.integers(0, 255, (20, 8, 8, 3), dtype=np.uint8), labels=np.arange(20) % 2)
    raw = bytearray(path.read_bytes())
    at = raw.find(b"images.npy") + len(b"images.npy") + 300  # inside the member's data
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="has a damaged array") as info:
        load_arrays("npz", tmp_path, path=path)
    assert len(str(info.value).splitlines()) == 1
