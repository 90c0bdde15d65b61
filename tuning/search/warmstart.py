"""Warm start: a new search's cells begin from the best configurations of a finished search.

For each cell of the new search, the finished search's matching cell is the one of the same
method (and block) with the nearest data set (the same, else one of its family: CIFAR-10,
CIFAR-100 and CIFAR subsets are one family), then the nearest depth. Its top configurations
by last-epoch validation accuracy (ties: the lower trial number) are queued in the new cell's
study after the cell's default configuration, each tagged with where it came from; the
parameters the new space does not search are left out, and values outside its ranges are
moved into them. A source configuration that lands on the new cell's default, or on one
already taken, is passed over for the next best, so that the top K are K new configurations.
They are queued once, when the study is made: a resumed search finds them there and queues
nothing again.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuning.run.config import RunConfig, UserError
from tuning.search import storage
from tuning.search.cells import Cell, study_name
from tuning.search.settings import SETTINGS_FILE, SearchSettings, check_name
from tuning.search.space import Param, Space, cell_defaults, decaying_range, inside_space


@dataclass(frozen=True)
class Seed:
    """One configuration queued in a new cell, and the trial it came from."""

    params: dict[str, Any]
    origin: str  # "<search>/<cell key>#<trial number>"


def family(dataset: str, data_path: str | None) -> str:
    text = f"{dataset} {Path(data_path).stem if data_path else ''}".lower()
    return "cifar" if "cifar" in text else dataset


def _where(space: Space, cell: Cell) -> tuple[str, str, int, str]:
    """A cell's method (with its block), data set, depth and data family."""
    values = {**space.fixed, **cell.as_dict()}
    method = f"{values.get('block') or 'plain'}+{values.get('method', RunConfig.method)}"
    dataset = values.get("dataset", RunConfig.dataset)
    return (method, dataset, int(values.get("depth", RunConfig.depth)),
            family(dataset, values.get("data_path")))


def nearest(source: Space, cell: Cell, target: Space) -> Cell | None:
    """The source cell a target cell starts from: the same method, the nearest data set,
    then the nearest depth; None where the source has no cell of that method."""
    method, dataset, depth, fam = _where(target, cell)
    options = []
    for i, candidate in enumerate(source.cells()):
        m, d, n, f = _where(source, candidate)
        if m != method:
            continue
        options.append(((0 if d == dataset else 1 if f == fam else 2, abs(n - depth), i),
                        candidate))
    return min(options, key=lambda o: o[0])[1] if options else None


def methods(space: Space) -> set[str]:
    return {_where(space, c)[0] for c in space.cells()}


def source_settings(name: str, storage_path: str) -> SearchSettings:
    """The finished search to start from, or one line saying why it cannot be."""
    check_name(name, "--warm-start")
    folder = storage.local_search_dir(storage_path, name)
    if not (folder / SETTINGS_FILE).is_file():
        raise UserError(f"--warm-start {name}: no search of that name under {storage_path}; "
                        "pass a finished search's name (and its --storage-path)")
    source = SearchSettings.read(folder / SETTINGS_FILE)
    if not (folder / "cells.csv").is_file():
        raise UserError(f"--warm-start {name}: that search has not finished (it chose no "
                        f"trial yet); finish it with `python -m tuning.search --resume --name "
                        f"{name}`, or start from another")
    return source


def plan(settings: SearchSettings, space: Space) -> dict[str, list[Seed]]:
    """cell key -> the configurations queued in that new cell (see the module's docstring)."""
    if not settings.warm_start:
        return {}
    import optuna

    source = source_settings(settings.warm_start, settings.storage_path)
    source_space = source.space()
    if methods(source_space) != methods(space):
        raise UserError(f"--warm-start {settings.warm_start}: that search ran "
                        f"{', '.join(sorted(methods(source_space)))} but this one runs "
                        f"{', '.join(sorted(methods(space)))}; start from a search of the "
                        "same methods")
    with open(source.folder / "cells.csv") as f:
        chosen = {r["cell"] for r in csv.DictReader(f) if r.get("chosen_trial")}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out: dict[str, list[Seed]] = {}
    for cell in space.cells():
        match = nearest(source_space, cell, space)
        if match is None or match.key not in chosen:
            continue
        study = optuna.load_study(study_name=study_name(source.name, match),
                                  storage=source.optuna_storage)
        done = sorted((t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE),
                      key=lambda t: (-t.value, t.number))
        taken = [cell_defaults(space, cell).enqueued] if space.kind == "sampled" else []
        seeds: list[Seed] = []
        for t in done:
            if len(seeds) == settings.warm_start_top:
                break
            params = fit(space, cell, t.params)
            if params not in taken:  # the study would not queue it twice
                taken.append(params)
                seeds.append(Seed(params, f"{source.name}/{match.key}#{t.number}"))
        out[cell.key] = seeds
    return out


def fit(space: Space, cell: Cell, params: dict[str, Any]) -> dict[str, Any]:
    """A source trial's values of the parameters the new cell searches, in its ranges."""
    chosen: dict[str, Any] = {**space.fixed, **cell.as_dict()}
    out: dict[str, Any] = {}
    for p in space.params:
        if p.name not in params or not p.active({**chosen, **out}):
            continue
        narrowed = Param(p.name, p.type, *decaying_range(p, {**chosen, **out}), log=p.log,
                         values=p.values)
        out[p.name] = inside_space(params[p.name], narrowed, [])
    return out


def describe(seeds: dict[str, list[Seed]]) -> str:
    return "\n".join(f"warm start: cell {key} starts from {len(s)} configuration(s) of "
                     f"{s[0].origin.split('#')[0]} (trials "
                     f"{', '.join('#' + x.origin.split('#')[1] for x in s)})"
                     for key, s in seeds.items() if s)
