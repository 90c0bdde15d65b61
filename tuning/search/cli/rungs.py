"""`python -m tuning.rungs NAME`: where early stopping can judge a cell's trials, measured.

Reads a finished FIFO pilot (`python -m tuning.search --scheduler fifo`, 20 trials or more in
a cell) and writes the measurement (see `tuning.search.rungs`): Spearman's rho of each epoch's
validation accuracy against the last epoch's, with bootstrap intervals, the fraction of
training from which it stays at 0.7 or more, and the default rungs replayed against FIFO.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tuning.run.checkpoint import atomic_write_text, check_output_file
from tuning.run.config import UserError
from tuning.run.console import Parser, refuse
from tuning.search import storage
from tuning.search.rungs import measure, table_text
from tuning.search.settings import DEFAULTS, SETTINGS_FILE, SearchSettings, check_name


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="tuning.rungs", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="the search's name")
    p.add_argument("--storage-path", default=DEFAULTS["storage_path"])
    p.add_argument("--out", default=None,
                   help="JSON file to write (default: rung-correlation.json in the search)")
    args = p.parse_args(argv)
    try:
        check_name(args.name, "NAME")
        folder = storage.local_search_dir(storage.storage_uri(args.storage_path), args.name)
        path = folder / SETTINGS_FILE
        if not path.is_file():
            raise UserError(f"no search named {args.name!r} under {args.storage_path}; check "
                            "the name and --storage-path")
        settings = SearchSettings.read(path)
        url = settings.optuna_storage
        if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
            raise UserError(f"the search's study storage {url} does not exist")
        stopped_early = settings.scheduler == "asha" and settings.objective == "acc" \
            and settings.sampler not in ("grid", "none")
        if stopped_early:
            raise UserError(f"search {args.name!r} ran {settings.scheduler}: its finished "
                            "trials survived its own rungs, so rho would be biased. Measure on "
                            "a --scheduler fifo pilot")
        out = Path(args.out) if args.out else folder / "rung-correlation.json"
        check_output_file(out, what="results file (--out)",
                          fix="pass --out a .json path in a folder you can write to")
        result = measure(settings)
    except UserError as err:
        return refuse(err)
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    print(table_text(result))
    print(f"written: {out}")
    return 0
