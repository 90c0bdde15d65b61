"""The eta schedule, as data: a kind plus numbers that a search can tune."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

KINDS = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class EtaSchedule:
    """eta(epoch): goes from `start` to `end` over the first `epochs` epochs, then stays at `end`.

    The paper's default is cosine from 1.0 to 0.5 over 60 epochs (of 200).
    `constant` is `start` throughout.
    """

    kind: str = "cosine"
    start: float = 1.0
    end: float = 0.5
    epochs: int = 60

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"eta schedule kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("start", "end"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"eta {name} must be a finite number >= 0, got {value!r}")
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise ValueError(f"eta epochs must be an integer >= 0, got {self.epochs!r}")

    def __call__(self, epoch: float) -> float:
        if self.kind == "constant":
            return float(self.start)
        if self.epochs == 0 or epoch >= self.epochs:
            return float(self.end)
        progress = max(epoch, 0) / self.epochs
        if self.kind == "linear":
            return self.start + (self.end - self.start) * progress
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def to_dict(self) -> dict:
        return asdict(self)
