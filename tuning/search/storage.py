"""A search's files on a local disk or behind a URI (s3://, gs://, ...), through one API.

Ray Tune keeps a search's state wherever `--storage-path` points; the search keeps its own
settings and tables beside it, and the teacher store (`--teacher-store`) may be a URI too,
so that nodes without a shared file system find them. URIs go through pyarrow's file systems
(the ones Ray Tune uses), configured the standard way: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION for S3 and S3-compatible servers.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def join(base: str | Path, *parts: str) -> str:
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return str(Path(base, *parts))


def _fs(uri: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri)


def exists(location: str | Path) -> bool:
    if not is_uri(location):
        return Path(location).exists()
    import pyarrow.fs

    fs, path = _fs(str(location))
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def read_bytes(location: str | Path) -> bytes:
    if not is_uri(location):
        return Path(location).read_bytes()
    fs, path = _fs(str(location))
    with fs.open_input_stream(path) as f:
        return f.readall()


def write_bytes(location: str | Path, data: bytes) -> None:
    """Write a whole file: atomically on a local disk (temp + rename); an object store's put
    is atomic by itself."""
    if not is_uri(location):
        from tuning.run.checkpoint import atomic_write_bytes

        atomic_write_bytes(Path(location), lambda f: f.write(data))
        return
    fs, path = _fs(str(location))
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def upload(local: Path, location: str | Path) -> None:
    if not is_uri(location):
        Path(location).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(local, location)
        return
    fs, path = _fs(str(location))
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with open(local, "rb") as src, fs.open_output_stream(path) as dst:
        shutil.copyfileobj(src, dst, length=16 << 20)


def download(location: str | Path, local: Path) -> None:
    """Copy a file to `local`, atomically (a reader never sees half a file)."""
    local.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=local.parent, prefix=f".{local.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as dst:
            if is_uri(location):
                fs, path = _fs(str(location))
                with fs.open_input_stream(path) as src:
                    shutil.copyfileobj(src, dst, length=16 << 20)
            else:
                with open(location, "rb") as src:
                    shutil.copyfileobj(src, dst, length=16 << 20)
        os.replace(tmp, local)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(location: str) -> str | None:
    """None when a file can be written and deleted under `location`; else why not."""
    probe = join(location, ".write-test")
    try:
        if is_uri(location):
            write_bytes(probe, b"")
            fs, path = _fs(probe)
            fs.delete_file(path)
        else:
            # Creates nothing: a refused search must leave no folder behind. The nearest
            # existing folder must take a new entry (the missing ones are made later).
            from tuning.run.checkpoint import check_output_dir
            from tuning.run.config import UserError

            try:
                check_output_dir(location, what="the folder", fix="")
            except UserError as err:
                return str(err).removeprefix("the folder ").rstrip("; ")
    except Exception as err:  # noqa: BLE001 - any failure means "not writable"
        return str(err).splitlines()[0][:160] if str(err) else type(err).__name__
    return None


def delete(location: str | Path) -> None:
    """Delete a file if it is there."""
    if not is_uri(location):
        Path(location).unlink(missing_ok=True)
        return
    fs, path = _fs(str(location))
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def storage_uri(path: str) -> str:
    """A storage location as the search keeps it: a URI as given, a path made absolute."""
    return path if is_uri(path) else str(Path(path).expanduser().resolve())


def local_search_dir(where: str, name: str) -> Path:
    """Where the driver's own files (settings, tables, chosen configs) go: beside Tune's on a
    local path; for a URI, in ./searches/NAME, and copied beside Tune's state (publish)."""
    return Path(where) / name if not is_uri(where) else Path("searches").resolve() / name


class NameLock:
    """The lock a driver holds on its search's name while it lives: an flock on
    `<storage>/.<name>.lock`, so a SIGKILLed driver never leaves it stuck."""

    def __init__(self) -> None:
        self.handle = None
        self.folder: Path | None = None

    def hold(self, folder: Path, name: str) -> None:
        """Take the lock; a second driver with the same name gets one line naming the first."""
        import fcntl
        import socket
        import time

        from tuning.run.config import UserError

        lock_path = folder.parent / f".{name}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a+")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UserError(f"search {name!r} is being run by {holder}; wait for it to end, "
                            "or choose another --name") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"driver pid {os.getpid()} on {socket.gethostname()}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self.handle, self.folder = handle, folder

    def release(self) -> None:
        """Drop the lock; with no search left in its folder (refused, or forgotten after a
        failure before its first trial), the lock file goes too."""
        if self.handle is not None:
            if self.folder is not None and not self.folder.exists():
                Path(self.handle.name).unlink(missing_ok=True)
            self.handle.close()  # closing the file drops the flock
            self.handle = None
