"""What the measurement commands share: a search run as a child process, and a Ctrl-C.

A Ctrl-C reaches the whole foreground process group: a child search saves its state and
exits on its own, and the measurement waits for it (never kills it), then says how to go
on, in one line, with exit code 130.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path


def run_logged(cmd: list[str], cwd: Path, log: Path) -> int:
    """Run `cmd` in `cwd`, its output appended to `log`; its exit code. A Ctrl-C waits for the
    child, which had it too, to save its state and exit, then goes on up."""
    with open(log, "a") as out, subprocess.Popen(cmd, cwd=cwd, stdout=out,
                                                 stderr=subprocess.STDOUT,
                                                 env=os.environ.copy()) as child:
        try:
            return child.wait()
        except KeyboardInterrupt:
            while True:
                try:
                    child.wait()
                    break
                except KeyboardInterrupt:  # a second Ctrl-C: the child hurries on its own
                    continue
            raise


def ignore_interrupts() -> None:
    """A worker process's initializer: a Ctrl-C is the parent's to handle."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def interrupted(module: str, argv: list[str] | None) -> int:
    """A Ctrl-C's one line: what finished is kept, and the same command goes on; exit 130."""
    again = shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])
    print(f"\ninterrupted; what finished is kept: run `{again}` again to go on",
          file=sys.stderr)
    return 130
