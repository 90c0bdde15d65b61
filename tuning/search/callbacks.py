"""How the console and MLflow hear of Tune's trial events: one line per event, and each
trial's MLflow run ended with the state it ended in."""

from __future__ import annotations

import math
from pathlib import Path

from ray import tune

from tuning.search import tracking
from tuning.search.results import error_reason
from tuning.search.trainable import SearchContext


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
        self.counted = False

    def on_step_begin(self, iteration, trials, **info) -> None:
        if not self.counted:  # a resumed search counts on from the trials that had ended
            self.counted = True
            self.done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)

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

    from tuning.run.checkpoint import load_checkpoint
    from tuning.run.config import RunConfig
    from tuning.run.trainer import CHECKPOINT_NAME, MODEL_NAME, model_from_checkpoint

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
