"""Dirac-parameterized convolutions (the original JointRD students) and their folding."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class DiracConv2d(nn.Conv2d):
    """A conv whose effective weight is a*delta + b*W, with a, b learnable per output channel.

    delta is the identity kernel (torch.nn.init.dirac_), so at a=1, b=0 the conv passes
    its input through; a starts at 1 and b at 0.1 as in the original JointRD code.
    """

    SCALE_NAMES = ("dirac_a", "dirac_b")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        out = self.out_channels
        self.dirac_a = nn.Parameter(torch.ones(out))
        self.dirac_b = nn.Parameter(torch.full((out,), 0.1))
        delta = torch.empty_like(self.weight)
        nn.init.dirac_(delta, groups=self.groups)
        self.register_buffer("delta", delta, persistent=False)

    def effective_weight(self) -> torch.Tensor:
        a = self.dirac_a.view(-1, 1, 1, 1)
        b = self.dirac_b.view(-1, 1, 1, 1)
        return a * self.delta + b * self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.effective_weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


def _plain_conv_like(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    # Made in the weight's dtype: a float32 module would round a float64 weight on copy.
    new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                    padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                    bias=bias is not None, device=weight.device, dtype=weight.dtype)
    new.weight.data.copy_(weight)
    if bias is not None:
        new.bias.data.copy_(bias)
    return new


def fold_dirac(net: nn.Module) -> nn.Module:
    """Return a copy in which every DiracConv2d is an ordinary Conv2d with equal outputs."""
    net = copy.deepcopy(net)
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, DiracConv2d):
                with torch.no_grad():
                    bias = None if child.bias is None else child.bias.detach()
                    setattr(parent, name,
                            _plain_conv_like(child, child.effective_weight().detach(), bias))
    _refresh_views(net)
    return net


def fold_batchnorm(net: nn.Module) -> nn.Module:
    """Return an eval-mode copy with each conv->BatchNorm pair merged into one biased conv.

    Dirac convs and RepVGG branches (models.repvgg.RepConv) are folded first, so the copy
    is plain convs, with biases, and their activations.
    """
    from models.repvgg import fold_repvgg  # not at the top: models.repvgg imports this module

    net = fold_repvgg(fold_dirac(net)).eval()
    for parent in list(net.modules()):
        names = list(parent._modules)
        for i, name in enumerate(names[:-1]):
            conv, bn = parent._modules[name], parent._modules[names[i + 1]]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                with torch.no_grad():
                    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                    weight = conv.weight * scale.view(-1, 1, 1, 1)
                    bias = bn.bias - bn.running_mean * scale
                    if conv.bias is not None:
                        bias = bias + conv.bias * scale
                parent._modules[name] = _plain_conv_like(conv, weight, bias)
                parent._modules[names[i + 1]] = nn.Identity()
    _refresh_views(net)
    return net


def _refresh_views(net: nn.Module) -> None:
    """Rebuild a ResNet's stage/head views after its modules were swapped."""
    rebuild = getattr(net, "_build_views", None)
    if rebuild is not None:
        rebuild()
