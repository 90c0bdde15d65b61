"""ResNet and Plain-CNN from one definition, exposed as four stages and a head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.dirac import DiracConv2d

BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
SHORTCUTS = ("all", "none", "downsample")
STEMS = ("cifar", "imagenet")


def _conv3x3(cin: int, cout: int, stride: int, dirac: bool) -> nn.Conv2d:
    cls = DiracConv2d if dirac else nn.Conv2d
    return cls(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers; the shortcut is kept, projected or removed."""

    def __init__(self, cin: int, cout: int, stride: int, shortcut: str, dirac: bool) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride, dirac)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(cout, cout, 1, dirac)
        self.bn2 = nn.BatchNorm2d(cout)
        projects = stride != 1 or cin != cout
        # "downsample" keeps only the projection shortcuts (the original JointRD
        # students); "none" drops the projections too, so no block adds anything.
        self.add_shortcut = shortcut == "all" or (shortcut == "downsample" and projects)
        self.downsample: nn.Module | None = None
        if self.add_shortcut and projects:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.add_shortcut:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class ResNet(nn.Module):
    """A CIFAR- or ImageNet-stem ResNet whose module names match torchvision's.

    The registered modules (conv1, bn1, layer1..4, fc) give torchvision's state_dict
    keys; `stages` and `head` are unregistered views over the same modules, so the
    paper's f_1..f_4 and C compose without hooks and without duplicate state.
    """

    def __init__(
        self,
        depth: int,
        *,
        shortcut: str = "all",
        stem: str = "cifar",
        num_classes: int = 10,
        width: int = 64,
        dirac: bool = False,
    ) -> None:
        super().__init__()
        if depth not in BLOCKS:
            raise ValueError(f"depth must be one of {sorted(BLOCKS)}, got {depth!r}")
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        if num_classes < 1 or width < 1:
            raise ValueError("num_classes and width must be positive integers")
        self.arch = dict(
            depth=depth, shortcut=shortcut, stem=stem, num_classes=num_classes,
            width=width, dirac=dirac,
        )
        if stem == "cifar":
            self.conv1 = _conv3x3(3, width, 1, dirac)
        else:
            self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()
        cin = width
        for i, blocks in enumerate(BLOCKS[depth]):
            cout = width * 2**i
            layer = nn.Sequential(
                *[
                    BasicBlock(cin if b == 0 else cout, cout, 2 if (i > 0 and b == 0) else 1,
                               shortcut, dirac)
                    for b in range(blocks)
                ]
            )
            self.add_module(f"layer{i + 1}", layer)
            cin = cout
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self._init_weights()
        self._build_views()

    def _build_views(self) -> None:
        stem = nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool, self.layer1)
        # object.__setattr__ keeps these views out of _modules (and the state_dict).
        object.__setattr__(self, "_stages", (stem, self.layer2, self.layer3, self.layer4))
        object.__setattr__(self, "_head", nn.Sequential(self.avgpool, nn.Flatten(1), self.fc))

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def stages(self) -> Sequence[nn.Module]:
        """f_1..f_4 of the paper; f_1 includes the stem."""
        return self._stages

    @property
    def head(self) -> nn.Module:
        """C of the paper: global average pool, flatten, fc."""
        return self._head

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """s_1..s_4 (or t_1..t_4): the output of every stage."""
        outs = []
        for stage in self._stages:
            x = stage(x)
            outs.append(x)
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self._stages:
            x = stage(x)
        return self._head(x)


def resnet(
    depth: int,
    *,
    shortcut: str = "all",
    stem: str = "cifar",
    num_classes: int = 10,
    width: int = 64,
    dirac: bool = False,
) -> ResNet:
    """Build a ResNet (shortcut="all") or its Plain-CNN (shortcut="none")."""
    return ResNet(depth, shortcut=shortcut, stem=stem, num_classes=num_classes,
                  width=width, dirac=dirac)


def freeze(net: nn.Module) -> nn.Module:
    """Make a teacher: eval-mode BatchNorm and no parameter gradients."""
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def param_groups(net: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer groups with Dirac scales (a, b) excluded from weight decay."""
    decay, no_decay = [], []
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.rsplit(".", 1)[-1] in DiracConv2d.SCALE_NAMES else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups
