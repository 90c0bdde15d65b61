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

from tuning.run import envvars
from tuning.run.config import RunConfig, UserError
from tuning.run.console import mask_credentials
from tuning.search.settings import SearchSettings

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
    from tuning.run.trainer import describe_device, resolve_device

    return describe_device(resolve_device("auto"))


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def check_reachable(uri: str, *, create: bool = True) -> None:
    """One clear error, before any trial starts, when the tracking store cannot be used.

    A local SQLite store is checked without being created (that would write a file before
    the rest of the input is known to be good): its folder must be writable, and a file
    already there must be an SQLite database. Read-only commands (`create=False`) need it to
    exist.
    """
    if uri.startswith("sqlite:///"):
        # sqlite:///rel.db is relative to the working folder, sqlite:////abs.db absolute.
        path = Path(uri.removeprefix("sqlite:///"))
        if path.exists():
            import sqlite3

            try:
                with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
                    db.execute("select name from sqlite_master limit 1").fetchall()
            except sqlite3.Error as err:
                raise UserError(f"MLflow tracking at {uri} is not an SQLite database ({err}); "
                                "move the file away, or pass another --tracking-uri") from None
            return
        if not create:
            raise UserError(f"there is no MLflow tracking store at {uri}; pass the search's "
                            "--tracking-uri (or set MLFLOW_TRACKING_URI)")
        folder = path.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise UserError(f"MLflow tracking at {uri} cannot be created: {folder} is not a "
                            "writable folder; fix the path or pass another --tracking-uri")
        return
    # Fail fast here, and only here: the settings are restored afterwards, so that neither
    # the driver's later calls nor the trial workers (which inherit the environment) lose
    # MLflow's retries to a transient error.
    fast = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    try:
        with envvars.defaults(fast if uri.startswith(("http://", "https://")) else {}):
            client(uri).search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - any failure here means "unusable store"
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise UserError(f"MLflow tracking at {uri} is unreachable ({reason}); start the server "
                        "(`mlflow server --host 127.0.0.1 --port 5000`) or drop --tracking-uri "
                        "to use the local sqlite:///mlflow.db") from None


# The MLflow UI opens an experiment on its GenAI overview unless the experiment says it is
# model training: the experiment tag its web app reads is `mlflow.experimentKind`.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(uri: str, name: str, description: str | None = None) -> str:
    """The experiment `name`, created if missing, marked as model training (so the UI opens
    on its runs) and given `description` (the UI shows the note on the experiment page)."""
    c = client(uri)
    found = c.get_experiment_by_name(name)
    if found is not None:
        exp = found.experiment_id
    else:
        root = artifact_root(uri)
        exp = c.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)
    tags = {**EXPERIMENT_KIND, **({"mlflow.note.content": description} if description else {})}
    for key, value in tags.items():
        c.set_experiment_tag(exp, key, value)
    return exp


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in ((k, scrub(k, v)) for k, v in sorted(params.items()))
             if v is not None]
    c = client(uri)
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        c.log_batch(run_id, params=items[i:i + 100])


# What the trainer calls a metric -> its name in MLflow: the prefix is the chart section the
# UI groups it in, the suffix its unit. Accuracies are logged in percent.
METRIC_NAMES = {
    "val_acc": "val/acc", "best_val_acc": "val/best_acc", "train_acc": "train/acc",
    "test_acc": "test/acc", "train_loss": "train/loss", "epoch": "train/epoch",
    "lr": "opt/lr", "momentum": "opt/momentum", "eta": "opt/eta",
    "epoch_time": "time/epoch_s", "train_time": "time/train_total_s",
    "eval_time": "time/eval_total_s", "images_per_s": "time/images_per_s",
    "checkpoint_time": "time/checkpoint_s",
}
PERCENT = {"val_acc", "best_val_acc", "train_acc", "test_acc"}


def metric_name(key: str) -> str | None:
    """The MLflow name of a trainer metric (`loss_kl` -> `loss/kl`); None: not logged."""
    if key.startswith("loss_"):
        return f"loss/{key.removeprefix('loss_')}"
    return METRIC_NAMES.get(key)


def log_metrics(uri: str, run_id: str, metrics: dict[str, Any], step: int) -> None:
    """Log a trainer's metrics under their MLflow names (`metric_name`), accuracies in %."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = []
    for key, value in metrics.items():
        name = metric_name(key)
        if name is None or isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            continue
        # Rounded for the UI's columns: 0.01 % and 0.01 s are below any difference that matters.
        value = round(100.0 * value, 2) if key in PERCENT else (
            round(float(value), 2) if name.startswith("time/") else float(value))
        items.append(Metric(name, value, now, step))
    if items:
        client(uri).log_batch(run_id, metrics=items)


# The hyperparameters that apply to each method; the rest of its config is not logged, so that
# a parallel-coordinates plot never shows a JointRD run at AlignKD's default alpha.
RECIPE = ("dataset", "depth", "width", "shortcut", "block", "epochs", "batch_size", "lr",
          "max_lr_factor", "pct_start", "cycle_momentum", "momentum", "nesterov",
          "weight_decay", "seed", "split_seed", "val_fraction")
ETA = ("eta_kind", "eta_start", "eta_end", "eta_epochs")
METHOD_PARAMS = {"ce": (), "kd": ("alpha", "temperature"),
                 "alignkd": ("alpha", "temperature", *ETA, "feature_loss", "beta"),
                 "jointrd": ("lam", *ETA), "jointrd_released": (*ETA, "dis_weight")}
# Shared fields whose None means "the method's default": logged as the value the run used.
RESOLVED = ("alpha", "temperature")


def run_params(cfg: RunConfig) -> dict[str, Any]:
    """The params of a run: its method, recipe and the hyperparameters its method uses."""
    from losses import DEFAULT_BETA

    values = cfg.to_dict()
    keys = ["method", *RECIPE, *METHOD_PARAMS.get(cfg.method, ())]
    if cfg.cycle_momentum:
        keys.append("base_momentum")
    if cfg.method != "ce":
        keys += ["teacher_depth", "teacher"]
    if cfg.data_options():
        keys.append("data_path")
    out = {k: cfg.resolved(k) if k in RESOLVED else values[k] for k in keys}
    if "beta" in out and out["beta"] is None:
        out["beta"] = DEFAULT_BETA[cfg.feature_loss]  # the weight the loss actually used
    if out.get("teacher_depth") is None and "teacher_depth" in out:
        out["teacher_depth"] = cfg.depth
    return out


def run_label(cfg: RunConfig, sample: dict[str, Any] | None = None) -> str:
    """A run name a chart legend can show: `alignkd · cifar10 · P18 · #07` (`RV18` for a
    RepVGG student, `D18` for a Dirac one); teachers
    `teacher · cifar10 · R18`; replicates `... · seed 2`; a cell's default configuration
    `... · default`."""
    sample = sample or {}
    data = Path(cfg.data_path).stem if cfg.data_options() else cfg.dataset
    if cfg.method == "ce" and cfg.shortcut == "all":
        return f"teacher · {data} · R{cfg.depth}"
    # P: a Plain-CNN student; D: with Dirac convs; RV: with RepVGG blocks (folded to plain).
    student = {"dirac": "D", "repvgg": "RV"}.get(cfg.block, "P")
    label = f"{cfg.method} · {data} · {student}{cfg.depth}"
    if "study_trial" in sample:
        label += f" · #{int(sample['study_trial']):02d}"
    if sample.get("default") or sample.get("arm") == "default":
        label += " · default"
    elif sample.get("warm_start_from"):
        label += " · warm"
    if "replicate" in sample:
        if sample.get("replicate_of_number") not in (None, ""):
            label += f" · #{int(sample['replicate_of_number']):02d}"
        label += f" · seed {cfg.seed}"
    return label


# What a trial's or replicate's Tune config carries besides the values its study sampled.
NOT_SEARCHED = ("cell", "study_trial", "default", "warm_start_from", "replicate", "replicate_of",
                "replicate_of_run", "replicate_of_number", "config", "arm", "concurrency")


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
        if "replicate" in sample:
            # A replicate: the cell's chosen trial (arm "tuned") or its default configuration
            # (arm "default", the baseline), trained again with a new seed.
            tags.update(replicate=str(sample["replicate"]), arm=sample.get("arm", "tuned"),
                        replicate_of=str(sample.get("replicate_of_run", "")),
                        replicate_of_trial=str(sample.get("replicate_of", "")),
                        concurrency=str(sample.get("concurrency", "")))
        else:
            tags["study_trial"] = str(sample.get("study_trial", ""))
            tags["default_config"] = str(bool(sample.get("default"))).lower()
            if sample.get("warm_start_from"):  # queued from a finished search's trial
                tags["warm_start_from"] = str(sample["warm_start_from"])
        if teacher_run:
            tags["teacher_run_id"] = teacher_run
        searched = [k for k in sample if k not in NOT_SEARCHED]
        if searched:
            tags["searched"] = ", ".join(searched)  # which of its params the study sampled
        c = client(self.uri)
        run = c.create_run(self.experiment_id, run_name=run_label(cfg, sample), tags=tags)
        # The searched values also under the names the space gives them (eta_span beside the
        # eta_epochs it sets), so that views and plots over the space's parameters find them.
        own_names = {k: sample[k] for k in searched if k not in run_params(cfg)}
        log_params(self.uri, run.info.run_id, {**run_params(cfg), **own_names,
                                                **({"cell": sample["cell"]}
                                                   if sample.get("cell") else {})})
        return run.info.run_id

    def has_run(self, run_id: str) -> bool:
        return _exists(client(self.uri), run_id)

    def resume_trial_run(self, run_id: str) -> None:
        client(self.uri).update_run(run_id, status="RUNNING")

    def end_trial_run(self, run_id: str, status: str, *, reason: str | None = None,
                      stopped_early: bool = False) -> None:
        c = client(self.uri)
        if reason:
            c.set_tag(run_id, "failure_reason", reason[:5000])
        c.set_tag(run_id, "stopped_early", str(stopped_early).lower())
        c.set_terminated(run_id, status=status)


# Saved views of the runs table, stored as experiment tags the MLflow 3.17 web app reads
# (`mlflow.sharedViewState.<key>`, a JSON envelope whose `state` is the table's settings) and
# opened by a link with ?viewStateShareKey=<key>. Nothing else presets what the UI shows.
VIEW_TAG = "mlflow.sharedViewState."
VIEWS = {"chosen": "Each cell's chosen trial", "trials": "Every trial, best first",
         "replicates": "Replicates: tuned and default configurations, new seeds"}


def _column(kind: str, name: str) -> str:
    return f"{kind}.`{name}`"


def save_views(tracker: Tracker, searched: list[str], dims: list[str]) -> None:
    """Write the search's saved views of the runs table (see VIEWS) into its experiment."""
    import json

    now = int(time.time() * 1000)
    hyper = [_column("params", p) for p in searched]
    cells = [_column("tags", "cell"), *(_column("params", d) for d in dims if d != "cell")]
    acc = [_column("metrics", "val/acc"), _column("metrics", "test/acc")]
    timing = [_column("metrics", "time/train_total_s"), _column("metrics", "time/epoch_s")]
    states = {
        "chosen": {"searchFilter": "tags.chosen = 'true'",
                   "orderByKey": _column("metrics", "val/acc"), "orderByAsc": False,
                   "selectedColumns": [*cells, *acc, *hyper, *timing]},
        # One row per trial, never a group row: a group's row would show each column's
        # maximum, a mix of several trials' values that reads like a winner's configuration.
        "trials": {"searchFilter": "tags.role = 'trial'",
                   "orderByKey": _column("metrics", "val/acc"), "orderByAsc": False,
                   "selectedColumns": [*cells, _column("tags", "chosen"),
                                       _column("tags", "default_config"),
                                       _column("tags", "stopped_early"),
                                       _column("metrics", "train/epoch"), *acc, *hyper, *timing]},
        "replicates": {"searchFilter": "tags.role = 'replicate'",
                       "orderByKey": _column("tags", "cell"), "orderByAsc": True,
                       "selectedColumns": [*cells, _column("tags", "arm"),
                                           _column("tags", "replicate"),
                                           _column("params", "seed"), *acc, *timing,
                                           _column("tags", "concurrency")]},
    }
    c = client(tracker.uri)
    for key, state in states.items():
        c.set_experiment_tag(tracker.experiment_id, VIEW_TAG + key, json.dumps(
            {"name": VIEWS[key], "createdAt": now, "updatedAt": now, "state": json.dumps(state)}))
    # The metric the UI charts first.
    c.set_experiment_tag(tracker.experiment_id, "mlflow.experiment.primaryMetric.name", "val/acc")


def view_url(base: str, experiment_id: str, view: str) -> str:
    """A link that opens the runs table (model training, not GenAI) in a saved view."""
    return (f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={view}"
            "&workflowType=machine_learning")


def where_to_look(tracker: Tracker, optuna_storage: str | None = None) -> str:
    """The console's pointer to the records: the experiment, how to open it, and the studies."""
    uri = tracker.uri
    lines = [f"MLflow: experiment {tracker.search_name!r} in {uri}"]
    if uri.startswith(("http://", "https://")):
        base = uri
    else:
        base = "http://127.0.0.1:5000"
        lines.append(f"  mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
    lines.append(f"  each cell's chosen trial: {view_url(base, tracker.experiment_id, 'chosen')}")
    lines.append(f"  every trial, best first:  {view_url(base, tracker.experiment_id, 'trials')}")
    if optuna_storage:
        lines.append(f"Optuna: one study per cell in {optuna_storage}")
        lines.append(f"  optuna-dashboard {optuna_storage} --host 127.0.0.1 --port 8080")
    return mask_credentials("\n".join(lines))


def teacher_run(uri: str, teacher_dir: Path, commit: str) -> str:
    """The teacher's own run in the `teachers` experiment; made once per store entry and URI.

    Its curves come from the teacher's last checkpoint, so a teacher trained by an earlier
    search (or logged to another tracking URI) gets its run too.
    """
    from tuning.run.checkpoint import load_checkpoint
    from tuning.run.trainer import CHECKPOINT_NAME, MODEL_NAME, load_model

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
    cfg = RunConfig.from_dict(meta["config"], source=str(teacher_dir / MODEL_NAME))
    c = client(uri)
    description = ("The ResNet teachers the searches trained, one run per entry of the teacher "
                   "store (keyed by recipe). Accuracies are in %.")
    run = c.create_run(experiment_id(uri, TEACHER_EXPERIMENT, description),
                       run_name=run_label(cfg),
                       tags={"role": "teacher", "git_commit": commit, "device": device_name(),
                             "teacher_key": teacher_dir.name})
    run_id = run.info.run_id
    log_params(uri, run_id, run_params(cfg))
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


def describe(settings: SearchSettings) -> str:
    """The experiment's note, shown on its page in the MLflow UI."""
    cells = settings.cells
    return (f"Search **{settings.name}** of the space `{settings.space_name}`: "
            f"{len(cells)} cell(s), each its own Optuna study with "
            f"{settings.trials_per_cell} trial(s) of "
            f"{settings.epochs} epochs, then {settings.replicates} replicate(s) of "
            "its chosen trial.\n\nCells: " + ", ".join(f"`{c}`" for c in cells) + ".\n\n"
            "Each trial's run is tagged with its `cell`; each cell's chosen trial is tagged "
            "`chosen = true` and has `test/acc`. Accuracies are in %, times in seconds. The "
            "parent run holds `cells.csv` (the per-cell table), `report/` (the paper's "
            "tables with their spread, and figures) and `best/` (the chosen configs).")


def start_parent(uri: str, settings: SearchSettings, commit: str) -> Tracker:
    """The search's experiment and parent run, created once and reopened on resume."""
    exp = experiment_id(uri, settings.name, describe(settings))
    c = client(uri)
    parent = settings.parent_run_id
    if parent and not _exists(c, parent):
        # The tracking store was lost or replaced since: a new parent, and the trials' runs
        # are recreated from their checkpoints (see recorder.repair_runs).
        print(f"tracking: the search's parent run {parent} is not in "
              f"{mask_credentials(uri)}; it is created again, and its trials' runs are rebuilt "
              "from their checkpoints")
        parent = None
        settings.parent_run_id = None
    if parent:
        c.update_run(parent, status="RUNNING")
        c.set_tag(parent, "state", "running")
    else:
        run = c.create_run(exp, run_name=settings.name,
                           tags={"role": "search", "git_commit": commit,
                                 "space": settings.space_name})
        parent = run.info.run_id
        log_params(uri, parent, {
            "space": settings.space_name, "space_source": settings.space_source,
            "sampler": settings.sampler, "scheduler": settings.scheduler,
            "objective": settings.objective, "num_samples": settings.num_samples,
            "seed": settings.seed, "epochs": settings.epochs,
            "teacher_epochs": settings.teacher_epochs,
            "max_concurrent": settings.max_concurrent,
            "cells": "; ".join(settings.cells),
            "trials_per_cell": settings.trials_per_cell,
            "optuna_storage": settings.optuna_storage,
            "gpus_per_trial": settings.gpus_per_trial,
            "cpus_per_trial": settings.cpus_per_trial,
            **({"warm_start": settings.warm_start} if settings.warm_start else {}),
            **({"proxy_width": settings.proxy_width,
                "target_width": settings.target_width} if settings.proxy_width else {}),
            **{f"set.{k}": v for k, v in settings.overrides.items()}})
    return Tracker(uri, exp, parent, settings.name, commit)


def _exists(c, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        c.get_run(run_id)
        return True
    except MlflowException:
        return False


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
            if row.get("_default_config"):  # its configuration is its cell's default
                c.set_tag(run_id, "default_config", "true")
            if not math.isnan(row.get("test_acc", math.nan)):
                log_metrics(tracker.uri, run_id, {"test_acc": row["test_acc"]},
                            step=int(row.get("epochs") or 0))
        info = c.get_run(run_id).info
        row["run_name"] = info.run_name
        if info.status != "RUNNING":
            continue
        if row["status"] == "FAILED":
            tracker.end_trial_run(run_id, "FAILED", reason=row.get("error") or "trial errored")
        else:
            tracker.end_trial_run(run_id, "FINISHED",
                                  stopped_early=row["status"] == "STOPPED_EARLY")


def log_cell_table(tracker: Tracker, cell_rows: list[dict[str, Any]],
                   chosen: dict[str, dict[str, Any]]) -> None:
    """The per-cell comparison as an MLflow table on the parent run (`cells.json`): one click
    in the UI's artifact view, with each cell's chosen run by name, accuracies in %."""
    table: dict[str, list] = {k: [] for k in ("cell", "chosen run", "val acc (%)",
                                              "test acc (%)", "train time (s)", "trials",
                                              "completed", "stopped early", "failed")}
    for r in cell_rows:
        best = chosen.get(r["cell"], {})
        name = best.get("run_name") or r.get("chosen_trial", "")
        for key, value in (("cell", r["cell"]), ("chosen run", name),
                           ("val acc (%)", 100 * r["val_acc"]),
                           ("test acc (%)", 100 * r["test_acc"]),
                           ("train time (s)", r["train_time"]), ("trials", r["trials"]),
                           ("completed", r["completed"]), ("stopped early", r["stopped_early"]),
                           ("failed", r["failed"])):
            table[key].append(round(value, 2) if isinstance(value, float) and
                              math.isfinite(value) else (None if isinstance(value, float)
                                                         else value))
    client(tracker.uri).log_table(tracker.parent_run_id, table, "cells.json")


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
    c.set_tag(tracker.parent_run_id, "state", "finished" if status == "FINISHED" else "stopped")
    c.set_terminated(tracker.parent_run_id, status=status)
