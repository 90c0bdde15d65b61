"""Replicates: each cell's chosen configuration, and its default one, trained with new seeds.

A replicate differs from the run it repeats only in its seed (so its initialization and data
order), never in its splits (split_seed is kept) or its teacher. Two arms per cell:

- `tuned`: the cell's chosen trial's configuration;
- `default`: the method's default configuration in that cell (the baseline; `--baseline
  none` leaves it out). Where the search chose the default itself, the tuned arm is also the
  default arm, and it is trained once.

Every arm of every cell runs under the same seeds (the search's seed + 1 .. + n), so that
arms of one data set x depth pair up by seed. The runs are interleaved seed by seed, so that
every arm trains under the same load and its times compare. Replicates run as Ray Tune trials
of a second experiment, `<search>/replicates`, in parallel and resumable like any trial; each
measures its test accuracy once, after its last epoch, and chooses nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search import Searcher

from tuning.run.config import RunConfig
from tuning.search import tracking
from tuning.search.callbacks import run_callbacks
from tuning.search.raytune import KEEP_CHECKPOINTS, fit, interrupted, keep_newest_checkpoint
from tuning.search.recorder import Records, close_unrecorded_runs, repair_runs
from tuning.search.results import error_reason, table_text, trial_status, write_csv
from tuning.search.settings import REPLICATES_EXPERIMENT, SearchSettings
from tuning.search.space import cell_defaults
from tuning.search.trainable import SearchContext, make_trainable, run_maker

COLUMNS = ["cell", "arm", "replicate", "seed", "trial_id", "replicate_of", "status", "val_acc",
           "test_acc", "train_time", "epochs", "concurrency", "error"]
ARMS = ("tuned", "default")


def replicate_seeds(seed: int, n: int) -> list[int]:
    """The seeds of n replicates: the same for every cell and arm of a search."""
    return [seed + i for i in range(1, n + 1)]


def same_recipe(a: RunConfig, b: RunConfig) -> bool:
    """Whether two configs train the same thing but for their seed."""
    def strip(c: RunConfig) -> dict[str, Any]:
        return {k: v for k, v in c.to_dict().items() if k not in ("seed", "extra")}
    return strip(a) == strip(b)


def replicate_trials(arms: list[dict[str, Any]], seeds: list[int],
                     concurrency: str = "") -> list[dict[str, Any]]:
    """Tune configs of every arm at every seed, seed by seed (replicate 1 of every arm, then
    replicate 2, ...), so that the arms share the machine alike."""
    out = []
    for i, seed in enumerate(seeds, 1):
        for a in arms:
            cfg: RunConfig = a["config"]
            out.append({"cell": a["cell"], "arm": a.get("arm", "tuned"), "replicate": i,
                        "replicate_of": a.get("trial_id", ""),
                        "replicate_of_run": a.get("run_id") or "",
                        "replicate_of_number": a.get("study_trial", ""),
                        "concurrency": concurrency,
                        "config": {**cfg.to_dict(), "seed": seed}})
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


def run_replicates(settings: SearchSettings, context: SearchContext,
                   arms: list[dict[str, Any]], seeds: list[int], callbacks: list,
                   concurrency: str = "") -> list[dict] | None:
    """Train (or continue) every arm's replicates; one row per replicate, or None when the
    phase was interrupted (Tune saved its state to resume from)."""
    path = settings.replicates_path
    context = dataclasses.replace(context, experiment_path=path, evaluate_test=True, rungs=())
    trainable = make_trainable(context, settings.cpus_per_trial, settings.gpus_per_trial)
    configs = replicate_trials(arms, seeds, concurrency)
    if tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    else:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=FixedTrials(configs),
                                        scheduler=FIFOScheduler(), num_samples=-1,
                                        max_concurrent_trials=settings.max_concurrent
                                        or None, reuse_actors=True),
            run_config=tune.RunConfig(
                name=REPLICATES_EXPERIMENT, storage_path=path.rsplit("/", 1)[0],
                checkpoint_config=tune.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
                failure_config=tune.FailureConfig(max_failures=2), verbose=0,
                callbacks=callbacks))
    grid, stopped = fit(tuner)
    if stopped or interrupted(grid):
        return None
    rows = []
    for result in grid:
        sample = dict(result.config or {})
        metrics = result.metrics or {}
        cfg = RunConfig(**sample["config"])
        epochs = int(metrics.get("epoch", 0))
        status = trial_status(result.error, epochs, cfg.epochs, metrics.get("failed"))
        test_acc = metrics.get("test_acc", math.nan)
        error = error_reason(result.error) if result.error else metrics.get("failed") or ""
        if status == "COMPLETED" and not math.isfinite(test_acc):
            # A run that ended without a test figure (its loss or evaluation went NaN) is a
            # failed replicate, counted as one, not a figure silently left out.
            status, error = "FAILED", error or "no finite test accuracy"
        rows.append({"cell": sample["cell"], "arm": sample.get("arm", "tuned"),
                     "replicate": sample["replicate"], "seed": cfg.seed,
                     "trial_id": metrics.get("trial_id", ""),
                     "replicate_of": sample["replicate_of"], "status": status,
                     "val_acc": metrics.get("val_acc", math.nan), "test_acc": test_acc,
                     "train_time": metrics.get("train_time", math.nan), "epochs": epochs,
                     "concurrency": sample.get("concurrency", ""),
                     "error": error, "_result": result, "_config": cfg})
    return sorted(rows, key=lambda r: (r["cell"], ARMS.index(r["arm"]), r["replicate"]))


def write_rows(rows: list[dict[str, Any]], folder: Path) -> Path:
    path = Path(folder) / "replicates.csv"
    write_csv(rows, path, COLUMNS)
    return path


def default_config(context: SearchContext, cell_key: str) -> RunConfig:
    """The cell's default configuration (its baseline) as a trial of the search would run it."""
    cell = next(c for c in context.space.cells() if c.key == cell_key)
    return context.run_config({"cell": cell.key, **cell.as_dict(),
                               **cell_defaults(context.space, cell).values})


def at_width(cfg: RunConfig, width: int, context: SearchContext) -> RunConfig:
    """`cfg` at another width, with the teacher of that width (a proxy search's replicates)."""
    from tuning.search.teachers import teacher_path, teacher_recipe

    values = {**cfg.to_dict(), "width": width}
    if cfg.method != "ce" and not context.space.fixed.get("teacher"):
        values["teacher"] = None
        values["teacher"] = teacher_path(context.teacher_store, teacher_recipe(
            RunConfig(**values), context.teacher_epochs))
    return RunConfig(**values)


def replicate_arms(context: SearchContext, finals: list[dict[str, Any]],
                   baseline: bool, width: int | None = None) -> list[dict[str, Any]]:
    """Each cell's tuned arm (its chosen trial) and, with a baseline, its default arm; a cell
    whose chosen configuration is its default trains it once."""
    arms = []
    for final in finals:
        tuned, default = final["config"], default_config(context, final["cell"])
        chose_default = same_recipe(default, tuned)
        if width is not None:  # searched at a proxy width: the answer is for this one
            tuned, default = at_width(tuned, width, context), at_width(default, width, context)
        arms.append({**final, "config": tuned, "arm": "tuned"})
        if baseline and not chose_default:
            arms.append({"cell": final["cell"], "arm": "default", "config": default})
    return arms


def concurrency(settings: SearchSettings) -> str:
    """How many runs the replicate phase trains at once, and with what: the condition its
    times were taken under."""
    have = ray.cluster_resources()
    slots = math.floor(have.get("CPU", 0) / settings.cpus_per_trial)
    if settings.gpus_per_trial:
        slots = min(slots, math.floor(have.get("GPU", 0) / settings.gpus_per_trial))
    if settings.max_concurrent:
        slots = min(slots, settings.max_concurrent)
    gpu = f", {settings.gpus_per_trial:g} GPU" if settings.gpus_per_trial else ""
    return f"{max(1, slots)} at a time, {settings.cpus_per_trial:g} CPU{gpu} each"


def replicate_phase(settings: SearchSettings, context: SearchContext, tracker: tracking.Tracker,
                    finals: list[dict[str, Any]], folder: Path,
                    records: Records | None = None) -> list[dict[str, Any]] | None:
    """Train each cell's chosen configuration, and its default one (unless `baseline` is
    none), again under the search's replicate seeds; None when interrupted."""
    records = records or Records()
    t0 = time.perf_counter()
    arms = replicate_arms(context, finals, settings.baseline != "none",
                          settings.target_width if settings.proxy_width else None)
    seeds = replicate_seeds(settings.seed, settings.replicates)
    rows = run_replicates(settings, context, arms, seeds,
                          callbacks=run_callbacks(tracker, context, settings.epochs,
                                                  len(arms) * len(seeds)),
                          concurrency=concurrency(settings))
    if rows is None:
        return None
    for row in rows:
        keep_newest_checkpoint(row["_result"].checkpoint)
    records("complete the replicate runs", repair_runs, tracker, rows, run_maker(tracker, context))
    records("record the replicates' final states", tracking.settle_trial_runs, tracker, rows)
    records("close the runs of unrecorded replicates", close_unrecorded_runs, tracker, rows,
            role="replicate")
    write_rows(rows, folder)
    print(f"\nreplicates (seeds {', '.join(map(str, seeds))}; arm tuned: each cell's chosen "
          "configuration, arm default: its default one; test accuracy measured once each)")
    print(table_text(rows, [c for c in COLUMNS if c != "error"]))
    seconds = time.perf_counter() - t0
    print(f"replicate phase: {seconds:.0f} s ({rows[0]['concurrency'] if rows else ''})",
          flush=True)
    return rows
