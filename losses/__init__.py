"""Distillation objectives: each returns (total, named terms, student logits)."""

from losses.features import DEFAULT_BETA, FEATURE_LOSSES, at_loss, attention_map, nst_loss
from losses.objectives import (
    OBJECTIVES,
    alignkd_loss,
    ce_loss,
    hybrid_logits,
    hybrid_logits_naive,
    jointrd_loss,
    kd_loss,
    kl_div,
)
from losses.released import (
    DEFAULT_DIS_WEIGHT,
    make_connectors,
    ofd_distance,
    ofd_margin,
    released_loss,
)
from losses.schedules import KINDS as ETA_KINDS
from losses.schedules import EtaSchedule

# JointRD as its authors released it (losses/released.py), beside the paper's objectives.
OBJECTIVES["jointrd_released"] = released_loss
# The objectives that train modules of their own besides the student: method -> a builder
# (student, teacher) -> module. The trainer makes the module once per run, trains it with the
# student, checkpoints it, and passes it to the objective as `connectors`.
OWN_MODULES = {"jointrd_released": make_connectors}

__all__ = [
    "DEFAULT_BETA", "DEFAULT_DIS_WEIGHT", "ETA_KINDS", "FEATURE_LOSSES", "OBJECTIVES",
    "OWN_MODULES", "EtaSchedule", "alignkd_loss", "at_loss", "attention_map", "ce_loss",
    "hybrid_logits", "hybrid_logits_naive", "jointrd_loss", "kd_loss", "kl_div",
    "make_connectors", "nst_loss", "ofd_distance", "ofd_margin", "released_loss",
]
