"""ResNet and Plain-CNN from one definition, exposed as four stages and a head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.dirac import DiracConv2d
from models.repvgg import repvgg_block

BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
SHORTCUTS = ("all", "none", "downsample")
STEMS = ("cifar", "imagenet")
# The blocks' convs: plain 3x3 convs, Dirac-parameterized ones (a*delta + b*W), or RepVGG
# branches (3x3 + 1x1 + identity BN, folded into one 3x3 conv for deployment).
BLOCK_TYPES = ("plain", "dirac", "repvgg")


def _conv3x3(cin: int, cout: int, stride: int, dirac: bool) -> nn.Conv2d:
    cls = DiracConv2d if dirac else nn.Conv2d
    return cls(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers; the shortcut is kept, projected or removed.

    `dirac` makes the 3x3 convs Dirac convs; `dirac_projection` the 1x1 projection too.
    """

    def __init__(self, cin: int, cout: int, stride: int, shortcut: str, dirac: bool,
                 dirac_projection: bool = False) -> None:
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
            conv = DiracConv2d if dirac_projection else nn.Conv2d
            self.downsample = nn.Sequential(
                conv(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
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

    `block` picks the blocks' convs (BLOCK_TYPES); `dirac=True` is the older spelling of
    block="dirac". The Dirac students are laid out as the released JointRD students: the
    stem conv stays plain, and with the ImageNet stem the 1x1 projections are Dirac too
    (the released CIFAR students keep plain projections). "repvgg" needs shortcut="none".
    """

    def __init__(
        self,
        depth: int,
        *,
        shortcut: str = "all",
        stem: str = "cifar",
        num_classes: int = 10,
        width: int = 64,
        block: str = "plain",
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
        if block not in BLOCK_TYPES:
            raise ValueError(f"block must be one of {BLOCK_TYPES}, got {block!r}")
        if dirac:
            if block == "repvgg":
                raise ValueError("dirac=True contradicts block='repvgg'; pass one of them")
            block = "dirac"
        if block == "repvgg" and shortcut != "none":
            raise ValueError(f"a RepVGG block has no shortcut: pass shortcut='none' with "
                             f"block='repvgg', got shortcut={shortcut!r}")
        dirac = block == "dirac"
        self.arch = dict(
            depth=depth, shortcut=shortcut, stem=stem, num_classes=num_classes,
            width=width, dirac=dirac, block=block,
        )
        if stem == "cifar":
            # Plain for every student, Dirac ones included: the released JointRD students
            # have a plain stem conv (an earlier layout here made it a Dirac conv; such
            # model files still load, see _load_from_state_dict).
            self.conv1 = _conv3x3(3, width, 1, False)
        else:
            self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()
        # The released ImageNet Dirac students have Dirac 1x1 projections, the CIFAR ones not.
        dirac_projection = dirac and stem == "imagenet"

        def make_block(cin: int, cout: int, stride: int) -> nn.Module:
            if block == "repvgg":
                return repvgg_block(cin, cout, stride, shortcut)
            return BasicBlock(cin, cout, stride, shortcut, dirac, dirac_projection)

        cin = width
        for i, blocks in enumerate(BLOCKS[depth]):
            cout = width * 2**i
            layer = nn.Sequential(
                *[
                    make_block(cin if b == 0 else cout, cout, 2 if (i > 0 and b == 0) else 1)
                    for b in range(blocks)
                ]
            )
            self.add_module(f"layer{i + 1}", layer)
            cin = cout
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self._init_weights()
        self._build_views()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Dirac students saved before the released layout: a Dirac CIFAR stem conv (folded
        # here into its plain weight a*delta + b*W) and plain ImageNet-stem projections
        # (loaded as Dirac convs with a=0, b=1, whose effective weight is that plain W).
        # Both give the saved network's outputs exactly.
        if self.arch["block"] == "dirac":
            _upgrade_dirac_layout(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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


def _upgrade_dirac_layout(net: ResNet, state: dict, prefix: str) -> None:
    """Rewrite, in place, a Dirac student's state_dict of the earlier layout (see ResNet)."""
    stem = prefix + "conv1."
    a, b, w = (state.get(stem + k) for k in ("dirac_a", "dirac_b", "weight"))
    if not isinstance(net.conv1, DiracConv2d) and all(
            isinstance(t, torch.Tensor) for t in (a, b, w)) and a.numel() == b.numel() == len(w):
        del state[stem + "dirac_a"], state[stem + "dirac_b"]
        delta = nn.init.dirac_(torch.empty_like(w))
        state[stem + "weight"] = a.view(-1, 1, 1, 1) * delta + b.view(-1, 1, 1, 1) * w
    for name, m in net.named_modules():
        key = f"{prefix}{name}."
        if isinstance(m, DiracConv2d) and ".downsample." in key and key + "weight" in state \
                and key + "dirac_a" not in state and key + "dirac_b" not in state:
            w = state[key + "weight"]
            state[key + "dirac_a"] = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
            state[key + "dirac_b"] = torch.ones(w.shape[0], dtype=w.dtype, device=w.device)


def resnet(
    depth: int,
    *,
    shortcut: str = "all",
    stem: str = "cifar",
    num_classes: int = 10,
    width: int = 64,
    block: str = "plain",
    dirac: bool = False,
) -> ResNet:
    """Build a ResNet (shortcut="all") or its Plain-CNN (shortcut="none").

    block="dirac" (or dirac=True) gives Dirac convs, block="repvgg" RepVGG blocks.
    """
    return ResNet(depth, shortcut=shortcut, stem=stem, num_classes=num_classes,
                  width=width, block=block, dirac=dirac)


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
