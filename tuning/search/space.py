"""Search spaces as data: YAML files validated on load, sampled define-by-run by Optuna.

A space file has these top-level keys (all optional but `params` or `grid`):

    description: one line
    fixed:  {key: value}           RunConfig values every trial gets
    params: {key: spec}            what the sampler searches, in this order
    grid:   {key: [values...]}     an exhaustive grid (Optuna's GridSampler) instead

A spec is {type: float|int, low, high, log: bool} or {type: choice, values: [...]}, with an
optional `when: {param: value or [values]}` that makes it conditional on an earlier choice.
Keys are RunConfig fields, plus `eta_span`: the fraction of the epochs the eta schedule spans.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from tuning.config import ConfigError, RunConfig

SPACES_DIR = Path(__file__).parent / "spaces"
TOP_KEYS = ("description", "fixed", "params", "grid")
RUN_KEYS = {f.name for f in fields(RunConfig)} - {"extra"}
EXTRA_KEYS = {"eta_span"}


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

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]

    @property
    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.grid.values()) if self.grid else 0

    def values_of(self, key: str, overrides: dict[str, Any]) -> tuple:
        """Every value `key` can take in a trial (for teacher planning)."""
        if key in overrides:
            return (overrides[key],)
        if key in self.grid:
            return self.grid[key]
        for p in self.params:
            if p.name == key:
                return p.values if p.type == "choice" else ()
        return (self.fixed[key],) if key in self.fixed else ()

    def without(self, keys: set[str]) -> Space:
        """This space with `keys` no longer searched (they are fixed from outside)."""
        return Space(self.name, self.source, self.text, self.description,
                     {k: v for k, v in self.fixed.items() if k not in keys},
                     tuple(p for p in self.params if p.name not in keys),
                     {k: v for k, v in self.grid.items() if k not in keys})


def available_spaces() -> list[str]:
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def resolve_space_path(name_or_path: str) -> Path:
    """A bundled space's name, or a path to a user's YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise SpaceError(f"space file {path} does not exist; pass a bundled space "
                             f"({', '.join(available_spaces())}) or a YAML file's path")
        return path
    bundled = SPACES_DIR / f"{name_or_path}.yaml"
    if not bundled.is_file():
        raise SpaceError(f"unknown space {name_or_path!r}; bundled spaces are "
                         f"{', '.join(available_spaces())}, or pass path/to/space.yaml")
    return bundled


def load_space(name_or_path: str) -> Space:
    path = resolve_space_path(name_or_path)
    return parse_space(path.read_text(), source=str(path), name=path.stem)


def parse_space(text: str, *, source: str, name: str) -> Space:
    """Parse and validate a space's YAML; every error names the file and the key."""
    def fail(key: str, message: str) -> SpaceError:
        return SpaceError(f"{source}: {key}: {message}")

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "syntax"
        return_err = fail(where, "not valid YAML; fix the file's syntax")
        raise return_err from None
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
    params = tuple(_parse_param(fail, key, spec, fixed)
                   for key, spec in (doc.get("params") or {}).items())
    grid = {}
    for key, values in (doc.get("grid") or {}).items():
        _check_key(fail, f"grid.{key}", key)
        if not isinstance(values, list) or not values:
            raise fail(f"grid.{key}", "must be a non-empty list of values")
        for v in values:
            _check_value(fail, f"grid.{key}", key, v, fixed)
        grid[key] = tuple(values)
    if grid and params:
        raise fail("grid", "a space has either params (sampled) or grid (exhaustive), not both")
    if not grid and not params:
        raise fail("params", "the space searches nothing; add params or grid")
    names = [p.name for p in params] + list(grid)
    for dup in {n for n in names if names.count(n) > 1 or n in fixed}:
        raise fail(dup, "is both fixed and searched, or searched twice; keep one")
    for i, p in enumerate(params):
        for key, allowed in p.when.items():
            earlier = {q.name: q for q in params[:i]}
            if key not in earlier or earlier[key].type != "choice":
                raise fail(f"params.{p.name}.when.{key}",
                           "must name a choice parameter listed before this one")
            bad = [v for v in allowed if v not in earlier[key].values]
            if bad:
                raise fail(f"params.{p.name}.when.{key}",
                           f"{bad[0]!r} is not one of {list(earlier[key].values)}")
    _check_eta_order(fail, fixed, params, grid)
    return Space(name, source, text, str(doc.get("description", "")), dict(fixed), params, grid)


def _check_key(fail, where: str, key: str) -> None:
    if key not in RUN_KEYS | EXTRA_KEYS:
        raise fail(where, f"unknown key; allowed: {', '.join(sorted(RUN_KEYS | EXTRA_KEYS))}")


def _check_value(fail, where: str, key: str, value: Any, fixed: dict) -> None:
    """A value is allowed where RunConfig accepts it (alpha in [0, 1], lam >= 0, ...)."""
    if key == "eta_span":
        if not isinstance(value, (int, float)) or not 0 <= value <= 1:
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
    when = {}
    for k, v in (spec.get("when") or {}).items():
        when[k] = tuple(v) if isinstance(v, list) else (v,)
    if kind == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise fail(f"{where}.values", "must be a non-empty list")
        for v in values:
            _check_value(fail, f"{where}.values", key, v, fixed)
        return Param(key, kind, values=tuple(values), when=when)
    low, high, log = spec.get("low"), spec.get("high"), bool(spec.get("log", False))
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


def _check_eta_order(fail, fixed: dict, params: tuple[Param, ...], grid: dict) -> None:
    """A decaying schedule: eta_end can never be beyond eta_start."""
    def bounds(key: str) -> tuple[float, float] | None:
        if key in fixed:
            return fixed[key], fixed[key]
        if key in grid:
            return min(grid[key]), max(grid[key])
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
    """The define-by-run function for OptunaSearch: a plain class, so it pickles."""

    def __init__(self, space: Space) -> None:
        self.space = space

    def __call__(self, trial) -> None:
        chosen: dict[str, Any] = dict(self.space.fixed)
        if self.space.grid:
            for key, values in self.space.grid.items():
                chosen[key] = trial.suggest_categorical(key, list(values))
            return None
        for p in self.space.params:
            if not p.active(chosen):
                continue
            if p.type == "choice":
                chosen[p.name] = trial.suggest_categorical(p.name, list(p.values))
                continue
            low, high = p.low, p.high
            if p.name == "eta_end" and "eta_start" in chosen:
                high = min(high, chosen["eta_start"])  # the schedule decays
                low = min(low, high)
            suggest = trial.suggest_int if p.type == "int" else trial.suggest_float
            chosen[p.name] = suggest(p.name, low, high, log=p.log)
        return None

    def grid_space(self) -> dict[str, list]:
        return {k: list(v) for k, v in self.space.grid.items()}


def trial_values(space: Space, sample: dict[str, Any], overrides: dict[str, Any]) -> dict:
    """RunConfig values of one trial: fixed, then the sample, then the user's overrides."""
    values = {**space.fixed, **sample, **overrides}
    span = values.pop("eta_span", None)
    if span is not None:
        values["eta_epochs"] = int(round(span * values.get("epochs", RunConfig.epochs)))
    return values


def grid_points(space: Space) -> list[dict[str, Any]]:
    keys = list(space.grid)
    return [dict(zip(keys, combo, strict=True))
            for combo in itertools.product(*(space.grid[k] for k in keys))]
