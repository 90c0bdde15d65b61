"""The training step and its optimizer, shared by the trainer and the throughput benchmark.

Both call these, so the benchmark times exactly the step that training runs.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from models import param_groups
from tuning.run.config import RunConfig

Result = tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]
Step = Callable[[torch.Tensor, torch.Tensor, dict[str, Any]], Result]


def autocast(device: torch.device) -> AbstractContextManager:
    """bf16 autocast on CUDA; plain fp32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def make_optimizer(
    student: nn.Module, cfg: RunConfig, total_steps: int, device: torch.device, *,
    connectors: nn.Module | None = None,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.OneCycleLR]:
    """SGD (fused on CUDA, foreach elsewhere) and its OneCycle schedule over total_steps.

    `connectors` (jointrd_released's) train with the student: their parameters join the
    student's weight-decayed group, after the student's own.
    """
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    groups = param_groups(student, cfg.weight_decay)
    if connectors is not None:
        groups[0]["params"] += [p for p in connectors.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                                nesterov=cfg.nesterov, **fast)
    # div_factor = max_lr_factor: the cycle starts at lr and peaks at lr * max_lr_factor.
    # Momentum is explicit: OneCycleLR would otherwise replace the optimizer's with its own
    # default cycle (0.95 -> 0.85 -> 0.95) whatever the config said.
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr * cfg.max_lr_factor, total_steps=total_steps,
        div_factor=cfg.max_lr_factor, pct_start=cfg.pct_start,
        cycle_momentum=cfg.cycle_momentum, base_momentum=cfg.base_momentum,
        max_momentum=cfg.momentum)
    return optimizer, scheduler


def make_train_step(
    objective: Callable[..., Result],
    student: nn.Module,
    teacher: nn.Module | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    device: torch.device,
    *,
    connectors: nn.Module | None = None,
) -> Step:
    """A function (x, y, hyperparameters) -> (total, terms, logits) that takes one SGD step.

    `connectors`, where the objective trains its own (jointrd_released), reach it as the
    keyword `connectors` on every step; every other objective is called as before.
    """
    own = {} if connectors is None else {"connectors": connectors}

    def step(x: torch.Tensor, y: torch.Tensor, hp: dict[str, Any]) -> Result:
        with autocast(device):
            total, terms, logits = objective(student, teacher, x, y, **hp, **own)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        return total, terms, logits

    return step
