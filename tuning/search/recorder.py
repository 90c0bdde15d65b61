"""A trial's MLflow records that survive a tracking outage, and their repair afterwards.

Training never waits on the tracking server: a trial logs each epoch through `TrialRecorder`,
which keeps what it could not log and sends it with the next epoch; the run itself is created
when the server first answers. If the server never comes back while the trial runs, the trial
still finishes, and `repair_runs` (the driver at the end of the search, or
`python -m tuning.report NAME --repair`) completes its run from the trial's last checkpoint,
which holds every epoch's metrics: missing epochs are logged, a missing model and config are
added, and the run gets its final state. Nothing is logged twice.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tuning.run.config import RunConfig
from tuning.search.tracking import Tracker, client, log_metrics, metric_name

# A trial's requests fail fast and are retried by the next epoch, not by the client for
# minutes; the driver's (after the first check) wait a little longer.
TRIAL_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
              "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
DRIVER_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def use_http_settings(values: dict[str, str]) -> None:
    """MLflow's retry settings for this process (the user's own values win)."""
    for key, value in values.items():
        os.environ.setdefault(key, value)


class TrialRecorder:
    """A trial's listener: logs each epoch to its run, buffering what the server did not take.

    `start` creates or finds the run; it is called again until it succeeds, so a trial that
    starts during an outage gets its run when the server returns.
    """

    def __init__(self, tracker: Tracker, cfg: RunConfig, run_dir: Path, start,
                 run_id: str | None = None) -> None:
        self.tracker, self.cfg, self.run_dir, self.start = tracker, cfg, run_dir, start
        self.run_id = run_id
        self.pending: list[tuple[dict[str, Any], int]] = []
        self.finished = False
        self.outage_since: float | None = None

    def __call__(self, metrics: dict[str, Any], ckpt: Path | None) -> None:
        self.pending.append((dict(metrics), int(metrics["epoch"])))
        if self.flush() and metrics["epoch"] >= self.cfg.epochs:
            self.finish()

    def flush(self) -> bool:
        """Log every pending epoch, oldest first; False when the server did not answer."""
        try:
            if self.run_id is None:
                self.run_id = self.start()
            while self.pending:
                metrics, step = self.pending[0]
                log_metrics(self.tracker.uri, self.run_id, metrics, step=step)
                self.pending.pop(0)
        except Exception as err:  # noqa: BLE001 - any failure: keep the epochs for later
            if self.outage_since is None:
                self.outage_since = time.time()
                print(f"tracking unreachable ({type(err).__name__}); training goes on and "
                      f"the epochs are logged when it answers", file=sys.stderr, flush=True)
            return False
        if self.outage_since is not None:
            print(f"tracking answers again after {time.time() - self.outage_since:.0f} s; "
                  "the buffered epochs are logged", file=sys.stderr, flush=True)
            self.outage_since = None
        return True

    def finish(self) -> None:
        """The last epoch: the run's model and config, then its end."""
        from tuning.run.checkpoint import atomic_write_text
        from tuning.run.trainer import MODEL_NAME

        try:
            atomic_write_text(self.run_dir / "config.yaml", self.cfg.to_yaml())
            mlflow = client(self.tracker.uri)
            mlflow.log_artifact(self.run_id, str(self.run_dir / MODEL_NAME))
            mlflow.log_artifact(self.run_id, str(self.run_dir / "config.yaml"))
            self.tracker.end_trial_run(self.run_id, "FINISHED")
            self.finished = True
        except Exception:  # noqa: BLE001 - the driver's repair completes the run
            pass


def logged_steps(uri: str, run_id: str) -> set[int]:
    return {m.step for m in client(uri).get_metric_history(run_id, metric_name("val_acc"))}


def complete_from_checkpoint(tracker: Tracker, run_id: str, checkpoint, *, epochs: int,
                             status: str, stopped_early: bool, reason: str | None = None) -> int:
    """Bring a run up to its trial's stored checkpoint: the epochs its history holds that the
    run lacks, the model and config if missing, and the final state. Returns the epochs
    logged."""
    from tuning.run.checkpoint import load_checkpoint
    from tuning.run.trainer import CHECKPOINT_NAME, MODEL_NAME, model_from_checkpoint

    uri = tracker.uri
    c = client(uri)
    added = 0
    run = c.get_run(run_id)
    complete = run.info.status != "RUNNING" and (
        status == "FAILED" or MODEL_NAME in {a.path for a in c.list_artifacts(run_id)})
    if complete and logged_steps(uri, run_id) >= set(range(1, epochs + 1)):
        return 0  # nothing missing: its checkpoint is not even read
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state_path = Path(folder) / CHECKPOINT_NAME
            state = load_checkpoint(state_path)
            have = logged_steps(uri, run_id)
            for metrics in state.get("history", []):
                if int(metrics["epoch"]) not in have:
                    log_metrics(uri, run_id, metrics, step=int(metrics["epoch"]))
                    added += 1
            artifacts = {a.path for a in c.list_artifacts(run_id)}
            if MODEL_NAME not in artifacts and status != "FAILED":
                with tempfile.TemporaryDirectory() as tmp:
                    epoch = model_from_checkpoint(state_path, Path(tmp) / MODEL_NAME)
                    cfg = RunConfig.from_dict(state["config"])
                    (Path(tmp) / "config.yaml").write_text(cfg.to_yaml())
                    c.log_artifact(run_id, str(Path(tmp) / MODEL_NAME))
                    c.log_artifact(run_id, str(Path(tmp) / "config.yaml"))
                    c.set_tag(run_id, "model_epoch", str(epoch))
    if c.get_run(run_id).info.status == "RUNNING":
        tracker.end_trial_run(run_id, status, reason=reason, stopped_early=stopped_early)
    return added


def repair_runs(tracker: Tracker, rows: list[dict[str, Any]], start_run) -> dict[str, int]:
    """Complete every row's run from its trial's checkpoint; `start_run(row)` creates the run
    of a trial that never got one (the tracking store was down or lost all along).

    Returns how many runs were created and how many epochs were added."""
    created = added = 0
    for row in rows:
        run_id = tracker.find_trial_run(row["trial_id"])
        if run_id is None:
            run_id = start_run(row)
            if run_id is None:
                continue
            created += 1
        row["mlflow_run_id"] = run_id
        status = {"FAILED": "FAILED"}.get(row["status"], "FINISHED")
        added += complete_from_checkpoint(
            tracker, run_id, row["_result"].checkpoint, epochs=int(row["epochs"] or 0),
            status=status,
            stopped_early=row["status"] == "STOPPED_EARLY", reason=row.get("error") or None)
    return {"created": created, "epochs_added": added}


def close_unrecorded_runs(tracker: Tracker, rows: list[dict[str, Any]],
                          role: str = "trial") -> None:
    """End the runs of trials (or replicates) a killed driver started but never recorded in
    its state.

    Tune restores only the trials its last saved state holds, so such a trial is not
    continued; without this its run would stay RUNNING for ever.
    """
    known = {row["trial_id"] for row in rows}
    runs = client(tracker.uri).search_runs(
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


def mark_interrupted(tracker: Tracker, trial_ids: list[str]) -> None:
    """The records of an interrupted search say so: its parent and its unfinished trials'
    runs end KILLED with the reason (a resume sets them running again)."""
    reason = "the search was interrupted; `python -m tuning.search --resume` continues it"
    try:
        c = client(tracker.uri)
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
