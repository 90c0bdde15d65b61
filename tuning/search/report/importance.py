"""Which hyperparameters mattered in a cell, where the cell has the trials to say so.

The evaluator is the one optuna-dashboard shows: Optuna's PED-ANOVA with its defaults (it is
deterministic), on each objective negated where it is maximized, as the dashboard passes it.
A cell needs at least max(10, 2 x its searched parameters) trials that finished or were
stopped early; below that, importances are noise (two trials with random accuracies rank
the same parameters first on any data set), and none is given.

Trials stopped early count too, at the last epoch that every counted trial reached: left out,
a parameter that gets trials stopped would look unimportant. Where no trial was stopped, the
values are the trials' own, and the numbers are the dashboard's.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

MIN_TRIALS = 10


@dataclass
class CellImportance:
    """A cell's importances per objective, or why there are none (`need` > `n`)."""

    n: int
    need: int
    epoch: int | None = None  # the epoch the values were read at, where trials were stopped
    by_objective: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def enough(self) -> bool:
        return self.n >= self.need

    def describe(self) -> str:
        if not self.enough:
            return f"too few trials (n={self.n}, need {self.need})"
        at = f", at epoch {self.epoch}" if self.epoch is not None else ""
        parts = []
        for objective, values in self.by_objective.items():
            top = sorted(values.items(), key=lambda kv: -kv[1])
            parts.append(f"{objective} (n={self.n}{at}): " +
                         ", ".join(f"{k} {v:.2f}" for k, v in top))
        return "; ".join(parts)


def needed(study) -> int:
    """How many finished or pruned trials a cell needs for its importances."""
    from optuna.trial import TrialState

    params = {k for t in study.get_trials(deepcopy=False)
              if t.state in (TrialState.COMPLETE, TrialState.PRUNED) for k in t.params}
    return max(MIN_TRIALS, 2 * len(params))


def _ped_anova(study, index: int) -> dict[str, float]:
    """PED-ANOVA importances of one objective, as optuna-dashboard computes them."""
    import optuna

    sign = -1.0 if study.directions[index] == optuna.study.StudyDirection.MAXIMIZE else 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PED-ANOVA notes that lower targets are better
        return optuna.importance.get_param_importances(
            study, target=lambda t: sign * t.values[index],
            evaluator=optuna.importance.PedAnovaImportanceEvaluator())


def cell_importance(study) -> CellImportance:
    """Importances of one cell's study, per objective (by the study's metric names)."""
    import optuna
    from optuna.trial import TrialState

    counted = [t for t in study.get_trials(deepcopy=False)
               if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    result = CellImportance(len(counted), needed(study))
    if not result.enough:
        return result
    names = study.metric_names or [f"objective {i}" for i in range(len(study.directions))]
    pruned = [t for t in counted if t.state == TrialState.PRUNED]
    if pruned and len(study.directions) == 1:
        # Every counted trial valued at the last epoch all of them reached.
        epoch = min(max(t.intermediate_values, default=0) for t in counted)
        kept = [t for t in counted if epoch in t.intermediate_values]
        result.epoch, result.n = epoch, len(kept)
        if not result.enough:
            return result
        study = optuna.create_study(direction=study.direction)
        study.add_trials([optuna.trial.create_trial(
            params=t.params, distributions=t.distributions, value=t.intermediate_values[epoch])
            for t in kept])
    result.by_objective = {names[i]: _ped_anova(study, i) for i in range(len(study.directions))}
    return result


def importances(storage_url: str | None, search: str) -> dict[str, CellImportance]:
    """cell key -> its importances, for every cell of the search's studies."""
    if not storage_url:
        return {}
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(storage_url)
    out: dict[str, Any] = {}
    for summary in storage.get_all_studies():
        if summary.study_name.startswith(f"{search}/"):
            study = optuna.load_study(study_name=summary.study_name, storage=storage)
            out[summary.study_name.split("/", 1)[1]] = cell_importance(study)
    return out
