"""The training objectives: (student, teacher, x, y, hyperparameters) -> total, terms, logits.

`terms` holds every unweighted loss term, detached, so each can be logged by name; the
total is what the optimizer minimizes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from losses.features import DEFAULT_BETA, FEATURE_LOSSES, feature_loss

Result = tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]


def _check(name: str, value: float, low: float, high: float = math.inf, *,
           low_open: bool = False) -> None:
    if torch.compiler.is_compiling():
        # Traced, a check on a hyperparameter's value would guard the compiled graph on
        # that value, so that each new eta (it changes every epoch) compiled it again.
        # Eager calls check; compiled runs take values RunConfig has already validated.
        return
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        upper = "inf)" if high == math.inf else f"{high}]"
        raise ValueError(f"{name} must be in {bracket}{low}, {upper}, got {value!r}")


def _require_frozen(teacher: nn.Module) -> None:
    if teacher.training:
        raise ValueError("the teacher must be frozen (eval mode, no grads): "
                         "call models.freeze(teacher) first")


def kl_div(z_s: torch.Tensor, z_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(z_t/tau) || softmax(z_s/tau)), batch mean, scaled by tau^2 (Hinton)."""
    log_p_s = F.log_softmax(z_s.float() / temperature, dim=1)
    log_p_t = F.log_softmax(z_t.float() / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


def ce_loss(student: nn.Module, teacher: nn.Module | None, x: torch.Tensor,
            y: torch.Tensor) -> Result:
    """Plain cross-entropy: trains a teacher, or a student from scratch."""
    logits = student(x)
    ce = F.cross_entropy(logits, y)
    return ce, {"ce": ce.detach()}, logits


def kd_loss(student: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
            alpha: float = 0.5, temperature: float = 4.0) -> Result:
    """Hinton KD on logits only: alpha * KL + (1 - alpha) * CE."""
    _check("alpha", alpha, 0.0, 1.0)
    _check("temperature", temperature, 0.0, low_open=True)
    _require_frozen(teacher)
    with torch.no_grad():
        z_t = teacher(x)
    logits = student(x)
    kl = kl_div(logits, z_t, temperature)
    ce = F.cross_entropy(logits, y)
    total = alpha * kl + (1 - alpha) * ce
    return total, {"kl": kl.detach(), "ce": ce.detach()}, logits


def alignkd_loss(student: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                 alpha: float = 0.5, eta: float, temperature: float = 1.0,
                 feature_loss_kind: str = "mse", beta: float | None = None) -> Result:
    """AlignKD, eq. 7: alpha*KL(z_T||z_S) + (1-alpha)*CE(z_S,y) + eta*sum_i L_feat(s_i, t_i).

    `feature_loss_kind` "mse" is eq. 4; "at" and "nst" replace it, weighted by `beta`
    (defaults: 1 for mse, 1000 for at, 50 for nst).
    """
    _check("alpha", alpha, 0.0, 1.0)
    _check("eta", eta, 0.0)
    _check("temperature", temperature, 0.0, low_open=True)
    if feature_loss_kind not in FEATURE_LOSSES:
        raise ValueError(f"feature_loss must be one of {FEATURE_LOSSES}, "
                         f"got {feature_loss_kind!r}")
    beta = DEFAULT_BETA[feature_loss_kind] if beta is None else beta
    _check("beta", beta, 0.0)
    _require_frozen(teacher)
    # no_grad, not inference_mode: inference tensors cannot be saved for backward.
    with torch.no_grad():
        t = teacher.stage_outputs(x)
        z_t = teacher.head(t[-1])
    s = student.stage_outputs(x)
    logits = student.head(s[-1])
    kl = kl_div(logits, z_t, temperature)  # eq. 5
    ce = F.cross_entropy(logits, y)  # eq. 6
    feats = [feature_loss(feature_loss_kind, s_i, t_i) for s_i, t_i in zip(s, t, strict=True)]
    total = alpha * kl + (1 - alpha) * ce + eta * beta * torch.stack(feats).sum()
    terms = {"kl": kl.detach(), "ce": ce.detach()}
    terms.update({f"feat_{i + 1}": f.detach() for i, f in enumerate(feats)})
    return total, terms, logits


def hybrid_logits(s: list[torch.Tensor], teacher: nn.Module) -> list[torch.Tensor]:
    """h_i = C^T(f^T_{i+1..4}(s_i)) for i = 1..4, one pass of each teacher stage.

    Every hybrid input that needs teacher stage j is concatenated along the batch and
    run through stage j once. The teacher's BatchNorm uses running statistics, so this
    equals running each path alone.
    """
    stages = teacher.stages
    path = s[0]
    for j in range(1, len(stages)):
        path = torch.cat([stages[j](path), s[j]])
    return list(teacher.head(path).split(s[0].shape[0]))


def hybrid_logits_naive(s: list[torch.Tensor], teacher: nn.Module) -> list[torch.Tensor]:
    """The same h_i, each path run separately (teacher stage j runs j-1 times)."""
    out = []
    for i, feat in enumerate(s):
        for stage in teacher.stages[i + 1:]:
            feat = stage(feat)
        out.append(teacher.head(feat))
    return out


def jointrd_loss(student: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                 eta: float, lam: float = 0.001, batched: bool = True) -> Result:
    """JointRD, eq. 3: CE(z_S,y) + eta*(sum_{i<4} CE(h_i,y) + lam*sum_i MSE(h_i, z_T)).

    Gradients reach the student through the frozen teacher stages.
    """
    _check("eta", eta, 0.0)
    _check("lam", lam, 0.0)
    _require_frozen(teacher)
    with torch.no_grad():
        z_t = teacher(x)
    s = student.stage_outputs(x)
    logits = student.head(s[-1])
    h = (hybrid_logits if batched else hybrid_logits_naive)(s, teacher)
    ce = F.cross_entropy(logits, y)  # eq. 1, i = 1
    hybrid_ce = [F.cross_entropy(h_i, y) for h_i in h[:-1]]  # eq. 1, i = 2..n
    hybrid_mse = [F.mse_loss(h_i.float(), z_t.float()) for h_i in h]  # eq. 2
    total = ce + eta * (torch.stack(hybrid_ce).sum() + lam * torch.stack(hybrid_mse).sum())
    terms = {"ce": ce.detach()}
    terms.update({f"hybrid_ce_{i + 1}": v.detach() for i, v in enumerate(hybrid_ce)})
    terms.update({f"hybrid_mse_{i + 1}": v.detach() for i, v in enumerate(hybrid_mse)})
    return total, terms, logits


OBJECTIVES = {"ce": ce_loss, "kd": kd_loss, "alignkd": alignkd_loss, "jointrd": jointrd_loss}
