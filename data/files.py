"""Reading a user's file safely: a regular file only, of bounded size, named for what it is.

A path that is a folder, a FIFO, a device or a socket is named as such (reading /dev/zero or
a FIFO would never end), a file above its bound is refused before it is read, and nothing is
read past the bound even if the file grows.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
         (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
         (stat.S_ISSOCK, "a socket"))


def not_a_regular_file(path: str | Path) -> str | None:
    """None for a regular file (a link to one included); else what the path is instead."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist"
    except NotADirectoryError:
        return "does not exist (a part of its path is a file)"
    except PermissionError:
        return "cannot be opened (permission denied)"
    except OSError as err:
        return f"cannot be opened ({err.strerror or type(err).__name__})"
    if stat.S_ISREG(mode):
        return None
    for test, word in KINDS:
        if test(mode):
            return f"is {word}, not a file"
    return "is not a regular file"


def read_bounded(path: str | Path, limit: int) -> bytes | str:
    """The bytes of a regular file of at most `limit` bytes; else a sentence saying why not
    (what the path is, or its size against the limit)."""
    problem = not_a_regular_file(path)
    if problem:
        return problem
    try:
        with open(path, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return "is not a regular file"
            data = f.read(limit + 1)
    except OSError as err:
        return f"cannot be read ({err.strerror or type(err).__name__})"
    if len(data) > limit:
        return f"is larger than {_size(limit)}"
    return data


def _size(n: int) -> str:
    return f"{n // 2**20} MB" if n >= 2**20 else f"{n // 2**10} KB"


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (MemAvailable), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
