"""The Ray Tune function trainable: one trial is one trainer run, reporting every epoch."""

from __future__ import annotations

import dataclasses
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

from data import DataError
from tuning.checkpoint import CheckpointError, safe_load, staged
from tuning.config import RunConfig, UserError
from tuning.search import storage
from tuning.search.recorder import TRIAL_HTTP, TrialRecorder, use_http_settings
from tuning.search.space import Space, trial_values
from tuning.search.teachers import local_teacher_dir, teacher_path, teacher_recipe
from tuning.search.tracking import Tracker
from tuning.trainer import CHECKPOINT_NAME, MODEL_NAME, DivergedError, OutOfMemory, train


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


def keep_newest_checkpoint(checkpoint) -> int:
    """Delete every checkpoint of an ended trial in Tune's storage but `checkpoint`, its
    newest: that one holds its last model and every epoch's metrics (for `--repair`); the one
    before it was only a fallback while the trial ran. Call it once Tune has returned: until
    then a resumed driver may restore from the older one. Returns how many were deleted."""
    import pyarrow.fs

    if checkpoint is None:
        return 0
    fs, folder = checkpoint.filesystem, str(PurePosixPath(checkpoint.path).parent)
    keep = _index(checkpoint.path)
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True))
        older = [i.path for i in infos if i.type == pyarrow.fs.FileType.Directory
                 and 0 <= _index(i.path) < keep]
        for path in older:
            fs.delete_dir(path)
    except OSError:
        return 0
    return len(older)


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


def quiet_worker() -> None:
    """Keep the worker's routine chatter out of the driver's console: Ray's note on every
    stored checkpoint, and the SystemExit Ray's SIGTERM handler raises when Tune ends a cached
    worker (Python reports it as "Exception ignored" while the process exits anyway)."""
    import logging
    import sys

    for name in ("ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    default = sys.__unraisablehook__

    def hook(unraisable) -> None:
        if not isinstance(unraisable.exc_value, SystemExit):
            default(unraisable)

    sys.unraisablehook = hook


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
    stored = stored_checkpoints(context)
    mend_bookkeeping(stored)
    resume_from, state = catch_up(run_dir, *restored_checkpoint(run_dir, stored), stored)
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
