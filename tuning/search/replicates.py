"""Replicated finalists: each cell's chosen trial trained again with new seeds.

A replicate differs from the trial it repeats only in its seed (so its initialization and
data order), never in its splits (split_seed is kept). Replicates run as Ray Tune trials of a
second experiment, `<search>/replicates`, in parallel and resumable like any trial; each
measures its test accuracy once, after its last epoch, and chooses nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search import Searcher

from tuning.config import RunConfig
from tuning.search.results import error_reason, trial_status, write_csv
from tuning.search.trainable import KEEP_CHECKPOINTS, SearchContext

EXPERIMENT = "replicates"
COLUMNS = ["cell", "replicate", "seed", "trial_id", "replicate_of", "status", "val_acc",
           "test_acc", "train_time", "epochs", "error"]


def replicate_trials(chosen: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Tune configs of n replicates per chosen trial: seeds seed+1 .. seed+n."""
    out = []
    for c in chosen:
        cfg: RunConfig = c["config"]
        for i in range(1, n + 1):
            out.append({"cell": c["cell"], "replicate": i, "replicate_of": c["trial_id"],
                        "replicate_of_run": c.get("run_id") or "",
                        "replicate_of_number": c.get("study_trial", ""),
                        "config": {**cfg.to_dict(), "seed": cfg.seed + i}})
    return out


class FixedTrials(Searcher):
    """Hands Tune a fixed list of trial configs, in order; its state is one index (JSON)."""

    def __init__(self, configs: list[dict[str, Any]]) -> None:
        super().__init__(metric=None, mode=None)
        self.configs, self.next = list(configs), 0

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True

    def suggest(self, trial_id: str) -> dict | None:
        if self.next >= len(self.configs):
            return Searcher.FINISHED
        self.next += 1
        return self.configs[self.next - 1]

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        pass

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps({"next": self.next}))

    def restore(self, checkpoint_path: str) -> None:
        self.next = int(json.loads(Path(checkpoint_path).read_text())["next"])


def experiment_path(settings: dict[str, Any]) -> str:
    return f"{settings['storage_path'].rstrip('/')}/{settings['name']}/{EXPERIMENT}"


def run_replicates(settings: dict[str, Any], context: SearchContext,
                   chosen: list[dict[str, Any]], n: int, callbacks: list) -> list[dict] | None:
    """Train (or continue) the replicates of every chosen trial; one row per replicate, or
    None when the phase was interrupted (Tune saved its state to resume from)."""
    from tuning.search.driver import make_trainable

    path = experiment_path(settings)
    context = dataclasses.replace(context, experiment_path=path, evaluate_test=True, rungs=())
    trainable = make_trainable(context, settings)
    configs = replicate_trials(chosen, n)
    if tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    else:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=FixedTrials(configs),
                                        scheduler=FIFOScheduler(), num_samples=-1,
                                        reuse_actors=True),
            run_config=tune.RunConfig(
                name=EXPERIMENT, storage_path=path.rsplit("/", 1)[0],
                checkpoint_config=tune.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
                failure_config=tune.FailureConfig(max_failures=2), verbose=0,
                callbacks=callbacks))
    grid = tuner.fit()
    from tuning.search.driver import interrupted

    if interrupted(grid):
        return None
    rows = []
    for result in grid:
        sample = dict(result.config or {})
        metrics = result.metrics or {}
        cfg = RunConfig(**sample["config"])
        epochs = int(metrics.get("epoch", 0))
        rows.append({"cell": sample["cell"], "replicate": sample["replicate"], "seed": cfg.seed,
                     "trial_id": metrics.get("trial_id", ""),
                     "replicate_of": sample["replicate_of"],
                     "status": trial_status(result.error, epochs, cfg.epochs,
                                            metrics.get("failed")),
                     "val_acc": metrics.get("val_acc", math.nan),
                     "test_acc": metrics.get("test_acc", math.nan),
                     "train_time": metrics.get("train_time", math.nan), "epochs": epochs,
                     "error": error_reason(result.error) if result.error else
                     metrics.get("failed") or "", "_result": result, "_config": cfg})
    return sorted(rows, key=lambda r: (r["cell"], r["replicate"]))


def write_rows(rows: list[dict[str, Any]], folder: Path) -> Path:
    path = Path(folder) / "replicates.csv"
    write_csv(rows, path, COLUMNS)
    return path
