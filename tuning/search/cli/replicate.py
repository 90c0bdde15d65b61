"""`python -m tuning.replicate NAME`: replicate the finalists of a search that has finished.

Each cell's chosen trial is trained again N times with new seeds (new initialization and data
order, the same splits), and so is its default configuration unless the search ran with
`--baseline none`, all under the same seeds. They run as Ray Tune trials, tracked in MLflow
under the search's parent run (tags `arm` and `replicate_of`); then the report is rebuilt.
Interrupted, the same command continues the replicates where they stopped.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from tuning.run.config import ConfigError, RunConfig, UserError
from tuning.run.console import Parser, refuse
from tuning.search import storage
from tuning.search.preflight import check_address
from tuning.search.raytune import loopback_only
from tuning.search.settings import DEFAULTS, SETTINGS_FILE, SearchSettings, check_name
from tuning.search.tracking import check_reachable


def finalists(folder: Path, name: str) -> list[dict]:
    """Each cell's chosen trial, from the search's cells.csv and best/ configs."""
    table = folder / "cells.csv"
    rows = []
    if table.is_file():
        with open(table) as f:
            rows = list(csv.DictReader(f))
    chosen = [r for r in rows if r.get("chosen_trial") and r.get("config")]
    if not chosen:
        raise UserError(f"search {name!r} has no finished trial to replicate (no cell has a "
                        "chosen trial); finish it with `python -m tuning.search --resume "
                        f"--name {name}`")
    out = []
    for r in chosen:
        try:
            cfg = RunConfig.from_yaml(r["config"])
        except ConfigError as err:
            raise UserError(f"the chosen config of cell {r['cell']} cannot be read ({err})") \
                from None
        out.append({"cell": r["cell"], "trial_id": r["chosen_trial"],
                    "study_trial": r.get("study_trial", ""), "config": cfg})
    return out


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="tuning.replicate", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="the search to replicate")
    p.add_argument("--replicates", type=int, default=DEFAULTS["replicates"], metavar="N",
                   help="runs per chosen trial (and per default configuration), each with a "
                        "new seed (default 3)")
    p.add_argument("--storage-path", default=DEFAULTS["storage_path"])
    p.add_argument("--tracking-uri", default=None, help="default: the search's own")
    p.add_argument("--address", help="join an existing Ray cluster (host:port or auto)")
    args = p.parse_args(argv)
    try:
        check_name(args.name, "NAME")
        if args.replicates < 1:
            raise UserError(f"--replicates must be 1 or more (runs per chosen configuration); "
                            f"got {args.replicates}")
        folder = storage.local_search_dir(storage.storage_uri(args.storage_path), args.name)
        path = folder / SETTINGS_FILE
        if not path.is_file():
            raise UserError(f"no search named {args.name!r} under {args.storage_path}; check "
                            "the name and --storage-path")
        settings = SearchSettings.read(path)
        chosen = finalists(folder, args.name)
        before = settings.replicates
        done = Path(settings.replicates_path).exists() if not \
            storage.is_uri(settings.storage_path) else False
        if done and before and before != args.replicates:
            raise UserError(f"search {args.name!r} already has {before} replicates per cell; "
                            f"pass --replicates {before} to continue them")
        if args.tracking_uri:
            settings.tracking_uri = args.tracking_uri
        args.address = check_address(args.address)
        check_reachable(settings.tracking_uri)
        settings.space()  # a space that no longer parses: one line, before anything runs
    except UserError as err:
        return refuse(err)
    settings.replicates = args.replicates
    settings.write(folder)
    with loopback_only(args.address):  # Ray is first imported in _run
        return _run(settings, chosen, folder, args.address)


def _run(settings: SearchSettings, chosen: list[dict], folder: Path,
         address: str | None) -> int:
    from tuning.search import tracking
    from tuning.search.driver import ray_started
    from tuning.search.raytune import interrupt_code
    from tuning.search.recorder import mark_interrupted
    from tuning.search.replicates import replicate_phase
    from tuning.search.report.build import build
    from tuning.search.teachers import local_teacher_dir
    from tuning.search.trainable import SearchContext

    commit = tracking.git_commit()
    tracker = tracking.start_parent(settings.tracking_uri, settings, commit)
    status = "KILLED"
    try:
        with ray_started(address, settings):
            teachers = {c["config"].teacher for c in chosen if c["config"].teacher}
            teacher_runs = {t: tracking.teacher_run(tracker.uri, local_teacher_dir(t), commit)
                            for t in teachers if storage.exists(t)}
            for c in chosen:
                c["run_id"] = tracker.find_trial_run(c["trial_id"])
            context = SearchContext(space=settings.space(), teacher_store=settings.teacher_store,
                                    teacher_epochs=settings.teacher_epochs,
                                    search_name=settings.name, tracker=tracker,
                                    teacher_runs=teacher_runs)
            if replicate_phase(settings, context, tracker, chosen, folder) is None:
                print(f"\nthe replicates were interrupted; run the same command again to "
                      f"continue them: python -m tuning.replicate {settings.name}", flush=True)
                return interrupt_code()
        text, _ = build(tracker.uri, settings.name, folder / "report")
        print(text)
        tracking.finish_parent(tracker, [folder / "replicates.csv"], {})
        status = "FINISHED"
        return 0
    except KeyboardInterrupt:  # a second Ctrl-C, while Tune saved its state
        print(f"\ninterrupted; run the same command again to continue: python -m "
              f"tuning.replicate {settings.name}", flush=True)
        return interrupt_code()
    finally:
        if status != "FINISHED":
            mark_interrupted(tracker, [])  # every replicate's run left open ends KILLED
            tracking.client(tracker.uri).set_terminated(tracker.parent_run_id, status=status)
