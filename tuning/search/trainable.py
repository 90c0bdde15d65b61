"""The Ray Tune function trainable: one trial is one trainer run, reporting every epoch."""

from __future__ import annotations

import dataclasses
import gc
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from data import DataError
from tuning.run.checkpoint import CheckpointError, safe_load, staged
from tuning.run.config import RunConfig, UserError
from tuning.run.trainer import CHECKPOINT_NAME, MODEL_NAME, DivergedError, OutOfMemory, train
from tuning.search import storage
from tuning.search.raytune import (
    catch_up,
    checkpoint_index,
    mend_bookkeeping,
    quiet_worker,
    stored_checkpoints,
)
from tuning.search.recorder import TRIAL_HTTP, TrialRecorder, use_http_settings
from tuning.search.space import Space, trial_values
from tuning.search.teachers import local_teacher_dir, teacher_path, teacher_recipe
from tuning.search.tracking import Tracker


@dataclass
class SearchContext:
    """What every trial of a search shares; passed to the trainable with tune.with_parameters."""

    space: Space  # with the search's --set values fixed
    teacher_store: str
    teacher_epochs: int
    search_name: str
    tracker: Tracker | None = None
    teacher_runs: dict[str, str] = field(default_factory=dict)  # teacher path -> its run id
    experiment_path: str | None = None  # the search's folder in Tune's storage (path or URI)
    evaluate_test: bool = False  # replicates measure their test accuracy; search trials don't
    rungs: tuple[int, ...] = ()  # epochs a trial may be stopped at: each writes a checkpoint

    def run_config(self, sample: dict[str, Any]) -> RunConfig:
        """The trial's RunConfig: the space's fixed values, its cell and sample, and its
        teacher's path; a replicate carries its whole config."""
        if "config" in sample:
            return RunConfig.from_dict(dict(sample["config"]), source="a replicate's config")
        cfg = RunConfig(**trial_values(self.space, sample))
        if cfg.method != "ce" and not cfg.teacher:
            recipe = teacher_recipe(cfg, self.teacher_epochs)
            cfg.teacher = teacher_path(self.teacher_store, recipe)
        return cfg


def report_to_tune(metrics: dict[str, Any], ckpt: Path | None) -> None:
    """Report an epoch to Tune, with its checkpoint when the epoch wrote one.

    Tune wants the checkpoint as a folder, which it copies to storage during the report.
    """
    metrics = {**metrics, "node_id": ray.get_runtime_context().get_node_id()}
    if ckpt is None:
        tune.report(metrics)
        return
    with staged(ckpt) as folder:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(folder)))


def _fetch(checkpoint: tune.Checkpoint, dst: Path, fix: str) -> dict:
    """Load a stored checkpoint's file and copy it to `dst`; CheckpointError names the file."""
    try:
        with checkpoint.as_directory() as folder:
            src = Path(folder) / CHECKPOINT_NAME
            state = safe_load(src, what="checkpoint", fix=fix)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
            return state
    except (OSError, RuntimeError) as err:  # the folder itself is gone or unreadable
        raise CheckpointError(f"checkpoint {checkpoint.path} cannot be read ({err}); {fix}") \
            from None


def restored_checkpoint(run_dir: Path, stored: list[tune.Checkpoint]) -> tuple[Path | None, dict]:
    """The checkpoint to resume from, copied into the run dir, and its state.

    It is the one Tune restored the trial with; if that is damaged or gone, the stored one
    before it (with a warning), and only if that fails too, none: a fresh start.
    """
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None, {}
    known = checkpoint_index(checkpoint.path)
    older = [c for c in stored if 0 <= checkpoint_index(c.path) < known][-1:]
    candidates = [checkpoint, *older]
    dst = run_dir / CHECKPOINT_NAME
    for i, candidate in enumerate(candidates):
        fix = (f"falling back to the previous checkpoint {candidates[i + 1].path}"
               if i + 1 < len(candidates) else "starting the trial afresh")
        try:
            return dst, _fetch(candidate, dst, fix)
        except CheckpointError as err:
            warnings.warn(str(err), stacklevel=2)
    return None, {}


def run_starter(context: SearchContext, cfg: RunConfig, sample: dict[str, Any], state: dict):
    """The trial's MLflow run: the one named in its checkpoint, else found by trial id, else new.

    A restarted trial therefore continues its own run and never starts a second one.
    """
    tracker, trial = context.tracker, tune.get_context()

    def start() -> str:
        run_id = state.get("extra", {}).get("mlflow_run_id")
        if not run_id or not tracker.has_run(run_id):  # the store may have been replaced
            run_id = tracker.find_trial_run(trial.get_trial_id())
        if run_id:
            tracker.resume_trial_run(run_id)
            return run_id
        return tracker.start_trial_run(trial.get_trial_id(), trial.get_trial_name(), cfg, sample,
                                       context.teacher_runs.get(cfg.teacher or ""))

    return start


# Errors that would recur if the trial were run again from its checkpoint: a diverged loss,
# a model that does not fit in memory, a missing or wrong teacher, a bad config or data.
DETERMINISTIC = (DivergedError, OutOfMemory, UserError, DataError)
FAILED = "failed"  # the key of a final result that reports such a failure


def run_trial(config: dict[str, Any], context: SearchContext) -> None:
    """The trainable: build the trial's config, resume from Tune's checkpoint, train.

    A deterministic failure ends the trial at once with its reason, as a final result with
    `failed` (Tune would otherwise restart it from its checkpoint to fail again); any other
    error (a lost node, a killed worker, a storage hiccup) is raised, and Tune retries it.
    """
    quiet_worker()
    # A trial's local folder (its working checkpoints and model) is removed when it ends:
    # the model is in MLflow and the checkpoints in Tune's storage. A trial the scheduler
    # stopped may not get to its own cleanup, so a reused worker clears its predecessor's.
    for earlier in _LOCAL_FOLDERS:
        shutil.rmtree(earlier, ignore_errors=True)
    run_dir = Path.cwd() / "run"  # Tune runs each trial in its own trial directory
    _LOCAL_FOLDERS[:] = [run_dir]
    done: dict[str, Any] = {"epoch": 0}
    try:
        cfg = context.run_config(config)
        _run(config, context, cfg, done, run_dir)
    except DETERMINISTIC as err:
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        _end_failed(context, done.get("run_id"), reason)
        tune.report({FAILED: reason, "epoch": done["epoch"]})
        return
    except Exception as err:
        _end_failed(context, done.get("run_id"), f"{type(err).__name__}: {err}".splitlines()[0])
        raise
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


_LOCAL_FOLDERS: list[Path] = []  # this worker process's current trial folder


def _end_failed(context: SearchContext, run_id: str | None, reason: str) -> None:
    """Mark the trial's run FAILED; during a tracking outage the driver's repair does it."""
    if context.tracker is None:
        return
    try:
        run_id = run_id or context.tracker.find_trial_run(tune.get_context().get_trial_id())
        if run_id is not None:
            context.tracker.end_trial_run(run_id, "FAILED", reason=reason)
    except Exception:  # noqa: BLE001 - the tracking server is down: repaired at the end
        pass


def _run(config: dict[str, Any], context: SearchContext, cfg: RunConfig,
         done: dict[str, Any], run_dir: Path) -> None:
    """Train the trial; `done` follows its epochs and its MLflow run id."""
    # The worker may have run an earlier trial (reuse_actors): free what it left behind
    # before this one allocates, so that a reused worker fits what a fresh one fits.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    stored = stored_checkpoints(context.experiment_path)
    mend_bookkeeping(stored)
    resume_from, state = catch_up(run_dir, *restored_checkpoint(run_dir, stored), stored,
                                  fetch=_fetch, report=report_to_tune)
    done["epoch"] = state.get("epoch", 0)
    if done["epoch"] >= cfg.epochs:
        return  # it had finished, and its run ended with its artifacts
    listeners = [lambda metrics, _: done.update(epoch=metrics["epoch"]), report_to_tune]
    extra = {}
    if context.tracker is not None:
        use_http_settings(TRIAL_HTTP)
        recorder = TrialRecorder(context.tracker, cfg, run_dir,
                                 run_starter(context, cfg, config, state))
        recorder.flush()  # the run exists from the start, unless the server is down
        done["run_id"] = recorder.run_id
        if recorder.run_id:
            extra["mlflow_run_id"] = recorder.run_id
        # Before Tune's report: a trial the scheduler stops may not return from it.
        listeners.insert(0, recorder)
    if cfg.teacher and storage.is_uri(cfg.teacher):
        # A teacher store behind a URI: train from this node's copy of the teacher; the
        # run's records keep the store's URI.
        local = local_teacher_dir(cfg.teacher) / MODEL_NAME
        cfg = dataclasses.replace(cfg, teacher=str(local))
    kwargs = dict(listeners=listeners, evaluate_test=context.evaluate_test, quiet=True,
                  checkpoint_extra=extra, checkpoint_epochs=context.rungs)
    try:
        train(cfg, run_dir, resume_from=resume_from, **kwargs)
    except CheckpointError as err:
        if resume_from is None:
            raise
        warnings.warn(f"{err}; starting the trial afresh", stacklevel=2)
        resume_from.unlink(missing_ok=True)
        train(cfg, run_dir, **kwargs)


def make_trainable(context: SearchContext, cpus: float, gpus: float):
    """The trial function with the search's context and each trial's resources."""
    return tune.with_resources(tune.with_parameters(run_trial, context=context),
                               {"cpu": cpus, "gpu": gpus})


def run_maker(tracker: Tracker, context: SearchContext):
    """Creates the run of a trial that never got one (its tracking was down all along)."""
    def start(row: dict[str, Any]) -> str:
        sample = dict(row["_result"].config or {})
        cfg = row["_config"]
        return tracker.start_trial_run(row["trial_id"], "", cfg, sample,
                                       context.teacher_runs.get(cfg.teacher or ""))
    return start
