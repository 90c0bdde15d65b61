"""One run's settings: a flat dataclass that maps 1:1 onto YAML and onto a search sample."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from data import DATASETS
from data.files import read_bounded
from losses import ETA_KINDS, FEATURE_LOSSES, EtaSchedule
from models import BLOCK_TYPES, BLOCKS, SHORTCUTS

METHODS = ("ce", "kd", "alignkd", "jointrd", "jointrd_released")
# alpha and temperature are shared by the methods that take them; left None (the default),
# each takes its method's value from this table.
METHOD_DEFAULTS: dict[str, dict[str, float]] = {
    # Hinton KD as CIFAR distillation benchmarks run it: tau = 4 and 0.9 on the KL term (the
    # CRD benchmark, Tian et al. 2020; also the released JointRD code's KD defaults).
    "kd": {"alpha": 0.9, "temperature": 4.0},
    # The paper's alpha; the paper writes no temperature, so tau = 1 (METHOD.md).
    "alignkd": {"alpha": 0.5, "temperature": 1.0},
}
PATH_DATASETS = ("npz", "imagewoof")
MAX_CONFIG_BYTES = 1 << 20  # a run config is a page of YAML  # the data sets that read data_path
# A number as text: YAML reads 1e-3 (no dot) as a string, so a float field converts it.
FLOAT_TEXT = re.compile(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*")


class UserError(Exception):
    """A problem in what the user asked for; its message names the problem and the fix."""


class ConfigError(UserError):
    """A bad config value or file."""


@dataclass
class RunConfig:
    """Everything one training run needs. Defaults are the paper's recipe (section 5)."""

    method: str = "alignkd"
    dataset: str = "digits"
    data_root: str = "./datasets"
    data_path: str | None = None  # the .npz file, or an Imagewoof folder
    download: bool = True  # fetch a missing CIFAR or Imagewoof into data_root (--no-download)
    val_fraction: float = 0.1
    split_seed: int = 0  # fixed across trials so that every trial sees the same val split
    depth: int = 18
    teacher_depth: int | None = None  # None: the teacher checkpoint's depth
    width: int = 64
    shortcut: str = "none"  # the trained network's shortcuts; "all" trains a ResNet teacher
    # The blocks' convs: plain, dirac (a*delta + b*W) or repvgg (3x3 + 1x1 + identity
    # branches, folded into one 3x3 conv at export; needs shortcut none). None: dirac where
    # `dirac` is true, else plain. Validation sets both: block, and dirac = (block == dirac).
    block: str | None = None
    dirac: bool | None = None  # the older spelling of block: dirac; None follows block
    teacher: str | None = None  # path of a trained teacher (model.pt)
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.01
    max_lr_factor: float = 10.0  # OneCycle peaks at lr * max_lr_factor and starts at lr
    pct_start: float = 0.3  # the fraction of the steps after which OneCycle's lr peaks
    # OneCycle as PyTorch runs it cycles momentum against the lr: `momentum` at the start and
    # the end, `base_momentum` at the lr peak. With cycle_momentum false it stays `momentum`.
    cycle_momentum: bool = True
    momentum: float = 0.95
    base_momentum: float = 0.85
    nesterov: bool = True
    weight_decay: float = 5e-4
    alpha: float | None = None  # None: the method's default (METHOD_DEFAULTS)
    temperature: float | None = None  # None: the method's default (METHOD_DEFAULTS)
    lam: float = 0.001
    # jointrd_released's weight on its OFD feature terms: 1e-3 is the released training
    # script's default and OFD's weight for 32x32 images (its code gives 1e-4 for 224x224);
    # the released CIFAR launch script passes 0, which switches the feature terms off.
    dis_weight: float = 1e-3
    eta_kind: str = "cosine"
    eta_start: float = 1.0
    eta_end: float = 0.5
    eta_epochs: int = 60
    feature_loss: str = "mse"
    beta: float | None = None  # feature-loss weight; None: 1 (mse), 1000 (at), 50 (nst)
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    # Seconds of training between checkpoints; 0 writes one every epoch. The last epoch always
    # writes one. A full-width checkpoint costs ~0.2 s, a large share of a 1.3 s GPU epoch.
    checkpoint_interval_s: float = 30.0
    extra: dict[str, Any] = field(default_factory=dict)  # free-form tags, never read by training

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field and what is allowed."""
        for f in fields(self):  # every field's type first, then its allowed values
            _typed(f.name, getattr(self, f.name), _field_types()[f.name])
        _choice("method", self.method, METHODS)
        _choice("dataset", self.dataset, DATASETS)
        _choice("depth", self.depth, tuple(BLOCKS))
        if self.teacher_depth is not None:
            _choice("teacher_depth", self.teacher_depth, tuple(BLOCKS))
        _choice("shortcut", self.shortcut, SHORTCUTS)
        self._resolve_block()
        _choice("eta_kind", self.eta_kind, ETA_KINDS)
        _choice("feature_loss", self.feature_loss, FEATURE_LOSSES)
        _choice("device", self.device.split(":")[0], ("auto", "cpu", "cuda"))
        _number("val_fraction", self.val_fraction, 0.0, 0.9)
        for name in ("width", "epochs", "batch_size"):
            _integer(name, getattr(self, name), 1)
        _integer("eta_epochs", self.eta_epochs, 0)
        for name in ("seed", "split_seed"):  # numpy and torch generators take 0 .. 2**63-1
            _integer(name, getattr(self, name), 0, 2**63 - 1)
        _number("lr", self.lr, 0.0, low_open=True)
        _number("max_lr_factor", self.max_lr_factor, 1.0)
        _number("pct_start", self.pct_start, 0.0, 1.0, low_open=True)
        _number("momentum", self.momentum, 0.0, 1.0)
        _number("base_momentum", self.base_momentum, 0.0, 1.0)
        for name in ("cycle_momentum", "nesterov", "dirac", "download", "compile"):
            _boolean(name, getattr(self, name))
        if self.cycle_momentum and self.base_momentum > self.momentum:
            raise ConfigError(f"base_momentum ({self.base_momentum}) is above momentum "
                              f"({self.momentum}); with cycle_momentum the momentum dips to "
                              "base_momentum at the lr peak, so keep base_momentum <= momentum")
        _number("weight_decay", self.weight_decay, 0.0)
        if self.alpha is not None:
            _number("alpha", self.alpha, 0.0, 1.0)
        if self.temperature is not None:
            _number("temperature", self.temperature, 0.0, low_open=True)
        _number("lam", self.lam, 0.0)
        _number("dis_weight", self.dis_weight, 0.0)
        _number("eta_start", self.eta_start, 0.0)
        _number("eta_end", self.eta_end, 0.0)
        _number("checkpoint_interval_s", self.checkpoint_interval_s, 0.0)
        if self.beta is not None:
            _number("beta", self.beta, 0.0)
        if self.dataset == "npz" and not self.data_path:
            raise ConfigError("dataset npz needs data_path: pass --data-path FILE.npz "
                              "(arrays 'images' uint8 NxHxWx3 and 'labels')")

    def _resolve_block(self) -> None:
        """Set block from dirac where it is None, refuse the two disagreeing, then set dirac."""
        if self.block is None:
            self.block = "dirac" if self.dirac else "plain"
        _choice("block", self.block, BLOCK_TYPES)
        if self.dirac is not None and self.dirac != (self.block == "dirac"):
            raise ConfigError(f"dirac: {str(self.dirac).lower()} contradicts block: "
                              f"{self.block} (dirac: true is the older spelling of block: "
                              "dirac); drop dirac and keep block, or make them agree")
        self.dirac = self.block == "dirac"
        if self.block == "repvgg" and self.shortcut != "none":
            raise ConfigError(f"block repvgg has no shortcuts but shortcut is "
                              f"{self.shortcut}; pass shortcut none with block repvgg (or "
                              "another block)")

    def data_options(self) -> dict[str, Any]:
        """The data set's own options: data_path reaches only the sets that read one, so a
        search across digits and npz can fix one data_path for all its trials."""
        return {"path": self.data_path} if self.data_path and self.dataset in PATH_DATASETS \
            else {}

    def resolved(self, name: str) -> Any:
        """The value a run uses for `name`: its own, or where it is None, its method's default
        (METHOD_DEFAULTS; None for a method that does not take it)."""
        value = getattr(self, name)
        return METHOD_DEFAULTS.get(self.method, {}).get(name) if value is None else value

    @property
    def eta_schedule(self) -> EtaSchedule:
        return EtaSchedule(self.eta_kind, self.eta_start, self.eta_end, self.eta_epochs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> RunConfig:
        """A validated RunConfig; a float field also takes a number written as text ("1e-3",
        which YAML reads as a string)."""
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: expected a mapping of keys to values, got "
                              f"{type(values).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted((k for k in values if k not in known), key=str)
        if unknown:
            raise ConfigError(f"{source}: unknown key {unknown[0]!r}; allowed keys: "
                              f"{', '.join(known)}")
        types = _field_types()
        values = {k: float(v) if float in types[k][0] and isinstance(v, str)
                  and FLOAT_TEXT.fullmatch(v) else v for k, v in values.items()}
        try:
            return cls(**values)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
        except TypeError as err:
            raise ConfigError(f"{source}: {err}") from None

    def to_yaml(self) -> str:
        import yaml  # here, not above: the training core runs where only PyTorch is installed

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        import yaml

        path = Path(path)
        data = read_bounded(path, MAX_CONFIG_BYTES)
        if isinstance(data, str):
            raise ConfigError(f"config file {path} {data}; pass the path of a YAML run config")
        try:
            values = yaml.safe_load(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not UTF-8 text (a binary file?); pass a "
                              "YAML file of key: value lines") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file {path} is not valid YAML{where}; fix its syntax") \
                from None
        if values is None:
            raise ConfigError(f"config file {path} is empty (or only comments); write its "
                              "key: value lines, e.g. method: ce")
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values")
        return cls.from_dict(values, source=str(path))


@functools.cache
def _field_types() -> dict[str, tuple[tuple[type, ...], bool]]:
    """Each field's allowed Python types, and whether it may be None."""
    out = {}
    for name, hint in typing.get_type_hints(RunConfig).items():
        args = typing.get_args(hint) if typing.get_origin(hint) is not dict else ()
        optional = type(None) in args
        kinds = [a for a in args if a is not type(None)] or [typing.get_origin(hint) or hint]
        out[name] = (tuple(kinds), optional)
    return out


_TYPE_WORDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               dict: "a mapping"}


def _typed(name: str, value: Any, spec: tuple[tuple[type, ...], bool]) -> None:
    """ConfigError unless value has the field's type: ints are ints (not bools), floats any
    int or float (not bools), bools only bools, strings only strings."""
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
        word = _TYPE_WORDS.get(kind, kind.__name__) + (" or null" if optional else "")
        raise ConfigError(f"{name} must be {word}; got {value!r} ({type(value).__name__})")


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def _boolean(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false; got {value!r}")


def _integer(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or \
            (high is not None and value > high):
        upto = f" and <= {high}" if high is not None else ""
        raise ConfigError(f"{name} must be an integer >= {low}{upto}; got {value!r}")


def _number(name: str, value: Any, low: float, high: float = math.inf, *,
            low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        lo = f"> {low}" if low_open else f">= {low}"
        hi = "" if high == math.inf else f" and <= {high}"
        raise ConfigError(f"{name} must be a number {lo}{hi}; got {value!r}")
