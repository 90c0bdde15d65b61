"""Search spaces as data: YAML files validated on load, sampled define-by-run by Optuna.

A space file has these top-level keys:

    description: one line
    fixed:  {key: value}           RunConfig values every trial gets
    across: {key: [values...]}     the dimensions the search runs across: each combination
                                   is a cell, a study of its own (data set x depth x method)
    exclude: [{key: value or [values]}, ...]
                                   combinations of across-values that are not cells: a
                                   combination matching every key of one entry is left out
    params: {key: spec}            what each cell's sampler searches, in this order
    grid:   {key: [values...]}     or: an exhaustive grid each cell runs (GridSampler)

A spec is {type: float|int, low, high, log: bool} or {type: choice, values: [...]}, with an
optional `when: {param: value or [values]}` that makes it conditional on an earlier choice or
on an across-dimension. Keys are RunConfig fields, plus `eta_span`: the fraction of the epochs
the eta schedule spans. A space with `across` alone runs its fixed settings once per cell.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from data.files import not_a_regular_file, read_bounded
from tuning.run.config import ConfigError, RunConfig
from tuning.search.cells import Cell, cells_of

SPACES_DIR = Path(__file__).parent / "spaces"
TOP_KEYS = ("description", "fixed", "across", "exclude", "params", "grid")
RUN_KEYS = {f.name for f in fields(RunConfig)} - {"extra"}
EXTRA_KEYS = {"eta_span"}
# Two ways to say how long eta decays: fixing one of them (in the file or with --set) removes
# the other from the space, so that a user's value is never overwritten by a searched one.
ALIASES = {"eta_epochs": "eta_span", "eta_span": "eta_epochs"}
# The search's own budget and bookkeeping: set with --epochs, never searched or run across.
NOT_SEARCHABLE = {"epochs", "device", "data_root", "checkpoint_interval_s"}
# What a search compares, and the data and seed it compares on: never searched, only run
# across (a cell per value) or fixed. Searched, trials of different data sets, networks or
# methods would compete for one budget and one choice, or a split, seed or teacher would be
# chosen for its luck on the validation set.
COMPARED = {"method": "the method", "dataset": "the data set", "depth": "the student's depth",
            "teacher_depth": "the teacher", "teacher": "the teacher",
            "block": "the student's network", "dirac": "the student's network",
            "shortcut": "the student's network", "width": "the networks' width",
            "data_path": "the data", "split_seed": "the data's splits",
            "val_fraction": "the data's splits", "download": "the data", "seed": "the seed "
            "every trial and replicate is measured under", "compile": "how a run executes"}
# What a trial's Tune config carries besides its run values: `default` marks the cell's
# default configuration, `warm_start_from` one queued from a finished search.
META_KEYS = ("cell", "study_trial", "default", "warm_start_from")


class SpaceError(ConfigError):
    """A space file that cannot be used; the message names the file, the key and the rule."""


@dataclass(frozen=True)
class Param:
    """One searched hyperparameter."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    values: tuple = ()
    when: dict[str, tuple] = field(default_factory=dict)

    def active(self, chosen: dict[str, Any]) -> bool:
        return all(chosen.get(k) in v for k, v in self.when.items())

    def candidates(self) -> tuple:
        """Every value a choice can take, or the two bounds of a range."""
        return self.values if self.type == "choice" else (self.low, self.high)


@dataclass(frozen=True)
class Space:
    """A validated search space."""

    name: str
    source: str
    text: str
    description: str
    fixed: dict[str, Any]
    params: tuple[Param, ...]
    grid: dict[str, tuple]
    across: dict[str, tuple] = field(default_factory=dict)
    exclude: tuple[dict[str, tuple], ...] = ()

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]

    @property
    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.grid.values()) if self.grid else 0

    @property
    def dims(self) -> tuple[str, ...]:
        return tuple(self.across)

    @property
    def kind(self) -> str:
        """How a cell is searched: `sampled` (params), `grid`, or `fixed` (one run)."""
        return "sampled" if self.params else ("grid" if self.grid else "fixed")

    def cells(self) -> list[Cell]:
        return [c for c in cells_of(self.across) if not _excluded(c.as_dict(), self.exclude)]

    def cell_budget(self, num_samples: int) -> int:
        """Trials per cell: num_samples when sampled, the grid's size, or one fixed run."""
        return {"sampled": num_samples, "grid": self.grid_size, "fixed": 1}[self.kind]

    def values_of(self, key: str) -> tuple:
        """Every value `key` can take in a trial; () for a range or a RunConfig default."""
        if key in self.fixed:
            return (self.fixed[key],)
        if key in self.across:
            return self.across[key]
        if key in self.grid:
            return self.grid[key]
        for p in self.params:
            if p.name == key:
                return p.values if p.type == "choice" else ()
        return ()

    def with_fixed(self, overrides: dict[str, Any]) -> Space:
        """This space with `overrides` fixed (--set): they leave the search and the cells.

        The method, and any setting a parameter's `when` names, say which parameters are
        searched: --set may pick one of the space's values of it, not a value the space was
        not written for (its parameters would be searched for a method that ignores them)."""
        for key in {"method"} | {k for p in self.params for k in p.when}:
            known = self.values_of(key)
            if key in overrides and known and overrides[key] not in known:
                raise SpaceError(
                    f"--set {key}={overrides[key]}: space {self.name} searches its parameters "
                    f"for {key} {', '.join(map(str, known))} only; set one of those, or pass "
                    f"a space written for {key} {overrides[key]} (the bundled spaces: "
                    f"{', '.join(available_spaces())})")
        drop = set(overrides) | {ALIASES[k] for k in overrides if k in ALIASES}
        fixed = {k: v for k, v in self.fixed.items() if k not in drop}
        fixed.update({k: v for k, v in overrides.items() if k in RUN_KEYS | EXTRA_KEYS})
        exclude = _fix_exclude(self.exclude, {k: v for k, v in overrides.items()
                                              if k in self.across})
        space = Space(self.name, self.source, self.text, self.description, fixed,
                      tuple(p for p in self.params if p.name not in drop),
                      {k: v for k, v in self.grid.items() if k not in drop},
                      {k: v for k, v in self.across.items() if k not in drop}, exclude)
        if self.across and not space.cells():
            fixed_dims = ", ".join(f"{k}={v}" for k, v in overrides.items() if k in self.across)
            raise SpaceError(f"{self.source}: exclude: with --set {fixed_dims} every cell is "
                             "excluded; set values that the space runs")
        return space


def available_spaces() -> list[str]:
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def resolve_space_path(name_or_path: str) -> Path:
    """A bundled space's name, or a path to a user's YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or os.path.lexists(path) or "/" in name_or_path:
        problem = not_a_regular_file(path)
        if problem:
            raise SpaceError(f"space file {path} {problem}; pass a bundled space "
                             f"({', '.join(available_spaces())}) or a YAML file's path")
        return path
    bundled = SPACES_DIR / f"{name_or_path}.yaml"
    if not bundled.is_file():
        raise SpaceError(f"unknown space {name_or_path!r}; bundled spaces are "
                         f"{', '.join(available_spaces())}, or pass path/to/space.yaml")
    return bundled


MAX_SPACE_BYTES = 64 << 10  # a space is a page of YAML; anything larger is not one


def load_space(name_or_path: str) -> Space:
    path = resolve_space_path(name_or_path)
    data = read_bounded(path, MAX_SPACE_BYTES)
    if isinstance(data, str):
        raise SpaceError(f"{path}: (file): {data}; a space file is a page of YAML")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SpaceError(f"{path}: (file): not a text (UTF-8) file; pass a YAML space file") \
            from None
    return parse_space(text, source=str(path), name=path.stem)


def parse_space(text: str, *, source: str, name: str, started: bool = False) -> Space:
    """Parse and validate a space's YAML; every error names the file and the key. A space
    read back from a search that `started` under earlier rules keeps what it searched (the
    rule that nothing compared is searched holds for new searches)."""
    def fail(key: str, message: str) -> SpaceError:
        return SpaceError(f"{source}: {key}: {message}")

    try:
        # Anchors and aliases are refused: a space needs none, and nested aliases are how a
        # few lines of YAML expand into billions of nodes.
        if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text)):
            raise fail("(file)", "anchors and aliases (&name, *name) are not allowed in a space "
                                 "file; write the values out")
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "syntax"
        raise fail(where, "not valid YAML; fix the file's syntax") from None
    if not isinstance(doc, dict):
        raise fail("(top level)", f"must be a mapping with keys {', '.join(TOP_KEYS)}")
    for key in doc:
        if key not in TOP_KEYS:
            raise fail(str(key), f"unknown top-level key; allowed: {', '.join(TOP_KEYS)}")
    fixed = doc.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise fail("fixed", "must be a mapping of RunConfig keys to values")
    for key, value in fixed.items():
        _check_key(fail, f"fixed.{key}", key)
        _check_value(fail, f"fixed.{key}", key, value, fixed)
    if "eta_span" in fixed and "eta_epochs" in fixed:
        raise fail("fixed.eta_span", "eta_span and eta_epochs say the same thing; keep one")
    across = _parse_lists(fail, doc, "across", fixed)
    exclude = _parse_exclude(fail, doc, across)
    params = doc.get("params") or {}
    if not isinstance(params, dict):
        raise fail("params", "must be a mapping of keys to specs")
    params = tuple(_parse_param(fail, key, spec, fixed) for key, spec in params.items())
    grid = _parse_lists(fail, doc, "grid", fixed)
    if grid and params:
        raise fail("grid", "a space has either params (sampled) or grid (exhaustive), not both")
    if not grid and not params and not across:
        raise fail("params", "the space searches nothing; add params, grid or across")
    searched = [p.name for p in params] + list(grid)
    for key in across:
        if key in searched:
            raise fail(f"across.{key}", "is both run across and searched; a cell's dimension "
                                        "is never a hyperparameter, so keep one")
    for n in searched:
        if n in COMPARED and not started:
            section = "grid" if n in grid else "params"
            raise fail(f"{section}.{n}", f"{n} defines what the search compares "
                                         f"({COMPARED[n]}), so it is never searched; run "
                                         f"across it (across: {{{n}: [...]}}, a cell per value) "
                                         f"or fix it (fixed:, or --set {n}=...)")
    names = searched + list(across)
    for dup in sorted({n for n in names if names.count(n) > 1 or n in fixed}):
        raise fail(dup, "is both fixed and searched, or searched twice; keep one")
    for n in names:
        if n in NOT_SEARCHABLE:
            raise fail(n, f"{n} is a setting of the whole search, not searched; set it with "
                          f"--{n.replace('_', '-')} or --set {n}=...")
        if ALIASES.get(n) in names or ALIASES.get(n) in fixed:
            raise fail(n, f"{n} and {ALIASES[n]} say the same thing; keep one")
    for i, p in enumerate(params):
        for key, allowed in p.when.items():
            earlier = {q.name: q.values for q in params[:i] if q.type == "choice"}
            options = {**across, **earlier}
            if key not in options:
                raise fail(f"params.{p.name}.when.{key}",
                           "must name an across-dimension or a choice parameter listed before")
            bad = [v for v in allowed if v not in options[key]]
            if bad:
                raise fail(f"params.{p.name}.when.{key}",
                           f"{bad[0]!r} is not one of {list(options[key])}")
    _check_eta_order(fail, fixed, params, {**grid, **across})
    return Space(name, source, text, str(doc.get("description", "")), dict(fixed), params,
                 grid, across, exclude)


def _parse_lists(fail, doc: dict, section: str, fixed: dict) -> dict[str, tuple]:
    """`across` or `grid`: each key a RunConfig field with a non-empty list of distinct values."""
    raw = doc.get(section) or {}
    if not isinstance(raw, dict):
        raise fail(section, "must be a mapping of RunConfig keys to lists of values")
    out = {}
    for key, values in raw.items():
        _check_key(fail, f"{section}.{key}", key)
        if section == "across" and key not in RUN_KEYS:
            raise fail(f"{section}.{key}", "must be a run-config field")
        if not isinstance(values, list) or not values:
            raise fail(f"{section}.{key}", "must be a non-empty list of values")
        for v in values:
            _check_value(fail, f"{section}.{key}", key, v, fixed)
        if len({repr(v) for v in values}) != len(values):
            raise fail(f"{section}.{key}", "lists a value twice; list each once")
        out[key] = tuple(values)
    return out


def _parse_exclude(fail, doc: dict, across: dict[str, tuple]) -> tuple[dict[str, tuple], ...]:
    """`exclude`: a list of {across-key: value or [values]}; at least one cell must remain."""
    raw = doc.get("exclude")
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(e, dict) and e for e in raw):
        raise fail("exclude", "must be a list of non-empty mappings {across-key: value or "
                              "[values]}")
    out = []
    for i, entry in enumerate(raw):
        rule: dict[str, tuple] = {}
        for key, value in entry.items():
            where = f"exclude[{i}].{key}"
            if key not in across:
                raise fail(where, f"must name an across-dimension ({', '.join(across) or 'none'})")
            values = tuple(value) if isinstance(value, list) else (value,)
            bad = [v for v in values if v not in across[key]]
            if bad or not values:
                raise fail(where, f"{bad[0] if bad else value!r} is not one of "
                                  f"{list(across[key])}")
            rule[key] = values
        out.append(rule)
    if across and not [c for c in cells_of(across) if not _excluded(c.as_dict(), out)]:
        raise fail("exclude", "excludes every cell; leave at least one combination")
    return tuple(out)


def _excluded(cell: dict[str, Any], exclude: tuple[dict[str, tuple], ...] | list) -> bool:
    return any(all(cell.get(k) in v for k, v in rule.items()) for rule in exclude)


def _fix_exclude(exclude: tuple[dict[str, tuple], ...], fixed: dict[str, Any]
                 ) -> tuple[dict[str, tuple], ...]:
    """The exclude rules once some across-dimensions are fixed (--set): a rule that the fixed
    value cannot match is dropped; a key the fixed value matches leaves the rule. A rule left
    with no key excludes every cell (the caller refuses that)."""
    out = []
    for rule in exclude:
        if any(k in fixed and fixed[k] not in v for k, v in rule.items()):
            continue
        out.append({k: v for k, v in rule.items() if k not in fixed})
    return tuple(out)


def _check_key(fail, where: str, key: str) -> None:
    if key not in RUN_KEYS | EXTRA_KEYS:
        raise fail(where, f"unknown key; allowed: {', '.join(sorted(RUN_KEYS | EXTRA_KEYS))}")


def _check_value(fail, where: str, key: str, value: Any, fixed: dict) -> None:
    """A value is allowed where RunConfig accepts it (alpha in [0, 1], lam >= 0, ...)."""
    if key == "eta_span":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise fail(where, f"must be a fraction in [0, 1]; got {value!r}")
        return
    base = {k: v for k, v in fixed.items() if k in RUN_KEYS}
    try:
        RunConfig(**{**base, key: value, **({"data_path": "x"} if value == "npz" else {})})
    except ConfigError as err:
        raise fail(where, str(err)) from None


def _parse_param(fail, key: str, spec: Any, fixed: dict) -> Param:
    where = f"params.{key}"
    _check_key(fail, where, key)
    if not isinstance(spec, dict) or "type" not in spec:
        raise fail(where, "must be a mapping with type: float, int or choice")
    kind = spec["type"]
    allowed = {"float": {"type", "low", "high", "log", "when"},
               "int": {"type", "low", "high", "log", "when"},
               "choice": {"type", "values", "when"}}
    if kind not in allowed:
        raise fail(f"{where}.type", f"must be float, int or choice; got {kind!r}")
    for extra in set(spec) - allowed[kind]:
        raise fail(f"{where}.{extra}", f"unknown key for a {kind}; allowed: "
                                       f"{', '.join(sorted(allowed[kind]))}")
    raw_when = spec.get("when") or {}
    if not isinstance(raw_when, dict):
        raise fail(f"{where}.when", "must be a mapping {param: value or [values]}")
    when = {k: tuple(v) if isinstance(v, list) else (v,) for k, v in raw_when.items()}
    if kind == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise fail(f"{where}.values", "must be a non-empty list")
        for v in values:
            _check_value(fail, f"{where}.values", key, v, fixed)
        if len({repr(v) for v in values}) != len(values):
            raise fail(f"{where}.values", "lists a value twice; list each once")
        return Param(key, kind, values=tuple(values), when=when)
    low, high, log = spec.get("low"), spec.get("high"), spec.get("log", False)
    if not isinstance(log, bool):
        raise fail(f"{where}.log", f"must be true or false; got {log!r}")
    number = int if kind == "int" else (int, float)
    for bound, value in (("low", low), ("high", high)):
        if not isinstance(value, number) or isinstance(value, bool):
            what = "an integer" if kind == "int" else "a number"
            raise fail(f"{where}.{bound}", f"must be {what}; got {value!r}")
        _check_value(fail, f"{where}.{bound}", key, value, fixed)
    if low > high:
        raise fail(where, f"low ({low}) is above high ({high}); swap them")
    if log and low <= 0:
        raise fail(f"{where}.low", f"a log range needs low > 0; got {low}")
    return Param(key, kind, low=low, high=high, log=log, when=when)


def _check_eta_order(fail, fixed: dict, params: tuple[Param, ...], lists: dict) -> None:
    """A decaying schedule: eta_end can never be beyond eta_start."""
    def bounds(key: str) -> tuple[float, float]:
        if key in fixed:
            return fixed[key], fixed[key]
        if key in lists:
            return min(lists[key]), max(lists[key])
        for p in params:
            if p.name == key:
                vals = p.candidates()
                return min(vals), max(vals)
        default = getattr(RunConfig, key)
        return default, default

    start, end = bounds("eta_start"), bounds("eta_end")
    if end[0] > start[1]:
        raise fail("eta_end", f"the schedule's end ({end[0]}) is beyond its start "
                              f"(at most {start[1]}); eta decays, so keep eta_end <= eta_start")


class SpaceSampler:
    """Samples one trial of a cell, define-by-run: a plain class, so it pickles."""

    def __init__(self, space: Space) -> None:
        self.space = space

    def sample(self, trial, cell: Cell) -> dict[str, Any]:
        """The searched values of one trial of `cell`, suggested through the Optuna trial."""
        chosen: dict[str, Any] = {**self.space.fixed, **cell.as_dict()}
        out: dict[str, Any] = {}
        for key, values in self.space.grid.items():
            out[key] = trial.suggest_categorical(key, list(values))
        for p in self.space.params:
            if not p.active({**chosen, **out}):
                continue
            if p.type == "choice":
                out[p.name] = trial.suggest_categorical(p.name, list(p.values))
                continue
            low, high = decaying_range(p, {**chosen, **out})
            suggest = trial.suggest_int if p.type == "int" else trial.suggest_float
            out[p.name] = suggest(p.name, low, high, log=p.log)
        return out

    def grid_space(self) -> dict[str, list]:
        return {k: list(v) for k, v in self.space.grid.items()}


def decaying_range(p: Param, chosen: dict[str, Any]) -> tuple[float, float]:
    """A range narrowed so that eta decays whichever of start and end is fixed or chosen."""
    low, high = p.low, p.high
    if p.name == "eta_end" and "eta_start" in chosen:
        high = min(high, chosen["eta_start"])
        low = min(low, high)
    if p.name == "eta_start" and "eta_end" in chosen:
        low = max(low, chosen["eta_end"])
        high = max(high, low)
    return low, high


# The paper's eta schedule spans 60 of its 200 epochs; a space searches that span as a
# fraction of training, so its default is the same fraction at any budget.
DEFAULT_ETA_SPAN = RunConfig.eta_epochs / RunConfig.epochs


@dataclass(frozen=True)
class Defaults:
    """A cell's default configuration in the space's own terms.

    `values`: what `tuning.train` runs without flags for every parameter the cell searches
    (the method's defaults: the paper's recipe), with eta's span as the paper's fraction.
    `enqueued`: the same, moved into the space where its ranges or choices exclude a value;
    `clipped` says which, as "name: default -> enqueued".
    """

    values: dict[str, Any]
    enqueued: dict[str, Any]
    clipped: tuple[str, ...] = ()


def default_value(name: str, values: dict[str, Any]) -> Any:
    """The value a run takes for `name` when nothing sets it, given the values that are set
    (its cell and the space's fixed values); None where none applies."""
    from tuning.run.config import METHOD_DEFAULTS

    method = values.get("method", RunConfig.method)
    if name == "eta_span":
        return DEFAULT_ETA_SPAN
    if name == "teacher_depth":  # a teacher as deep as its student
        return values.get("teacher_depth") or values.get("depth", RunConfig.depth)
    if name in ("alpha", "temperature") and values.get(name) is None:
        return METHOD_DEFAULTS.get(method, {}).get(name)
    if name == "beta" and values.get("beta") is None:
        from losses import DEFAULT_BETA

        return DEFAULT_BETA[values.get("feature_loss", RunConfig.feature_loss)]
    if name == "block":
        return values.get("block") or ("dirac" if values.get("dirac") else "plain")
    if name == "dirac" and values.get("dirac") is None:
        return values.get("block") == "dirac"
    return values.get(name, getattr(RunConfig, name))


def cell_defaults(space: Space, cell: Cell) -> Defaults:
    """The default configuration of `cell`: each of its active parameters at its default."""
    base = trial_values(space, cell.as_dict())
    values: dict[str, Any] = {}
    enqueued: dict[str, Any] = {}
    clipped: list[str] = []
    chosen: dict[str, Any] = {**space.fixed, **cell.as_dict()}
    for key, options in space.grid.items():
        values[key] = default_value(key, base)
        enqueued[key] = inside_space(values[key], Param(key, "choice", values=options), clipped)
    for p in space.params:
        if not p.active({**chosen, **enqueued}):
            continue
        value = default_value(p.name, {**base, **enqueued})
        if value is None:
            continue  # nothing to default to: the sampler proposes it
        values[p.name] = value
        narrowed = Param(p.name, p.type, *decaying_range(p, {**chosen, **enqueued}), log=p.log,
                         values=p.values)
        enqueued[p.name] = inside_space(value, narrowed, clipped)
    return Defaults(values, enqueued, tuple(clipped))


def inside_space(value: Any, p: Param, clipped: list[str]) -> Any:
    """`value` if the parameter's space holds it, else the nearest value it holds."""
    if p.type == "choice":
        if value in p.values:
            return value
        numeric = [v for v in p.values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        inside = (min(numeric, key=lambda v: abs(v - value)) if numeric and isinstance(
            value, (int, float)) and not isinstance(value, bool) else p.values[0])
    else:
        inside = min(max(value, p.low), p.high)
        if p.type == "int":
            inside = int(round(inside))
        if inside == value:
            return value
    clipped.append(f"{p.name}: {value!r} -> {inside!r}")
    return inside


def grid_points(space: Space) -> list[dict[str, Any]]:
    """Every point of the space's grid, in order (one empty point for no grid)."""
    points: list[dict[str, Any]] = [{}]
    for key, values in space.grid.items():
        points = [{**p, key: v} for p in points for v in values]
    return points if space.grid else []


def trial_values(space: Space, sample: dict[str, Any]) -> dict[str, Any]:
    """RunConfig values of one trial: the space's fixed values (with --set), then the sample."""
    values = {**space.fixed, **{k: v for k, v in sample.items() if k not in META_KEYS}}
    span = values.pop("eta_span", None)
    if span is not None and "eta_epochs" not in values:
        values["eta_epochs"] = int(round(span * values.get("epochs", RunConfig.epochs)))
    return values
