"""The Ray Tune function trainable: one trial is one trainer run, reporting every epoch."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune

from tuning.checkpoint import CheckpointError, atomic_write_text, load_checkpoint
from tuning.config import RunConfig
from tuning.space import Space, trial_values
from tuning.teachers import teacher_path, teacher_recipe
from tuning.tracking import Tracker, client, log_metrics
from tuning.trainer import CHECKPOINT_NAME, MODEL_NAME, train


@dataclass
class SearchContext:
    """What every trial of a search shares; passed to the trainable with tune.with_parameters."""

    space: Space
    overrides: dict[str, Any]
    teacher_store: str
    teacher_epochs: int
    search_name: str
    tracker: Tracker | None = None
    teacher_runs: dict[str, str] = field(default_factory=dict)  # teacher path -> its run id

    def run_config(self, sample: dict[str, Any]) -> RunConfig:
        """The trial's RunConfig: space, sample, overrides, and its teacher's path."""
        cfg = RunConfig(**trial_values(self.space, sample, self.overrides))
        if cfg.method != "ce" and not cfg.teacher:
            recipe = teacher_recipe(cfg, self.teacher_epochs)
            cfg.teacher = str(teacher_path(Path(self.teacher_store), recipe))
        return cfg


def report_to_tune(metrics: dict[str, Any], ckpt: Path) -> None:
    """Report an epoch together with its checkpoint, as Tune's function-trainable API wants."""
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy2(ckpt, Path(tmp) / CHECKPOINT_NAME)
        node = ray.get_runtime_context().get_node_id()
        tune.report({**metrics, "node_id": node},
                    checkpoint=tune.Checkpoint.from_directory(tmp))


def restored_checkpoint(run_dir: Path) -> Path | None:
    """Copy the checkpoint Tune restored this trial with into the run dir, if there is one."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        src = Path(folder) / CHECKPOINT_NAME
        if not src.is_file():
            warnings.warn(f"restored checkpoint {folder} has no {CHECKPOINT_NAME}; "
                          "starting the trial afresh", stacklevel=2)
            return None
        run_dir.mkdir(parents=True, exist_ok=True)
        dst = run_dir / CHECKPOINT_NAME
        shutil.copy2(src, dst)
        return dst


class TrialRunLogger:
    """Logs each epoch to the trial's run; after the last, its artifacts, then ends the run."""

    def __init__(self, tracker: Tracker, run_id: str, cfg: RunConfig, run_dir: Path) -> None:
        self.tracker, self.run_id, self.cfg, self.run_dir = tracker, run_id, cfg, run_dir

    def __call__(self, metrics: dict[str, Any], ckpt: Path) -> None:
        log_metrics(self.tracker.uri, self.run_id, metrics, step=metrics["epoch"])
        if metrics["epoch"] < self.cfg.epochs:
            return
        atomic_write_text(self.run_dir / "config.yaml", self.cfg.to_yaml())
        mlflow = client(self.tracker.uri)
        mlflow.log_artifact(self.run_id, str(self.run_dir / MODEL_NAME))
        mlflow.log_artifact(self.run_id, str(self.run_dir / "config.yaml"))
        self.tracker.end_trial_run(self.run_id, "FINISHED")


def trial_run_id(context: SearchContext, cfg: RunConfig, sample: dict[str, Any],
                 resume_from: Path | None) -> str | None:
    """The trial's MLflow run: the one named in its checkpoint, else found by trial id, else new.

    A restarted trial therefore continues its own run and never starts a second one.
    """
    tracker = context.tracker
    if tracker is None:
        return None
    run_id = None
    if resume_from is not None:
        try:
            run_id = load_checkpoint(resume_from).get("extra", {}).get("mlflow_run_id")
        except CheckpointError:
            run_id = None
    trial = tune.get_context()
    run_id = run_id or tracker.find_trial_run(trial.get_trial_id())
    if run_id:
        tracker.resume_trial_run(run_id)
        return run_id
    return tracker.start_trial_run(trial.get_trial_id(), trial.get_trial_name(), cfg, sample,
                                   context.teacher_runs.get(cfg.teacher or ""))


def run_trial(config: dict[str, Any], context: SearchContext) -> None:
    """The trainable: build the trial's config, resume from Tune's checkpoint, train."""
    cfg = context.run_config(config)
    run_dir = Path.cwd() / "run"  # Tune runs each trial in its own trial directory
    resume_from = restored_checkpoint(run_dir)
    run_id = trial_run_id(context, cfg, config, resume_from)
    tracker = context.tracker
    listeners = [report_to_tune]
    if run_id is not None:
        # Before Tune's report: a trial the scheduler stops may not return from it.
        listeners.insert(0, TrialRunLogger(tracker, run_id, cfg, run_dir))
    extra = {"mlflow_run_id": run_id} if run_id else {}
    try:
        try:
            train(cfg, run_dir, listeners=listeners, resume_from=resume_from,
                  evaluate_test=False, quiet=True, checkpoint_extra=extra)
        except CheckpointError as err:
            if resume_from is None:
                raise
            warnings.warn(f"{err}; starting the trial afresh", stacklevel=2)
            resume_from.unlink(missing_ok=True)
            train(cfg, run_dir, listeners=listeners, evaluate_test=False, quiet=True,
                  checkpoint_extra=extra)
    except Exception as err:
        if run_id is not None:
            reason = f"{type(err).__name__}: {err}".splitlines()[0]
            tracker.end_trial_run(run_id, "FAILED", reason=reason)
        raise
