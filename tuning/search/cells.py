"""A cell: one combination of the dimensions a search runs across (data set x depth x method).

Each cell is a study of its own: its own sampler history, early-stopping rungs, budget, chosen
trial and test accuracy. Trials of different cells never compete. The cell is named here once;
the searcher, the scheduler, the tracker and the tables key on it.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

SINGLE = "all"  # the key of the one cell of a search that runs across nothing


@dataclass(frozen=True)
class Cell:
    """The values of the across-dimensions, in the space's order."""

    values: tuple[tuple[str, Any], ...] = ()

    @property
    def key(self) -> str:
        """Stable and unique within a search: `dataset=cifar10,depth=18`."""
        return ",".join(f"{k}={v}" for k, v in self.values) or SINGLE

    @property
    def label(self) -> str:
        """For people: `cifar10 · 18`."""
        return " · ".join(str(v) for _, v in self.values) or SINGLE

    @property
    def slug(self) -> str:
        """For file names: `dataset-cifar10_depth-18`."""
        return re.sub(r"[^A-Za-z0-9._-]", "-", self.key.replace(",", "_").replace("=", "-"))

    def as_dict(self) -> dict[str, Any]:
        return dict(self.values)

    @classmethod
    def of(cls, config: dict[str, Any], dims: tuple[str, ...]) -> Cell:
        return cls(tuple((d, config[d]) for d in dims))


def cells_of(across: dict[str, tuple]) -> list[Cell]:
    """Every combination of the across-dimensions, in the space's order."""
    keys = list(across)
    return [Cell(tuple(zip(keys, combo, strict=True)))
            for combo in itertools.product(*(across[k] for k in keys))]


def study_name(search: str, cell: Cell) -> str:
    """The cell's Optuna study: `<search>/<cell key>`."""
    return f"{search}/{cell.key}"
