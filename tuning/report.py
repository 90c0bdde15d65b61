"""`python -m tuning.report [NAME]`: the paper's Tables 1-3 from a search, with their spread.

One row per data set x student. Per method: the test accuracy of the cell's chosen trial and
its replicates as mean ± std (n runs), the median minutes to train, and seconds per epoch;
the teacher's test accuracy; and where AlignKD and JointRD were both searched, their
difference with Welch's 95% interval, the time ratio, and a plain verdict. Per cell, the
hyperparameters that mattered most (Optuna's importance evaluator on the cell's study).
Written as Markdown and CSV, with figures, and logged to the search's parent run.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

from tuning.checkpoint import atomic_write_text
from tuning.config import UserError
from tuning.search.tracking import check_reachable, client, default_tracking_uri
from tuning.stats import Summary, verdict, welch

# A table's "method" is the objective, prefixed by the student's block where a search runs
# across blocks (`repvgg+alignkd`: a RepVGG student distilled by AlignKD).
METHOD_ORDER = ("alignkd", "jointrd", "jointrd_released", "kd", "ce", "repvgg+alignkd",
                "repvgg+ce", "dirac+jointrd")
METHOD_NAMES = {"alignkd": "AlignKD", "jointrd": "JointRD", "jointrd_released":
                "JointRD (released)", "kd": "KD", "ce": "CE", "repvgg+alignkd": "RepVGG+AlignKD",
                "repvgg+ce": "RepVGG", "dirac+jointrd": "Dirac+JointRD"}
COLOURS = {"alignkd": "#1f77b4", "jointrd": "#d62728", "jointrd_released": "#ff7f0e",
           "kd": "#2ca02c", "ce": "#7f7f7f", "repvgg+alignkd": "#9467bd", "repvgg+ce": "#8c564b",
           "dirac+jointrd": "#e377c2"}
BASELINE = "alignkd"  # with more than two methods, each is compared with this one
DPI = 150


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
        out.append({
            "run_id": r.info.run_id, "status": r.info.status,
            "method": method_label(p["method"], t.get("cell", "")),
            "dataset": p["dataset"], "depth": int(p.get("depth", 0)),
            "cell": t.get("cell", ""), "role": t.get("role", "trial"),
            "chosen": t.get("chosen") == "true", "replicate_of": t.get("replicate_of", ""),
            "teacher_run_id": t.get("teacher_run_id", ""),
            # the latest val/acc is the last epoch's: what a cell's trials are selected on
            "val_acc": accuracy(m, "val"), "test_acc": accuracy(m, "test"),
            "train_time": m.get("time/train_total_s", math.nan), "epochs": epochs,
            "epoch_time": m.get("time/train_total_s", math.nan) / epochs if epochs
            else math.nan,
            "stopped_early": t.get("stopped_early") == "true",
        })
    return out


def _cell_values(cell: str) -> list[tuple[str, str]]:
    return [tuple(kv.split("=", 1)) for kv in cell.split(",") if "=" in kv]


def method_label(method: str, cell: str) -> str:
    """The objective, prefixed by the student's block where the search runs across blocks."""
    block = dict(_cell_values(cell)).get("block", "plain")
    return method if block == "plain" else f"{block}+{method}"


def row_key(run: dict[str, Any]) -> tuple:
    """A table row: the run's cell without its method (and block), so that the methods of one
    data set and student sit side by side, and cells that differ in anything else stay
    apart."""
    rest = tuple((k, v) for k, v in _cell_values(run["cell"]) if k not in ("method", "block"))
    return (run["dataset"], run["depth"], rest)


def row_label(key: tuple) -> tuple[str, str]:
    dataset, depth, rest = key
    extra = ", ".join(f"{k}={v}" for k, v in rest if k not in ("dataset", "depth"))
    return dataset, f"Plain-{depth}" + (f" ({extra})" if extra else "")


def accuracy(metrics: dict[str, float], split: str) -> float:
    """A run's `<split>/acc` (logged in %) as a fraction; runs logged before the metrics had
    sections carry `<split>_acc`."""
    if f"{split}/acc" in metrics:
        return metrics[f"{split}/acc"] / 100
    return metrics.get(f"{split}_acc", math.nan)


def finalists(runs: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """(row key, method) -> the chosen trial of its cell, then its finished replicates."""
    out: dict[tuple, list[dict[str, Any]]] = {}
    for chosen in (r for r in runs if r["chosen"] and r["role"] == "trial"):
        again = [r for r in runs if r["role"] == "replicate" and
                 r["replicate_of"] == chosen["run_id"] and r["status"] == "FINISHED"]
        out[(row_key(chosen), chosen["method"])] = [chosen, *again]
    return out


def _method_key(m: str) -> int:
    return METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER)


def tables(runs: list[dict[str, Any]], teacher_acc: dict[str, float]) -> list[dict[str, Any]]:
    """One row per data set x student (x any other across-dimension), with every method's
    columns (numbers, not text).

    A method's accuracy pools its cell's chosen trial with that trial's replicates. The chosen
    trial won its cell on validation accuracy, so it may sit above its replicates; the CSV
    also carries the replicates alone (`<method>_rep_*`).
    """
    final = finalists(runs)
    methods = sorted({k[1] for k in final}, key=_method_key)
    rows = []
    for key in sorted({k[0] for k in final}, key=str):
        dataset, student = row_label(key)
        row: dict[str, Any] = {"dataset": dataset, "student": student}
        for m in methods:
            mine = final.get((key, m), [])
            acc = Summary.of([r["test_acc"] for r in mine])
            rep = Summary.of([r["test_acc"] for r in mine[1:]])
            times = [r["train_time"] for r in mine if math.isfinite(r["train_time"])]
            per_epoch = [r["epoch_time"] for r in mine if math.isfinite(r["epoch_time"])]
            row.update({f"{m}_mean": acc.mean, f"{m}_std": acc.std, f"{m}_n": acc.n,
                        f"{m}_min": statistics.median(times) / 60 if times else math.nan,
                        f"{m}_s_per_epoch": statistics.median(per_epoch) if per_epoch
                        else math.nan,
                        f"{m}_rep_mean": rep.mean, f"{m}_rep_std": rep.std, f"{m}_rep_n": rep.n})
        teachers = [teacher_acc.get(r["teacher_run_id"], math.nan)
                    for m in methods for r in final.get((key, m), [])[:1]]
        row["teacher"] = next((t for t in teachers if math.isfinite(t)), math.nan)
        if {"alignkd", "jointrd"} <= set(methods):
            a = [r["test_acc"] for r in final.get((key, "alignkd"), [])]
            j = [r["test_acc"] for r in final.get((key, "jointrd"), [])]
            d = welch(a, j)
            row.update({"diff": d.diff, "diff_low": d.low, "diff_high": d.high,
                        "time_ratio": row["alignkd_s_per_epoch"] / row["jointrd_s_per_epoch"]
                        if row["jointrd_s_per_epoch"] else math.nan,
                        "verdict": verdict(d, "AlignKD", "JointRD")})
        if BASELINE in methods and len(methods) > 2:
            base = [r["test_acc"] for r in final.get((key, BASELINE), [])]
            for m in methods:
                if m == BASELINE:
                    continue
                d = welch([r["test_acc"] for r in final.get((key, m), [])], base)
                row.update({f"{m}_vs_{BASELINE}": d.diff, f"{m}_vs_{BASELINE}_low": d.low,
                            f"{m}_vs_{BASELINE}_high": d.high,
                            f"{m}_vs_{BASELINE}_verdict": verdict(
                                d, METHOD_NAMES.get(m, m), METHOD_NAMES[BASELINE])})
        rows.append(row)
    return rows


def methods_markdown(rows: list[dict[str, Any]]) -> str:
    """With more than two methods: one line per data set x student x method, each compared
    with AlignKD (difference of mean test accuracy, Welch's 95% interval, verdict)."""
    lines = ["| data set | student | method | test acc (%) | − AlignKD (pp), 95% CI (Welch) "
             "| verdict | s/epoch |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        methods = sorted({k[:-len("_mean")] for k in r if k.endswith("_mean")
                          and not k.endswith("_rep_mean")}, key=_method_key)
        for m in methods:
            n = r[f"{m}_n"]
            if n == 0:
                continue
            acc = (f"{_pct(r[f'{m}_mean'])} ± {_pct(r[f'{m}_std'])} (n={n})" if n > 1
                   else f"{_pct(r[f'{m}_mean'])} (n=1)")
            vs, ci, word = f"{m}_vs_{BASELINE}", "", ""
            if vs in r:
                ci = (f"{100 * r[vs]:+.2f} [{100 * r[vs + '_low']:+.2f}, "
                      f"{100 * r[vs + '_high']:+.2f}]" if math.isfinite(r[vs + "_low"])
                      else (f"{100 * r[vs]:+.2f}" if math.isfinite(r[vs]) else "-"))
                word = r[vs + "_verdict"]
            elif m == BASELINE:
                ci, word = "(baseline)", ""
            lines.append(f"| {r['dataset']} | {r['student']} | {METHOD_NAMES.get(m, m)} | {acc} "
                         f"| {ci} | {word} | {_num(r[f'{m}_s_per_epoch'], 2)} |")
    return "\n".join(lines)


def _pct(v: float) -> str:
    return "-" if not math.isfinite(v) else f"{100 * v:.2f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    """The paper's layout: accuracies in %, as mean ± std (n)."""
    if not rows:
        return "(no cell has a chosen trial yet)"
    methods = sorted({k[:-len("_mean")] for r in rows for k in r
                      if k.endswith("_mean") and not k.endswith("_rep_mean")}, key=_method_key)
    head = ["data set", "student"]
    for m in methods:
        name = METHOD_NAMES.get(m, m)
        head += [f"{name} test acc (%)", f"{name} min", f"{name} s/epoch"]
    head.append("teacher (%)")
    compare = "diff" in rows[0]
    if compare:
        head += ["AlignKD − JointRD (pp), 95% CI (Welch)", "time AlignKD/JointRD", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["dataset"], r["student"]]
        for m in methods:
            n = r[f"{m}_n"]
            acc = "-" if n == 0 else (f"{_pct(r[f'{m}_mean'])} ± {_pct(r[f'{m}_std'])} (n={n})"
                                      if n > 1 else f"{_pct(r[f'{m}_mean'])} (n=1)")
            cells += [acc, _num(r[f"{m}_min"], 1), _num(r[f"{m}_s_per_epoch"], 2)]
        cells.append(_pct(r["teacher"]))
        if compare:
            ci = (f"{100 * r['diff']:+.2f} [{100 * r['diff_low']:+.2f}, "
                  f"{100 * r['diff_high']:+.2f}]" if math.isfinite(r["diff_low"])
                  else (f"{100 * r['diff']:+.2f} [{r['verdict']}]" if math.isfinite(r["diff"])
                        else r["verdict"]))
            cells += [ci, _num(r["time_ratio"], 2), r["verdict"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _num(v: float, digits: int) -> str:
    return "-" if not math.isfinite(v) else f"{v:.{digits}f}"


def csv_text(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def teacher_accuracies(uri: str, runs: list[dict[str, Any]]) -> dict[str, float]:
    c = client(uri)
    out = {}
    for run_id in {r["teacher_run_id"] for r in runs if r["teacher_run_id"]}:
        try:
            out[run_id] = accuracy(c.get_run(run_id).data.metrics, "test")
        except Exception:  # noqa: BLE001 - a teacher run of another store: no figure
            out[run_id] = math.nan
    return out


def importances(storage_url: str | None, search: str) -> dict[str, dict[str, float]]:
    """cell key -> {parameter: importance}, from each cell's study (fANOVA, seeded)."""
    if not storage_url:
        return {}
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = {}
    storage = optuna.storages.RDBStorage(storage_url)
    for summary in storage.get_all_studies():
        if not summary.study_name.startswith(f"{search}/"):
            continue
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        varied = {k for t in done for k in t.params if len({str(u.params.get(k))
                                                             for u in done}) > 1}
        if len(done) < 2 or not varied or len(study.directions) > 1:
            continue
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        try:
            out[summary.study_name.split("/", 1)[1]] = optuna.importance.get_param_importances(
                study, evaluator=evaluator)
        except (RuntimeError, ValueError):
            continue  # too few trials with every parameter set
    return out


def study_handles(storage_url: str | None, search: str) -> dict[str, Any]:
    if not storage_url:
        return {}
    import optuna

    storage = optuna.storages.RDBStorage(storage_url)
    return {s.study_name.split("/", 1)[1]: optuna.load_study(study_name=s.study_name,
                                                             storage=storage)
            for s in storage.get_all_studies() if s.study_name.startswith(f"{search}/")}


def _slug(key: str) -> str:
    from tuning.search.cells import Cell

    return Cell(tuple(tuple(kv.split("=", 1)) for kv in key.split(",") if "=" in kv)).slug \
        if key != "all" else "all"


def plot_replicates(runs: list[dict[str, Any]], out: Path) -> Path | None:
    """Per data set x depth: each method's runs (chosen + replicates) as points, with the
    mean and its 95% t interval, one colour per method in every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    final = finalists(runs)
    panels = sorted({k[0] for k in final}, key=str)
    if not panels:
        return None
    methods = sorted({k[1] for k in final}, key=_method_key)
    # Each panel wide enough for its methods' names, which tilt when there are many.
    many = len(methods) > 3
    panel_w = max(3.2, 0.9 * len(methods) + 0.8)
    fig, axes = plt.subplots(1, len(panels), figsize=(panel_w * len(panels) + 1,
                                                      4.4 if many else 3.6),
                             squeeze=False, sharey=True)
    for ax, key in zip(axes[0], panels, strict=True):
        for x, m in enumerate(methods):
            accs = [100 * r["test_acc"] for r in final.get((key, m), [])
                    if math.isfinite(r["test_acc"])]
            if not accs:
                continue
            jitter = [x + 0.08 * (i - (len(accs) - 1) / 2) for i in range(len(accs))]
            ax.scatter(jitter, accs, color=COLOURS.get(m, "k"), alpha=0.6, s=18, zorder=2)
            s = Summary.of(accs)
            err = [[s.mean - s.low], [s.high - s.mean]] if s.n > 1 else None
            ax.errorbar([x + 0.3], [s.mean], yerr=err, fmt="D", color=COLOURS.get(m, "k"),
                        capsize=4, zorder=3)
        ax.set_xticks(range(len(methods)), [METHOD_NAMES.get(m, m) for m in methods],
                      rotation=30 if many else 0, ha="right" if many else "center")
        ax.set_xlim(-0.5, len(methods) - 0.3)
        ax.set_title(", ".join(row_label(key)))
    axes[0][0].set_ylabel("test accuracy (%)")
    fig.suptitle("each cell's chosen trial and its replicates:\nruns, mean and 95% CI",
                 fontsize=10)
    fig.tight_layout()
    path = out / "replicates.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_importances(imp: dict[str, dict[str, float]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for cell, values in imp.items():
        names = sorted(values, key=values.get)
        fig, ax = plt.subplots(figsize=(5, 0.35 * len(names) + 1.2))
        ax.barh(names, [values[n] for n in names], color="#1f77b4")
        ax.set(xlabel="importance (fANOVA, share of the variance)",
               title=f"which hyperparameters mattered: {cell}")
        fig.tight_layout()
        path = out / f"importance-{_slug(cell)}.png"
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_parallel(studies: dict[str, Any], out: Path) -> list[Path]:
    """Optuna's parallel-coordinates plot of each cell's completed trials, drawn with
    matplotlib (Optuna's matplotlib backend), so no plotly is needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization.matplotlib import plot_parallel_coordinate

    paths = []
    for cell, study in studies.items():
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if len(done) < 2 or not done[0].params or len(study.directions) > 1:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib backend experimental
            ax = plot_parallel_coordinate(study, target_name="val accuracy, last epoch")
        fig = ax.figure
        fig.set_size_inches(max(6, 1.2 * len(done[0].params) + 2), 4)
        ax.set_title(f"trials of {cell} (completed)")
        fig.tight_layout()
        path = out / f"parallel-{_slug(cell)}.png"
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
        paths.append(path)
    return paths


def build(uri: str, name: str | None, out: Path | None = None, *,
          log_to_parent: bool = True) -> tuple[str, list[Path]]:
    """The tables, importances and figures; all logged to the search's parent run."""
    exp, parent = find_search(uri, name)
    runs = search_runs(uri, exp, parent)
    rows = tables(runs, teacher_accuracies(uri, runs))
    out = Path(out or Path("reports") / exp.name)
    out.mkdir(parents=True, exist_ok=True)
    many = len({r["method"] for r in runs if r["chosen"]}) > 2
    # More than two methods: one line per method, each against AlignKD, reads better than a
    # row with three columns per method.
    md = methods_markdown(rows) if many else markdown(rows)
    storage = parent.data.params.get("optuna_storage")
    imp = importances(storage, exp.name)
    top = [f"- {cell}: " + ", ".join(f"{k} {v:.2f}" for k, v in
                                     sorted(vals.items(), key=lambda kv: -kv[1])[:3])
           for cell, vals in imp.items()]
    trials = sum(r["role"] == "trial" for r in runs)
    replicates = sum(r["role"] == "replicate" for r in runs)
    text = (f"search {exp.name}: {trials} trial runs, {replicates} replicate runs\n{md}\n"
            + ("\nhyperparameter importance per cell (fANOVA on the cell's study):\n"
               + "\n".join(top) if top else ""))
    files = [out / "tables.md", out / "tables.csv"]
    atomic_write_text(files[0], f"# {exp.name}\n\n{md}\n" + ("\n" + "\n".join(top) + "\n"
                                                              if top else ""))
    atomic_write_text(files[1], csv_text(rows))
    pngs = [p for p in (plot_replicates(runs, out),) if p is not None]
    pngs += plot_importances(imp, out)
    pngs += plot_parallel(study_handles(storage, exp.name), out)
    pngs += plot_curves(uri, runs, out)
    if log_to_parent:
        for path in [*files, *pngs]:
            client(uri).log_artifact(parent.info.run_id, str(path), artifact_path="report")
    return text, [*files, *pngs]


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(time, accuracy) points that no other point beats on both; sorted by time."""
    front, best = [], -math.inf
    for t, a in sorted(points, key=lambda p: (p[0], -p[1])):
        if a > best:
            front.append((t, a))
            best = a
    return front


def plot_curves(uri: str, runs: list[dict[str, Any]], out: Path) -> list[Path]:
    """Validation accuracy per epoch of each cell's chosen trial, and accuracy against time
    of the completed trials with each panel's Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    trials = [r for r in runs if r["role"] == "trial"]
    groups = sorted({(r["dataset"], r["depth"]) for r in trials})
    if not groups:
        return []
    c = client(uri)
    methods = sorted({r["method"] for r in trials}, key=_method_key)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.6), squeeze=False,
                             sharey=True)
    for ax, (dataset, depth) in zip(axes[0], groups, strict=True):
        for m in methods:
            chosen = [r for r in trials if (r["dataset"], r["depth"], r["method"]) ==
                      (dataset, depth, m) and r["chosen"]]
            for r in chosen:
                hist = sorted(c.get_metric_history(r["run_id"], "val/acc"), key=lambda h: h.step)
                ax.plot([h.step for h in hist], [h.value for h in hist], marker="o",
                        color=COLOURS.get(m, "k"), label=METHOD_NAMES.get(m, m))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(title=f"{dataset}, Plain-{depth}", xlabel="epoch")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    axes[0][0].set_ylabel("validation accuracy (%)")
    fig.suptitle("each cell's chosen trial")
    fig.tight_layout()
    curves = out / "val_acc_per_epoch.png"
    fig.savefig(curves, dpi=DPI)
    plt.close(fig)

    done = [r for r in trials if not r["stopped_early"] and r["status"] == "FINISHED"
            and math.isfinite(r["val_acc"]) and math.isfinite(r["train_time"])]
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.6), squeeze=False,
                             sharey=True)
    for ax, (dataset, depth) in zip(axes[0], groups, strict=True):
        for m in methods:
            mine = [r for r in done if (r["dataset"], r["depth"], r["method"]) ==
                    (dataset, depth, m)]
            ax.scatter([r["train_time"] for r in mine], [100 * r["val_acc"] for r in mine],
                       color=COLOURS.get(m, "k"), label=METHOD_NAMES.get(m, m), s=20)
            front = pareto_front([(r["train_time"], 100 * r["val_acc"]) for r in mine])
            if len(front) > 1:
                ax.step([p[0] for p in front], [p[1] for p in front], where="post",
                        color=COLOURS.get(m, "k"), linestyle="--", linewidth=1)
        ax.set(title=f"{dataset}, Plain-{depth}", xlabel="training time (s)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    axes[0][0].set_ylabel("validation accuracy, last epoch (%)")
    fig.suptitle("completed trials; dashed: each method's Pareto front")
    fig.tight_layout()
    tradeoff = out / "acc_vs_time.png"
    fig.savefig(tradeoff, dpi=DPI)
    plt.close(fig)
    return [curves, tradeoff]


def _repair(args: argparse.Namespace) -> str:
    """Repair the search's records; returns the tracking URI it used (the search's own unless
    --tracking-uri names another)."""
    import yaml

    from tuning.search.cli import local_search_dir, storage_uri
    from tuning.search.repair import repair

    if not args.name:
        raise UserError("--repair needs the search's NAME")
    folder = local_search_dir(storage_uri(args.storage_path), args.name)
    if not (folder / "search.yaml").is_file():
        raise UserError(f"no search named {args.name!r} under {args.storage_path}; pass its "
                        "--storage-path")
    settings = yaml.safe_load((folder / "search.yaml").read_text())
    settings["tracking_uri"] = uri = args.tracking_uri or settings["tracking_uri"]
    check_reachable(uri)  # a lost store is made afresh and filled from the checkpoints
    done = repair(settings, folder)
    print(f"repaired {args.name}: {done['trials']} trials; {done['created']} run(s) created, "
          f"{done['epochs_added']} epoch(s) logged from checkpoints")
    return uri


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tuning.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", help="the search's name (default: the newest search)")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--out", default=None, help="folder for the tables and figures "
                                                "(default reports/NAME)")
    p.add_argument("--repair", action="store_true",
                   help="first complete the search's MLflow records from its trials' "
                        "checkpoints (after a tracking outage, or a lost tracking store)")
    p.add_argument("--storage-path", default="ray_results",
                   help="where the search's Tune state is (with --repair)")
    args = p.parse_args(argv)
    uri = default_tracking_uri(args.tracking_uri)
    try:
        if args.repair:
            uri = _repair(args)
        else:
            check_reachable(uri, create=False)  # a report reads; it creates no store
        text, files = build(uri, args.name, Path(args.out) if args.out else None)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(text)
    for path in files:
        print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
