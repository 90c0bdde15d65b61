"""Dirac-parameterized convolutions (the original JointRD students) and their folding."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from models.convs import plain_conv_like, refresh_views


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


def fold_dirac(net: nn.Module) -> nn.Module:
    """Return a copy in which every DiracConv2d is an ordinary Conv2d with equal outputs."""
    net = copy.deepcopy(net)
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, DiracConv2d):
                with torch.no_grad():
                    bias = None if child.bias is None else child.bias.detach()
                    setattr(parent, name,
                            plain_conv_like(child, child.effective_weight().detach(), bias))
    refresh_views(net)
    return net
