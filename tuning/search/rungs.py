"""Where early stopping can judge a cell's trials, measured (`python -m tuning.rungs NAME`).

Run it on a FIFO pilot (`tuning.search --scheduler fifo`, 20 trials or more in a cell): every
trial ran to the end, so each epoch's validation accuracy can be set against the last one's.
Per cell it gives:

- Spearman's rho between the trials' accuracy at each epoch and at their last epoch, with a
  bootstrap 95% interval;
- the fraction of training from which rho stays at 0.7 or more (the measurement behind
  `FIRST_RUNG_FRACTION`, the default rule of `tuning.search.schedule`);
- the rungs that the default rule gives this search, replayed against FIFO on the same
  curves: successive halving run over many orders of arrival, with its regret (the best final
  accuracy lost) and the share of the epochs it saves.

Under ASHA the trials that ran to the end are the survivors of the rungs themselves, so a
search that was not FIFO is refused.
"""

from __future__ import annotations

import math
import random
import statistics
from typing import Any

from tuning.run.config import UserError
from tuning.search.report.stats import spearman
from tuning.search.schedule import (
    FIRST_RUNG_FRACTION,
    REDUCTION_FACTOR,
    default_rungs,
    promotes,
    settled_fraction,
)
from tuning.search.settings import SearchSettings

THRESHOLD = 0.7  # rho from which a rung's ranking is taken to predict the final one
MIN_TRIALS = 5  # below this, rho is noise: refused
ADVISED_TRIALS = 20  # a pilot for the default rule
ORDERS = 1000  # random orders of arrival the replay averages over


def replay(curves: list[dict[int, float]], rungs: tuple[int, ...], epochs: int,
           reduction_factor: int = REDUCTION_FACTOR) -> dict[str, Any]:
    """Asynchronous successive halving on complete curves, in the given order of arrival:
    which trials would have run to the end, the best final accuracy among them against the
    best of all (the regret), and the epochs trained as a share of running every trial."""
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


def replay_orders(curves: list[dict[int, float]], rungs: tuple[int, ...], epochs: int,
                  orders: int = ORDERS, seed: int = 0) -> dict[str, Any]:
    """`replay` over random orders of arrival (the asynchronous rule depends on it): the mean
    regret, how often the best trial was kept, and the mean share of the epochs saved."""
    rng = random.Random(seed)
    runs = []
    for _ in range(orders):
        order = list(curves)
        rng.shuffle(order)
        runs.append(replay(order, rungs, epochs))
    return {"rungs": list(rungs), "orders": orders,
            "regret_mean": statistics.fmean(r["regret"] for r in runs),
            "regret_max": max(r["regret"] for r in runs),
            "best_kept_share": sum(r["regret"] == 0 for r in runs) / orders,
            "epochs_saved_share": 1 - statistics.fmean(r["epoch_share"] for r in runs)}


def settled_from(rho_at: dict[int, float], epochs: int, threshold: float = THRESHOLD) -> float:
    """The earliest fraction of training from which rho stays at `threshold` or more (the
    last epoch ranks the trials as itself: rho 1)."""
    first = epochs
    for e in range(epochs - 1, 0, -1):
        if not rho_at.get(e, math.nan) >= threshold:
            break
        first = e
    return first / epochs


def cell_correlation(curves: list[dict[int, float]], epochs: int,
                     rungs: tuple[int, ...]) -> dict[str, Any]:
    """rho between each epoch and the last over complete curves; the replay of `rungs`."""
    full = [c for c in curves if all(e in c for e in range(1, epochs + 1))]
    last = [c[epochs] for c in full]
    by_epoch = {e: spearman([c[e] for c in full], last, seed=e) for e in range(1, epochs)}
    rho_at = {e: c.rho for e, c in by_epoch.items()}
    return {"trials": len(full), "rho_at": rho_at,
            "rho_interval": {e: [c.low, c.high] for e, c in by_epoch.items()},
            "settled_fraction": settled_from(rho_at, epochs),
            "default_rungs": list(rungs),
            "replay": replay_orders(full, rungs, epochs) if rungs and full else None,
            "finals": last}


def measure(settings: SearchSettings) -> dict[str, Any]:
    import optuna

    from tuning.search.cells import study_name

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = settings.space()
    epochs = settings.epochs
    rungs = default_rungs(space, epochs, REDUCTION_FACTOR)  # the search's own rule
    storage = optuna.storages.RDBStorage(settings.optuna_storage)
    cells = {}
    for cell in space.cells():
        study = optuna.load_study(study_name=study_name(settings.name, cell), storage=storage)
        curves = [dict(t.intermediate_values) for t in study.trials
                  if t.state == optuna.trial.TrialState.COMPLETE]
        if len(curves) < MIN_TRIALS:
            raise UserError(f"cell {cell.key} of search {settings.name!r} has "
                            f"{len(curves)} finished trial(s); rho needs at least {MIN_TRIALS} "
                            f"(advised: {ADVISED_TRIALS}). Run a FIFO pilot with more "
                            "--num-samples")
        cells[cell.key] = cell_correlation(curves, epochs, rungs)
    out: dict[str, Any] = {
        "search": settings.name, "scheduler": settings.scheduler, "epochs": epochs,
        "fixed": settings.overrides, "space": settings.space_name,
        "rule": (f"first rung at the larger of FIRST_RUNG_FRACTION ({FIRST_RUNG_FRACTION:.3f})"
                 f" and the fraction by which every lr and eta schedule of the space has "
                 f"settled ({settled_fraction(space, epochs):.2f}); then x{REDUCTION_FACTOR}"),
        "threshold": THRESHOLD}
    if len(cells) == 1:
        out.update(next(iter(cells.values())))
    else:
        out["trials"] = sum(c["trials"] for c in cells.values())
        out["default_rungs"] = list(rungs)
        out["cells"] = cells
    return out


def table_text(result: dict[str, Any]) -> str:
    cells = result.get("cells") or {"(the one cell)": result}
    lines = [f"search {result['search']} ({result['scheduler']}, {result['epochs']} epochs): "
             "Spearman rho of val accuracy at an epoch against the last epoch, with its "
             "bootstrap 95% interval"]
    for cell, c in cells.items():
        lines.append(f"{cell}: {c['trials']} trials")
        for e, rho in c["rho_at"].items():
            low, high = c["rho_interval"][e]
            lines.append(f"  epoch {int(e):>3} ({int(e) / result['epochs']:.2f}): rho "
                         f"{rho:+.2f} [{low:+.2f}, {high:+.2f}]")
        lines.append(f"  rho stays >= {result['threshold']} from {c['settled_fraction']:.2f} "
                     f"of training: a search like this one can pass --first-rung "
                     f"{c['settled_fraction']:.3f} (the default rule, from the project's own "
                     f"pilot, is {FIRST_RUNG_FRACTION:.3f})")
        r = c["replay"]
        if r:
            lines.append(f"  the default rungs {r['rungs']} against FIFO, over {r['orders']} "
                         f"orders of arrival: mean regret {100 * r['regret_mean']:.2f} pp "
                         f"(max {100 * r['regret_max']:.2f}), best trial kept in "
                         f"{100 * r['best_kept_share']:.0f}%, "
                         f"{100 * r['epochs_saved_share']:.0f}% of the epochs saved")
        else:
            lines.append("  the default rule gives this search no rung")
    return "\n".join(lines)
