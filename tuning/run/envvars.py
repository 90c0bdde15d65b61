"""Environment variables set for a block of code and put back afterwards."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def defaults(values: dict[str, str]) -> Iterator[None]:
    """Within, each variable in `values` that the user has not set has that value; afterwards
    the environment is as it was (a variable the user set is never touched)."""
    added = [k for k in values if k not in os.environ]
    os.environ.update({k: values[k] for k in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)
