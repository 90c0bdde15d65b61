"""`python -m tuning.warmgain`: what a warm start buys, measured.

One cell (a data set x depth of a space) is searched again and again at one budget of
trials, FIFO, under several sampler seeds: cold (from the default configuration alone) and
warm-started from a finished search (`--warm-start`, its matching cell's best
configurations queued after the default). Each search is scored by the number of trials it
needed for its best validation accuracy so far to come within 1 point of the cell's best,
the best any of these searches found. Searches run through the real `tuning.search`
command, and one that finished is not run again.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from tuning.measure.children import interrupted, run_logged
from tuning.run.checkpoint import atomic_write_text, check_output_file
from tuning.run.config import UserError
from tuning.run.console import Parser, refuse

WITHIN = 0.01  # one percentage point of validation accuracy


def trials_to_within(curve: list[float], best: float, within: float = WITHIN) -> int | None:
    """The 1-based trial after which the best value so far is within `within` of `best`;
    None if it never gets there."""
    so_far = -math.inf
    for i, value in enumerate(curve, 1):
        so_far = max(so_far, value)
        if so_far >= best - within - 1e-12:
            return i
    return None


def curve_of(folder: Path) -> list[float]:
    """A finished search's validation accuracies in the order its study asked for them (a
    trial that failed counts as nothing found)."""
    with open(folder / "results.csv") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: int(r["study_trial"]))
    return [float(r["val_acc"]) if r["status"] == "COMPLETED" and r["val_acc"] not in
            ("", "nan") else -math.inf for r in rows]


def run(args: argparse.Namespace, strategy: str, seed: int) -> Path:
    work = Path(args.work).resolve()
    name = f"gain-{strategy}-s{seed}"
    folder = Path(args.storage_path).resolve() / name
    if (folder / "results.csv").is_file():
        return folder
    warm = ["--warm-start", args.source] if strategy == "warm" else []
    resume = (folder / "search.yaml").is_file()
    cmd = ([sys.executable, "-m", "tuning.search", "--resume", "--name", name,
            "--storage-path", args.storage_path] if resume else
           [sys.executable, "-m", "tuning.search", "--space", args.space, "--name", name,
            "--scheduler", "fifo", "--num-samples", str(args.trials), "--sampler-seed",
            str(seed), "--epochs", str(args.epochs), "--replicates", "0", "--baseline",
            "none", "--max-concurrent", str(args.max_concurrent), *warm,
            "--storage-path", args.storage_path, "--teacher-store", args.teacher_store,
            "--data-root", args.data_root, "--tracking-uri",
            f"sqlite:///{work / 'mlflow.db'}", "--optuna-storage",
            f"sqlite:///{work / 'optuna.db'}", *(a for s in args.set for a in ("--set", s))])
    work.mkdir(parents=True, exist_ok=True)
    print(f"warmgain: {' '.join(cmd[2:])}", flush=True)
    code = run_logged(cmd, work, work / f"{name}.log")
    if code != 0:
        raise UserError(f"the search {name} exited {code}; see {work / name}.log, then run "
                        "this command again to continue")
    return folder


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    curves = {(strategy, seed): curve_of(run(args, strategy, seed))
              for seed in args.seeds for strategy in ("cold", "warm")}
    best = max(max(c) for c in curves.values())
    rows = []
    for (strategy, seed), curve in curves.items():
        reached = trials_to_within(curve, best)
        rows.append({"strategy": strategy, "seed": seed, "trials": len(curve),
                     "trials_to_within_1pp": reached, "best_val_acc": max(curve),
                     "cell_best_val_acc": best, "curve": curve, "source": args.source
                     if strategy == "warm" else None, "epochs": args.epochs,
                     "space": args.space, "set": args.set, "device": "cpu"})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| start | searches | trials to within 1 pp of the cell's best (each seed) | "
             "mean | best val acc so far (%) after trial 1, 2, ..., mean over seeds | "
             "best val acc (%), mean |", "|---|---|---|---|---|---|"]
    for strategy in ("cold", "warm"):
        mine = [r for r in rows if r["strategy"] == strategy]
        if not mine:
            continue
        counts = [r["trials_to_within_1pp"] for r in mine]
        shown = ", ".join(str(c) if c is not None else f">{r['trials']}"
                          for c, r in zip(counts, mine, strict=True))
        reached = [c for c in counts if c is not None]
        mean = (f"{statistics.fmean(reached):.1f}" + ("" if len(reached) == len(counts)
                                                       else f" ({len(reached)} reached)")
                if reached else "-")
        so_far = [statistics.fmean(max(r["curve"][:k]) for r in mine)
                  for k in range(1, min(len(r["curve"]) for r in mine) + 1)]
        lines.append(f"| {strategy} | {len(mine)} | {shown} | {mean} | "
                     f"{', '.join(f'{100 * v:.1f}' for v in so_far)} | "
                     f"{100 * statistics.fmean(r['best_val_acc'] for r in mine):.2f} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    colours = {"cold": "#7f7f7f", "warm": "#1f77b4"}
    for r in rows:
        best, so_far = [], -math.inf
        for v in r["curve"]:
            so_far = max(so_far, v)
            best.append(100 * so_far)
        ax.step(range(1, len(best) + 1), best, where="post", color=colours[r["strategy"]],
                alpha=0.8, label=f"{r['strategy']}, seed {r['seed']}")
    cell = 100 * rows[0]["cell_best_val_acc"]
    ax.axhspan(cell - 100 * WITHIN, cell, color="#2ca02c", alpha=0.12,
               label="within 1 pp of the cell's best")
    ax.set(xlabel="trials (in the order the study asked for them)",
           ylabel="best validation accuracy so far (%)", title="cold and warm-started studies")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="tuning.warmgain", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="the finished search to warm-start from")
    p.add_argument("--storage-path", required=True, help="where the source search is kept")
    p.add_argument("--space", default="alignkd")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="the cell's settings, e.g. --set depth=34 (as tuning.search takes)")
    p.add_argument("--trials", type=int, default=6, help="the budget of each search")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--teacher-store", default="teachers")
    p.add_argument("--data-root", default="datasets")
    p.add_argument("--work", default="warmgain")
    p.add_argument("--out", default="bench/results/warm-start-cifar10-cpu.json")
    args = p.parse_args(argv)
    try:
        if args.trials < 2 or args.epochs < 1:
            raise UserError("--trials must be at least 2 and --epochs at least 1")
        check_output_file(args.out, what="results file (--out)",
                          fix="pass --out a .json path in a folder you can write to")
        rows = measure(args)
    except UserError as err:
        return refuse(err)
    except KeyboardInterrupt:
        return interrupted("tuning.warmgain", argv)
    out = Path(args.out)
    atomic_write_text(out, json.dumps(rows, indent=1) + "\n")
    figure = plot(rows, out.with_suffix(".png"))
    print(markdown(rows))
    print(f"written: {out}, {figure}")
    return 0
