"""The Ray Tune function trainable: one trial is one trainer run, reporting every epoch."""

from __future__ import annotations

import gc
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import ray
import torch
from ray import tune

from tuning.checkpoint import CheckpointError, atomic_write_text, safe_load, staged
from tuning.config import RunConfig
from tuning.search.space import Space, trial_values
from tuning.search.teachers import teacher_path, teacher_recipe
from tuning.search.tracking import Tracker, client, log_metrics
from tuning.trainer import CHECKPOINT_NAME, MODEL_NAME, train


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

    def run_config(self, sample: dict[str, Any]) -> RunConfig:
        """The trial's RunConfig: the space's fixed values, its cell and sample, and its
        teacher's path; a replicate carries its whole config."""
        if "config" in sample:
            return RunConfig.from_dict(dict(sample["config"]), source="a replicate's config")
        cfg = RunConfig(**trial_values(self.space, sample))
        if cfg.method != "ce" and not cfg.teacher:
            recipe = teacher_recipe(cfg, self.teacher_epochs)
            cfg.teacher = str(teacher_path(Path(self.teacher_store), recipe))
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


CHECKPOINT_DIR = re.compile(r"checkpoint_(\d+)$")
KEEP_CHECKPOINTS = 2  # Tune keeps each trial's newest 2: the current one and its fallback


def _index(path: str) -> int:
    match = CHECKPOINT_DIR.search(PurePosixPath(path).name)
    return int(match.group(1)) if match else -1


def stored_checkpoints(context: SearchContext) -> list[tune.Checkpoint]:
    """This trial's checkpoints in the search's storage, oldest first by Tune's index.

    They can be newer than the one Tune restores the trial with: a trial stores each
    checkpoint before the driver hears of it, and the driver saves its view every few seconds.
    """
    import pyarrow.fs

    restored = tune.get_checkpoint()
    if restored is not None:
        fs, folder = restored.filesystem, str(PurePosixPath(restored.path).parent)
    elif context.experiment_path:
        fs, root = pyarrow.fs.FileSystem.from_uri(context.experiment_path)
        folder = f"{root.rstrip('/')}/{Path(tune.get_context().get_trial_dir()).name}"
    else:
        return []
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True))
    except OSError:
        return []
    found = [i.path for i in infos
             if i.type == pyarrow.fs.FileType.Directory and _index(i.path) >= 0]
    return [tune.Checkpoint(p, filesystem=fs) for p in sorted(found, key=_index)]


def mend_bookkeeping(stored: list[tune.Checkpoint]) -> None:
    """Put back (empty) the checkpoint folders Tune's restored state still keeps but a killed
    driver had already deleted after newer epochs. Tune deletes them again at the trial's
    next checkpoint; a missing one makes that fail and leaves its count of checkpoints behind
    (ray-project/ray#27790)."""
    restored = tune.get_checkpoint()
    if restored is None:
        return
    known, have = _index(restored.path), {_index(c.path) for c in stored}
    folder = PurePosixPath(restored.path).parent
    for index in range(max(0, known - KEEP_CHECKPOINTS + 1), known):
        if index not in have:
            try:
                restored.filesystem.create_dir(str(folder / f"checkpoint_{index:06d}"))
            except OSError:
                pass  # only Tune's log suffers


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
    known = _index(checkpoint.path)
    older = [c for c in stored if 0 <= _index(c.path) < known][-1:]
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


def _epochs(state: dict) -> list[tuple]:
    return [(h.get("epoch"), h.get("train_time")) for h in state.get("history", [])]


def catch_up(run_dir: Path, resume_from: Path | None, state: dict,
             stored: list[tune.Checkpoint]) -> tuple[Path | None, dict]:
    """Hand Tune the epochs this trial stored after the checkpoint Tune restored it with.

    A killed driver may not have recorded a trial's last checkpoints. Those epochs are
    reported again (not trained again), each checkpointed one with its checkpoint and the
    epochs between with their metrics alone, so Tune's count of epochs stays the trial's.
    Only checkpoints that continue the current one are taken.
    """
    restored = tune.get_checkpoint()
    known = _index(restored.path) if restored is not None else -1
    epoch = state.get("epoch", 0)
    if restored is not None and resume_from is None:
        return resume_from, state  # a fresh start: nothing stored continues it
    current, nxt = run_dir / CHECKPOINT_NAME, run_dir / (CHECKPOINT_NAME + ".next")
    for checkpoint in (c for c in stored if _index(c.path) > known):
        try:
            new = _fetch(checkpoint, nxt, f"the trial goes on from epoch {epoch}")
        except CheckpointError as err:
            warnings.warn(str(err), stacklevel=2)
            break
        later = new.get("epoch", 0)
        if later <= epoch or len(new.get("history", [])) != later or \
                _epochs(new)[:epoch] != _epochs(state):
            break  # it does not continue this trial's epochs (it restarted since, or fell back)
        os.replace(nxt, current)
        for metrics in new["history"][epoch:-1]:  # epochs that wrote no checkpoint
            report_to_tune(dict(metrics), None)
        report_to_tune(dict(new["history"][-1]), current)
        resume_from, state, epoch = current, new, later
    nxt.unlink(missing_ok=True)
    return resume_from, state


class TrialRunLogger:
    """Logs each epoch to the trial's run; after the last, its artifacts, then ends the run."""

    def __init__(self, tracker: Tracker, run_id: str, cfg: RunConfig, run_dir: Path) -> None:
        self.tracker, self.run_id, self.cfg, self.run_dir = tracker, run_id, cfg, run_dir

    def __call__(self, metrics: dict[str, Any], ckpt: Path | None) -> None:
        log_metrics(self.tracker.uri, self.run_id, metrics, step=metrics["epoch"])
        if metrics["epoch"] < self.cfg.epochs:
            return
        atomic_write_text(self.run_dir / "config.yaml", self.cfg.to_yaml())
        mlflow = client(self.tracker.uri)
        mlflow.log_artifact(self.run_id, str(self.run_dir / MODEL_NAME))
        mlflow.log_artifact(self.run_id, str(self.run_dir / "config.yaml"))
        self.tracker.end_trial_run(self.run_id, "FINISHED")


def trial_run_id(context: SearchContext, cfg: RunConfig, sample: dict[str, Any],
                 state: dict) -> str | None:
    """The trial's MLflow run: the one named in its checkpoint, else found by trial id, else new.

    A restarted trial therefore continues its own run and never starts a second one.
    """
    tracker = context.tracker
    if tracker is None:
        return None
    trial = tune.get_context()
    run_id = state.get("extra", {}).get("mlflow_run_id") or \
        tracker.find_trial_run(trial.get_trial_id())
    if run_id:
        tracker.resume_trial_run(run_id)
        return run_id
    return tracker.start_trial_run(trial.get_trial_id(), trial.get_trial_name(), cfg, sample,
                                   context.teacher_runs.get(cfg.teacher or ""))


def run_trial(config: dict[str, Any], context: SearchContext) -> None:
    """The trainable: build the trial's config, resume from Tune's checkpoint, train."""
    cfg = context.run_config(config)
    # The worker may have run an earlier trial (reuse_actors): free what it left behind
    # before this one allocates, so that a reused worker fits what a fresh one fits.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    run_dir = Path.cwd() / "run"  # Tune runs each trial in its own trial directory
    stored = stored_checkpoints(context)
    mend_bookkeeping(stored)
    resume_from, state = catch_up(run_dir, *restored_checkpoint(run_dir, stored), stored)
    if state.get("epoch", 0) >= cfg.epochs:
        return  # it had finished, and its run ended with its artifacts; Tune has its last epoch
    run_id = trial_run_id(context, cfg, config, state)
    tracker = context.tracker
    listeners = [report_to_tune]
    if run_id is not None:
        # Before Tune's report: a trial the scheduler stops may not return from it.
        listeners.insert(0, TrialRunLogger(tracker, run_id, cfg, run_dir))
    extra = {"mlflow_run_id": run_id} if run_id else {}
    try:
        try:
            train(cfg, run_dir, listeners=listeners, resume_from=resume_from,
                  evaluate_test=context.evaluate_test, quiet=True, checkpoint_extra=extra)
        except CheckpointError as err:
            if resume_from is None:
                raise
            warnings.warn(f"{err}; starting the trial afresh", stacklevel=2)
            resume_from.unlink(missing_ok=True)
            train(cfg, run_dir, listeners=listeners, evaluate_test=context.evaluate_test,
                  quiet=True, checkpoint_extra=extra)
    except Exception as err:
        if run_id is not None:
            reason = f"{type(err).__name__}: {err}".splitlines()[0]
            tracker.end_trial_run(run_id, "FAILED", reason=reason)
        raise
