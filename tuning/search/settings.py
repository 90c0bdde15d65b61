"""A search's settings: one typed, validated record, saved as `search.yaml` beside the search.

`SearchSettings` is to a search what `RunConfig` is to one run: the command line resolves it
once, every phase reads it, and `--resume`, `tuning.replicate`, `tuning.report --repair` and
`tuning.rungs` read it back from `search.yaml`. A file written before a setting existed
reads as that setting's default, so old searches still resume.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from data.files import read_bounded
from tuning.run.config import ConfigError, RunConfig, UserError
from tuning.search import storage
from tuning.search.space import Space, parse_space

SETTINGS_FILE = "search.yaml"
REPLICATES_EXPERIMENT = "replicates"
# A new search's settings where the command line gives none.
DEFAULTS = {"num_samples": 20, "scheduler": "asha", "objective": "acc", "cpus_per_trial": 1.0,
            "replicates": 3, "baseline": "default", "choose": "best",
            "storage_path": "ray_results", "data_root": "datasets", "teacher_store": "teachers"}
MAX_SETTINGS_BYTES = 1 << 20  # far above any search.yaml this project writes
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
SCHEDULERS = ("asha", "fifo")
OBJECTIVES = ("acc", "acc-time")
BASELINES = ("default", "none")
SAMPLERS = ("tpe", "random", "multi-objective tpe", "grid", "none")


def check_name(name: str, flag: str = "--name") -> None:
    """A search's name becomes a folder, an experiment and a study prefix: letters, digits,
    dots, dashes and underscores, no separator, not `.` or `..`. Every command that takes a
    search's name checks it here."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or name in (".", ".."):
        raise UserError(f"{flag} {name!r} is not a valid search name; use letters, digits, '.', "
                        "'-' and '_' (up to 100, starting with a letter or digit), no '/'")


@dataclass
class SearchSettings:
    """Everything a search runs with (see `python -m tuning.search --help` for each)."""

    name: str
    space_name: str
    space_source: str
    space_text: str
    space_digest: str
    overrides: dict[str, Any]  # the --set values (and --epochs, --seed, --data-root) fixed
    cells: list[str]
    tracking_uri: str
    optuna_storage: str
    storage_path: str
    teacher_store: str
    epochs: int
    teacher_epochs: int
    num_samples: int  # trials per cell (a cap, under an epoch budget)
    trials_per_cell: int
    seed: int  # every trial's seed; replicates take seed + 1 .. seed + n
    scheduler: str = "asha"
    objective: str = "acc"
    sampler: str = "tpe"
    gpus_per_trial: float = 0.0
    cpus_per_trial: float = 1.0
    max_concurrent: int = 0  # 0: as many as resources allow
    replicates: int = 3
    baseline: str = "default"
    choose: str = "best"
    budget_epochs: int | None = None
    sampler_seed: int | None = None  # None: the samplers take `seed`
    first_rung: float | None = None  # None: the measured default rule
    warm_start: str | None = None  # a finished search whose best configurations start it
    warm_start_top: int = 3  # how many of each matching cell's
    proxy_width: int | None = None  # search at this width; replicate at the space's own
    smoke: bool = False  # started with --smoke
    parent_run_id: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """ConfigError naming the first bad setting and what is allowed."""
        for f in fields(self):
            _typed(f.name, getattr(self, f.name), _types()[f.name])
        check_name(self.name)
        for name, value, allowed in (("scheduler", self.scheduler, SCHEDULERS),
                                     ("objective", self.objective, OBJECTIVES),
                                     ("baseline", self.baseline, BASELINES),
                                     ("sampler", self.sampler, SAMPLERS)):
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        for name, low in (("epochs", 1), ("teacher_epochs", 1), ("num_samples", 1),
                          ("trials_per_cell", 1), ("seed", 0), ("replicates", 0),
                          ("max_concurrent", 0)):
            if getattr(self, name) < low:
                raise ConfigError(f"{name} must be at least {low}; got {getattr(self, name)}")
        if not (math.isfinite(self.cpus_per_trial) and self.cpus_per_trial > 0):
            raise ConfigError(f"cpus_per_trial must be more than 0; got {self.cpus_per_trial}")
        if not (math.isfinite(self.gpus_per_trial) and self.gpus_per_trial >= 0):
            raise ConfigError(f"gpus_per_trial must be 0 or more; got {self.gpus_per_trial}")
        if self.warm_start is not None:
            check_name(self.warm_start, "--warm-start")
            if self.warm_start == self.name:
                raise ConfigError("--warm-start names the search itself; name a finished one")
        if self.warm_start_top < 1:
            raise ConfigError(f"warm_start_top must be at least 1; got {self.warm_start_top}")
        if self.proxy_width is not None and self.proxy_width < 1:
            raise ConfigError(f"proxy_width must be at least 1; got {self.proxy_width}")
        if self.sampler_seed is not None and self.sampler_seed < 0:
            raise ConfigError(f"sampler_seed must be 0 or more; got {self.sampler_seed}")
        if self.first_rung is not None and not (math.isfinite(self.first_rung) and
                                                0 < self.first_rung <= 1):
            raise ConfigError("first_rung must be a fraction of training in (0, 1]; got "
                              f"{self.first_rung}")
        if self.budget_epochs is not None and self.budget_epochs < self.epochs:
            raise ConfigError(f"budget_epochs ({self.budget_epochs}) is less than one trial "
                              f"({self.epochs} epochs)")
        from tuning.search.results import parse_choose

        try:
            rule, _ = parse_choose(self.choose)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if rule != "best" and self.objective != "acc-time":
            raise ConfigError(f"choose {self.choose} picks from a Pareto front of accuracy "
                              "against time, which only --objective acc-time searches")

    # What the search derives from its settings.

    @property
    def sampler_rng_seed(self) -> int:
        """The samplers' seed: --sampler-seed, else the trials' seed."""
        return self.seed if self.sampler_seed is None else self.sampler_seed

    def space(self) -> Space:
        """The space the search's trials run in: its --set values fixed, and the proxy width
        where there is one."""
        proxy = {"width": self.proxy_width} if self.proxy_width else {}
        return self.target_space().with_fixed(proxy) if proxy else self.target_space()

    def target_space(self) -> Space:
        """The space its answer is for: the one its replicates train in."""
        return parse_space(self.space_text, source=self.space_source, name=self.space_name,
                           started=True).with_fixed(self.overrides)

    @property
    def target_width(self) -> int:
        return int(self.overrides.get("width", RunConfig.width))

    @property
    def folder(self) -> Path:
        """Where the driver keeps the search's own files (see storage.local_search_dir)."""
        return storage.local_search_dir(self.storage_path, self.name)

    @property
    def experiment_path(self) -> str:
        """The search's Tune experiment, a path or URI under the storage path."""
        return f"{self.storage_path.rstrip('/')}/{self.name}"

    @property
    def replicates_path(self) -> str:
        """The Tune experiment of its replicates, inside the search's."""
        return f"{self.experiment_path}/{REPLICATES_EXPERIMENT}"

    # search.yaml

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, values: Any, *, source: str = SETTINGS_FILE) -> SearchSettings:
        """Validated settings; a key written before a setting existed takes its default, and
        one this project never wrote is refused."""
        if not isinstance(values, dict):
            raise ConfigError(f"{source} is empty, truncated or not a search's settings (it is "
                              f"not a mapping)")
        known = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is dataclasses.MISSING}
        missing = sorted(required - set(values))
        if missing:
            raise ConfigError(f"{source} is empty, truncated or not a search's settings (it "
                              f"lacks {missing[0]})")
        unknown = sorted(str(k) for k in values if k not in known)
        if unknown:
            raise ConfigError(f"{source} is not a search's settings this project wrote (unknown "
                              f"key {unknown[0]!r})")
        try:
            return cls(**values)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def read(cls, path: Path) -> SearchSettings:
        """A search's search.yaml, or one line saying what is wrong with it and how to go on."""
        import yaml

        fix = "restore it from a backup, or start the search again under a new --name"
        data = read_bounded(path, MAX_SETTINGS_BYTES)
        if isinstance(data, str):
            raise UserError(f"{path} {data}; {fix}")
        try:
            values = yaml.safe_load(data.decode("utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            kind = "not valid YAML" if isinstance(err, yaml.YAMLError) else "not UTF-8 text"
            raise UserError(f"{path} is {kind}; {fix}") from None
        try:
            return cls.from_dict(values, source=str(path))
        except ConfigError as err:
            raise UserError(f"{err}; {fix}") from None

    def write(self, folder: Path | None = None) -> None:
        """search.yaml in the search's folder, and beside Tune's state when that is a URI."""
        from tuning.run.checkpoint import atomic_write_text

        self.validate()
        text = self.to_yaml()
        atomic_write_text(Path(folder or self.folder) / SETTINGS_FILE, text)
        if storage.is_uri(self.storage_path):
            storage.write_bytes(storage.join(self.storage_path, self.name, SETTINGS_FILE),
                                text.encode())


@functools.cache
def _types() -> dict[str, tuple[tuple[type, ...], bool]]:
    """Each setting's allowed Python types, and whether it may be None."""
    out = {}
    for name, hint in typing.get_type_hints(SearchSettings).items():
        origin = typing.get_origin(hint)
        args = typing.get_args(hint) if origin not in (dict, list) else ()
        optional = type(None) in args
        kinds = [typing.get_origin(a) or a for a in args if a is not type(None)] or \
            [origin or hint]
        out[name] = (tuple(kinds), optional)
    return out


def _typed(name: str, value: Any, spec: tuple[tuple[type, ...], bool]) -> None:
    kinds, optional = spec
    if value is None and optional:
        return
    kind = kinds[0]
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        word = {str: "text", int: "an integer", float: "a number", dict: "a mapping",
                list: "a list"}.get(kind, kind.__name__)
        raise ConfigError(f"{name} must be {word}{' or null' if optional else ''}; got "
                          f"{value!r}")
