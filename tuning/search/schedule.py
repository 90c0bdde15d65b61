"""When a cell's trials are compared: the rungs of successive halving, and its rule.

No Ray here: the command line plans the rungs (and what an epoch budget buys) before Ray
starts, and the scheduler in `studies` applies them.
"""

from __future__ import annotations

import math

from tuning.search.settings import SearchSettings
from tuning.search.space import Space

REDUCTION_FACTOR = 2  # successive halving keeps the top half of a cell at each rung


# Where the first rung goes, as a fraction of training: the earliest fraction from which a
# trial's validation accuracy ranks the trials of a cell as their last epoch does, with
# Spearman's rho at least 0.7 at every later epoch. Measured on a FIFO pilot of the alignkd
# space, 24 trials of 15 epochs on 5,085 real CIFAR-10 images (`python -m tuning.rungs`;
# bench/results/rung-correlation-cifar10-cpu.json): rho reached 0.7 only at epoch 14. With
# 407 validation images the last epoch's own ranking is noisy, so no earlier epoch predicts
# it; `--first-rung` takes the fraction a pilot of your own measures.
FIRST_RUNG_FRACTION = 14 / 15


def rung_epochs(epochs: int, first_fraction: float, reduction_factor: int) -> tuple[int, ...]:
    """ASHA's rungs: the first at the first epoch ending at or after `first_fraction` of
    training, then every `reduction_factor` times later, before the last epoch."""
    first = max(1, math.ceil(first_fraction * epochs - 1e-9))
    rungs, r = [], first
    while r < epochs:
        rungs.append(r)
        r *= reduction_factor
    return tuple(rungs)


def settled_fraction(space: Space, epochs: int) -> float:
    """The fraction of training after which no trial of the space still changes by schedule:
    OneCycle's lr has peaked and eta has ended its decay, for every value the space allows.

    A rung before that would judge a trial's lr or eta schedule in mid-course, not the
    trial: early in a schedule, a low lr or a slowly decaying eta looks better than it ends.
    """
    from tuning.run.config import RunConfig

    def highest(key: str, default: float) -> float:
        values = [v for v in space.values_of(key) if v is not None]
        values += [p.high for p in space.params if p.name == key and p.type != "choice"]
        return max(values, default=default)

    kinds = set(space.values_of("eta_kind")) or {RunConfig.eta_kind}
    eta = 0.0
    if kinds != {"constant"}:
        eta = highest("eta_span", -1.0)
        if eta < 0:
            eta = highest("eta_epochs", RunConfig.eta_epochs) / epochs
    return max(highest("pct_start", RunConfig.pct_start), eta)


def default_rungs(space: Space, epochs: int, reduction_factor: int,
                  first: float | None = None) -> tuple[int, ...]:
    """The rungs of a space: the first at `first` (by default the measured
    FIRST_RUNG_FRACTION), or later where the space's lr or eta schedules can still be moving
    then."""
    first = FIRST_RUNG_FRACTION if first is None else first
    return rung_epochs(epochs, max(first, settled_fraction(space, epochs)), reduction_factor)


def promotes(value: float, compared: list[float], reduction_factor: int) -> bool:
    """Successive halving's rule: a trial goes on when it is in the top 1/reduction_factor of
    the values recorded at its rung (its own included), and always when it is the first."""
    ranked = sorted((v for v in compared if not math.isnan(v)), reverse=True)
    if math.isnan(value):
        return not ranked
    keep = max(1, len(ranked) // reduction_factor)
    return value >= ranked[keep - 1]


def search_rungs(space: Space, settings: SearchSettings) -> tuple[int, ...]:
    """The epochs at which a search's trials are compared within their cell; none under FIFO.

    Grid and fixed spaces run FIFO: their points are settings to measure, not candidates; a
    multi-objective search keeps every trial to the end for its Pareto front.
    """
    if settings.scheduler == "fifo" or settings.objective == "acc-time" or \
            space.kind != "sampled":
        return ()
    return default_rungs(space, settings.epochs, REDUCTION_FACTOR,
                         settings.first_rung)


def stopping_words(space: Space, settings: SearchSettings, rungs: tuple[int, ...]) -> str:
    """What the console says of early stopping: its rungs, or why there are none."""
    if rungs:
        return f"at epochs {', '.join(map(str, rungs))}, within each cell"
    if settings.scheduler == "asha" and settings.objective == "acc" and \
            space.kind == "sampled":
        first = max(settings.first_rung or FIRST_RUNG_FRACTION,
                    settled_fraction(space, settings.epochs))
        return (f"none: the first rung would be at {first:.2f} of training, and "
                f"{settings.epochs} epochs leave no epoch before the last there")
    return "none (FIFO)"
