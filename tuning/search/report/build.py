"""The paper's Tables 1-3 from a search's MLflow records, with their spread (`build`).

One row per data set x student and method, estimated from unselected replicates (see
`tuning.search.report.tables`): the tuned configuration's test accuracy, the selected trial's own
figure apart, the default configuration's, the tuning gain, the comparisons between methods
with paired and Welch intervals and Holm-corrected verdicts, and the training times. Per
cell, the hyperparameters that mattered (PED-ANOVA, where the cell has enough trials).
Written as Markdown and CSV, with figures, and logged to the search's parent run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tuning.run.checkpoint import atomic_write_text, check_output_dir
from tuning.run.config import UserError
from tuning.search.report.tables import (
    csv_text,
    data_name,
    markdown,
    method_label,
    tables,
)
from tuning.search.tracking import client


def find_search(uri: str, name: str | None):
    """The search's experiment and parent run; without a name, the newest search."""
    c = client(uri)
    if name:
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise UserError(f"no search named {name!r} in {uri}; list them in the MLflow UI or "
                            "pass --tracking-uri")
        exps = [exp]
    else:
        exps = sorted(c.search_experiments(), key=lambda e: e.creation_time or 0, reverse=True)
    for exp in exps:
        parents = c.search_runs([exp.experiment_id], filter_string="tags.role = 'search'",
                                max_results=1)
        if parents:
            return exp, parents[0]
    raise UserError(f"no search found in {uri}; run `python -m tuning.search` first")


def search_runs(uri: str, exp, parent) -> list[dict[str, Any]]:
    """Every trial and replicate run of the search, as a flat record."""
    c = client(uri)
    runs = c.search_runs([exp.experiment_id],
                         filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                         max_results=50000)
    out = []
    for r in runs:
        p, m, t = r.data.params, r.data.metrics, r.data.tags
        if "method" not in p or "dataset" not in p:
            continue  # killed before its params were logged: nothing to compare
        epochs = int(m.get("train/epoch", 0))
        train_time = m.get("time/train_total_s", math.nan)
        out.append({
            "run_id": r.info.run_id, "status": r.info.status,
            "method": method_label(p["method"], t.get("cell", "")),
            "dataset": data_name(p), "depth": int(p.get("depth", 0)),
            "cell": t.get("cell", ""), "role": t.get("role", "trial"),
            "arm": t.get("arm", "tuned"), "seed": int(p.get("seed", 0)),
            "study_trial": int(t["study_trial"]) if t.get("study_trial", "").isdigit() else -1,
            "chosen": t.get("chosen") == "true",
            "default_config": t.get("default_config") == "true",
            "replicate_of": t.get("replicate_of", ""),
            "teacher_run_id": t.get("teacher_run_id", ""),
            "concurrency": t.get("concurrency", ""),
            # the latest val/acc is the last epoch's: what a cell's trials are selected on
            "val_acc": accuracy(m, "val"), "test_acc": accuracy(m, "test"),
            "train_time": train_time, "epochs": epochs,
            "epoch_time": train_time / epochs if epochs else math.nan,
            "stopped_early": t.get("stopped_early") == "true",
        })
    return out


def accuracy(metrics: dict[str, float], split: str) -> float:
    """A run's `<split>/acc` (logged in %) as a fraction; runs logged before the metrics had
    sections carry `<split>_acc`."""
    if f"{split}/acc" in metrics:
        return metrics[f"{split}/acc"] / 100
    return metrics.get(f"{split}_acc", math.nan)


def teacher_accuracies(uri: str, runs: list[dict[str, Any]]) -> dict[str, float]:
    c = client(uri)
    out = {}
    for run_id in {r["teacher_run_id"] for r in runs if r["teacher_run_id"]}:
        try:
            out[run_id] = accuracy(c.get_run(run_id).data.metrics, "test")
        except Exception:  # noqa: BLE001 - a teacher run of another store: no figure
            out[run_id] = math.nan
    return out


def study_handles(storage_url: str | None, search: str) -> dict[str, Any]:
    if not storage_url:
        return {}
    import optuna

    storage = optuna.storages.RDBStorage(storage_url)
    return {s.study_name.split("/", 1)[1]: optuna.load_study(study_name=s.study_name,
                                                             storage=storage)
            for s in storage.get_all_studies() if s.study_name.startswith(f"{search}/")}


def study_fronts(studies: dict[str, Any]) -> dict[str, set[int]] | None:
    """Each multi-objective cell's Pareto front (study trial numbers); None without any."""
    multi = {cell: study for cell, study in studies.items() if len(study.directions) > 1}
    return {cell: {t.number for t in study.best_trials} for cell, study in multi.items()} \
        if multi else None


def clipped_defaults(studies: dict[str, Any]) -> list[str]:
    """A line per cell whose default configuration had to be moved into the space."""
    lines = []
    for cell, study in studies.items():
        clipped = study.user_attrs.get("default", {}).get("clipped", [])
        if clipped:
            lines.append(f"- {cell}: the space excludes the default "
                         f"{'; '.join(clipped)}; its trial 0 ran the nearest value it allows")
    return lines


def build(uri: str, name: str | None, out: Path | None = None, *,
          log_to_parent: bool = True) -> tuple[str, list[Path]]:
    """The tables, importances and figures; all logged to the search's parent run."""
    from tuning.search.report import figures
    from tuning.search.report.importance import importances

    exp, parent = find_search(uri, name)
    runs = search_runs(uri, exp, parent)
    rows = tables(runs, teacher_accuracies(uri, runs))
    out = Path(out or Path("reports") / exp.name)
    check_output_dir(out, what="report folder", fix="pass --out a folder you can write to")
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(rows)
    storage = parent.data.params.get("optuna_storage")
    studies = study_handles(storage, exp.name)
    imp = importances(storage, exp.name)
    notes = [f"- {cell}: {result.describe()}" for cell, result in imp.items()]
    clipped = clipped_defaults(studies)
    trials = sum(r["role"] == "trial" for r in runs)
    replicates = sum(r["role"] == "replicate" for r in runs)
    sections = [md]
    proxy = parent.data.params.get("proxy_width")
    if proxy:
        sections.insert(0, f"The search ran at width {proxy}, a proxy: each *selected* figure "
                           f"is its chosen trial at width {proxy}; every replicate, tuned and "
                           "default, trained the configuration again at width "
                           f"{parent.data.params.get('target_width')}, the width the answer is "
                           "for.")
    warm = parent.data.params.get("warm_start")
    if warm:
        sections.insert(0, f"Each cell started from the best configurations of the finished "
                           f"search {warm} (its trials tagged warm_start_from).")
    if notes:
        sections.append("hyperparameter importance per cell (PED-ANOVA, the evaluator "
                        "optuna-dashboard shows; n: the trials it read):\n" + "\n".join(notes))
    if clipped:
        sections.append("default configurations moved into the space:\n" + "\n".join(clipped))
    body = "\n\n".join(sections)
    text = f"search {exp.name}: {trials} trial runs, {replicates} replicate runs\n\n{body}"
    files = [out / "tables.md", out / "tables.csv"]
    atomic_write_text(files[0], f"# {exp.name}\n\n{body}\n")
    atomic_write_text(files[1], csv_text(rows))
    pngs = [p for p in (figures.plot_replicates(runs, out),) if p is not None]
    pngs += figures.plot_importances(imp, out)
    pngs += figures.plot_parallel(studies, out)
    pngs += figures.plot_curves(client(uri), runs, study_fronts(studies), out)
    if log_to_parent:
        for path in [*files, *pngs]:
            client(uri).log_artifact(parent.info.run_id, str(path), artifact_path="report")
    return text, [*files, *pngs]
