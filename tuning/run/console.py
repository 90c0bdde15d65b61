"""What every command says on the console: one line per bad flag or refused input, with the
fix and exit code 2, one line for a Ctrl-C, exit code 130, and no credential in any URL it
prints."""

from __future__ import annotations

import argparse
import re
import sys
import typing
from collections.abc import Callable

# user:password@ in a URL, and password-like query parameters (?password=..., &token=...)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:\s]*):[^@/\s]*@")
_SECRET_QUERY = re.compile(r"(?P<key>(?:pass(?:word|wd)?|pwd|token|secret|api[_-]?key|"
                           r"access[_-]?key|auth)=)[^&\s]+", re.I)
MASK = "***"


def mask_credentials(text: str) -> str:
    """`text` with every URL's password (and password-like query value) replaced by ***."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", str(text))
    return _SECRET_QUERY.sub(lambda m: f"{m['key']}{MASK}", text)


def refuse(err: BaseException | str) -> int:
    """Print a refused input as one line on stderr (credentials masked); exit code 2."""
    message = " ".join(str(err).split()) or type(err).__name__
    print(f"error: {mask_credentials(message)}", file=sys.stderr)
    return 2


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line, with the fix, and exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {mask_credentials(message)}; see `python -m {self.prog} "
                     "--help`\n")


def run_command(main: Callable[[], int]) -> typing.NoReturn:
    """A command's entry point: exit with `main`'s code. A Ctrl-C that `main` leaves to it
    (the commands whose output is written at their end) is one line and exit code 130, never
    a traceback; the commands that keep partial work say themselves how to go on."""
    try:
        code = main()
    except KeyboardInterrupt:
        print("\ninterrupted before the command finished: run it again", file=sys.stderr)
        code = 130
    sys.exit(code)
