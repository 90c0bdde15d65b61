"""RepVGG re-parameterization (Ding et al. 2021) for the Plain-CNN students.

A `RepConv` trains as three parallel branches whose outputs are summed:

    y = BN_3(conv3x3(x)) + BN_1(conv1x1(x)) [+ BN_id(x)   only where cin == cout, stride 1]

In eval mode every branch is affine in x, so the sum is one 3x3 conv with a bias
(`fold_repconv`); `fold_repvgg` does that for a whole network, so the deployed student is
a plain VGG-style stack of 3x3 convs and ReLUs.

`repvgg_block` builds a block with BasicBlock's attribute names (conv1, bn1, relu, conv2,
bn2, add_shortcut, downsample) and BasicBlock's forward: conv1 and conv2 are RepConvs and
bn1, bn2 are nn.Identity (each RepConv holds its own BatchNorms). It has no shortcut. Its
output shape equals BasicBlock's, so a ResNet built from it keeps its stage outputs and
every objective (stage_outputs, stages, head) works unchanged.

`ResNet(depth, shortcut="none", block="repvgg")` (models/resnet.py) is built from these
blocks and records block "repvgg" in `net.arch`, so a model file rebuilds it;
`fold_repvgg(student)` is its deployable form, and `models.fold_batchnorm` (which the export
uses) folds the RepConvs first. The stem conv stays the Plain-CNN's conv+BN.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

# No import of models.resnet: resnet.py may import repvgg_block without a cycle.
from models.convs import plain_conv_like, refresh_views


def _conv_bn(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        bn=nn.BatchNorm2d(cout),
    ))


class RepConv(nn.Module):
    """3x3 conv+BN, 1x1 conv+BN and (cin == cout, stride 1) an identity BN, summed; no ReLU.

    Branches: `dense` (Sequential conv, bn), `pointwise` (Sequential conv, bn) and
    `identity` (a BatchNorm2d, or None where the shapes do not allow it).
    """

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride!r}")
        self.in_channels, self.out_channels, self.stride = cin, cout, stride
        self.dense = _conv_bn(cin, cout, 3, stride)
        self.pointwise = _conv_bn(cin, cout, 1, stride)
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dense(x) + self.pointwise(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return out


def _bn_scale_shift(bn: nn.Module, channels: int, like: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as y = scale * x + shift (an nn.Identity gives 1, 0)."""
    if isinstance(bn, nn.Identity):
        return torch.ones(channels, dtype=like.dtype), torch.zeros(channels, dtype=like.dtype)
    if not isinstance(bn, nn.BatchNorm2d) or bn.running_var is None:
        raise TypeError(f"cannot fold {type(bn).__name__}: need BatchNorm2d with running stats")
    var = bn.running_var.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - bn.running_mean.double() * scale


def _branch(seq: nn.Sequential) -> tuple[torch.Tensor, torch.Tensor]:
    """A conv(+BN) branch as a (kernel, bias) pair in float64; 1x1 kernels padded to 3x3."""
    conv, bn = seq.conv, seq.bn
    w = conv.weight.detach().double()
    scale, shift = _bn_scale_shift(bn, conv.out_channels, w)
    scale, shift = scale.to(w.device), shift.to(w.device)
    bias = shift
    if conv.bias is not None:  # e.g. after models.fold_batchnorm
        bias = bias + scale * conv.bias.detach().double()
    w = w * scale.view(-1, 1, 1, 1)
    pad = (3 - w.shape[-1]) // 2
    return F.pad(w, [pad] * 4), bias


def fold_repconv(m: RepConv) -> nn.Conv2d:
    """One biased 3x3 conv equal to `m` in eval mode (BN running statistics)."""
    with torch.no_grad():
        w, b = _branch(m.dense)
        w1, b1 = _branch(m.pointwise)
        w, b = w + w1, b + b1
        if m.identity is not None:
            scale, shift = _bn_scale_shift(m.identity, m.in_channels, w)
            scale, shift = scale.to(w.device), shift.to(w.device)
            eye = torch.zeros_like(w)  # a per-channel dirac: centre tap of channel o -> o
            idx = torch.arange(m.in_channels, device=w.device)
            eye[idx, idx, 1, 1] = 1.0
            w, b = w + eye * scale.view(-1, 1, 1, 1), b + shift
        dtype = m.dense.conv.weight.dtype
        return plain_conv_like(m.dense.conv, w.to(dtype), b.to(dtype))


def fold_repvgg(net: nn.Module) -> nn.Module:
    """An eval-mode deep copy with every RepConv replaced by its folded 3x3 conv."""
    if isinstance(net, RepConv):
        return fold_repconv(net)  # reads the running statistics, whatever the mode
    net = copy.deepcopy(net).eval()
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, RepConv):
                setattr(parent, name, fold_repconv(child))
    refresh_views(net)
    return net


class RepVGGBlock(nn.Module):
    """BasicBlock's attribute names and forward, with RepConv convs and no shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = RepConv(cin, cout, stride)
        self.bn1 = nn.Identity()
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = RepConv(cout, cout, 1)
        self.bn2 = nn.Identity()
        self.add_shortcut = False
        self.downsample: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)))


def repvgg_block(cin: int, cout: int, stride: int, shortcut: str = "none",
                 dirac: bool = False) -> RepVGGBlock:
    """A Plain-CNN block of two RepConvs; takes BasicBlock's arguments (see module doc)."""
    if shortcut != "none":
        raise ValueError(f"a RepVGG block has no shortcut; use shortcut='none', got {shortcut!r}")
    if dirac:
        raise ValueError("a RepVGG block re-parameterizes by branches, not Dirac scales: "
                         "use dirac=False")
    return RepVGGBlock(cin, cout, stride)
