"""`python -m tuning.rungs NAME`: how well a search's first early-stopping rung predicts the end.

For each cell of a finished search, the Spearman rank correlation between the trials'
validation accuracy at the first rung (the epoch ASHA would first compare them at) and at
their last epoch, over the trials that ran to the end; and the same at every epoch, to show
where the ranking settles. Run it on a FIFO search (`--scheduler fifo`): under ASHA the
trials that ran to the end are the survivors of that very rung.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import yaml

from tuning.checkpoint import atomic_write_text
from tuning.config import RunConfig, UserError


def ranks(values: list[float]) -> list[float]:
    """1-based ranks; tied values share the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rho: Pearson's correlation of the ranks (NaN when either is constant)."""
    if len(x) != len(y) or len(x) < 2:
        return math.nan
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx and syy else math.nan


def replay(curves: list[dict[int, float]], rungs: tuple[int, ...], epochs: int,
           reduction_factor: int = 2) -> dict[str, Any]:
    """Asynchronous successive halving replayed on complete curves, in the trials' order:
    which would have run to the end, the best final accuracy among them against the best of
    all (the regret), and the epochs trained as a share of running every trial to the end."""
    from tuning.search.studies import promotes

    recorded: dict[int, list[float]] = {r: [] for r in rungs}
    stopped_at = []
    for c in curves:
        stop = epochs
        for r in rungs:
            recorded[r].append(c[r])
            if not promotes(c[r], recorded[r], reduction_factor):
                stop = r
                break
        stopped_at.append(stop)
    finished = [c[epochs] for c, s in zip(curves, stopped_at, strict=True) if s == epochs]
    best = max(c[epochs] for c in curves)
    return {"rungs": list(rungs), "ran_to_the_end": len(finished),
            "best_kept": max(finished), "best": best, "regret": best - max(finished),
            "epoch_share": sum(stopped_at) / (len(curves) * epochs)}


def cell_correlation(curves: list[dict[int, float]], rung: int, epochs: int,
                     rungs: tuple[int, ...] = ()) -> dict[str, Any]:
    """rho between each epoch's values and the last epoch's, over complete curves, and the
    replay of successive halving at `rungs`."""
    full = [c for c in curves if all(e in c for e in range(1, epochs + 1))]
    last = [c[epochs] for c in full]
    by_epoch = {e: spearman([c[e] for c in full], last) for e in range(1, epochs + 1)}
    return {"trials": len(full), "rung": rung, "rho_at_rung": by_epoch.get(rung, math.nan),
            "rho_by_epoch": by_epoch,
            "replay": replay(full, rungs or (rung,), epochs) if full else None,
            "pairs": [{"at_rung": c[rung], "last": c[epochs]} for c in full]}


def measure(settings: dict[str, Any]) -> dict[str, Any]:
    import optuna

    from tuning.search.cells import study_name
    from tuning.search.cli import settings_space
    from tuning.search.driver import REDUCTION_FACTOR
    from tuning.search.studies import default_rungs

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = settings_space(settings)
    epochs = settings["epochs"]
    peak = space.fixed.get("pct_start", RunConfig.pct_start)
    rungs = default_rungs(space, epochs, REDUCTION_FACTOR)  # the search's own rule
    if not rungs:
        raise UserError(f"a {epochs}-epoch search has no rung to measure; it needs 2 epochs "
                        "or more")
    storage = optuna.storages.RDBStorage(settings["optuna_storage"])
    out = {"search": settings["name"], "scheduler": settings["scheduler"], "epochs": epochs,
           "fixed": settings["overrides"], "space": settings["space_name"],
           "rule": f"first rung at ceil({peak} x epochs), the first epoch ending at or after "
                   "OneCycle's lr peak", "cells": {}}
    for cell in space.cells():
        study = optuna.load_study(study_name=study_name(settings["name"], cell), storage=storage)
        curves = [dict(t.intermediate_values) for t in study.trials
                  if t.state == optuna.trial.TrialState.COMPLETE]
        out["cells"][cell.key] = cell_correlation(curves, rungs[0], epochs, rungs)
    return out


def table_text(result: dict[str, Any]) -> str:
    lines = [f"search {result['search']} ({result['scheduler']}, {result['epochs']} epochs): "
             "Spearman rho of val accuracy at an epoch against the last epoch"]
    for cell, c in result["cells"].items():
        curve = ", ".join(f"{e}: {r:.2f}" for e, r in c["rho_by_epoch"].items()
                          if math.isfinite(r))
        lines.append(f"{cell}: {c['trials']} trials, first rung epoch {c['rung']}: "
                     f"rho {c['rho_at_rung']:.3f}  (by epoch: {curve})")
        r = c["replay"]
        if r:
            lines.append(f"  halving replayed at epochs {r['rungs']}, in trial order: "
                         f"{r['ran_to_the_end']} of {c['trials']} ran to the end, best of them "
                         f"{r['best_kept']:.4f} against {r['best']:.4f} (regret "
                         f"{r['regret']:.4f}), {100 * r['epoch_share']:.0f}% of the epochs")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tuning.rungs", description=__doc__)
    p.add_argument("name", help="the search's name")
    p.add_argument("--storage-path", default="ray_results")
    p.add_argument("--out", default=None,
                   help="JSON file to write (default: rung-correlation.json in the search)")
    args = p.parse_args(argv)
    try:
        folder = Path(args.storage_path) / args.name
        path = folder / "search.yaml"
        if not path.is_file():
            raise UserError(f"no search named {args.name!r} under {args.storage_path}; check "
                            "the name and --storage-path")
        settings = yaml.safe_load(path.read_text())
        url = settings["optuna_storage"]
        if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
            raise UserError(f"the search's study storage {url} does not exist")
        if settings["scheduler"] != "fifo":
            print("note: under ASHA the trials that ran to the end survived the rung itself; "
                  "measure on a --scheduler fifo search", file=sys.stderr)
        result = measure(settings)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else folder / "rung-correlation.json"
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    print(table_text(result))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
