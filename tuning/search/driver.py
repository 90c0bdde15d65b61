"""The search driver: a search's phases, in order, on Ray Tune, Optuna and MLflow.

`run_search` reads as the list of its phases. Each phase is a function that takes what it
needs and returns what the next one takes:

    start Ray -> open the records -> teachers -> search -> settle -> test -> write
    -> replicate -> report -> publish

An interrupted search (Ctrl-C, SIGTERM) stops after the phase it was in, exits 130 and says
how to resume. A tracking outage never stops the training: the phases after it keep going,
and the driver exits 3 with the command that completes the records.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune

from tuning.run.checkpoint import atomic_write_text
from tuning.run.config import UserError
from tuning.run.console import mask_credentials
from tuning.search import results as res
from tuning.search import storage, tracking, warmstart
from tuning.search.callbacks import run_callbacks
from tuning.search.cells import Cell
from tuning.search.raytune import (
    KEEP_CHECKPOINTS,
    fit,
    interrupt_code,
    interrupted,
    keep_newest_checkpoint,
    sigterm_as_interrupt,
    tune_environment,
)
from tuning.search.recorder import (
    DRIVER_HTTP,
    Records,
    close_unrecorded_runs,
    mark_interrupted,
    repair_runs,
    use_http_settings,
)
from tuning.search.replicates import default_config, replicate_phase, same_recipe
from tuning.search.schedule import REDUCTION_FACTOR, search_rungs, stopping_words
from tuning.search.settings import SETTINGS_FILE, SearchSettings
from tuning.search.space import Space
from tuning.search.studies import (
    CellScheduler,
    CellSearcher,
    StudyBook,
    pareto_fronts,
    settle_studies,
    short_cells,
    study_book,
)
from tuning.search.teachers import local_teacher_dir, train_teachers
from tuning.search.trainable import SearchContext, make_trainable, run_maker

INTERRUPTED = 130
RECORDS_INCOMPLETE = 3


class Interrupted(Exception):
    """A phase found the search interrupted; its message says how far it got."""


@dataclass
class Search:
    """What every phase after the start shares: the settings, the space, the cells and their
    studies, the rungs, the MLflow parent run, and the record of MLflow calls that failed."""

    settings: SearchSettings
    space: Space
    cells: list[Cell]
    book: StudyBook
    rungs: tuple[int, ...]
    tracker: tracking.Tracker
    commit: str
    records: Records = field(default_factory=Records)
    started_at: float = field(default_factory=time.perf_counter)

    @property
    def folder(self) -> Path:
        return self.settings.folder


def run_search(settings: SearchSettings, *, address: str | None, resume: bool,
               claim: Callable[[], None] = lambda: None) -> int:
    """The search, phase by phase; the exit code (0, 1 with an empty cell, 3 with records
    incomplete, 130 interrupted, 143 terminated). `claim` takes the search's name once Ray
    runs and a trial is known to fit: before it, nothing is written."""
    tune_environment()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with ray_started(address, settings):
        claim()
        search = open_records(settings, resume)
        finished = trials_started = False
        try:
            context = teachers_phase(search)
            trials_started = True
            grid = search_phase(search, context, resume)
            rows, chosen = settle_phase(search, context, grid)
            test_phase(search, chosen)
            configs = write_phase(search, rows, chosen)
            replicated = replicate_phase_of(search, context, chosen)
            report_phase(search)
            code = publish_phase(search, chosen, configs, replicated)
            finished = True
            return code
        except Interrupted as stop:
            mark_interrupted(search.tracker, [])
            print(f"\n{stop}; continue with:\n  python -m tuning.search --resume --name "
                  f"{settings.name} --storage-path {settings.storage_path}", flush=True)
            return interrupt_code()
        except Exception:
            if not trials_started and not resume:
                forget(search)  # it failed before its first trial: its name stays free
            raise
        finally:
            if not finished:
                mark_interrupted(search.tracker, [])  # every run it left open ends KILLED
                end_parent_killed(search.tracker)


# The phases, in order.

@contextmanager
def ray_started(address: str | None, settings: SearchSettings) -> Iterator[None]:
    """Start (or join) Ray for the search, check that a trial fits on one of its nodes, and
    stop a Ray started here at the end. Within, SIGTERM stops the search as Ctrl-C does."""
    started = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=True,
                 configure_logging=True, logging_level="warning")
        started = True
    try:
        with sigterm_as_interrupt():
            check_resources(settings)
            yield
    finally:
        if started:
            ray.shutdown()


def open_records(settings: SearchSettings, resume: bool = False) -> Search:
    """The MLflow parent run (new, or reopened), its saved views, and the cells' studies."""
    space = settings.space()
    commit = tracking.git_commit()
    tracker = tracking.start_parent(settings.tracking_uri, settings, commit)
    if settings.parent_run_id != tracker.parent_run_id:
        settings.parent_run_id = tracker.parent_run_id  # new, or made again
        settings.write()
    tracking.save_views(tracker, [p.name for p in space.params] + list(space.grid),
                        list(space.dims))
    use_http_settings(DRIVER_HTTP)  # after Ray started: the workers set their own
    seeds = {} if resume else warmstart.plan(settings, space)
    if seeds:
        print(warmstart.describe(seeds), flush=True)
    if settings.proxy_width:
        print(f"proxy: the trials run at width {settings.proxy_width}; each cell's chosen "
              f"and default configurations are replicated at width {settings.target_width}",
              flush=True)
    return Search(settings=settings, space=space, cells=space.cells(),
                  book=study_book(settings, space, seeds), rungs=search_rungs(space, settings),
                  tracker=tracker, commit=commit)


def teachers_phase(search: Search) -> SearchContext:
    """Every teacher the space can ask for, trained once; the context every trial shares."""
    settings, tracker = search.settings, search.tracker
    teachers = train_teachers(search.space, settings)
    if settings.proxy_width:  # the replicates' teachers, at the space's own width
        teachers += train_teachers(settings.target_space(), settings)
    teacher_runs = {p: tracking.teacher_run(tracker.uri, local_teacher_dir(p), search.commit)
                    for p in teachers}
    return SearchContext(space=search.space, teacher_store=settings.teacher_store,
                         teacher_epochs=settings.teacher_epochs, search_name=settings.name,
                         tracker=tracker, teacher_runs=teacher_runs,
                         experiment_path=settings.experiment_path, rungs=search.rungs)


def search_phase(search: Search, context: SearchContext, resume: bool):
    """Every cell's trials in one Tune experiment (continued, on a resume); Tune's results."""
    settings, book, cells = search.settings, search.book, search.cells
    budget = search.space.cell_budget(settings.num_samples)
    print(tracking.where_to_look(search.tracker, settings.optuna_storage), flush=True)
    each = (f"up to {budget} trials or {book.epoch_budget} epochs" if book.epoch_budget
            else f"{budget} trials")
    print(f"cells: {len(cells)}, {each} each ({', '.join(c.label for c in cells)})"
          f"; early stopping: {stopping_words(search.space, settings, search.rungs)}"
          f"; studies in {mask_credentials(settings.optuna_storage)}", flush=True)
    trainable = make_trainable(context, settings.cpus_per_trial, settings.gpus_per_trial)
    experiment = settings.experiment_path
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
                search_alg=CellSearcher(book, cells, epochs=settings.epochs,
                                        max_concurrent=settings.max_concurrent),
                scheduler=CellScheduler(book, search.rungs, REDUCTION_FACTOR),
                num_samples=-1,  # the searcher ends the search when every cell is full
                # A new trial reuses a finished trial's worker process: importing torch, Ray
                # and MLflow and opening the store are paid once per worker (~3 s on the
                # CPU), not once per trial. Tune moves it into the new trial's folder.
                reuse_actors=True),
            run_config=tune.RunConfig(
                name=settings.name, storage_path=settings.storage_path,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
                failure_config=tune.FailureConfig(max_failures=2), verbose=0,
                callbacks=run_callbacks(search.tracker, context, settings.epochs,
                                        book.expected_trials(settings.epochs) * len(cells))))
    grid, stopped = fit(tuner)
    unfinished = interrupted(grid)
    if stopped or unfinished or short_cells(book, cells, settings.epochs):
        mark_interrupted(search.tracker, unfinished)
        what = (f"with {len(unfinished)} trial(s) unfinished" if unfinished
                else "as its last trials ended" if stopped
                else "before every cell had its trials")
        raise Interrupted(f"the search was interrupted {what}; nothing was chosen or tested")
    return grid


def settle_phase(search: Search, context: SearchContext,
                 grid) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Tune's trials as rows; their MLflow runs completed and their studies told; each cell's
    chosen trial."""
    rows = res.trial_rows(grid, context)
    # Only now, with Tune's state saved for good: a driver killed earlier must still find the
    # checkpoint its saved state names for each trial.
    for row in rows:
        keep_newest_checkpoint(row["_result"].checkpoint)
    # Runs a tracking outage kept from the trials are completed from their checkpoints.
    repaired = search.records("complete the trial runs", repair_runs, search.tracker, rows,
                              run_maker(search.tracker, context))
    if repaired and any(repaired.values()):
        print(f"tracking: {repaired['created']} run(s) created and "
              f"{repaired['epochs_added']} epoch(s) logged from the trials' checkpoints")
    settle_studies(search.book, search.cells, rows, search.settings.epochs)
    fronts = pareto_fronts(search.book, search.cells)
    res.mark_pareto(rows, fronts)
    chosen = res.choose(rows, search.settings.choose, fronts)
    warn_thin_cells(rows, search.cells)
    for key, row in chosen.items():
        row["_default_config"] = same_recipe(row["_config"], default_config(context, key))
    return rows, chosen


def test_phase(search: Search, chosen: dict[str, dict[str, Any]]) -> None:
    """Each cell's chosen trial on the test split, once, as parallel Ray tasks. The figure is
    kept in the cell's study; a resumed driver reads it from there, not from the test set."""
    by_key = {c.key: c for c in search.cells}
    todo = {}
    for key, row in chosen.items():
        kept = search.book.study(by_key[key]).user_attrs.get("chosen", {})
        if kept.get("ray_trial_id") == row["trial_id"] and "test_acc" in kept:
            row["test_acc"] = kept["test_acc"]
        elif row["_result"].checkpoint is not None:
            todo[key] = row
    task = ray.remote(num_cpus=search.settings.cpus_per_trial,
                      num_gpus=search.settings.gpus_per_trial)(res.stored_test_accuracy)
    refs = {key: task.remote(row["_config"], row["_result"].checkpoint, int(row["epochs"]))
            for key, row in todo.items()}
    for key, ref in refs.items():
        row = chosen[key]
        row["test_acc"] = ray.get(ref)
        search.book.study(by_key[key]).set_user_attr("chosen", {
            "study_trial": row["study_trial"], "ray_trial_id": row["trial_id"],
            "val_acc": row["val_acc"], "test_acc": row["test_acc"]})


def write_phase(search: Search, rows: list[dict[str, Any]],
                chosen: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The chosen configs (`best/`), `results.csv`, `cells.csv`, the trials' final states in
    MLflow, and the console's tables; the chosen configs' paths by cell."""
    folder, records, tracker = search.folder, search.records, search.tracker
    configs = {}
    for cell in search.cells:
        if cell.key in chosen:
            path = folder / "best" / f"{cell.slug}.yaml"
            atomic_write_text(path, chosen[cell.key]["_config"].to_yaml())
            configs[cell.key] = str(path)
    records("record the trials' final states", tracking.settle_trial_runs, tracker, rows)
    records("close the runs of unrecorded trials", close_unrecorded_runs, tracker, rows)
    res.write_csv(rows, folder / "results.csv")
    cell_table = res.cell_rows(rows, [c.key for c in search.cells], configs)
    res.write_csv(cell_table, folder / "cells.csv", res.CELL_COLUMNS)
    records("log the per-cell table", tracking.log_cell_table, tracker, cell_table, chosen)
    print(res.table_text(rows))
    print("\nper cell (val_acc: the chosen trial's last epoch; test_acc: the same weights)")
    print(res.table_text(cell_table, res.CELL_COLUMNS[:-1]))
    print(f"search phase: {time.perf_counter() - search.started_at:.0f} s", flush=True)
    return configs


def replicate_phase_of(search: Search, context: SearchContext,
                       chosen: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The chosen and the default configurations of every cell, again under new seeds."""
    if not search.settings.replicates or not chosen:
        return []
    finals = [{"cell": key, "trial_id": row["trial_id"], "study_trial": row["study_trial"],
               "run_id": row.get("mlflow_run_id"), "config": row["_config"]}
              for key, row in chosen.items()]
    replicated = replicate_phase(search.settings, context, search.tracker, finals,
                                 search.folder, search.records)
    if replicated is None:
        raise Interrupted("the replicates were interrupted")
    return replicated


def report_phase(search: Search) -> None:
    """The paper's tables from the replicates, and the figures, logged to the parent run."""
    from tuning.search.report.build import build

    built = search.records("build the report", build, search.tracker.uri,
                           search.settings.name, search.folder / "report")
    if built:
        print(built[0])


def publish_phase(search: Search, chosen: dict[str, dict[str, Any]], configs: dict[str, str],
                  replicated: list[dict[str, Any]]) -> int:
    """The parent run's artifacts and state; the search's files beside Tune's state on a URI
    storage; where everything is. The exit code."""
    settings, folder, records, tracker = search.settings, search.folder, search.records, \
        search.tracker
    records("finish the parent run", tracking.finish_parent, tracker,
            [folder / "results.csv", folder / "cells.csv",
             *([folder / "replicates.csv"] if replicated else []),
             folder / SETTINGS_FILE, *map(Path, configs.values())], chosen)
    publish(folder, settings)
    print("\n" + tracking.where_to_look(tracker, settings.optuna_storage))
    print(f"\ntables: {folder / 'results.csv'} (every trial), {folder / 'cells.csv'} "
          f"(per cell)\nchosen configs: {folder / 'best'}/ (run one again with "
          "`python -m tuning.train --config FILE`)")
    if records.failed:
        print(f"\nthe training is done and its results are in {folder}, but MLflow could not "
              f"{'; nor '.join(records.failed)}. When the tracking server answers, complete "
              f"the records with:\n  python -m tuning.report {settings.name} --repair "
              f"--storage-path {settings.storage_path} --tracking-uri "
              f"{mask_credentials(tracker.uri)}")
        return RECORDS_INCOMPLETE
    empty = [c.label for c in search.cells if c.key not in chosen]
    if empty:
        print(f"no trial completed in cell(s) {', '.join(empty)}; see "
              f"{folder / 'results.csv'} for the errors")
        return 1
    return 0


# What the phases call.

def check_resources(settings: SearchSettings) -> None:
    """A trial must fit on some node of the Ray it runs on, or it would wait for ever."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    fits = [n for n in nodes if n.get("CPU", 0) >= settings.cpus_per_trial
            and n.get("GPU", 0) >= settings.gpus_per_trial]
    if not fits:
        largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
        raise UserError(f"no node of this Ray cluster has {settings.cpus_per_trial:g} CPU(s) "
                        f"and {settings.gpus_per_trial:g} GPU(s) for a trial (the largest "
                        f"has {largest.get('CPU', 0):g} and {largest.get('GPU', 0):g}); lower "
                        "--cpus-per-trial or --gpus-per-trial")


def warn_thin_cells(rows: list[dict[str, Any]], cells: list[Cell]) -> None:
    """A cell with fewer than 2 completed trials chose between nothing: say so."""
    done = res.by_cell(res.completed(rows))
    for cell in cells:
        n = len(done.get(cell.key, []))
        if n < 2:
            print(f"warning: cell {cell.key} ended with {n} completed trial(s); its chosen "
                  "configuration was not compared with any other to the end. Give it more "
                  "--num-samples (or --scheduler fifo)", flush=True)


def publish(folder: Path, settings: SearchSettings) -> None:
    """With a URI storage path, the search's own files go there too, beside Tune's, so that
    any machine can resume it or read its tables."""
    if not storage.is_uri(settings.storage_path):
        return
    base = storage.join(settings.storage_path, settings.name)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        storage.upload(path, storage.join(base, *path.relative_to(folder).parts))


def forget(search: Search) -> None:
    """Undo what a search wrote before it failed without a trial: its search.yaml, its empty
    folders and its MLflow parent run, so that the same command may run again. Teachers it
    trained stay in the store, for any search to reuse."""
    folder = search.folder
    (folder / SETTINGS_FILE).unlink(missing_ok=True)
    if storage.is_uri(search.settings.storage_path):
        storage.delete(storage.join(search.settings.storage_path, search.settings.name,
                                    SETTINGS_FILE))
    try:
        folder.rmdir()  # the name lock goes with it when the driver ends (NameLock.release)
    except OSError:
        pass  # not empty: it holds something the user may want
    try:
        tracking.client(search.tracker.uri).delete_run(search.tracker.parent_run_id)
    except Exception:  # noqa: BLE001 - a tracking outage: the run stays, KILLED
        pass
    print(f"the search {search.settings.name!r} failed before its first trial; its name is "
          "free again", flush=True)


def end_parent_killed(tracker: tracking.Tracker) -> None:
    """The parent run of a search that did not finish: KILLED, tagged interrupted."""
    try:
        c = tracking.client(tracker.uri)
        c.set_tag(tracker.parent_run_id, "state", "interrupted")
        c.set_terminated(tracker.parent_run_id, status="KILLED")
    except Exception:  # noqa: BLE001 - nothing more can be recorded
        pass

