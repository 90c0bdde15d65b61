"""`python -m tuning.transfer`: does a ranking of configurations carry from a cheap setting
to a dear one? Measured.

K configurations are sampled once from a space (at random, seeded), and each is trained in
several settings that differ from a base setting in one thing only:

- `depth`: the Plain-18 student against Plain-34 (each with a teacher of its depth);
- `width`: width 8 against 16;
- `epochs`: the base's epochs against three times as many (15 against 45 by default);
- `data`: the bundled digits against the CIFAR-10 subset;
- `seed`: the base setting again under the next seed (the same teacher): not a transfer but
  its ceiling, how far one training seed's ranking predicts another's.

For each pair (cheap -> dear) it reports Spearman's rho between the configurations' last-epoch
validation accuracies in the two settings, with a bootstrap 95% interval, and the regret of
taking the cheap setting's winner into the dear one: the dear setting's best accuracy minus
that of the cheap winner, in percentage points. Runs are plain training runs (no search), two
at a time, each kept on disk with its configuration: an interrupted measurement continues
where it stopped, and a run of another configuration (other --epochs, say) is trained again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tuning.measure.children import ignore_interrupts, interrupted
from tuning.run.checkpoint import atomic_write_text, check_output_file
from tuning.run.config import RunConfig, UserError
from tuning.run.console import Parser, refuse
from tuning.search.report.stats import spearman

PAIRS = {"seed": ("base", "reseed"), "depth": ("base", "depth34"),
         "width": ("base", "width16"), "epochs": ("base", "epochs3x"),
         "data": ("digits", "base")}


def settings_of(data_path: str, width: int, depth: int, epochs: int) -> dict[str, dict]:
    """Each setting's fixed run values: the base, and each differing from it in one thing."""
    base = {"dataset": "npz", "data_path": data_path, "width": width, "depth": depth,
            "epochs": epochs}
    return {"base": base, "reseed": {**base, "seed_offset": 1},
            "depth34": {**base, "depth": 34}, "width16": {**base, "width": 2 * width},
            "epochs3x": {**base, "epochs": 3 * epochs},
            "digits": {**base, "dataset": "digits", "data_path": None}}


def sample_configs(space_name: str, k: int, seed: int) -> list[dict[str, Any]]:
    """K configurations of the space's searched parameters, drawn at random (seeded)."""
    import optuna

    from tuning.search.cells import Cell
    from tuning.search.space import SpaceSampler, load_space

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space(space_name)
    space = space.with_fixed({d: space.across[d][0] for d in space.dims})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    sampler = SpaceSampler(space)
    return [sampler.sample(study.ask(), Cell()) for _ in range(k)]


def pair_stats(cheap: list[float], dear: list[float]) -> dict[str, Any]:
    """Spearman's rho of the two settings' accuracies (bootstrap 95% interval) and the regret
    of the cheap winner in the dear setting, in percentage points. A tie for the cheap win
    goes to the lower configuration index."""
    rho = spearman(cheap, dear)
    winner = max(range(len(cheap)), key=lambda i: (cheap[i], -i))
    best = max(range(len(dear)), key=lambda i: (dear[i], -i))
    return {"configs": len(cheap), "rho": rho.rho, "rho_low": rho.low, "rho_high": rho.high,
            "regret_pp": 100 * (dear[best] - dear[winner]), "cheap_winner": winner,
            "dear_winner": best}


def _train(values: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """One training run in a worker process, one thread; its result, also kept on disk."""
    import torch

    from tuning.run.trainer import train

    torch.set_num_threads(1)
    final = train(RunConfig(**values), Path(run_dir), quiet=True, evaluate_test=False)
    result = {"val_acc": final["last_val_acc"], "train_time": final["train_time"],
              "config": values}
    atomic_write_text(Path(run_dir) / "result.json", json.dumps(result) + "\n")
    return result


@dataclasses.dataclass
class Plan:
    """What a measurement trains: the configurations, the settings' fixed values, and every
    run the pairs need, (setting, configuration index) -> its RunConfig, with the teachers'
    recipes by key."""

    configs: list[dict[str, Any]]
    settings: dict[str, dict]
    jobs: dict[tuple[str, int], RunConfig]
    recipes: dict[str, Any]


def plan(args: argparse.Namespace) -> Plan:
    from tuning.search.space import load_space, trial_values
    from tuning.search.teachers import teacher_path, teacher_recipe

    work = Path(args.work).resolve()
    configs = sample_configs(args.space, args.configs, args.seed)
    settings = settings_of(str(Path(args.data_path).resolve()), args.width, args.depth,
                           args.epochs)
    space = load_space(args.space)
    wanted = sorted({s for pair in args.pairs for s in PAIRS[pair]})
    jobs, recipes = {}, {}
    for name in wanted:
        offset = settings[name].get("seed_offset", 0)
        fixed = {**settings[name], "data_root": str(work / "datasets"), "seed": args.seed}
        fixed = {k: v for k, v in fixed.items() if v is not None and k != "seed_offset"}
        setting_space = space.with_fixed(fixed)
        for i, sample in enumerate(configs):
            cfg = RunConfig(**trial_values(setting_space, sample))
            recipe = teacher_recipe(cfg, args.teacher_epochs)  # a new seed keeps the teacher
            cfg = dataclasses.replace(cfg, seed=cfg.seed + offset)
            recipes[recipe.key] = recipe
            cfg.teacher = teacher_path(str(work / "teachers"), recipe)
            jobs[(name, i)] = cfg
    return Plan(configs, {k: settings[k] for k in wanted}, jobs, recipes)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from tuning.search.teachers import train_teacher

    work = Path(args.work).resolve()
    runs = plan(args)
    configs, jobs = runs.configs, runs.jobs
    for recipe in runs.recipes.values():  # each setting's teacher, once
        done = train_teacher(recipe, str(work / "teachers"))
        if done["trained"]:
            print(f"teacher {recipe.key}: val_acc {done['metrics']['best_val_acc']:.4f}",
                  flush=True)
    results: dict[tuple[str, int], dict] = {}
    todo = {}
    for (name, i), cfg in jobs.items():
        kept = work / "runs" / name / f"{i:02d}" / "result.json"
        old = json.loads(kept.read_text()) if kept.is_file() else {}
        # A kept run counts only if it ran this very configuration (the same --epochs,
        # --width, data and teacher): otherwise it is trained again.
        if old.get("config") == json.loads(json.dumps(cfg.to_dict())):
            results[(name, i)] = old
        else:
            todo[(name, i)] = cfg
    # The workers leave a Ctrl-C to this process, which stops them at once: a run that had
    # not finished is trained again by the next call.
    pool = get_context("spawn").Pool(args.workers, initializer=ignore_interrupts)
    try:
        jobs_left = {key: pool.apply_async(_train, (cfg.to_dict(), str(
            work / "runs" / key[0] / f"{key[1]:02d}"))) for key, cfg in todo.items()}
        for key, job in jobs_left.items():
            results[key] = job.get()
            print(f"  {key[0]} #{key[1]:02d}: val {100 * results[key]['val_acc']:.1f}%",
                  flush=True)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
    pairs = []
    for pair in args.pairs:
        cheap, dear = PAIRS[pair]
        a = [results[(cheap, i)]["val_acc"] for i in range(len(configs))]
        b = [results[(dear, i)]["val_acc"] for i in range(len(configs))]
        pairs.append({"pair": pair, "from": cheap, "to": dear, **pair_stats(a, b),
                      "from_val_acc": a, "to_val_acc": b})
    return {"space": args.space, "seed": args.seed, "metric": "last-epoch validation accuracy",
            "settings": runs.settings, "configs": configs,
            "teacher_epochs": args.teacher_epochs, "device": "cpu", "pairs": pairs}


def markdown(result: dict[str, Any]) -> str:
    lines = ["| pair | cheap setting -> dear setting | configs | Spearman rho [95% CI] | "
             "regret of the cheap winner (pp) |", "|---|---|---|---|---|"]
    for p in result["pairs"]:
        if not math.isfinite(p["rho"]):  # one setting ranked every configuration alike
            ci = "undefined (no spread in one setting)"
        elif math.isfinite(p["rho_low"]):
            ci = f"{p['rho']:+.2f} [{p['rho_low']:+.2f}, {p['rho_high']:+.2f}]"
        else:
            ci = f"{p['rho']:+.2f}"
        lines.append(f"| {p['pair']} | {p['from']} -> {p['to']} | {p['configs']} | {ci} | "
                     f"{p['regret_pp']:.2f} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path:
    """Per pair, each configuration's rank in the cheap setting against the dear one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import rankdata

    pairs = result["pairs"]
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.2 * len(pairs), 3.4), squeeze=False)
    for ax, p in zip(axes[0], pairs, strict=True):
        a = rankdata([-v for v in p["from_val_acc"]])
        b = rankdata([-v for v in p["to_val_acc"]])
        ax.scatter(a, b, s=18)
        n = len(a)
        ax.plot([1, n], [1, n], color="#bbbbbb", linewidth=1)
        ax.scatter([a[p["cheap_winner"]]], [b[p["cheap_winner"]]], color="#d62728", s=30,
                   label="cheap winner")
        rho = f"{p['rho']:+.2f}" if math.isfinite(p["rho"]) else "undefined"
        ax.set(title=f"{p['pair']}: rho {rho}", xlabel=f"rank in {p['from']}",
               ylabel=f"rank in {p['to']}")
        ax.invert_xaxis()
        ax.invert_yaxis()
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="tuning.transfer", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", required=True, help="the npz data set of the base setting")
    p.add_argument("--space", default="alignkd", help="the space the configurations come from")
    p.add_argument("--configs", type=int, default=12, help="K configurations (at least 3)")
    p.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--depth", type=int, default=18, choices=(18,))
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--teacher-epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0,
                   help="draws the configurations, and is every run's seed (reseed: +1)")
    p.add_argument("--workers", type=int, default=2, help="runs at once")
    p.add_argument("--work", default="transfer", help="where the runs and teachers are kept")
    p.add_argument("--out", default="bench/results/transfer-cifar10-cpu.json")
    args = p.parse_args(argv)
    try:
        for flag, value, low in (("--configs", args.configs, 3), ("--width", args.width, 1),
                                 ("--epochs", args.epochs, 1), ("--workers", args.workers, 1),
                                 ("--teacher-epochs", args.teacher_epochs, 1)):
            if value < low:
                raise UserError(f"{flag} must be at least {low}; got {value}")
        if not Path(args.data_path).is_file():
            raise UserError(f"--data-path {args.data_path} is not a file; pass an npz data set")
        check_output_file(args.out, what="results file (--out)",
                          fix="pass --out a .json path in a folder you can write to")
        result = measure(args)
    except UserError as err:
        return refuse(err)
    except KeyboardInterrupt:
        return interrupted("tuning.transfer", argv)
    out = Path(args.out)
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    figure = plot(result, out.with_suffix(".png"))
    print(markdown(result))
    print(f"written: {out}, {figure}")
    return 0
