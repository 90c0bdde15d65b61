"""The search driver: teachers as Ray tasks, then trials under a Tune Tuner with OptunaSearch."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from tuning import report
from tuning.checkpoint import atomic_write_text
from tuning.search import tracking
from tuning.search.results import error_reason
from tuning.search.space import Space, SpaceSampler
from tuning.search.teachers import plan_teachers, teacher_path, train_teacher
from tuning.search.trainable import KEEP_CHECKPOINTS, SearchContext, run_trial

METRIC = "val_acc"
SETTINGS_NAME = "search.yaml"


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


def close_unrecorded_runs(tracker: tracking.Tracker, rows: list[dict[str, Any]]) -> None:
    """End the runs of trials a killed driver started but never recorded in its state.

    Tune restores only the trials its last saved state holds, so such a trial is not
    continued; without this its run would stay RUNNING for ever.
    """
    known = {row["trial_id"] for row in rows}
    runs = tracking.client(tracker.uri).search_runs(
        [tracker.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{tracker.parent_run_id}' and "
                      "attributes.status = 'RUNNING'", max_results=10000)
    for run in runs:
        if run.data.tags.get("ray_trial_id") not in known:
            tracker.end_trial_run(run.info.run_id, "KILLED", stopped_early=True,
                                  reason="the search driver was killed before it recorded this "
                                         "trial, so the resumed search could not continue it")


def train_teachers(space: Space, settings: dict[str, Any]) -> list[Path]:
    """Train every missing teacher the space can ask for, as parallel Ray tasks."""
    store = Path(settings["teacher_store"])
    recipes = plan_teachers(space, settings["overrides"], settings["teacher_epochs"])
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


def make_searcher(space: Space, settings: dict[str, Any]):
    sampler_fn = SpaceSampler(space)
    seed = settings["seed"]
    if space.grid:
        sampler = optuna.samplers.GridSampler(sampler_fn.grid_space(), seed=seed)
    elif settings["objective"] == "acc-time":
        sampler = optuna.samplers.NSGAIISampler(seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed)
    if settings["objective"] == "acc-time":
        searcher = OptunaSearch(space=sampler_fn, metric=["best_val_acc", "train_time"],
                                mode=["max", "min"], sampler=sampler)
    else:
        searcher = OptunaSearch(space=sampler_fn, metric=METRIC, mode="max", sampler=sampler)
    if settings["max_concurrent"]:
        searcher = ConcurrencyLimiter(searcher, max_concurrent=settings["max_concurrent"])
    return searcher


def make_scheduler(settings: dict[str, Any]):
    if settings["scheduler"] == "fifo" or settings["objective"] == "acc-time":
        return FIFOScheduler()
    epochs = settings["epochs"]
    # The trial's own epoch, not Tune's count of reports: after a trial falls back to an older
    # checkpoint (or starts afresh) the two differ, and ASHA would stop it short of max_t.
    return ASHAScheduler(time_attr="epoch", max_t=epochs,
                         grace_period=max(1, epochs // 4), reduction_factor=2)


def make_trainable(context: SearchContext, settings: dict[str, Any]):
    resources = {"cpu": settings["cpus_per_trial"], "gpu": settings["gpus_per_trial"]}
    return tune.with_resources(tune.with_parameters(run_trial, context=context), resources)


def run_search(settings: dict[str, Any], space: Space, *, address: str | None, resume: bool,
               folder: Path) -> int:
    from tuning.search import results as res
    from tuning.search.cli import write_settings

    # Tune saves its view of the search (trials, their last checkpoints, the searcher) every
    # 10 s or more by default; a trial it has not saved yet is one that a resume after a killed
    # driver cannot continue. Every 2 s keeps that window shorter than a trial's start-up.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    commit = tracking.git_commit()
    tracker = tracking.start_parent(settings["tracking_uri"], settings, commit)
    if not resume:
        settings["parent_run_id"] = tracker.parent_run_id
        write_settings(folder, settings)
    started = ensure_ray(address)
    status = "KILLED"
    try:
        teachers = train_teachers(space, settings)
        teacher_runs = {str(p): tracking.teacher_run(tracker.uri, p.parent, commit)
                        for p in teachers}
        experiment = f"{settings['storage_path'].rstrip('/')}/{settings['name']}"
        context = SearchContext(space=space, overrides=settings["overrides"],
                                teacher_store=settings["teacher_store"],
                                teacher_epochs=settings["teacher_epochs"],
                                search_name=settings["name"], tracker=tracker,
                                teacher_runs=teacher_runs, experiment_path=experiment)
        trainable = make_trainable(context, settings)
        if resume and tune.Tuner.can_restore(experiment):
            tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=False)
        else:
            multi = settings["objective"] == "acc-time"
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    search_alg=make_searcher(space, settings),
                    scheduler=make_scheduler(settings), num_samples=settings["num_samples"],
                    metric=None if multi else METRIC, mode=None if multi else "max",
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
        rows = res.trial_rows(grid, context)
        res.mark_pareto(rows)
        best = res.best_row(rows)
        if best is not None:
            if best["_result"].checkpoint is not None:
                with best["_result"].checkpoint.as_directory() as ckpt_dir:
                    best["test_acc"] = res.test_accuracy(best["_config"], Path(ckpt_dir),
                                                         epoch=int(best["epochs"]))
            atomic_write_text(folder / "best_config.yaml", best["_config"].to_yaml())
        tracking.settle_trial_runs(tracker, rows)
        close_unrecorded_runs(tracker, rows)
        res.write_csv(rows, folder / "results.csv")
        print(res.table_text(rows))
        try:
            report_text, _ = report.build(tracker.uri, settings["name"], folder / "plots")
            print(report_text)
        except Exception as err:  # noqa: BLE001 - plots are a convenience; never lose a search
            print(f"warning: the comparison plots failed ({err}); the results are intact")
        status = "FINISHED"
        tracking.finish_parent(tracker, [folder / "results.csv", folder / "best_config.yaml",
                                         folder / SETTINGS_NAME], best)
        if best is None:
            print(f"no trial finished; see {folder / 'results.csv'} for the errors")
            return 1
        print(f"\nbest trial {best['trial_id']}: val_acc {best['val_acc']:.4f}, "
              f"test_acc {best['test_acc']:.4f} ({best['method']}, {best['dataset']}, "
              f"depth {best['depth']})")
        best_yaml = folder / "best_config.yaml"
        print(f"table: {folder / 'results.csv'}\nbest config: {best_yaml} "
              f"(run it again with `python -m tuning.train --config {best_yaml}`)")
        return 0
    finally:
        if status != "FINISHED":
            tracking.client(tracker.uri).set_terminated(tracker.parent_run_id, status=status)
        if started:
            ray.shutdown()



