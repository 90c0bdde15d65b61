"""The search driver: teachers as Ray tasks, then every cell's trials in one Tune experiment."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import optuna
import ray
from optuna.trial import TrialState
from ray import tune

from tuning import report
from tuning.checkpoint import atomic_write_text
from tuning.search import results as res
from tuning.search import tracking
from tuning.search.cells import Cell
from tuning.search.replicates import COLUMNS as REPLICATE_COLUMNS
from tuning.search.replicates import run_replicates
from tuning.search.replicates import write_rows as write_replicates
from tuning.search.results import error_reason
from tuning.search.space import Space
from tuning.search.studies import (
    CellScheduler,
    CellSearcher,
    StudyBook,
    default_rungs,
    mark_lost,
    tell,
)
from tuning.search.teachers import plan_teachers, teacher_path, train_teacher
from tuning.search.trainable import KEEP_CHECKPOINTS, SearchContext, run_trial

SETTINGS_NAME = "search.yaml"
REDUCTION_FACTOR = 2  # successive halving keeps the top half of a cell at each rung


def ensure_ray(address: str | None) -> bool:
    """Start or join Ray unless this process already did; True when we started it."""
    if ray.is_initialized():
        return False
    # Every epoch is a checkpoint; Tune's warning about frequent snapshots is expected here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    ray.init(address=address, include_dashboard=False, log_to_driver=True,
             configure_logging=True, logging_level="warning")
    return True


class TrialRunStatus(tune.Callback):
    """Marks a trial's MLflow run as it ends: FAILED with the reason, or stopped early."""

    def __init__(self, tracker: tracking.Tracker, epochs: int) -> None:
        self.tracker, self.epochs = tracker, epochs

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        run_id = self.tracker.find_trial_run(trial.trial_id)
        if run_id is not None:
            error = trial.get_error()
            reason = error_reason(error) if error else "trial errored"
            self.tracker.end_trial_run(run_id, "FAILED", reason=reason)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        epochs_done = int((trial.last_result or {}).get("epoch", 0))
        if epochs_done >= self.epochs:
            return  # the trial ended its own run, with its artifacts
        run_id = self.tracker.find_trial_run(trial.trial_id)
        if run_id is not None:
            self.tracker.end_trial_run(run_id, "FINISHED", stopped_early=True)


def close_unrecorded_runs(tracker: tracking.Tracker, rows: list[dict[str, Any]],
                          role: str = "trial") -> None:
    """End the runs of trials (or replicates) a killed driver started but never recorded in
    its state.

    Tune restores only the trials its last saved state holds, so such a trial is not
    continued; without this its run would stay RUNNING for ever.
    """
    known = {row["trial_id"] for row in rows}
    runs = tracking.client(tracker.uri).search_runs(
        [tracker.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{tracker.parent_run_id}' and "
                      "attributes.status = 'RUNNING'", max_results=10000)
    for run in runs:
        if run.data.tags.get("role", "trial") != role:
            continue  # the other phase's runs
        if run.data.tags.get("ray_trial_id") not in known:
            tracker.end_trial_run(run.info.run_id, "KILLED", stopped_early=True,
                                  reason="the search driver was killed before it recorded this "
                                         "trial, so the resumed search could not continue it")


def train_teachers(space: Space, settings: dict[str, Any]) -> list[Path]:
    """Train every missing teacher the space can ask for, as parallel Ray tasks."""
    store = Path(settings["teacher_store"])
    recipes = plan_teachers(space, settings["teacher_epochs"])
    missing = [r for r in recipes if not teacher_path(store, r).is_file()]
    print(f"teachers: {len(recipes)} needed, {len(recipes) - len(missing)} in the store "
          f"{store}", flush=True)
    paths = [teacher_path(store, r) for r in recipes]
    if not missing:
        return paths
    task = ray.remote(num_cpus=settings["cpus_per_trial"], num_gpus=settings["gpus_per_trial"],
                      max_retries=1)(train_teacher)
    refs = {task.remote(r, store): r for r in missing}
    for ref in refs:
        done = ray.get(ref)
        acc = done.get("metrics", {}).get("best_val_acc", math.nan)
        print(f"teacher {done['key']}: val_acc {acc:.4f}", flush=True)
    return paths


def scheduler_rungs(space: Space, settings: dict[str, Any]) -> tuple[int, ...]:
    """The epochs at which a cell's trials are compared; none under FIFO.

    Grid and fixed spaces run FIFO: their points are settings to measure, not candidates.
    """
    if settings["scheduler"] == "fifo" or settings["objective"] == "acc-time" or \
            space.kind != "sampled":
        return ()
    return default_rungs(space, settings["epochs"], REDUCTION_FACTOR)


def make_trainable(context: SearchContext, settings: dict[str, Any]):
    resources = {"cpu": settings["cpus_per_trial"], "gpu": settings["gpus_per_trial"]}
    return tune.with_resources(tune.with_parameters(run_trial, context=context), resources)


def settle_studies(book: StudyBook, cells: list[Cell], rows: list[dict[str, Any]],
                   epochs: int) -> None:
    """Make each study and Tune's table agree. Normally a no-op; after a killed driver it
    catches what one side heard before the kill and the other did not:

    - a study trial Tune never recorded is marked lost;
    - a trial Tune finished but its study did not hear of is told now;
    - a trial its study had already stopped or failed keeps that state, and its row says so
      (Tune may have run it again from a checkpoint after the resume).
    """
    mark_lost(book, cells, known={r["trial_id"] for r in rows})
    for row in rows:
        if row["study_trial"] == "":
            continue
        cell = next(c for c in cells if c.key == row["cell"])
        frozen = book.trial(cell, row["study_trial"])
        if frozen.state == TrialState.FAIL and row["status"] != "ERROR":
            row["status"] = "ERROR"
            row["error"] = row["error"] or frozen.user_attrs.get(
                "failure", "the trial failed before the search driver was killed")
        elif frozen.state == TrialState.PRUNED and row["status"] == "TERMINATED":
            row["status"] = "STOPPED_EARLY"
        elif frozen.state.is_finished():
            continue
        elif row["status"] == "STOPPED_EARLY":
            book.study(cell).tell(row["study_trial"], state=TrialState.PRUNED)
        else:
            metrics = dict(row["_result"].metrics or {})
            tell(book, cell, row["study_trial"], metrics, error=row["status"] == "ERROR",
                 epochs=epochs)


def interrupted(grid) -> list[str]:
    """Trials that Tune left unfinished: the search was interrupted (Ctrl-C, SIGTERM), and
    Tune saved its state and returned instead of raising."""
    trials = getattr(getattr(grid, "_experiment_analysis", None), "trials", None) or []
    return [t.trial_id for t in trials if t.status not in ("TERMINATED", "ERROR")]


def measure_tests(book: StudyBook, cells: list[Cell], chosen: dict[str, dict[str, Any]],
                  settings: dict[str, Any]) -> None:
    """Each cell's chosen trial on the test split, once, as parallel Ray tasks. The figure is
    kept in the cell's study; a resumed driver reads it from there, not from the test set."""
    by_key = {c.key: c for c in cells}
    todo = {}
    for key, row in chosen.items():
        kept = book.study(by_key[key]).user_attrs.get("chosen", {})
        if kept.get("ray_trial_id") == row["trial_id"] and "test_acc" in kept:
            row["test_acc"] = kept["test_acc"]
        elif row["_result"].checkpoint is not None:
            todo[key] = row
    task = ray.remote(num_cpus=settings["cpus_per_trial"],
                      num_gpus=settings["gpus_per_trial"])(res.stored_test_accuracy)
    refs = {key: task.remote(row["_config"], row["_result"].checkpoint, int(row["epochs"]))
            for key, row in todo.items()}
    for key, ref in refs.items():
        row = chosen[key]
        row["test_acc"] = ray.get(ref)
        book.study(by_key[key]).set_user_attr("chosen", {
            "study_trial": row["study_trial"], "ray_trial_id": row["trial_id"],
            "val_acc": row["val_acc"], "test_acc": row["test_acc"]})


def replicate_phase(settings: dict[str, Any], context: SearchContext, tracker: tracking.Tracker,
                    chosen: list[dict[str, Any]], folder: Path) -> list[dict[str, Any]] | None:
    """Train each chosen trial again with new seeds (settings["replicates"] times); None when
    interrupted."""
    t0 = time.perf_counter()
    rows = run_replicates(settings, context, chosen, settings["replicates"],
                          callbacks=[TrialRunStatus(tracker, settings["epochs"])])
    if rows is None:
        return None
    tracking.settle_trial_runs(tracker, rows)
    close_unrecorded_runs(tracker, rows, role="replicate")
    write_replicates(rows, folder)
    print("\nreplicates (the chosen trials again, with new seeds; test accuracy measured once "
          "each)")
    print(res.table_text(rows, [c for c in REPLICATE_COLUMNS if c != "error"]))
    seconds = time.perf_counter() - t0
    print(f"replicate phase: {seconds:.0f} s", flush=True)
    return rows


def run_search(settings: dict[str, Any], space: Space, *, address: str | None, resume: bool,
               folder: Path) -> int:
    from tuning.search.cli import write_settings

    # Tune saves its view of the search (trials, their last checkpoints, the searcher) every
    # 10 s or more by default; a trial it has not saved yet is one that a resume after a killed
    # driver cannot continue. Every 2 s keeps that window shorter than a trial's start-up.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    commit = tracking.git_commit()
    tracker = tracking.start_parent(settings["tracking_uri"], settings, commit)
    if not resume:
        settings["parent_run_id"] = tracker.parent_run_id
        write_settings(folder, settings)
    cells = space.cells()
    book = StudyBook(settings["optuna_storage"], settings["name"], space, seed=settings["seed"],
                     multi_objective=settings["objective"] == "acc-time",
                     budget=settings["num_samples"])
    started = ensure_ray(address)
    t_start = time.perf_counter()
    status = "KILLED"
    try:
        teachers = train_teachers(space, settings)
        teacher_runs = {str(p): tracking.teacher_run(tracker.uri, p.parent, commit)
                        for p in teachers}
        experiment = f"{settings['storage_path'].rstrip('/')}/{settings['name']}"
        context = SearchContext(space=space, teacher_store=settings["teacher_store"],
                                teacher_epochs=settings["teacher_epochs"],
                                search_name=settings["name"], tracker=tracker,
                                teacher_runs=teacher_runs, experiment_path=experiment)
        trainable = make_trainable(context, settings)
        rungs = scheduler_rungs(space, settings)
        budget = space.cell_budget(settings["num_samples"])
        print(f"cells: {len(cells)}, {budget} trials each ({', '.join(c.label for c in cells)})"
              f"; early stopping: " + (f"at epochs {', '.join(map(str, rungs))}, within each "
                                       "cell" if rungs else "none (FIFO)") +
              f"; studies in {settings['optuna_storage']}", flush=True)
        if resume and tune.Tuner.can_restore(experiment):
            tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=False)
        else:
            # A new Tune experiment: studies left by a driver killed before Tune saved anything
            # would hold trials Tune will never know of, so they start afresh with it.
            book.delete_all(cells)
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    search_alg=CellSearcher(book, cells, epochs=settings["epochs"],
                                            max_concurrent=settings["max_concurrent"]),
                    scheduler=CellScheduler(book, rungs, REDUCTION_FACTOR),
                    num_samples=-1,  # the searcher ends the search when every cell is full
                    # A new trial reuses a finished trial's worker process: importing torch,
                    # Ray and MLflow and opening the store are paid once per worker (~3 s on
                    # the CPU), not once per trial. Tune moves it into the new trial's folder.
                    reuse_actors=True),
                run_config=tune.RunConfig(
                    name=settings["name"], storage_path=settings["storage_path"],
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
                    failure_config=tune.FailureConfig(max_failures=2), verbose=1,
                    callbacks=[TrialRunStatus(tracker, settings["epochs"])]),
            )
        grid = tuner.fit()
        unfinished = interrupted(grid)
        if unfinished:
            print(f"\nthe search was interrupted with {len(unfinished)} trial(s) unfinished; "
                  "nothing was chosen or tested. Continue it with:\n  python -m tuning.search "
                  f"--resume --name {settings['name']} --storage-path "
                  f"{settings['storage_path']}", flush=True)
            return 130
        rows = res.trial_rows(grid, context)
        settle_studies(book, cells, rows, settings["epochs"])
        res.mark_pareto(rows)
        chosen = res.choose(rows)
        measure_tests(book, cells, chosen, settings)
        configs = {}
        for cell_key, row in chosen.items():
            cell = next(c for c in cells if c.key == cell_key)
            path = folder / "best" / f"{cell.slug}.yaml"
            atomic_write_text(path, row["_config"].to_yaml())
            configs[cell_key] = str(path)
        tracking.settle_trial_runs(tracker, rows)
        close_unrecorded_runs(tracker, rows)
        res.write_csv(rows, folder / "results.csv")
        cell_table = res.cell_rows(rows, [c.key for c in cells], configs)
        res.write_csv(cell_table, folder / "cells.csv", res.CELL_COLUMNS)
        print(res.table_text(rows))
        print("\nper cell (val_acc: the chosen trial's last epoch; test_acc: the same weights)")
        print(res.table_text(cell_table, res.CELL_COLUMNS[:-1]))
        searched_s = time.perf_counter() - t_start
        print(f"search phase: {searched_s:.0f} s", flush=True)
        replicated = []
        if settings.get("replicates", 0) and chosen:
            finals = [{"cell": key, "trial_id": row["trial_id"],
                       "run_id": row.get("mlflow_run_id"), "config": row["_config"]}
                      for key, row in chosen.items()]
            replicated = replicate_phase(settings, context, tracker, finals, folder)
            if replicated is None:
                print(f"\nthe replicates were interrupted; continue them with:\n  python -m "
                      f"tuning.search --resume --name {settings['name']} --storage-path "
                      f"{settings['storage_path']}", flush=True)
                return 130
        try:
            report_text, _ = report.build(tracker.uri, settings["name"], folder / "report")
            print(report_text)
        except Exception as err:  # noqa: BLE001 - plots are a convenience; never lose a search
            print(f"warning: the comparison plots failed ({err}); the results are intact")
        status = "FINISHED"
        tracking.finish_parent(tracker, [folder / "results.csv", folder / "cells.csv",
                                         *([folder / "replicates.csv"] if replicated else []),
                                         folder / SETTINGS_NAME, *map(Path, configs.values())],
                               chosen)
        empty = [c.label for c in cells if c.key not in chosen]
        print(f"\ntables: {folder / 'results.csv'} (every trial), {folder / 'cells.csv'} "
              f"(per cell)\nchosen configs: {folder / 'best'}/ (run one again with "
              "`python -m tuning.train --config FILE`)")
        if empty:
            print(f"no trial completed in cell(s) {', '.join(empty)}; see "
                  f"{folder / 'results.csv'} for the errors")
            return 1
        return 0
    finally:
        if status != "FINISHED":
            tracking.client(tracker.uri).set_terminated(tracker.parent_run_id, status=status)
        if started:
            ray.shutdown()
