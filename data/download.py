"""Fetch a data-set archive into a root folder: locked, verified, extracted safely, atomically.

fetch(archive, root) is the only way data sets get downloaded (CIFAR-10/100, Imagewoof). It

* holds a file lock in root (``.<file name>.lock``) for the whole download and extraction, so
  concurrent processes or Ray workers on one node never race: the second waits, then finds the
  extracted folder and returns without downloading;
* downloads with urllib to a temporary file in root (never the final name), with a progress bar
  on stderr when it is a terminal and a line every ~10% otherwise;
* verifies the file before extracting (its size, the md5 of the whole file, or the md5 of its
  first MiB as fastai does, whichever the Archive gives);
* extracts with tarfile's "data" filter (no absolute paths, no ``..``, no links leaving the
  folder, no devices) into a temporary folder in root, checks the extracted structure, and only
  then renames the folder into place;
* on any failure deletes the partial download and extraction and raises data.DataError with one
  line that names the problem and the fix.

Mirrors: set the environment variable PLAINKD_DATA_MIRROR to a base URL (``http://host/dir``,
``https://...`` or ``file:///shared/archives``) and every archive is fetched from
``<mirror>/<archive file name>`` (e.g. ``<mirror>/cifar-10-python.tar.gz``) instead of its
official URL, with exactly the same checks. Use it on clusters without internet access: put the
official archive files in one folder served over HTTP or on a shared file system.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from data.arrays import DataError

MIRROR_ENV = "PLAINKD_DATA_MIRROR"
HEAD_BYTES = 2**20  # fastai checks the md5 of the first MiB (its archives change between releases)
CHUNK = 2**20
TIMEOUT_S = 60.0  # per socket operation (connect, each read), not for the whole download


@dataclass(frozen=True)
class Archive:
    """One downloadable tar archive and how to check it.

    title: the name in messages ("CIFAR-10"). url: the official URL. filename: the archive's file
    name (also its name under PLAINKD_DATA_MIRROR). folder: the folder the archive extracts to,
    relative to root. contents: what that folder must hold, in words, for messages ("data_batch_1
    ..5, test_batch, batches.meta"). md5: md5 of the whole file; size: its exact byte size;
    head_md5: md5 of its first HEAD_BYTES bytes (at least one of the three must be given).
    check: called with the extracted folder, returns None when the structure is right, otherwise
    the problem in a few words.
    """

    title: str
    url: str
    filename: str
    folder: str
    contents: str
    md5: str | None = None
    size: int | None = None
    head_md5: str | None = None
    check: Callable[[Path], str | None] | None = None


def source_url(archive: Archive) -> str:
    """Where archive is fetched from: <PLAINKD_DATA_MIRROR>/<filename> if set, else its URL."""
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if mirror:
        return f"{mirror.rstrip('/')}/{archive.filename}"
    return archive.url


def _squeeze(exc: BaseException) -> str:
    """Exception text on one line, with its type."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


class _Progress:
    """Download progress on stderr: a bar on a terminal, else a line every ~10%."""

    def __init__(self, title: str, total: int | None, stream: IO[str] | None = None) -> None:
        self.title, self.total = title, total
        self.stream = stream if stream is not None else sys.stderr
        try:
            self.tty = self.stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self.start = time.monotonic()
        self.last_draw = 0.0
        self.next_step = 1  # next 10% step (or 32 MB step without a known total) to report

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stderr must not fail the download
            pass

    def update(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        rate = done / max(now - self.start, 1e-6) / 1e6
        if self.tty:
            if not final and now - self.last_draw < 0.2:
                return
            self.last_draw = now
            if self.total:
                frac = min(done / self.total, 1.0)
                bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
                text = f"{self.title} [{bar}] {frac:4.0%} {_mb(done)}/{_mb(self.total)}"
            else:
                text = f"{self.title} {_mb(done)}"
            self._write(f"\r{text} {rate:.1f} MB/s" + ("\n" if final else ""))
            return
        if self.total:
            step = min(int(10 * done / self.total), 10)
            if step >= self.next_step:
                self.next_step = step + 1
                self._write(
                    f"{self.title}: {10 * step}% ({_mb(done)} of {_mb(self.total)}, "
                    f"{rate:.1f} MB/s)\n"
                )
        else:
            step = done // (32 * 2**20)
            if step >= self.next_step or final:
                self.next_step = step + 1
                self._write(f"{self.title}: {_mb(done)} ({rate:.1f} MB/s)\n")


def _remove(path: Path) -> None:
    """Delete a file or folder if it exists; never raises."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink()
    except OSError:
        pass


def _tmp_prefixes(archive: Archive) -> tuple[str, str]:
    """Name prefixes of the temporary download file and extraction folder in root."""
    return f".{archive.filename}.", f".{archive.folder}."


def _clean_stale(root: Path, archive: Archive) -> None:
    """Remove temporaries a killed process left behind (only called while holding the lock)."""
    part, extract = _tmp_prefixes(archive)
    for p in root.iterdir():
        if (p.name.startswith(part) and p.name.endswith(".part")) or (
            p.name.startswith(extract) and p.name.endswith(".extracting")
        ):
            _remove(p)


def _download(url: str, dest: IO[bytes], title: str, quiet: bool,
              announce: str = "") -> tuple[int, str, str]:
    """Stream url into dest; returns (bytes, md5 of all, md5 of the first HEAD_BYTES).

    `announce` is printed once the server answers, so that a failed connection gives the
    user one line (the error), not a progress line and then the error.

    Raises _NetError for anything the network or server did, OSError for local write errors.
    """
    whole, head = hashlib.md5(), hashlib.md5()
    done = 0
    request = urllib.request.Request(url, headers={"User-Agent": "plainkd-data/1"})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except (OSError, ValueError, http.client.HTTPException) as exc:  # URLError is an OSError
        raise _NetError(exc) from exc
    if announce and not quiet:
        print(announce, file=sys.stderr)
    with response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        progress = None if quiet else _Progress(title, total)
        while True:
            try:
                chunk = response.read(CHUNK)
            except (OSError, ValueError, http.client.HTTPException) as exc:  # IncompleteRead
                raise _NetError(exc) from exc
            if not chunk:
                break
            dest.write(chunk)
            if done < HEAD_BYTES:
                head.update(chunk[: HEAD_BYTES - done])
            whole.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress.update(done)
        if progress is not None:
            progress.update(done, final=True)
    if total is not None and done != total:
        raise _NetError(OSError(f"connection closed after {done} of {total} bytes"))
    return done, whole.hexdigest(), head.hexdigest()


class _UnsafeMember(Exception):
    """An archive member that would land outside the extraction folder (no filter support)."""


_UNSAFE = (_UnsafeMember, getattr(tarfile, "FilterError", _UnsafeMember))


class _NetError(Exception):
    """A download failed on the network or server side (wraps the original exception)."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(_squeeze(exc))


def _extract(tar_path: Path, dest: Path) -> None:
    """Extract tar_path into dest, refusing absolute paths, traversal, links out and devices."""
    with tarfile.open(tar_path, "r:*") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
            return
        # Python < 3.10.12 / 3.11.4 has no extraction filters: allow plain files and folders
        # with relative, non-escaping names only.
        members = tar.getmembers()
        for m in members:
            name = Path(m.name)
            if name.is_absolute() or ".." in name.parts or not (m.isfile() or m.isdir()):
                raise _UnsafeMember(f"refusing member {m.name!r}")
        tar.extractall(dest, members=members)


def fetch(archive: Archive, root: str | Path, *, quiet: bool = False) -> Path:
    """Download, verify and extract archive so that root/archive.folder exists; returns it.

    Returns at once (without checking its contents) when root/archive.folder already exists,
    also after waiting for another process that was fetching it. Raises DataError (one line).
    """
    root = Path(root).expanduser()
    target = root / archive.folder
    url = source_url(archive)
    via = f" (from {MIRROR_ENV})" if url != archive.url else ""
    by_hand = (
        f"download {archive.filename} elsewhere and extract it so that {target} holds "
        f"{archive.contents}"
    )
    created = not root.exists()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"cannot create the data folder {root} ({_squeeze(exc)}); choose a writable data "
            "root or create it"
        ) from exc
    if target.exists():
        return target

    from filelock import FileLock, Timeout

    lock = FileLock(str(root / f".{archive.filename}.lock"))
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if not quiet:
                print(
                    f"waiting for another process to finish fetching {archive.title} into "
                    f"{root} (lock {lock.lock_file})",
                    file=sys.stderr,
                    flush=True,
                )
            lock.acquire()
    except OSError as exc:
        raise DataError(
            f"cannot lock {root / f'.{archive.filename}.lock'} ({_squeeze(exc)}); make {root} "
            f"writable, or {by_hand}"
        ) from exc
    try:
        if target.exists():  # another process fetched it while we waited
            return target
        _clean_stale(root, archive)
        _fetch_locked(archive, root, target, url, via, by_hand, quiet)
        return target
    except DataError:
        if created:  # a failed first fetch leaves no data folder behind
            lock.release()
            Path(lock.lock_file).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                root.rmdir()
        raise
    finally:
        lock.release()


def _fetch_locked(
    archive: Archive, root: Path, target: Path, url: str, via: str, by_hand: str, quiet: bool
) -> None:
    part_prefix, extract_prefix = _tmp_prefixes(archive)
    part: Path | None = None
    scratch: Path | None = None
    retry = f"run again to download it afresh, or {by_hand}"
    source = f"{url}{via}"
    try:
        # -- download -----------------------------------------------------------------------
        fd, name = tempfile.mkstemp(dir=root, prefix=part_prefix, suffix=".part")
        part = Path(name)
        try:
            with os.fdopen(fd, "wb") as f:
                size, md5, head_md5 = _download(
                    url, f, archive.title, quiet,
                    announce=f"downloading {archive.title} from {source} into {root}")
        except _NetError as exc:
            mirror = (
                f"check {MIRROR_ENV}={os.environ.get(MIRROR_ENV)}"
                if via
                else f"set {MIRROR_ENV} to a base URL that serves {archive.filename}"
            )
            raise DataError(
                f"could not download {archive.title} from {source} ({exc}); without network, "
                f"run the smoke search with --smoke (it uses the bundled digits), or {by_hand}, "
                f"or {mirror}"
            ) from None

        # -- verify -------------------------------------------------------------------------
        problem = None
        if archive.size is not None and size != archive.size:
            problem = (
                f"is {size} bytes, expected {archive.size} (a truncated download or a "
                "different release)"
            )
        elif archive.md5 is not None and md5 != archive.md5:
            problem = f"did not match its checksum (md5 {md5}, expected {archive.md5})"
        elif archive.head_md5 is not None and head_md5 != archive.head_md5:
            problem = (
                f"did not match its checksum (md5 of the first MiB {head_md5}, expected "
                f"{archive.head_md5})"
            )
        if problem is not None:
            raise DataError(
                f"the {archive.title} download from {source} {problem}: the file is damaged or "
                f"not the official archive, so it was deleted; {retry}"
            )

        # -- extract into scratch, check, move into place -------------------------------------
        scratch = Path(tempfile.mkdtemp(dir=root, prefix=extract_prefix, suffix=".extracting"))
        try:
            _extract(part, scratch)
        except _UNSAFE as exc:
            raise DataError(
                f"the {archive.title} archive from {source} holds an unsafe member "
                f"({_squeeze(exc)}); refused to extract it and deleted it; use the official "
                f"archive, or {by_hand}"
            ) from None
        except Exception as exc:  # TarError, EOFError, gzip's OSError, zlib.error, ...
            raise DataError(
                f"the {archive.title} archive from {source} could not be extracted "
                f"({_squeeze(exc)}); it was deleted; {retry}"
            ) from None
        _remove(part)
        part = None
        extracted = scratch / archive.folder
        if not extracted.is_dir() or extracted.is_symlink():
            found = ", ".join(sorted(p.name for p in scratch.iterdir())[:5]) or "nothing"
            problem = f"has no top-level folder {archive.folder} (found {found})"
        else:
            problem = archive.check(extracted) if archive.check is not None else None
        if problem is not None:
            raise DataError(
                f"the {archive.title} archive from {source} {problem}, so it is not the "
                f"expected archive and nothing was kept; {retry}"
            )
        os.rename(extracted, target)
        if not quiet:
            print(f"{archive.title} is ready in {target}", file=sys.stderr)
    except OSError as exc:  # local: disk full, permissions, rename (network errors are wrapped)
        raise DataError(
            f"could not store {archive.title} in {root} ({_squeeze(exc)}); free disk space "
            f"there (the archive plus its extracted copy) or make it writable, or choose another "
            f"data root"
        ) from exc
    finally:
        if part is not None:
            _remove(part)
        if scratch is not None:
            _remove(scratch)
