"""One Optuna study per cell, in one Optuna storage; the Tune searcher and scheduler over them.

- `CellSearcher` asks each cell's own study for that cell's trials, round-robin over the cells
  until each has its budget, and tells the study how each trial ended: COMPLETE with the last
  epoch's validation accuracy, PRUNED when the scheduler stopped it, FAIL when it errored.
- `CellScheduler` records every epoch's validation accuracy as the trial's intermediate
  value and runs asynchronous successive halving inside the trial's study: a trial reaching a
  rung is compared only with the trials of its own study that reached that rung. Each decision
  is recorded on the trial (user attribute `asha_epoch_<epoch>`) with the trials it compared.

The storage is the state: both run in the search driver, and a resumed driver reopens the same
studies. Trials a killed driver had asked for but Tune never recorded are marked FAIL with a
`lost` reason and do not count against their cell's budget; a lost grid point, default or
warm-start seed is queued again.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from tuning.search.cells import Cell, study_name
from tuning.search.schedule import promotes
from tuning.search.settings import SearchSettings
from tuning.search.space import Space, SpaceSampler, cell_defaults, grid_points

RAY_ID = "ray_trial_id"
LOST = "lost"
DECISION = "asha_epoch_{}"
METRIC = "val_acc"  # selection: the last epoch's validation accuracy, the tested weights'
TIME_METRIC = "train_time"


def cell_seed(seed: int, cell: Cell) -> int:
    return int(hashlib.sha256(f"{seed}/{cell.key}".encode()).hexdigest()[:8], 16)


DEFAULT = "default"  # the user attribute of each cell's enqueued default configuration
WARM = "warm_start_from"  # ... and of a configuration queued from a finished search
OBJECTIVES = {False: ["val_acc"], True: ["val_acc", "train_time"]}  # the studies' metric names


class StudyBook:
    """The cells' studies, opened lazily: the object pickles with its settings alone.

    `budget` caps a cell's trials; `epoch_budget` (0: none) caps the epochs its trials may
    spend, counting a running trial at its full length, so that strategies that stop trials
    early can be compared with those that do not at the same cost.
    """

    def __init__(self, storage: str, search: str, space: Space, *, seed: int,
                 multi_objective: bool, budget: int, sampler: str = "tpe",
                 concurrent: bool = True, epoch_budget: int = 0,
                 warm: dict[str, list] | None = None) -> None:
        self.storage_url, self.search, self.space = storage, search, space
        self.seed, self.multi_objective, self.budget = seed, multi_objective, budget
        self.sampler_kind, self.concurrent, self.epoch_budget = sampler, concurrent, epoch_budget
        self.warm = warm or {}  # cell key -> warm-start seeds, queued when the study is made
        self._studies: dict[str, optuna.Study] = {}
        self._storage = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_studies": {}, "_storage": None}

    def __setstate__(self, state: dict) -> None:
        # A searcher pickled before these settings existed resumes with their old behaviour.
        self.__dict__.update({"sampler_kind": "tpe", "concurrent": True, "epoch_budget": 0,
                              "warm": {}, **state})

    @property
    def storage(self):
        if self._storage is None:
            self._storage = optuna.storages.RDBStorage(self.storage_url)
        return self._storage

    def directions(self) -> list[str]:
        return ["maximize", "minimize"] if self.multi_objective else ["maximize"]

    def expected_trials(self, epochs: int) -> int:
        """The trials a cell is expected to run: its cap, or what its epoch budget buys."""
        if self.epoch_budget:
            return min(self.budget, max(1, self.epoch_budget // epochs))
        return self.budget

    def sampler(self, cell: Cell, asked: int = 0, epochs: int = 0) -> optuna.samplers.BaseSampler:
        """The cell's sampler, seeded by the search's seed, the cell and the trials it has
        already asked, so that a resumed driver does not replay its first proposals."""
        seed = cell_seed(self.seed, cell) + asked
        if self.space.kind != "sampled" or self.sampler_kind == "random":
            # A grid's points are queued in the study (see `study`), and a space of fixed
            # settings has none; random search is asked for by name.
            return optuna.samplers.RandomSampler(seed=seed)
        # TPE (multi-objective TPE for acc-time); its random start-up is at most half the
        # cell's budget, so that a small budget still gets model-based proposals. With trials
        # running at once, each running trial counts as a poor result until it reports
        # (constant liar), so that concurrent proposals spread out instead of repeating.
        trials = self.expected_trials(epochs) if epochs else self.budget
        startup = max(1, min(10, trials // 2))
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup,
                                          constant_liar=self.concurrent)

    def study(self, cell: Cell, epochs: int = 0) -> optuna.Study:
        if cell.key not in self._studies:
            study = optuna.create_study(
                storage=self.storage, study_name=study_name(self.search, cell),
                directions=self.directions(), load_if_exists=True)
            trials = study.get_trials(deepcopy=False)
            study.sampler = self.sampler(cell, asked=len(trials), epochs=epochs)
            if not trials and not study.user_attrs:
                study.set_user_attr("search", self.search)
                study.set_user_attr("cell", cell.as_dict())
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    study.set_metric_names(OBJECTIVES[self.multi_objective])
                # A grid is run point by point from the study's queue, in order, so that a
                # point lost with a killed driver can be queued again (never skipped).
                for point in grid_points(self.space):
                    study.enqueue_trial(point)
                if self.space.kind == "sampled":
                    # The search starts from the method's defaults (the paper's recipe): any
                    # other configuration must beat it on validation to be chosen.
                    defaults = cell_defaults(self.space, cell)
                    study.set_user_attr(DEFAULT, {"params": defaults.enqueued,
                                                  "clipped": list(defaults.clipped)})
                    study.enqueue_trial(defaults.enqueued, user_attrs={DEFAULT: True})
                # Then the best configurations of a finished search's matching cell, each
                # once (a seed equal to one already queued is not queued again).
                for seed in self.warm.get(cell.key, []):
                    study.enqueue_trial(seed.params, user_attrs={WARM: seed.origin},
                                        skip_if_exists=True)
            self._studies[cell.key] = study
        return self._studies[cell.key]

    def trial(self, cell: Cell, number: int) -> optuna.trial.FrozenTrial:
        study = self.study(cell)
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
        return self.storage.get_trial(trial_id)

    def counted(self, cell: Cell) -> list[optuna.trial.FrozenTrial]:
        """The cell's trials that count against its budget: all asked but the lost ones."""
        return [t for t in self.study(cell).get_trials(deepcopy=False)
                if LOST not in t.user_attrs and t.state != TrialState.WAITING]

    def epochs_spent(self, cell: Cell, epochs: int) -> int:
        """Epochs the cell's trials have spent, a running one counted at its full length."""
        total = 0
        for t in self.counted(cell):
            if t.state in (TrialState.RUNNING, TrialState.COMPLETE):
                total += epochs
            else:  # stopped early or failed: the epochs it reported
                total += max(t.intermediate_values, default=0)
        return total

    def is_open(self, cell: Cell, epochs: int, started: int | None = None) -> bool:
        """Whether the cell may start another trial: under its cap of trials (`started`, when
        the caller keeps count) and, with an epoch budget, with a whole trial's epochs left."""
        cap = self.space.cell_budget(self.budget)
        if (len(self.counted(cell)) if started is None else started) >= cap:
            return False
        return not self.epoch_budget or \
            self.epochs_spent(cell, epochs) + epochs <= self.epoch_budget

    def delete_all(self, cells: list[Cell]) -> None:
        """Forget every study of the search (a fresh Tune experiment under the same name)."""
        names = {s.study_name for s in self.storage.get_all_studies()}
        for cell in cells:
            if study_name(self.search, cell) in names:
                optuna.delete_study(study_name=study_name(self.search, cell),
                                    storage=self.storage)
        self._studies.clear()


class CellSearcher(Searcher):
    """Ray Tune's searcher over the cells' studies: each cell gets exactly its budget."""

    def __init__(self, book: StudyBook, cells: list[Cell], *, epochs: int,
                 max_concurrent: int = 0) -> None:
        super().__init__(metric=None, mode=None)
        self.book, self.cells, self.epochs = book, list(cells), epochs
        self.max_concurrent = max_concurrent
        self.sampler = SpaceSampler(book.space)
        self.known: set[str] = set()  # every Tune trial id this search asked a study for
        self.live: dict[str, tuple[str, int]] = {}  # Tune trial id -> (cell key, study trial)
        self._started: dict[str, int] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_started": None}

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # the metric and direction are the studies'

    def _cell(self, key: str) -> Cell:
        return next(c for c in self.cells if c.key == key)

    def _counts(self) -> dict[str, int]:
        """Trials started per cell; the first call also settles what a killed driver left."""
        if self._started is None:
            mark_lost(self.book, self.cells, self.known)
            self._started = {c.key: len(self.book.counted(c)) for c in self.cells}
        return self._started

    def suggest(self, trial_id: str) -> dict | None:
        counts = self._counts()
        open_cells = [c for c in self.cells if self.book.is_open(c, self.epochs, counts[c.key])]
        if not open_cells:
            # Under an epoch budget, a running trial that is stopped early gives back the
            # epochs it was counted for: wait for it before declaring the search done.
            return None if self.book.epoch_budget and self.live else Searcher.FINISHED
        if self.max_concurrent and len(self.live) >= self.max_concurrent:
            return None
        # The cell with the fewest trials so far: every cell advances, and all run at once.
        cell = min(open_cells, key=lambda c: counts[c.key])
        study = self.book.study(cell, self.epochs)
        trial = study.ask()
        trial.set_user_attr(RAY_ID, trial_id)
        params = self.sampler.sample(trial, cell)
        counts[cell.key] += 1
        self.known.add(trial_id)
        self.live[trial_id] = (cell.key, trial.number)
        return {"cell": cell.key, "study_trial": trial.number, **marks(trial), **cell.as_dict(),
                **params}

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        entry = self.live.pop(trial_id, None)
        if entry is None:
            return
        cell, number = self._cell(entry[0]), entry[1]
        tell(self.book, cell, number, result, error=error, epochs=self.epochs)

    def save(self, checkpoint_path: str) -> None:
        # JSON, not a pickle: the state is two lists of ids, and the studies are in storage.
        Path(checkpoint_path).write_text(json.dumps(
            {"known": sorted(self.known), "live": self.live}))

    def restore(self, checkpoint_path: str) -> None:
        state = json.loads(Path(checkpoint_path).read_text())
        self.known = set(state["known"])
        self.live = {k: (v[0], int(v[1])) for k, v in state["live"].items()}
        self._started = None


def marks(trial: optuna.trial.BaseTrial) -> dict[str, Any]:
    """How a trial came to its values, where it was given them: the default, a warm seed."""
    return {key: trial.user_attrs[key] for key in (DEFAULT, WARM) if trial.user_attrs.get(key)}


def mark_lost(book: StudyBook, cells: list[Cell], known: set[str]) -> int:
    """FAIL every unfinished study trial that Tune has no record of (asked for by a driver that
    was killed before Tune saved its state): it never trained, or not for long. It does not
    count against its cell's budget."""
    lost = 0
    for cell in cells:
        study = book.study(cell)
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.user_attrs.get(RAY_ID) in known:
                continue
            book.storage.set_trial_user_attr(
                t._trial_id, LOST, "the search driver was killed before Ray Tune recorded "
                                   "this trial; another trial of the cell took its place")
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            # A configuration the study was given, not proposed (a grid point, the default, a
            # warm start's seed), is queued again with its marks: lost, never skipped.
            # Its queued values, not `params`: a driver killed while the trial took its values
            # left only some of them there.
            if book.space.kind == "grid" or marks(t):
                study.enqueue_trial(t.system_attrs.get("fixed_params", t.params),
                                    user_attrs=marks(t))
            lost += 1
    return lost


def tell(book: StudyBook, cell: Cell, number: int, result: dict | None, *, error: bool,
         epochs: int) -> optuna.trial.FrozenTrial:
    """Tell a cell's study how a trial ended; a trial already told (pruned, or told before a
    killed driver could save) keeps its state."""
    study, frozen = book.study(cell), book.trial(cell, number)
    if frozen.state.is_finished():
        return frozen
    result = result or {}
    epoch = int(result.get("epoch", 0))
    if error or result.get("failed"):
        book.storage.set_trial_user_attr(frozen._trial_id, "failure",
                                         result.get("failed") or "the trial errored")
        return study.tell(number, state=TrialState.FAIL)
    value = result.get(METRIC)
    if epoch < epochs or value is None or not math.isfinite(value):
        book.storage.set_trial_user_attr(
            frozen._trial_id, "failure",
            f"ended after epoch {epoch} of {epochs} without being stopped by the scheduler")
        return study.tell(number, state=TrialState.FAIL)
    values = [value, result[TIME_METRIC]] if book.multi_objective else [value]
    return study.tell(number, values)


class CellScheduler(FIFOScheduler):
    """Early stopping inside each cell's study (successive halving at `rungs`), and every
    epoch's validation accuracy recorded as the study trial's intermediate value.

    With no rungs it stops nothing (FIFO) and still records the curves.
    """

    def __init__(self, book: StudyBook, rungs: tuple[int, ...], reduction_factor: int) -> None:
        super().__init__()
        self.book, self.rungs, self.reduction_factor = book, tuple(rungs), reduction_factor
        self._cells: dict[str, Cell] = {}

    def _cell(self, trial) -> Cell:
        key = trial.config["cell"]
        if key not in self._cells:
            self._cells[key] = Cell.of(trial.config, self.book.space.dims)
        return self._cells[key]

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if self.book.multi_objective or "study_trial" not in trial.config:
            return TrialScheduler.CONTINUE  # Optuna keeps no curves for multi-objective studies
        epoch, value = int(result.get("epoch", 0)), result.get(METRIC)
        if epoch < 1 or value is None:
            return TrialScheduler.CONTINUE
        return self.decide(self._cell(trial), trial.config["study_trial"], epoch, float(value))

    def decide(self, cell: Cell, number: int, epoch: int, value: float) -> str:
        """Record the epoch's value; at a rung, compare it within the cell's study."""
        book = self.book
        frozen = book.trial(cell, number)
        if frozen.state in (TrialState.PRUNED, TrialState.FAIL):
            # Stopped, or failed, before a killed driver could tell Tune: Tune runs it again
            # from its checkpoint, and it stops at once, as its study already says.
            return TrialScheduler.STOP
        if frozen.state.is_finished():
            return TrialScheduler.CONTINUE
        stopped = [r for k, r in frozen.user_attrs.items()
                   if k.startswith("asha_epoch_") and not r["go_on"]]
        if stopped:
            # Decided, but the driver was killed before the study heard of it; the trial
            # may even have trained past its rung since. The decision stands.
            book.study(cell).tell(number, state=TrialState.PRUNED, skip_if_finished=True)
            return TrialScheduler.STOP
        if epoch not in frozen.intermediate_values:
            book.storage.set_trial_intermediate_value(frozen._trial_id, epoch, value)
        if epoch not in self.rungs:
            return TrialScheduler.CONTINUE
        if DECISION.format(epoch) in frozen.user_attrs:
            return TrialScheduler.CONTINUE  # it went on from this rung before
        compared = [(t.user_attrs.get(RAY_ID), t.number, t.intermediate_values[epoch])
                    for t in book.study(cell).get_trials(deepcopy=False)
                    if epoch in t.intermediate_values and LOST not in t.user_attrs
                    and t.number != number]
        compared.append((frozen.user_attrs.get(RAY_ID), number, value))
        # The default configuration always runs to the end: it is the reference every chosen
        # configuration must beat, and the baseline of the cell's tuning gain.
        default = bool(frozen.user_attrs.get(DEFAULT))
        go_on = default or promotes(value, [v for _, _, v in compared], self.reduction_factor)
        book.storage.set_trial_user_attr(frozen._trial_id, DECISION.format(epoch), {
            "epoch": epoch, "value": value, "go_on": go_on, "cell": cell.key,
            "rule": "the default configuration is never stopped early" if default else
                    f"top 1/{self.reduction_factor} of the cell's trials at this rung",
            "compared": [{"ray_trial_id": r, "study_trial": n, "value": v}
                         for r, n, v in sorted(compared, key=lambda x: x[1])],
        })
        if go_on:
            return TrialScheduler.CONTINUE
        book.study(cell).tell(number, state=TrialState.PRUNED)
        return TrialScheduler.STOP


def decisions(book: StudyBook, cells: list[Cell]) -> list[dict[str, Any]]:
    """Every early-stopping decision of the search, as recorded on the study trials."""
    out = []
    for cell in cells:
        for t in book.study(cell).get_trials(deepcopy=False):
            for key, record in t.user_attrs.items():
                if key.startswith("asha_epoch_"):
                    out.append({**record, "ray_trial_id": t.user_attrs.get(RAY_ID),
                                "study_trial": t.number})
    return out


def settle_studies(book: StudyBook, cells: list[Cell], rows: list[dict[str, Any]],
                   epochs: int) -> None:
    """Make each study and Tune's table agree. Normally a no-op; after a killed driver it
    catches what one side heard before the kill and the other did not:

    - a study trial Tune never recorded is marked lost;
    - a trial Tune finished but its study did not hear of is told now;
    - a trial its study had already stopped or failed keeps that state, and its row says so
      (Tune may have run it again from a checkpoint after the resume).
    """
    mark_lost(book, cells, known={r["trial_id"] for r in rows})
    for row in rows:
        if row["study_trial"] == "":
            continue
        cell = next(c for c in cells if c.key == row["cell"])
        frozen = book.trial(cell, row["study_trial"])
        if frozen.state == TrialState.FAIL and row["status"] != "FAILED":
            row["status"] = "FAILED"
            row["error"] = row["error"] or frozen.user_attrs.get(
                "failure", "the trial failed before the search driver was killed")
        elif frozen.state == TrialState.PRUNED and row["status"] == "COMPLETED":
            row["status"] = "STOPPED_EARLY"
        elif frozen.state.is_finished():
            continue
        elif row["status"] == "STOPPED_EARLY":
            book.study(cell).tell(row["study_trial"], state=TrialState.PRUNED)
        else:
            metrics = dict(row["_result"].metrics or {})
            tell(book, cell, row["study_trial"], metrics, error=row["status"] == "FAILED",
                 epochs=epochs)


def short_cells(book: StudyBook, cells: list[Cell], epochs: int) -> list[str]:
    """Cells that could still have taken a trial: under their trial cap and within their
    epoch budget. Tune returns from an interrupted run (Ctrl-C) as from a finished one, and a
    trial it stopped on the way out can look ended: only the studies know whether every cell
    got its budget."""
    return [c.key for c in cells
            if any(t.state == TrialState.RUNNING for t in book.counted(c))
            or book.is_open(c, epochs)]


def study_book(settings: SearchSettings, space: Space,
               warm: dict[str, list] | None = None) -> StudyBook:
    """The search's studies, with its sampler, budgets and warm-start seeds."""
    seed = settings.sampler_seed
    return StudyBook(settings.optuna_storage, settings.name, space,
                     seed=settings.seed if seed is None else seed,
                     multi_objective=settings.objective == "acc-time",
                     budget=settings.num_samples,
                     sampler="random" if "random" in settings.sampler else "tpe",
                     concurrent=settings.max_concurrent != 1,
                     epoch_budget=settings.budget_epochs or 0, warm=warm)


def pareto_fronts(book: StudyBook, cells: list[Cell]) -> dict[str, set[int]] | None:
    """Each cell's Pareto front of accuracy against time, as its study computes it; None for a
    single objective."""
    if not book.multi_objective:
        return None
    return {c.key: {t.number for t in book.study(c).best_trials} for c in cells}
