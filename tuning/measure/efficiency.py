"""`python -m tuning.efficiency`: does the search pay? Strategies at one budget of epochs.

Each strategy searches one cell (AlignKD, Plain-18 by default) with the same budget of
training epochs, under several sampler seeds (the trials' own seeds and the teacher stay the
same), through the real `tuning.search` command:

- `tpe-asha`: TPE with early stopping (trials stopped at a rung give back their epochs);
- `tpe-fifo`: TPE, every trial to the end;
- `random-fifo`: random proposals, every trial to the end;
- `default`: no search: the method's default configuration (the paper's recipe).

Every search starts from the default configuration (its trial 0). Each is scored by what it
chose: the chosen configuration's replicates (new seeds, the same for every strategy) on the
test split; the default by its own replicates under those seeds. A search that finished is
not run again, so an interrupted measurement continues where it stopped.

It writes a JSON list of rows (strategy, seed, budget_epochs, epochs_spent, test_acc_mean,
...) and a figure of accuracy against epochs spent.
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
from tuning.search.report.stats import Summary, paired

STRATEGIES = {"tpe-asha": ["--sampler", "tpe", "--scheduler", "asha"],
              "tpe-fifo": ["--sampler", "tpe", "--scheduler", "fifo"],
              "random-fifo": ["--sampler", "random", "--scheduler", "fifo"]}
COLOURS = {"tpe-asha": "#1f77b4", "tpe-fifo": "#ff7f0e", "random-fifo": "#2ca02c",
           "default": "#7f7f7f"}


def search_command(args: argparse.Namespace, strategy: str, seed: int, name: str,
                   baseline: bool) -> list[str]:
    work = Path(args.work).resolve()
    return [sys.executable, "-m", "tuning.search", "--space", args.space, "--name", name,
            *STRATEGIES[strategy], "--sampler-seed", str(seed),
            "--budget-epochs", str(args.budget_trials * args.epochs),
            "--epochs", str(args.epochs), "--teacher-epochs", str(args.teacher_epochs),
            "--replicates", str(args.replicates), "--baseline", "default" if baseline else "none",
            "--max-concurrent", str(args.max_concurrent),
            "--storage-path", str(work / "ray_results"), "--teacher-store", str(work / "teachers"),
            "--data-root", str(work / "datasets"),
            "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}",
            "--optuna-storage", f"sqlite:///{work / 'optuna.db'}",
            "--set", "dataset=npz", "--set", f"data_path={Path(args.data_path).resolve()}",
            "--set", f"width={args.width}", "--set", f"depth={args.depth}"]


def _read(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def search_row(folder: Path, strategy: str, seed: int, budget: int) -> tuple[dict, dict]:
    """The strategy's row from its finished search, and the default arm's replicates (by
    seed) where the search trained them."""
    trials = _read(folder / "results.csv")
    (cell,) = _read(folder / "cells.csv")
    replicates = _read(folder / "replicates.csv")
    tuned = {int(r["seed"]): float(r["test_acc"]) if r["status"] == "COMPLETED" else math.nan
             for r in replicates if r.get("arm", "tuned") == "tuned"}
    default = {int(r["seed"]): float(r["test_acc"]) if r["status"] == "COMPLETED" else math.nan
               for r in replicates if r.get("arm") == "default"}
    chosen = next(r for r in trials if r["chosen"] == "True")
    if chosen.get("default") == "True":
        default = tuned  # it chose the default configuration: the same runs, the same seeds
    s = Summary.of(list(tuned.values()))
    return {"strategy": strategy, "seed": seed, "budget_epochs": budget,
            "epochs_spent": sum(int(r["epochs"] or 0) for r in trials), "trials": len(trials),
            "stopped_early": sum(r["status"] == "STOPPED_EARLY" for r in trials),
            "chosen_trial": int(chosen["study_trial"]),
            "chosen_is_default": chosen.get("default") == "True",
            "chosen_val_acc": float(cell["val_acc"]), "test_acc_mean": s.mean,
            "test_acc_std": s.std, "test_acc_n": s.n, "test_acc_by_seed": tuned}, default


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    budget = args.budget_trials * args.epochs
    rows, default = [], {}
    for seed in args.seeds:
        for strategy in args.strategies:
            name = f"eff-{strategy}-s{seed}"
            folder = work / "ray_results" / name
            baseline = not default and strategy == args.strategies[0] and seed == args.seeds[0]
            if not (folder / "replicates.csv").is_file():
                resume = (folder / "search.yaml").is_file()
                cmd = (search_command(args, strategy, seed, name, baseline) if not resume else
                       [sys.executable, "-m", "tuning.search", "--resume", "--name", name,
                        "--storage-path", str(work / "ray_results")])
                print(f"efficiency: {' '.join(cmd[1:])}", flush=True)
                code = run_logged(cmd, work, work / f"{name}.log")
                if code != 0:
                    raise UserError(f"the search {name} exited {code}; see {work / name}.log, "
                                    "then run this command again to continue")
            row, arm = search_row(folder, strategy, seed, budget)
            default = default or arm
            rows.append(row)
            print(f"  {strategy} seed {seed}: {row['trials']} trials, {row['epochs_spent']} "
                  f"epochs, chose #{row['chosen_trial']}, replicate test acc "
                  f"{100 * row['test_acc_mean']:.2f}%", flush=True)
    d = Summary.of(list(default.values()))
    rows.append({"strategy": "default", "seed": None, "budget_epochs": 0, "epochs_spent": 0,
                 "trials": 0, "stopped_early": 0, "chosen_trial": 0, "chosen_is_default": True,
                 "chosen_val_acc": math.nan, "test_acc_mean": d.mean, "test_acc_std": d.std,
                 "test_acc_n": d.n, "test_acc_by_seed": default})
    for row in rows:
        if row["strategy"] != "default":
            gain = paired(row["test_acc_by_seed"], default)
            row.update(gain_vs_default=gain.diff, gain_low=gain.low, gain_high=gain.high)
        row.update(space=args.space, dataset=Path(args.data_path).stem, width=args.width,
                   depth=args.depth, epochs=args.epochs, replicates=args.replicates,
                   device="cpu")
        row["test_acc_by_seed"] = {str(k): v for k, v in row["test_acc_by_seed"].items()}
    return rows


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per strategy: the mean over search seeds of its replicate test accuracy, its spread
    over those seeds, and its mean gain over the default configuration."""
    out = []
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        mine = [r for r in rows if r["strategy"] == strategy]
        acc = Summary.of([r["test_acc_mean"] for r in mine])
        gains = Summary.of([r.get("gain_vs_default", math.nan) for r in mine])
        out.append({"strategy": strategy, "searches": len(mine) if strategy != "default" else 0,
                    "epochs_spent": statistics.fmean(r["epochs_spent"] for r in mine),
                    "chose_default": sum(r["chosen_is_default"] for r in mine),
                    "test_acc_mean": acc.mean, "test_acc_std": acc.std, "n": acc.n,
                    "gain_mean": gains.mean, "gain_low": gains.low, "gain_high": gains.high})
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| strategy | searches | epochs spent (mean) | chose the default | replicate test "
             "acc (%), mean ± std over searches | gain over default (pp), mean [95% CI over "
             "searches] |", "|---|---|---|---|---|---|"]
    for s in summary(rows):
        if s["strategy"] == "default":
            acc = next(r for r in rows if r["strategy"] == "default")
            lines.append(f"| default (no search) | - | 0 | - | {100 * acc['test_acc_mean']:.2f}"
                         f" ± {100 * acc['test_acc_std']:.2f} (its {acc['test_acc_n']} "
                         "replicates) | - |")
            continue
        ci = (f"{100 * s['gain_mean']:+.2f} [{100 * s['gain_low']:+.2f}, "
              f"{100 * s['gain_high']:+.2f}]" if math.isfinite(s["gain_low"])
              else f"{100 * s['gain_mean']:+.2f}")
        lines.append(f"| {s['strategy']} | {s['searches']} | {s['epochs_spent']:.0f} | "
                     f"{s['chose_default']} of {s['searches']} | {100 * s['test_acc_mean']:.2f} ± "
                     f"{100 * s['test_acc_std']:.2f} | {ci} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    default = next(r for r in rows if r["strategy"] == "default")
    d = 100 * default["test_acc_mean"]
    ax.axhline(d, color=COLOURS["default"], linestyle="--", label="default configuration")
    if math.isfinite(default["test_acc_std"]):
        ax.axhspan(d - 100 * default["test_acc_std"], d + 100 * default["test_acc_std"],
                   color=COLOURS["default"], alpha=0.15)
    for strategy in STRATEGIES:
        mine = [r for r in rows if r["strategy"] == strategy]
        if not mine:
            continue
        ax.errorbar([r["epochs_spent"] for r in mine], [100 * r["test_acc_mean"] for r in mine],
                    yerr=[100 * r["test_acc_std"] if math.isfinite(r["test_acc_std"]) else 0
                          for r in mine], fmt="o", capsize=3, color=COLOURS[strategy],
                    label=strategy, alpha=0.8)
    ax.set(xlabel="epochs the search spent (one cell)",
           ylabel="test accuracy of what it chose (%)\n(mean ± std of its replicates)",
           title="does the search pay? one point per search seed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="tuning.efficiency", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", required=True, help="an npz data set (images, labels)")
    p.add_argument("--space", default="alignkd")
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--depth", type=int, default=18)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--teacher-epochs", type=int, default=30)
    p.add_argument("--budget-trials", type=int, default=8,
                   help="the budget, in whole trials' epochs (budget = this x --epochs)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="sampler seeds: one search per strategy and seed")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    p.add_argument("--replicates", type=int, default=3)
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--work", default="efficiency", help="where the searches are kept")
    p.add_argument("--out", default="bench/results/search-efficiency-cifar10-cpu.json")
    args = p.parse_args(argv)
    try:
        if not Path(args.data_path).is_file():
            raise UserError(f"--data-path {args.data_path} is not a file; pass an npz data set")
        for flag, value in (("--budget-trials", args.budget_trials), ("--epochs", args.epochs),
                            ("--replicates", args.replicates)):
            if value < 1:
                raise UserError(f"{flag} must be at least 1; got {value}")
        check_output_file(args.out, what="results file (--out)",
                          fix="pass --out a .json path in a folder you can write to")
        rows = measure(args)
    except UserError as err:
        return refuse(err)
    except KeyboardInterrupt:
        return interrupted("tuning.efficiency", argv)
    out = Path(args.out)
    atomic_write_text(out, json.dumps(rows, indent=1) + "\n")
    figure = plot(rows, out.with_suffix(".png"))
    print(markdown(rows))
    print(f"written: {out}, {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
