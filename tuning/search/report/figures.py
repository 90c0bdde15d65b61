"""The report's figures: replicates per cell, importances, parallel coordinates, curves."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

from tuning.search.report.importance import CellImportance
from tuning.search.report.stats import Summary
from tuning.search.report.tables import METHOD_NAMES, finalists, method_key, row_label

COLOURS = {"alignkd": "#1f77b4", "jointrd": "#d62728", "jointrd_released": "#ff7f0e",
           "kd": "#2ca02c", "ce": "#7f7f7f", "repvgg+alignkd": "#9467bd", "repvgg+ce": "#8c564b",
           "dirac+jointrd": "#e377c2"}
DPI = 150


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def slug(key: str) -> str:
    from tuning.search.cells import Cell

    return Cell(tuple(tuple(kv.split("=", 1)) for kv in key.split(",") if "=" in kv)).slug \
        if key != "all" else "all"


def plot_replicates(runs: list[dict[str, Any]], out: Path) -> Path | None:
    """Per data set x depth: each method's tuned replicates (filled) and default replicates
    (hollow squares) as points, each arm's mean with its 95% t interval, and the selected
    trial's own score (a cross), which no interval includes."""
    plt = _pyplot()
    final = finalists(runs)
    panels = sorted({k[0] for k in final}, key=str)
    if not panels:
        return None
    methods = sorted({k[1] for k in final}, key=method_key)
    many = len(methods) > 3
    panel_w = max(3.6, 1.2 * len(methods) + 1.0)
    fig, axes = plt.subplots(1, len(panels), figsize=(panel_w * len(panels) + 1,
                                                      4.6 if many else 3.9),
                             squeeze=False, sharey=True)
    for ax, key in zip(axes[0], panels, strict=True):
        for x, m in enumerate(methods):
            arms = final.get((key, m))
            if arms is None:
                continue
            colour = COLOURS.get(m, "k")
            default = [] if arms.default_is_tuned else arms.default
            for offset, runs_, marker, fill in ((-0.15, arms.tuned, "o", colour),
                                                 (0.15, default, "s", "none")):
                accs = [100 * r["test_acc"] for r in runs_ if math.isfinite(r["test_acc"])]
                if not accs:
                    continue
                xs = [x + offset + 0.05 * (i - (len(accs) - 1) / 2) for i in range(len(accs))]
                ax.scatter(xs, accs, facecolors=fill, edgecolors=colour, marker=marker, s=20,
                           alpha=0.7, zorder=2)
                s = Summary.of(accs)
                err = [[s.mean - s.low], [s.high - s.mean]] if s.n > 1 else None
                ax.errorbar([x + offset + 0.1], [s.mean], yerr=err, fmt="D", color=colour,
                            mfc=fill, capsize=3, zorder=3)
            if arms.selected and math.isfinite(arms.selected["test_acc"]):
                ax.scatter([x], [100 * arms.selected["test_acc"]], marker="x", color="k",
                           s=30, zorder=4)
        ax.set_xticks(range(len(methods)), [METHOD_NAMES.get(m, m) for m in methods],
                      rotation=30 if many else 0, ha="right" if many else "center")
        ax.set_xlim(-0.6, len(methods) - 0.4)
        ax.set_title(", ".join(row_label(key)))
    axes[0][0].set_ylabel("test accuracy (%)")
    fig.suptitle("replicates (new seeds): tuned ● and default □ configurations, mean and 95% CI;"
                 "\n× the selected trial's own score (not an estimate)", fontsize=9)
    fig.tight_layout()
    path = out / "replicates.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_importances(imp: dict[str, CellImportance], out: Path) -> list[Path]:
    """One bar chart per cell and objective that has enough trials for importances."""
    plt = _pyplot()
    paths = []
    for cell, result in imp.items():
        if not result.enough:
            continue
        for objective, values in result.by_objective.items():
            names = sorted(values, key=values.get)
            fig, ax = plt.subplots(figsize=(5, 0.35 * len(names) + 1.3))
            ax.barh(names, [values[n] for n in names], color="#1f77b4")
            at = f", at epoch {result.epoch}" if result.epoch is not None else ""
            ax.set(xlabel=f"importance for {objective} (PED-ANOVA, n={result.n}{at})",
                   title=f"which hyperparameters mattered: {cell}")
            fig.tight_layout()
            suffix = "" if len(result.by_objective) == 1 else f"-{objective}"
            path = out / f"importance-{slug(cell)}{suffix}.png"
            fig.savefig(path, dpi=DPI)
            plt.close(fig)
            paths.append(path)
    return paths


def plot_parallel(studies: dict[str, Any], out: Path) -> list[Path]:
    """Optuna's parallel-coordinates plot of each cell's completed trials, drawn with
    matplotlib (Optuna's matplotlib backend), so no plotly is needed."""
    plt = _pyplot()
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
        path = out / f"parallel-{slug(cell)}.png"
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_curves(client, runs: list[dict[str, Any]], fronts: dict[str, set[int]] | None,
                out: Path) -> list[Path]:
    """Validation accuracy per epoch of each cell's chosen trial; accuracy against time of
    the completed trials, with each cell's Pareto front as its study computed it (searches
    of accuracy and time only)."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    trials = [r for r in runs if r["role"] == "trial"]
    groups = sorted({(r["dataset"], r["depth"]) for r in trials})
    if not groups:
        return []
    methods = sorted({r["method"] for r in trials}, key=method_key)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.6), squeeze=False,
                             sharey=True)
    for ax, (dataset, depth) in zip(axes[0], groups, strict=True):
        for m in methods:
            for r in (r for r in trials if (r["dataset"], r["depth"], r["method"]) ==
                      (dataset, depth, m) and r["chosen"]):
                hist = sorted(client.get_metric_history(r["run_id"], "val/acc"),
                              key=lambda h: h.step)
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
            front = sorted((r for r in mine if fronts and r["study_trial"] in
                            fronts.get(r["cell"], set())), key=lambda r: r["train_time"])
            if len(front) > 1:
                ax.step([r["train_time"] for r in front], [100 * r["val_acc"] for r in front],
                        where="post", color=COLOURS.get(m, "k"), linestyle="--", linewidth=1)
        ax.set(title=f"{dataset}, Plain-{depth}", xlabel="training time (s, loop only)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    axes[0][0].set_ylabel("validation accuracy, last epoch (%)")
    fig.suptitle("completed trials" + ("; dashed: each cell's Pareto front" if fronts else ""))
    fig.tight_layout()
    tradeoff = out / "acc_vs_time.png"
    fig.savefig(tradeoff, dpi=DPI)
    plt.close(fig)
    return [curves, tradeoff]
