"""`python -m tuning.report [NAME]`: the paper's comparison, from a search's MLflow runs."""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from tuning.config import UserError
from tuning.search.tracking import check_reachable, client, default_tracking_uri

METHOD_ORDER = ("alignkd", "jointrd", "kd", "ce")


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


def trial_runs(uri: str, exp, parent) -> list[dict[str, Any]]:
    """Every trial run of the search, as a flat record."""
    c = client(uri)
    runs = c.search_runs([exp.experiment_id],
                         filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                         max_results=5000)
    out = []
    for r in runs:
        p, m, t = r.data.params, r.data.metrics, r.data.tags
        epochs = int(m.get("epoch", 0))
        if "method" not in p or "dataset" not in p:
            continue  # killed before its params were logged: nothing to compare
        out.append({
            "run_id": r.info.run_id, "status": r.info.status, "method": p.get("method"),
            "dataset": p.get("dataset"), "depth": int(p.get("depth", 0)),
            "cell": t.get("cell", ""), "chosen": t.get("chosen") == "true",
            # the latest val_acc is the last epoch's: what a cell's trials are selected on
            "val_acc": m.get("val_acc", math.nan), "test_acc": m.get("test_acc", math.nan),
            "train_time": m.get("train_time", math.nan), "epochs": epochs,
            "epoch_time": m.get("train_time", math.nan) / epochs if epochs else math.nan,
            "stopped_early": t.get("stopped_early") == "true",
        })
    return out


def comparison(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per data set x depth x method: the chosen trial's val and test accuracy, its time, and
    the AlignKD/JointRD ratio.

    The chosen trial is the one its cell's study chose (tag `chosen`): the completed trial with
    the best last-epoch validation accuracy. The time ratio compares median seconds per epoch,
    so runs an early-stopping scheduler cut short still count fairly.
    """
    groups: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r["status"] != "FAILED" and not math.isnan(r["val_acc"]):
            groups[(r["dataset"], r["depth"])][r["method"]].append(r)
    rows = []
    for (dataset, depth), by_method in sorted(groups.items()):
        epoch_time = {m: statistics.median(x["epoch_time"] for x in rs)
                      for m, rs in by_method.items()}
        ratio = (epoch_time["alignkd"] / epoch_time["jointrd"]
                 if {"alignkd", "jointrd"} <= set(epoch_time) else math.nan)
        for method in sorted(by_method, key=_method_key):
            mine = by_method[method]
            complete = [x for x in mine if not x["stopped_early"]] or mine
            best = next((x for x in mine if x["chosen"]), None) or \
                max(complete, key=lambda x: x["val_acc"])
            rows.append({"dataset": dataset, "depth": depth, "method": method,
                         "runs": len(mine), "val_acc": best["val_acc"],
                         "test_acc": best["test_acc"], "train_time": best["train_time"],
                         "epoch_time": epoch_time[method], "alignkd/jointrd": ratio})
    return rows


def _method_key(m: str) -> int:
    return METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(time, accuracy) points that no other point beats on both; sorted by time."""
    front, best = [], -math.inf
    for t, a in sorted(points, key=lambda p: (p[0], -p[1])):
        if a > best:
            front.append((t, a))
            best = a
    return front


def plot(uri: str, runs: list[dict[str, Any]], out: Path) -> list[Path]:
    """Validation accuracy per epoch (best run per method), and accuracy against time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    c = client(uri)
    groups = sorted({(r["dataset"], r["depth"]) for r in runs})
    fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(5 * max(len(groups), 1), 4),
                             squeeze=False)
    for ax, (dataset, depth) in zip(axes[0], groups, strict=False):
        for method in sorted({r["method"] for r in runs}, key=_method_key):
            mine = [r for r in runs if (r["dataset"], r["depth"], r["method"]) ==
                    (dataset, depth, method) and not math.isnan(r["val_acc"])]
            if not mine:
                continue
            best = max(mine, key=lambda r: r["val_acc"])
            hist = sorted(c.get_metric_history(best["run_id"], "val_acc"), key=lambda m: m.step)
            ax.plot([m.step for m in hist], [m.value for m in hist], marker="o", label=method)
        ax.set(title=f"{dataset}, depth {depth}", xlabel="epoch", ylabel="validation accuracy")
        ax.legend()
    fig.tight_layout()
    curves = out / "val_acc_per_epoch.png"
    fig.savefig(curves, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ok = [r for r in runs if not math.isnan(r["val_acc"]) and not math.isnan(r["train_time"])]
    for method in sorted({r["method"] for r in ok}, key=_method_key):
        mine = [r for r in ok if r["method"] == method]
        ax.scatter([r["train_time"] for r in mine], [r["val_acc"] for r in mine], label=method,
                   marker="x" if method == "jointrd" else "o")
    front = pareto_front([(r["train_time"], r["val_acc"]) for r in ok])
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="k",
                linestyle="--", label="Pareto front")
    ax.set(xlabel="training time (s)", ylabel="best validation accuracy",
           title="accuracy against training time")
    ax.legend()
    fig.tight_layout()
    tradeoff = out / "acc_vs_time.png"
    fig.savefig(tradeoff, dpi=100)
    plt.close(fig)
    return [curves, tradeoff]


def table_text(rows: list[dict[str, Any]]) -> str:
    cols = ["dataset", "depth", "method", "runs", "val_acc", "test_acc", "train_time",
            "epoch_time", "alignkd/jointrd"]

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    cells = [[fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c)
              for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(x, widths, strict=True)) for x in cells]
    return "\n".join(lines)


def build(uri: str, name: str | None, out: Path | None = None, *,
          log_to_parent: bool = True) -> tuple[str, list[Path]]:
    """The comparison table and the plots; the plots are logged to the search's parent run."""
    exp, parent = find_search(uri, name)
    runs = trial_runs(uri, exp, parent)
    text = table_text(comparison(runs))
    out = Path(out or Path("reports") / exp.name)
    pngs = plot(uri, runs, out) if runs else []
    if log_to_parent:
        for png in pngs:
            client(uri).log_artifact(parent.info.run_id, str(png), artifact_path="plots")
    return f"search {exp.name}: {len(runs)} trial runs\n{text}", pngs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tuning.report", description=__doc__)
    p.add_argument("name", nargs="?", help="the search's name (default: the newest search)")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--out", default=None, help="folder for the PNGs (default reports/NAME)")
    args = p.parse_args(argv)
    uri = default_tracking_uri(args.tracking_uri)
    try:
        check_reachable(uri)
        text, pngs = build(uri, args.name, Path(args.out) if args.out else None)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(text)
    for png in pngs:
        print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
