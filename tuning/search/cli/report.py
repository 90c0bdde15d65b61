"""`python -m tuning.report [NAME]`: the paper's Tables 1-3 from a search, with their spread.

One line per data set x student x method, estimated from unselected replicates: the tuned
configuration's test accuracy, the selected trial's own figure apart, the default
configuration's, the tuning gain, the comparisons between methods with paired and Welch
intervals and Holm-corrected verdicts, and the training times. Per cell, the hyperparameters
that mattered (PED-ANOVA, where the cell has enough trials). Written as Markdown and CSV,
with figures, and logged to the search's parent run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tuning.run.checkpoint import check_output_dir
from tuning.run.config import UserError
from tuning.run.console import Parser, refuse
from tuning.search import storage
from tuning.search.report.build import build
from tuning.search.settings import DEFAULTS, SETTINGS_FILE, SearchSettings, check_name
from tuning.search.tracking import check_reachable, default_tracking_uri


def repair(args: argparse.Namespace) -> str:
    """Repair the search's records; returns the tracking URI it used (the search's own unless
    --tracking-uri names another)."""
    from tuning.search.raytune import loopback_only

    if not args.name:
        raise UserError("--repair needs the search's NAME")
    folder = storage.local_search_dir(storage.storage_uri(args.storage_path), args.name)
    if not (folder / SETTINGS_FILE).is_file():
        raise UserError(f"no search named {args.name!r} under {args.storage_path}; pass its "
                        "--storage-path")
    settings = SearchSettings.read(folder / SETTINGS_FILE)
    settings.tracking_uri = uri = args.tracking_uri or settings.tracking_uri
    check_reachable(uri)  # a lost store is made afresh and filled from the checkpoints
    with loopback_only(None):  # Ray is first imported here, for Tune's saved state
        from tuning.search.repair import repair as repair_search

        done = repair_search(settings)
    print(f"repaired {args.name}: {done['trials']} trials; {done['created']} run(s) created, "
          f"{done['epochs_added']} epoch(s) logged from checkpoints")
    return uri


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="tuning.report", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", help="the search's name (default: the newest search)")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--out", default=None, help="folder for the tables and figures "
                                                "(default reports/NAME)")
    p.add_argument("--repair", action="store_true",
                   help="first complete the search's MLflow records from its trials' "
                        "checkpoints (after a tracking outage, or a lost tracking store)")
    p.add_argument("--storage-path", default=DEFAULTS["storage_path"],
                   help="where the search's Tune state is (with --repair)")
    args = p.parse_args(argv)
    uri = default_tracking_uri(args.tracking_uri)
    try:
        if args.name is not None:
            check_name(args.name, "NAME")
        if args.out is not None:  # before anything is read or repaired
            check_output_dir(args.out, what="report folder (--out)",
                             fix="pass a folder that can be created and written")
        if args.repair:
            uri = repair(args)
        else:
            check_reachable(uri, create=False)  # a report reads; it creates no store
        text, files = build(uri, args.name, Path(args.out) if args.out else None)
    except UserError as err:
        return refuse(err)
    print(text)
    for path in files:
        print(f"written: {path}")
    return 0
