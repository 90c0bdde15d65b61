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
import sys
from pathlib import Path

import yaml

from tuning.config import ConfigError, RunConfig, UserError


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
    from tuning.search.cli import (
        DEFAULTS,
        SETTINGS_FILE,
        check_address,
        check_count,
        local_search_dir,
        loopback_only,
        settings_space,
        storage_uri,
        write_settings,
    )

    p = argparse.ArgumentParser(prog="tuning.replicate", description=__doc__,
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
        check_count(args.replicates)
        if args.replicates == 0:
            raise UserError("--replicates 0 asks for no replicate; pass 1 or more")
        folder = local_search_dir(storage_uri(args.storage_path), args.name)
        path = folder / SETTINGS_FILE
        if not path.is_file():
            raise UserError(f"no search named {args.name!r} under {args.storage_path}; check "
                            "the name and --storage-path")
        settings = yaml.safe_load(path.read_text())
        chosen = finalists(folder, args.name)
        before = settings.get("replicates") or 0
        from tuning.search.replicates import experiment_path

        done = Path(experiment_path(settings)).exists() if "://" not in \
            settings["storage_path"] else False
        if done and before and before != args.replicates:
            raise UserError(f"search {args.name!r} already has {before} replicates per cell; "
                            f"pass --replicates {before} to continue them")
        if args.tracking_uri:
            settings["tracking_uri"] = args.tracking_uri
        check_address(args.address)
        from tuning.search.tracking import check_reachable

        check_reachable(settings["tracking_uri"])
        space = settings_space(settings)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    settings["replicates"] = args.replicates
    write_settings(folder, settings)
    with loopback_only(args.address):  # Ray is first imported in _run
        return _run(settings, space, chosen, folder, args.address)


def _run(settings, space, chosen, folder: Path, address: str | None) -> int:

    from tuning import report
    from tuning.search import storage, tracking
    from tuning.search.driver import ensure_ray, replicate_phase, stop_ray
    from tuning.search.teachers import local_teacher_dir
    from tuning.search.trainable import SearchContext

    commit = tracking.git_commit()
    tracker = tracking.start_parent(settings["tracking_uri"], settings, commit)
    started = ensure_ray(address)
    status = "KILLED"
    try:
        teachers = {c["config"].teacher for c in chosen if c["config"].teacher}
        teacher_runs = {t: tracking.teacher_run(tracker.uri, local_teacher_dir(t), commit)
                        for t in teachers if storage.exists(t)}
        for c in chosen:
            c["run_id"] = tracker.find_trial_run(c["trial_id"])
        context = SearchContext(space=space, teacher_store=settings["teacher_store"],
                                teacher_epochs=settings["teacher_epochs"],
                                search_name=settings["name"], tracker=tracker,
                                teacher_runs=teacher_runs)
        if replicate_phase(settings, context, tracker, chosen, folder) is None:
            print(f"\nthe replicates were interrupted; run the same command again to continue "
                  f"them: python -m tuning.replicate {settings['name']}", flush=True)
            return 130
        text, _ = report.build(tracker.uri, settings["name"], folder / "report")
        print(text)
        tracking.finish_parent(tracker, [folder / "replicates.csv"], {})
        status = "FINISHED"
        return 0
    finally:
        if status != "FINISHED":
            tracking.client(tracker.uri).set_terminated(tracker.parent_run_id, status=status)
        if started:
            stop_ray()


if __name__ == "__main__":
    sys.exit(main())
