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
from losses.schedules import KINDS as ETA_KINDS
from losses.schedules import EtaSchedule

__all__ = [
    "DEFAULT_BETA", "ETA_KINDS", "FEATURE_LOSSES", "OBJECTIVES", "EtaSchedule", "alignkd_loss",
    "at_loss", "attention_map", "ce_loss", "hybrid_logits", "hybrid_logits_naive",
    "jointrd_loss", "kd_loss", "kl_div", "nst_loss",
]
