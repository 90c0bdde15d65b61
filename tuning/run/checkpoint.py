"""Atomic writes and safe loads of checkpoints and trained models."""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from data.files import not_a_regular_file
from tuning.run.config import UserError

MODEL_FORMAT = "plainkd-model/1"
CHECKPOINT_FORMAT = "plainkd-checkpoint/1"


class CheckpointError(UserError):
    """A checkpoint or model file that cannot be used."""


def _probe(folder: Path, target: Path, what: str, fix: str) -> None:
    """UserError unless a folder can be made (and removed again) in `folder`."""
    try:
        os.rmdir(tempfile.mkdtemp(dir=folder, prefix=".probe-"))
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise UserError(f"{what} {target} cannot be written: nothing can be created in "
                        f"{folder} ({reason}); {fix}") from None


def _check_folder(folder: Path, target: Path, what: str, fix: str) -> None:
    """UserError unless `folder` (which will hold `target`, or is it) is a writable folder or
    can be created as one."""
    try:
        _check_folder_or_raise(folder, target, what, fix)
    except OSError as err:  # a name too long, a loop of links, ...: the path itself is bad
        raise UserError(f"{what} {str(target)[:120]}{'...' if len(str(target)) > 120 else ''} "
                        f"cannot be used ({err.strerror or type(err).__name__}); {fix}") \
            from None


def _check_folder_or_raise(folder: Path, target: Path, what: str, fix: str) -> None:
    if folder.exists() or folder.is_symlink():
        if not folder.is_dir():
            raise UserError(f"{what} {target} cannot be written: {folder} is a file, not a "
                            f"folder; {fix}")
        _probe(folder, target, what, fix)
        return
    parent = next((p for p in folder.absolute().parents if p.exists() or p.is_symlink()),
                  Path(folder.absolute().anchor))
    if not parent.is_dir():
        raise UserError(f"{what} {target} cannot be created: {parent} is a file, not a folder; "
                        f"{fix}")
    _probe(parent, target, what, fix)


def check_output_dir(path: str | Path, *, what: str = "output folder",
                     fix: str = "pass a writable folder") -> None:
    """UserError unless `path` is a writable folder, or one that can be created.

    Run before any work, so that a bad location fails at once. It creates nothing: a probe
    folder is made in the folder (or its nearest existing parent) and removed at once.
    """
    path = Path(path).expanduser()
    _check_folder(path, path, what, fix)


def check_output_file(path: str | Path, *, what: str = "output file",
                      fix: str = "pass a writable file path") -> None:
    """UserError unless `path` can be written as atomic_write_bytes writes it (through a temp
    file beside it): it is no folder, and its folder is writable or can be created.
    Creates nothing."""
    path = Path(path).expanduser()
    if len(path.name.encode()) > 255:
        raise UserError(f"{what} {str(path)[:120]}... cannot be used (its name is longer than "
                        f"255 bytes); {fix}")
    try:
        if path.is_dir():
            raise UserError(f"{what} {path} is a folder, not a file; {fix}")
    except OSError as err:
        raise UserError(f"{what} {str(path)[:120]} cannot be used "
                        f"({err.strerror or type(err).__name__}); {fix}") from None
    _check_folder(path.parent, path, what, fix)


def atomic_write_bytes(path: Path, write) -> None:
    """Write through a temp file in the same folder, fsync, then rename over `path`.

    A reader sees the old file or the new one, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file 0600; give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write_bytes(path, lambda f: torch.save(obj, f))


def safe_load(path: Path, *, what: str, fix: str) -> dict:
    """torch.load with weights_only=True; any damage becomes one CheckpointError line."""
    path = Path(path)
    problem = not_a_regular_file(path)
    if problem:
        raise CheckpointError(f"{what} {path} {problem}; {fix}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError,
            zipfile.BadZipFile, AttributeError, IndexError, KeyError) as err:
        reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise CheckpointError(f"{what} {path} is truncated or corrupt ({reason}); {fix}") \
            from None
    if not isinstance(obj, dict) or "format" not in obj:
        raise CheckpointError(f"{what} {path} is not a file this project wrote; {fix}")
    return obj


def save_checkpoint(state: dict, path: Path, *, keep_previous: bool = True) -> None:
    """Write the epoch checkpoint; the one it replaces is kept as `<name>.prev`."""
    path = Path(path)
    tmp_new = path.with_name(path.name + ".new")
    atomic_torch_save({"format": CHECKPOINT_FORMAT, **state}, tmp_new)
    if keep_previous and path.exists():
        os.replace(path, path.with_name(path.name + ".prev"))
    os.replace(tmp_new, path)


def load_checkpoint(path: Path) -> dict:
    """The newest readable checkpoint at `path`, falling back to `<name>.prev` with a warning."""
    path = Path(path)
    prev = path.with_name(path.name + ".prev")
    fix = "delete it to start the run afresh"
    try:
        state = safe_load(path, what="checkpoint", fix=fix)
    except CheckpointError as err:
        if not prev.is_file():
            raise
        state = safe_load(prev, what="checkpoint", fix=fix)
        # The damaged file is set aside for inspection, so that the next save cannot rotate
        # it over the good one as the new `.prev`.
        damaged = path.with_name(path.name + ".damaged")
        if path.exists():
            os.replace(path, damaged)
        warnings.warn(f"{err}; falling back to the previous checkpoint {prev} (the damaged "
                      f"one is kept as {damaged})", stacklevel=2)
        path = prev
    # Another of this project's files in a checkpoint's place (a model.pt copied over it) is
    # a mistake to report, not damage to fall back from.
    if state.get("format") != CHECKPOINT_FORMAT:
        kind = " (a trained model file)" if state.get("format") == MODEL_FORMAT else ""
        raise CheckpointError(f"{path} is not a checkpoint: it is a {state.get('format')} "
                              f"file{kind}, not {CHECKPOINT_FORMAT}; put the run's own "
                              "checkpoint.pt back, or start the run afresh in a new folder")
    return state


@contextmanager
def staged(path: Path) -> Iterator[Path]:
    """A temporary folder beside `path` that holds it under its own name, as a checkpoint
    folder for Tune to copy to storage; removed afterwards.

    The file is hard-linked, not copied: checkpoints are only ever replaced by renaming
    (save_checkpoint), so the linked file cannot change while it is read.
    """
    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".report-") as tmp:
        try:
            os.link(path, Path(tmp) / path.name)
        except OSError:  # a file system without hard links
            shutil.copy2(path, Path(tmp) / path.name)
        yield Path(tmp)
