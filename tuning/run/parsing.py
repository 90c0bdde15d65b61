"""The command line's one parser: a bad flag gets one line, with the fix, and exit code 2."""

from __future__ import annotations

import argparse
import typing


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line, with the fix, and exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message}; see `python -m {self.prog} --help`\n")
