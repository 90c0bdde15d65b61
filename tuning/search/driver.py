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
from tuning.config import RunConfig, UserError
from tuning.search import results as res
from tuning.search import storage, tracking
from tuning.search.cells import Cell
from tuning.search.recorder import DRIVER_HTTP, repair_runs, use_http_settings
from tuning.search.replicates import COLUMNS as REPLICATE_COLUMNS
from tuning.search.replicates import replicate_seeds, run_replicates, same_recipe
from tuning.search.replicates import write_rows as write_replicates
from tuning.search.results import error_reason
from tuning.search.schedule import (
    FIRST_RUNG_FRACTION,
    REDUCTION_FACTOR,
    search_rungs,
    settled_fraction,
)
from tuning.search.space import Space, cell_defaults
from tuning.search.studies import (
    CellScheduler,
    CellSearcher,
    StudyBook,
    mark_lost,
    tell,
)
from tuning.search.teachers import local_teacher_dir, plan_teachers, teacher_path, train_teacher
from tuning.search.trainable import (
    KEEP_CHECKPOINTS,
    SearchContext,
    keep_newest_checkpoint,
    run_trial,
)

SETTINGS_NAME = "search.yaml"


def ensure_ray(address: str | None) -> bool:
    """Start or join Ray unless this process already did; True when we started it (stop it
    with stop_ray). A Ray started here listens on the loopback interface only when Ray was
    first imported under `tuning.search.cli.loopback_only`, as the commands do."""
    if ray.is_initialized():
        return False
    # Every epoch is a checkpoint; Tune's warning about frequent snapshots is expected here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    ray.init(address=address, include_dashboard=False, log_to_driver=True,
             configure_logging=True, logging_level="warning")
    return True


def stop_ray() -> None:
    """Shut down the Ray that ensure_ray started."""
    ray.shutdown()


class TrialRunStatus(tune.Callback):
    """Marks a trial's MLflow run as it ends: FAILED with the reason, or stopped early."""

    def __init__(self, tracker: tracking.Tracker, epochs: int) -> None:
        self.tracker, self.epochs = tracker, epochs

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        try:
            run_id = self.tracker.find_trial_run(trial.trial_id)
            if run_id is not None:
                error = trial.get_error()
                reason = error_reason(error) if error else "trial errored"
                self.tracker.end_trial_run(run_id, "FAILED", reason=reason)
        except Exception:  # noqa: BLE001 - a tracking outage: repaired after the trials
            pass

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result or {}
        if int(result.get("epoch", 0)) >= self.epochs or result.get("failed"):
            return  # the trial ended its own run: with its artifacts, or FAILED with why
        try:
            run_id = self.tracker.find_trial_run(trial.trial_id)
            if run_id is not None:
                log_last_model(self.tracker, run_id, trial.checkpoint)
                self.tracker.end_trial_run(run_id, "FINISHED", stopped_early=True)
        except Exception:  # noqa: BLE001 - a tracking outage: repaired after the trials
            pass


class ProgressLines(tune.Callback):
    """One line per trial event, in the words of results.csv (Ray's own tables are off)."""

    def __init__(self, context: SearchContext, epochs: int, total: int) -> None:
        self.context, self.epochs, self.total, self.done = context, epochs, total, 0

    def _label(self, trial) -> str:
        try:
            return tracking.run_label(self.context.run_config(trial.config), trial.config)
        except Exception:  # noqa: BLE001 - a label is not worth a failed search
            return trial.trial_id

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        print(f"  started   {self._label(trial)} ({trial.trial_id})", flush=True)

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        print(f"  restarted {self._label(trial)}: from its last checkpoint", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result or {}
        epoch, acc = int(result.get("epoch", 0)), result.get("val_acc", math.nan)
        self.done += 1
        if result.get("failed"):
            print(f"  [{self.done}/{self.total}] {self._label(trial)}: failed (not retried, it "
                  f"would recur): {result['failed']}", flush=True)
            return
        what = ("completed      " if epoch >= self.epochs else
                f"stopped early at epoch {epoch}:")
        print(f"  [{self.done}/{self.total}] {self._label(trial)}: {what} "
              f"val {100 * acc:.1f}%", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.done += 1
        error = trial.get_error()
        print(f"  [{self.done}/{self.total}] {self._label(trial)}: failed: "
              f"{error_reason(error) if error else 'error'}", flush=True)


def run_callbacks(tracker: tracking.Tracker, context: SearchContext, epochs: int,
                  total: int) -> list:
    """MLflow run states, our progress lines, and Tune's JSON and CSV logs (its automatic
    loggers are off, which also drops its TensorBoard files and hint)."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    return [TrialRunStatus(tracker, epochs), ProgressLines(context, epochs, total),
            JsonLoggerCallback(), CSVLoggerCallback()]


def log_last_model(tracker: tracking.Tracker, run_id: str, checkpoint) -> None:
    """A trial stopped early keeps its artifacts too: the model and config of its last
    checkpoint (trials checkpoint at every rung, so that is the epoch it was stopped at)."""
    if checkpoint is None:
        return
    import tempfile

    from tuning.checkpoint import load_checkpoint
    from tuning.config import RunConfig
    from tuning.trainer import CHECKPOINT_NAME, MODEL_NAME, model_from_checkpoint

    c = tracking.client(tracker.uri)
    try:
        with checkpoint.as_directory() as folder, tempfile.TemporaryDirectory() as tmp:
            state = Path(folder) / CHECKPOINT_NAME
            epoch = model_from_checkpoint(state, Path(tmp) / MODEL_NAME)
            cfg = RunConfig.from_dict(load_checkpoint(state)["config"])
            (Path(tmp) / "config.yaml").write_text(cfg.to_yaml())
            c.log_artifact(run_id, str(Path(tmp) / MODEL_NAME))
            c.log_artifact(run_id, str(Path(tmp) / "config.yaml"))
            c.set_tag(run_id, "model_epoch", str(epoch))
    except Exception as err:  # noqa: BLE001 - a missing model must not stop the search
        c.set_tag(run_id, "model_epoch", f"none ({type(err).__name__}: {err})"[:250])


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


def train_teachers(space: Space, settings: dict[str, Any]) -> list[str]:
    """Train every missing teacher the space can ask for, as parallel Ray tasks."""
    store = settings["teacher_store"]
    recipes = plan_teachers(space, settings["teacher_epochs"])
    missing = [r for r in recipes if not storage.exists(teacher_path(store, r))]
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
        if frozen.state == TrialState.FAIL and row["status"] != "FAILED":
            row["status"] = "FAILED"
            row["error"] = row["error"] or frozen.user_attrs.get(
                "failure", "the trial failed before the search driver was killed")
        elif frozen.state == TrialState.PRUNED and row["status"] == "COMPLETED":
            row["status"] = "STOPPED_EARLY"
        elif frozen.state.is_finished():
            continue
        elif row["status"] == "STOPPED_EARLY":
            book.study(cell).tell(row["study_trial"], state=TrialState.PRUNED)
        else:
            metrics = dict(row["_result"].metrics or {})
            tell(book, cell, row["study_trial"], metrics, error=row["status"] == "FAILED",
                 epochs=epochs)


def publish(folder: Path, settings: dict[str, Any]) -> None:
    """With a URI storage path, the search's own files go there too, beside Tune's, so that
    any machine can resume it or read its tables."""
    if not storage.is_uri(settings["storage_path"]):
        return
    base = storage.join(settings["storage_path"], settings["name"])
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        storage.upload(path, storage.join(base, *path.relative_to(folder).parts))


def check_resources(settings: dict[str, Any]) -> None:
    """A trial must fit on some node of the Ray it runs on, or it would wait for ever."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    fits = [n for n in nodes if n.get("CPU", 0) >= settings["cpus_per_trial"]
            and n.get("GPU", 0) >= settings["gpus_per_trial"]]
    if not fits:
        largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
        raise UserError(f"no node of this Ray cluster has {settings['cpus_per_trial']:g} CPU(s) "
                        f"and {settings['gpus_per_trial']:g} GPU(s) for a trial (the largest "
                        f"has {largest.get('CPU', 0):g} and {largest.get('GPU', 0):g}); lower "
                        "--cpus-per-trial or --gpus-per-trial")


def mark_interrupted(tracker: tracking.Tracker, trial_ids: list[str]) -> None:
    """The records of an interrupted search say so: its parent and its unfinished trials'
    runs end KILLED with the reason (a resume sets them running again)."""
    reason = "the search was interrupted; `python -m tuning.search --resume` continues it"
    try:
        c = tracking.client(tracker.uri)
        c.set_tag(tracker.parent_run_id, "state", "interrupted")
        run_ids = {tracker.find_trial_run(t) for t in trial_ids}
        # Also any other run of the search still RUNNING: a trial Tune stopped on its way
        # out can look ended to Tune while its worker never closed its run.
        exp = c.get_run(tracker.parent_run_id).info.experiment_id
        run_ids |= {r.info.run_id for r in c.search_runs(
            [exp], filter_string=f"tags.`mlflow.parentRunId` = '{tracker.parent_run_id}' "
                                 "and attributes.status = 'RUNNING'", max_results=10000)}
        for run_id in run_ids - {None}:
            if c.get_run(run_id).info.status == "RUNNING":
                tracker.end_trial_run(run_id, "KILLED", reason=reason)
    except Exception:  # noqa: BLE001 - an interrupted search must still exit at once
        pass


def interrupted(grid) -> list[str]:
    """Trials that Tune left unfinished: the search was interrupted (Ctrl-C, SIGTERM), and
    Tune saved its state and returned instead of raising."""
    trials = getattr(getattr(grid, "_experiment_analysis", None), "trials", None) or []
    return [t.trial_id for t in trials if t.status not in ("TERMINATED", "ERROR")]  # Ray's


def short_cells(book: StudyBook, cells: list[Cell], epochs: int) -> list[str]:
    """Cells that could still have taken a trial: under their trial cap and within their
    epoch budget. Tune returns from an interrupted run (Ctrl-C) as from a finished one, and a
    trial it stopped on the way out can look ended: only the studies know whether every cell
    got its budget."""
    return [c.key for c in cells
            if any(t.state == TrialState.RUNNING for t in book.counted(c))
            or book.is_open(c, epochs)]


def stopping_words(space: Space, settings: dict[str, Any], rungs: tuple[int, ...]) -> str:
    """What the console says of early stopping: its rungs, or why there are none."""
    if rungs:
        return f"at epochs {', '.join(map(str, rungs))}, within each cell"
    if settings["scheduler"] == "asha" and settings["objective"] == "acc" and \
            space.kind == "sampled":
        first = max(settings.get("first_rung") or FIRST_RUNG_FRACTION,
                    settled_fraction(space, settings["epochs"]))
        return (f"none: the first rung would be at {first:.2f} of training, and "
                f"{settings['epochs']} epochs leave no epoch before the last there")
    return "none (FIFO)"


def study_book(settings: dict[str, Any], space: Space) -> StudyBook:
    """The search's studies, with its sampler and budgets."""
    seed = settings.get("sampler_seed")
    return StudyBook(settings["optuna_storage"], settings["name"], space,
                     seed=settings["seed"] if seed is None else seed,
                     multi_objective=settings["objective"] == "acc-time",
                     budget=settings["num_samples"],
                     sampler="random" if "random" in settings.get("sampler", "") else "tpe",
                     concurrent=settings.get("max_concurrent", 0) != 1,
                     epoch_budget=settings.get("budget_epochs") or 0)


def pareto_fronts(book: StudyBook, cells: list[Cell]) -> dict[str, set[int]] | None:
    """Each cell's Pareto front of accuracy against time, as its study computes it; None for a
    single objective."""
    if not book.multi_objective:
        return None
    return {c.key: {t.number for t in book.study(c).best_trials} for c in cells}


def warn_thin_cells(rows: list[dict[str, Any]], cells: list[Cell]) -> None:
    """A cell with fewer than 2 completed trials chose between nothing: say so."""
    done = res.by_cell(res.completed(rows))
    for cell in cells:
        n = len(done.get(cell.key, []))
        if n < 2:
            print(f"warning: cell {cell.key} ended with {n} completed trial(s); its chosen "
                  "configuration was not compared with any other to the end. Give it more "
                  "--num-samples (or --scheduler fifo)", flush=True)


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


class Records:
    """The driver's MLflow calls after the trials, each guarded: a tracking outage then costs
    the records (which `tuning.report --repair` completes), never the search's results."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def __call__(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - see the class's docstring
            self.failed.append(what)
            reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
            print(f"warning: could not {what} in MLflow ({reason})", flush=True)
            return None


def run_maker(tracker: tracking.Tracker, context: SearchContext):
    """Creates the run of a trial that never got one (its tracking was down all along)."""
    def start(row: dict[str, Any]) -> str:
        sample = dict(row["_result"].config or {})
        cfg = row["_config"]
        return tracker.start_trial_run(row["trial_id"], "", cfg, sample,
                                       context.teacher_runs.get(cfg.teacher or ""))
    return start


def default_config(context: SearchContext, cell_key: str) -> RunConfig:
    """The cell's default configuration (its baseline) as a trial of the search would run it."""
    cell = next(c for c in context.space.cells() if c.key == cell_key)
    return context.run_config({"cell": cell.key, **cell.as_dict(),
                               **cell_defaults(context.space, cell).values})


def replicate_arms(context: SearchContext, finals: list[dict[str, Any]],
                   baseline: bool) -> list[dict[str, Any]]:
    """Each cell's tuned arm (its chosen trial) and, with a baseline, its default arm; a cell
    whose chosen configuration is its default trains it once."""
    arms = []
    for final in finals:
        arms.append({**final, "arm": "tuned"})
        if baseline:
            default = default_config(context, final["cell"])
            if not same_recipe(default, final["config"]):
                arms.append({"cell": final["cell"], "arm": "default", "config": default})
    return arms


def concurrency(settings: dict[str, Any]) -> str:
    """How many runs the replicate phase trains at once, and with what: the condition its
    times were taken under."""
    have = ray.cluster_resources()
    slots = math.floor(have.get("CPU", 0) / settings["cpus_per_trial"])
    if settings["gpus_per_trial"]:
        slots = min(slots, math.floor(have.get("GPU", 0) / settings["gpus_per_trial"]))
    if settings.get("max_concurrent"):
        slots = min(slots, settings["max_concurrent"])
    gpu = f", {settings['gpus_per_trial']:g} GPU" if settings["gpus_per_trial"] else ""
    return f"{max(1, slots)} at a time, {settings['cpus_per_trial']:g} CPU{gpu} each"


def replicate_phase(settings: dict[str, Any], context: SearchContext, tracker: tracking.Tracker,
                    finals: list[dict[str, Any]], folder: Path,
                    records: Records | None = None) -> list[dict[str, Any]] | None:
    """Train each cell's chosen configuration, and its default one (unless `baseline` is
    none), again under the search's replicate seeds; None when interrupted."""
    records = records or Records()
    t0 = time.perf_counter()
    arms = replicate_arms(context, finals, settings.get("baseline", "default") != "none")
    seeds = replicate_seeds(settings["seed"], settings["replicates"])
    rows = run_replicates(settings, context, arms, seeds,
                          callbacks=run_callbacks(tracker, context, settings["epochs"],
                                                  len(arms) * len(seeds)),
                          concurrency=concurrency(settings))
    if rows is None:
        return None
    for row in rows:
        keep_newest_checkpoint(row["_result"].checkpoint)
    records("complete the replicate runs", repair_runs, tracker, rows, run_maker(tracker, context))
    records("record the replicates' final states", tracking.settle_trial_runs, tracker, rows)
    records("close the runs of unrecorded replicates", close_unrecorded_runs, tracker, rows,
            role="replicate")
    write_replicates(rows, folder)
    print(f"\nreplicates (seeds {', '.join(map(str, seeds))}; arm tuned: each cell's chosen "
          "configuration, arm default: its default one; test accuracy measured once each)")
    print(res.table_text(rows, [c for c in REPLICATE_COLUMNS if c != "error"]))
    seconds = time.perf_counter() - t0
    print(f"replicate phase: {seconds:.0f} s ({rows[0]['concurrency'] if rows else ''})",
          flush=True)
    return rows


def run_search(settings: dict[str, Any], space: Space, *, address: str | None, resume: bool,
               folder: Path) -> int:
    from tuning.search.cli import write_settings

    # Tune saves its view of the search (trials, their last checkpoints, the searcher) every
    # 10 s or more by default; a trial it has not saved yet is one that a resume after a killed
    # driver cannot continue. Every 2 s keeps that window shorter than a trial's start-up.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # see run_callbacks
    # Ray's tables say TERMINATED for a trial stopped early, and its new output engine prints
    # them even at verbose=0; the legacy engine at 0 is silent, and ProgressLines speaks.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = ensure_ray(address)
    try:
        check_resources(settings)
    except UserError:
        if started:
            stop_ray()
        raise
    commit = tracking.git_commit()
    tracker = tracking.start_parent(settings["tracking_uri"], settings, commit)
    if settings.get("parent_run_id") != tracker.parent_run_id:
        settings["parent_run_id"] = tracker.parent_run_id  # new, or made again
        write_settings(folder, settings)
    tracking.save_views(tracker, [p.name for p in space.params] + list(space.grid),
                        list(space.dims))
    cells = space.cells()
    book = study_book(settings, space)
    use_http_settings(DRIVER_HTTP)  # after Ray started: the workers set their own
    t_start = time.perf_counter()
    status = "KILLED"
    try:
        teachers = train_teachers(space, settings)
        teacher_runs = {p: tracking.teacher_run(tracker.uri, local_teacher_dir(p), commit)
                        for p in teachers}
        experiment = f"{settings['storage_path'].rstrip('/')}/{settings['name']}"
        rungs = search_rungs(space, settings)
        context = SearchContext(space=space, teacher_store=settings["teacher_store"],
                                teacher_epochs=settings["teacher_epochs"],
                                search_name=settings["name"], tracker=tracker,
                                teacher_runs=teacher_runs, experiment_path=experiment,
                                rungs=rungs)
        trainable = make_trainable(context, settings)
        budget = space.cell_budget(settings["num_samples"])
        print(tracking.where_to_look(tracker, settings["optuna_storage"]), flush=True)
        each = (f"up to {budget} trials or {book.epoch_budget} epochs" if book.epoch_budget
                else f"{budget} trials")
        print(f"cells: {len(cells)}, {each} each ({', '.join(c.label for c in cells)})"
              f"; early stopping: {stopping_words(space, settings, rungs)}"
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
                    failure_config=tune.FailureConfig(max_failures=2), verbose=0,
                    callbacks=run_callbacks(tracker, context, settings["epochs"],
                                            book.expected_trials(settings["epochs"])
                                            * len(cells))),
            )
        grid = tuner.fit()
        unfinished = interrupted(grid)
        if unfinished or short_cells(book, cells, settings["epochs"]):
            mark_interrupted(tracker, unfinished)
            what = (f"with {len(unfinished)} trial(s) unfinished" if unfinished
                    else "before every cell had its trials")
            print(f"\nthe search was interrupted {what}; "
                  "nothing was chosen or tested. Continue it with:\n  python -m tuning.search "
                  f"--resume --name {settings['name']} --storage-path "
                  f"{settings['storage_path']}", flush=True)
            return 130
        rows = res.trial_rows(grid, context)
        # Only now, with Tune's state saved for good: a driver killed earlier must still find
        # the checkpoint its saved state names for each trial.
        for row in rows:
            keep_newest_checkpoint(row["_result"].checkpoint)
        records = Records()
        # Runs a tracking outage kept from the trials are completed from their checkpoints.
        repaired = records("complete the trial runs", repair_runs, tracker, rows,
                           run_maker(tracker, context))
        if repaired and any(repaired.values()):
            print(f"tracking: {repaired['created']} run(s) created and "
                  f"{repaired['epochs_added']} epoch(s) logged from the trials' checkpoints")
        settle_studies(book, cells, rows, settings["epochs"])
        fronts = pareto_fronts(book, cells)
        res.mark_pareto(rows, fronts)
        chosen = res.choose(rows, settings.get("choose", "best"), fronts)
        warn_thin_cells(rows, cells)
        for key, row in chosen.items():
            row["_default_config"] = same_recipe(row["_config"], default_config(context, key))
        measure_tests(book, cells, chosen, settings)
        configs = {}
        for cell_key, row in chosen.items():
            cell = next(c for c in cells if c.key == cell_key)
            path = folder / "best" / f"{cell.slug}.yaml"
            atomic_write_text(path, row["_config"].to_yaml())
            configs[cell_key] = str(path)
        records("record the trials' final states", tracking.settle_trial_runs, tracker, rows)
        records("close the runs of unrecorded trials", close_unrecorded_runs, tracker, rows)
        res.write_csv(rows, folder / "results.csv")
        cell_table = res.cell_rows(rows, [c.key for c in cells], configs)
        res.write_csv(cell_table, folder / "cells.csv", res.CELL_COLUMNS)
        records("log the per-cell table", tracking.log_cell_table, tracker, cell_table, chosen)
        print(res.table_text(rows))
        print("\nper cell (val_acc: the chosen trial's last epoch; test_acc: the same weights)")
        print(res.table_text(cell_table, res.CELL_COLUMNS[:-1]))
        searched_s = time.perf_counter() - t_start
        print(f"search phase: {searched_s:.0f} s", flush=True)
        replicated = []
        if settings.get("replicates", 0) and chosen:
            finals = [{"cell": key, "trial_id": row["trial_id"],
                       "study_trial": row["study_trial"],
                       "run_id": row.get("mlflow_run_id"), "config": row["_config"]}
                      for key, row in chosen.items()]
            replicated = replicate_phase(settings, context, tracker, finals, folder, records)
            if replicated is None:
                print(f"\nthe replicates were interrupted; continue them with:\n  python -m "
                      f"tuning.search --resume --name {settings['name']} --storage-path "
                      f"{settings['storage_path']}", flush=True)
                return 130
        built = records("build the report", report.build, tracker.uri, settings["name"],
                        folder / "report")
        if built:
            print(built[0])
        records("finish the parent run", tracking.finish_parent, tracker,
                [folder / "results.csv", folder / "cells.csv",
                 *([folder / "replicates.csv"] if replicated else []),
                 folder / SETTINGS_NAME, *map(Path, configs.values())], chosen)
        status = "FINISHED" if not records.failed else "RUNNING"
        publish(folder, settings)
        print("\n" + tracking.where_to_look(tracker, settings["optuna_storage"]))
        empty = [c.label for c in cells if c.key not in chosen]
        print(f"\ntables: {folder / 'results.csv'} (every trial), {folder / 'cells.csv'} "
              f"(per cell)\nchosen configs: {folder / 'best'}/ (run one again with "
              "`python -m tuning.train --config FILE`)")
        if records.failed:
            print(f"\nthe training is done and its results are in {folder}, but MLflow could not "
                  f"{'; nor '.join(records.failed)}. When the tracking server answers, complete "
                  f"the records with:\n  python -m tuning.report {settings['name']} --repair "
                  f"--storage-path {settings['storage_path']} --tracking-uri {tracker.uri}")
            return 3
        if empty:
            print(f"no trial completed in cell(s) {', '.join(empty)}; see "
                  f"{folder / 'results.csv'} for the errors")
            return 1
        return 0
    finally:
        if status not in ("FINISHED", "RUNNING"):
            try:
                c = tracking.client(tracker.uri)
                c.set_tag(tracker.parent_run_id, "state", "interrupted")
                c.set_terminated(tracker.parent_run_id, status=status)
            except Exception:  # noqa: BLE001 - nothing more can be recorded
                pass
        if started:
            stop_ray()
