"""Per-stage MAC counts of a network, and METHOD.md's cost model of one training step.

Counting runs on the meta device, so even ResNet-34 at 224 px costs no real arithmetic.
Only conv and linear layers are counted: BatchNorm, ReLU and pooling are a few percent of
the memory traffic and a negligible share of the MACs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from models import resnet

STEP_METHODS = ("ce", "kd", "alignkd", "jointrd", "jointrd_released")


def _module_macs(module: nn.Module, out: torch.Tensor) -> int:
    """MACs per image of one conv or linear call, from its output shape."""
    per_image = out[0].numel()
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return per_image * (module.in_channels // module.groups) * kh * kw
    return per_image * module.in_features  # nn.Linear


def stage_macs(net: nn.Module, image_size: int) -> list[int]:
    """MACs per image of f_1..f_4 and the head C (five numbers) of a models.ResNet."""
    parts = [*net.stages, net.head]
    counts = [0] * len(parts)
    hooks = []
    for i, part in enumerate(parts):
        for m in part.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                def hook(mod: nn.Module, _inp: tuple, out: torch.Tensor, i: int = i) -> None:
                    counts[i] += _module_macs(mod, out)
                hooks.append(m.register_forward_hook(hook))
    param = next(net.parameters())
    try:
        with torch.no_grad():
            net(torch.empty(1, 3, image_size, image_size, device=param.device))
    finally:
        for h in hooks:
            h.remove()
    return counts


def network_macs(depth: int, image_size: int, *, shortcut: str = "all", width: int = 64,
                 num_classes: int | None = None) -> list[int]:
    """stage_macs of a freshly built ResNet/Plain-CNN, built and run on the meta device."""
    stem = "cifar" if image_size < 64 else "imagenet"
    classes = num_classes if num_classes is not None else (10 if stem == "cifar" else 1000)
    with torch.device("meta"):
        net = resnet(depth, shortcut=shortcut, stem=stem, num_classes=classes, width=width)
    return stage_macs(net, image_size)


def hybrid_r(teacher_parts: list[int]) -> float:
    """r: the JointRD hybrid forward in units of one teacher forward F.

    Hybrid path i (i = 1..4) runs teacher stages i+1..4 and the head, so teacher stage j
    runs for j-1 paths (stage 2 once, 3 twice, 4 three times) and the head four times.
    """
    *stages, head = teacher_parts
    hybrid = sum((j - 1) * f for j, f in enumerate(stages, start=1)) + len(stages) * head
    return hybrid / sum(teacher_parts)


@dataclass
class CostModel:
    """One (depth, size, width)'s MACs and each method's modelled step cost in units of F."""

    depth: int
    image_size: int
    width: int
    gmac_teacher: float  # forward of the ResNet teacher, per image: this F
    gmac_student: float  # forward of the Plain student, per image
    stage_split: list[float]  # f_1..f_4 and head, shares of the teacher forward
    r: float
    step_F: dict[str, float]  # F is the paper's symbol, hence the capital

    def to_dict(self) -> dict:
        return asdict(self)


def cost_model(depth: int, image_size: int, width: int, num_classes: int = 10) -> CostModel:
    """The cost model with F = one teacher forward and a backward = 2 forwards.

    ce: student fwd+bwd, 3s (s = student/teacher MACs, a little under 1: no projection
    convs). kd/alignkd: + teacher forward 1. jointrd: + hybrid forward r and its
    input-gradient backward of about r. jointrd_released runs the same paths; its four 1x1
    connectors at stage-4 resolution add under 1% of F and are not counted.
    """
    teacher = network_macs(depth, image_size, width=width, num_classes=num_classes)
    student = network_macs(depth, image_size, shortcut="none", width=width,
                           num_classes=num_classes)
    f_t, f_s = sum(teacher), sum(student)
    s, r = f_s / f_t, hybrid_r(teacher)
    step = {"ce": 3 * s, "kd": 1 + 3 * s, "alignkd": 1 + 3 * s, "jointrd": 1 + 3 * s + 2 * r}
    step["jointrd_released"] = step["jointrd"]
    return CostModel(depth, image_size, width, f_t / 1e9, f_s / 1e9,
                     [p / f_t for p in teacher], r, step)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None where either is missing (a configuration that ran out of memory)."""
    return a / b if a is not None and b else None


def add_model_ratios(rows: list[dict], models: dict[str, dict]) -> None:
    """Give each measured row its modelled step cost, and measured vs modelled cost ratios.

    rows hold method, depth, size and ms_per_step; models maps "DEPTHxSIZE" to a
    CostModel.to_dict(). Ratios are against jointrd and ce of the same depth and size.
    """
    for row in rows:
        key = (row["depth"], row["size"])
        model = models[f"{row['depth']}x{row['size']}"]["step_F"]
        same = {r["method"]: r["ms_per_step"] for r in rows if (r["depth"], r["size"]) == key}
        row["flop_model_step_F"] = model[row["method"]]
        for base in ("jointrd", "ce"):
            row[f"ratio_vs_{base}"] = {"measured": ratio(row["ms_per_step"], same.get(base)),
                                       "model": model[row["method"]] / model[base]}
