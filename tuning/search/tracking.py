"""MLflow tracking: one experiment per search, a parent run, one nested run per trial.

Everything goes through MlflowClient with explicit run ids (no global active run), because
runs are written from Ray workers, the driver and teacher tasks alike.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuning.config import RunConfig, UserError

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
TEACHER_EXPERIMENT = "teachers"
SECRET = re.compile(r"(secret|token|passw|credential|api[_-]?key|access[_-]?key|auth)", re.I)
MAX_PARAM = 500  # MLflow's limit on a param value's length


def default_tracking_uri(cli_value: str | None = None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db (absolute).

    Absolute, because every trial runs in its own directory.
    """
    uri = cli_value or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path(DEFAULT_DB).resolve()}"


def artifact_root(uri: str) -> str | None:
    """Local stores keep artifacts in ./mlartifacts; a server chooses its own."""
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        return Path(DEFAULT_ARTIFACTS).resolve().as_uri()
    return None


def scrub(key: str, value: Any) -> str | None:
    """A param or tag value safe to record: None for anything that looks like a credential."""
    text = str(value)
    if SECRET.search(key) or SECRET.search(text) or re.search(r"://[^/\s]+:[^@/\s]+@", text):
        return None
    return text[:MAX_PARAM]


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name() -> str:
    from tuning.trainer import describe_device, resolve_device

    return describe_device(resolve_device("auto"))


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def check_reachable(uri: str) -> None:
    """One clear error, before any trial starts, when the tracking store cannot be used.

    A local SQLite store is only checked for a writable folder: creating it here would
    write a file before the rest of the input is known to be good.
    """
    if uri.startswith("sqlite:///"):
        # sqlite:///rel.db is relative to the working folder, sqlite:////abs.db absolute.
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise UserError(f"MLflow tracking at {uri} cannot be created: {folder} is not a "
                            "writable folder; fix the path or pass another --tracking-uri")
        return
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    try:
        client(uri).search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - any failure here means "unusable store"
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise UserError(f"MLflow tracking at {uri} is unreachable ({reason}); start the server "
                        "(`mlflow server --host 127.0.0.1 --port 5000`) or drop --tracking-uri "
                        "to use the local sqlite:///mlflow.db") from None


def experiment_id(uri: str, name: str) -> str:
    c = client(uri)
    found = c.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    root = artifact_root(uri)
    return c.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in ((k, scrub(k, v)) for k, v in sorted(params.items()))
             if v is not None]
    c = client(uri)
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        c.log_batch(run_id, params=items[i:i + 100])


def log_metrics(uri: str, run_id: str, metrics: dict[str, Any], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if items:
        client(uri).log_batch(run_id, metrics=items)


def config_params(cfg: RunConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.to_dict().items() if k != "extra"}


@dataclass
class Tracker:
    """What a trial needs to write its run: picklable, so it travels to Ray workers."""

    uri: str
    experiment_id: str
    parent_run_id: str
    search_name: str
    commit: str

    def find_trial_run(self, trial_id: str) -> str | None:
        runs = client(self.uri).search_runs(
            [self.experiment_id],
            filter_string=f"tags.ray_trial_id = '{trial_id}' and "
                          f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'",
            max_results=1)
        return runs[0].info.run_id if runs else None

    def start_trial_run(self, trial_id: str, trial_name: str, cfg: RunConfig,
                        sample: dict[str, Any], teacher_run: str | None) -> str:
        """The trial's run: created once, found again by its Ray trial id on any restart."""
        tags = {"mlflow.parentRunId": self.parent_run_id, "ray_trial_id": trial_id,
                "search": self.search_name, "git_commit": self.commit, "device": device_name(),
                "method": cfg.method, "dataset": cfg.dataset, "stopped_early": "false",
                "cell": str(sample.get("cell", "")),
                "role": "replicate" if "replicate" in sample else "trial"}
        if "replicate" in sample:  # the chosen trial it repeats, with another seed
            tags.update(replicate=str(sample["replicate"]),
                        replicate_of=str(sample.get("replicate_of_run", "")),
                        replicate_of_trial=str(sample.get("replicate_of", "")))
        else:
            tags["study_trial"] = str(sample.get("study_trial", ""))
        if teacher_run:
            tags["teacher_run_id"] = teacher_run
        c = client(self.uri)
        run = c.create_run(self.experiment_id, run_name=trial_name, tags=tags)
        sampled = {} if "replicate" in sample else {
            f"sampled.{k}": v for k, v in sample.items() if k not in ("cell", "study_trial")}
        log_params(self.uri, run.info.run_id, {**config_params(cfg), **sampled})
        return run.info.run_id

    def resume_trial_run(self, run_id: str) -> None:
        client(self.uri).update_run(run_id, status="RUNNING")

    def end_trial_run(self, run_id: str, status: str, *, reason: str | None = None,
                      stopped_early: bool = False) -> None:
        c = client(self.uri)
        if reason:
            c.set_tag(run_id, "failure_reason", reason[:5000])
        c.set_tag(run_id, "stopped_early", str(stopped_early).lower())
        c.set_terminated(run_id, status=status)


def teacher_run(uri: str, teacher_dir: Path, commit: str) -> str:
    """The teacher's own run in the `teachers` experiment; made once per store entry and URI.

    Its curves come from the teacher's last checkpoint, so a teacher trained by an earlier
    search (or logged to another tracking URI) gets its run too.
    """
    from tuning.checkpoint import load_checkpoint
    from tuning.trainer import CHECKPOINT_NAME, MODEL_NAME, load_model

    teacher_dir = Path(teacher_dir)
    marker = teacher_dir / "mlflow-runs.txt"
    known = {}
    if marker.exists():
        for line in marker.read_text().splitlines():
            run_id, _, where = line.partition(" ")
            known[where] = run_id
    if uri in known:
        return known[uri]
    _, meta = load_model(teacher_dir / MODEL_NAME)
    history = load_checkpoint(teacher_dir / CHECKPOINT_NAME).get("history", [])
    c = client(uri)
    run = c.create_run(experiment_id(uri, TEACHER_EXPERIMENT), run_name=teacher_dir.name,
                       tags={"role": "teacher", "git_commit": commit, "device": device_name(),
                             "teacher_key": teacher_dir.name})
    run_id = run.info.run_id
    log_params(uri, run_id, {k: v for k, v in meta["config"].items() if k != "extra"})
    for epoch in history:
        log_metrics(uri, run_id, epoch, step=int(epoch["epoch"]))
    final = meta.get("metrics", {})
    log_metrics(uri, run_id, {k: final[k] for k in ("best_val_acc", "last_val_acc", "test_acc",
                                                     "train_time") if k in final},
                step=int(final.get("epoch", 0)))
    c.log_artifact(run_id, str(teacher_dir / MODEL_NAME))
    c.set_terminated(run_id, "FINISHED")
    with open(marker, "a") as f:
        f.write(f"{run_id} {uri}\n")
    return run_id


def start_parent(uri: str, settings: dict[str, Any], commit: str) -> Tracker:
    """The search's experiment and parent run, created once and reopened on resume."""
    exp = experiment_id(uri, settings["name"])
    c = client(uri)
    parent = settings.get("parent_run_id")
    if parent:
        c.update_run(parent, status="RUNNING")
    else:
        run = c.create_run(exp, run_name=settings["name"],
                           tags={"role": "search", "git_commit": commit,
                                 "space": settings["space_name"]})
        parent = run.info.run_id
        log_params(uri, parent, {
            "space": settings["space_name"], "space_source": settings["space_source"],
            "sampler": settings["sampler"], "scheduler": settings["scheduler"],
            "objective": settings["objective"], "num_samples": settings["num_samples"],
            "seed": settings["seed"], "epochs": settings["epochs"],
            "teacher_epochs": settings["teacher_epochs"],
            "max_concurrent": settings["max_concurrent"],
            "cells": "; ".join(settings.get("cells", [])),
            "trials_per_cell": settings.get("trials_per_cell"),
            "optuna_storage": settings.get("optuna_storage"),
            "gpus_per_trial": settings["gpus_per_trial"],
            "cpus_per_trial": settings["cpus_per_trial"],
            **{f"set.{k}": v for k, v in settings["overrides"].items()}})
    return Tracker(uri, exp, parent, settings["name"], commit)


def settle_trial_runs(tracker: Tracker, rows: list[dict[str, Any]]) -> None:
    """After the search: each trial's run gets its final status; none stays RUNNING. A cell's
    chosen trial gets its test accuracy and the tag `chosen`."""
    c = client(tracker.uri)
    for row in rows:
        run_id = tracker.find_trial_run(row["trial_id"])
        if run_id is None:
            continue
        row["mlflow_run_id"] = run_id
        if "chosen" in row:  # a search trial; a replicate logged its own test accuracy
            c.set_tag(run_id, "chosen", str(bool(row["chosen"])).lower())
            if not math.isnan(row.get("test_acc", math.nan)):
                c.log_metric(run_id, "test_acc", row["test_acc"])
        if c.get_run(run_id).info.status != "RUNNING":
            continue
        if row["status"] == "ERROR":
            tracker.end_trial_run(run_id, "FAILED", reason=row.get("error") or "trial errored")
        else:
            tracker.end_trial_run(run_id, "FINISHED",
                                  stopped_early=row["status"] == "STOPPED_EARLY")


def finish_parent(tracker: Tracker, files: list[Path], chosen: dict[str, dict[str, Any]],
                  status: str = "FINISHED") -> None:
    """The parent run's artifacts (tables, chosen configs), and a tag per cell naming the run
    of its chosen trial."""
    c = client(tracker.uri)
    for path in files:
        if Path(path).exists():
            artifact_path = "best" if Path(path).parent.name == "best" else None
            c.log_artifact(tracker.parent_run_id, str(path), artifact_path=artifact_path)
    for cell, row in chosen.items():
        if row.get("mlflow_run_id"):
            key = re.sub(r"[^A-Za-z0-9_./ -]", "-", f"chosen/{cell}")[:250]
            c.set_tag(tracker.parent_run_id, key, row["mlflow_run_id"])
    c.set_terminated(tracker.parent_run_id, status=status)
