"""The deployable form of a trained network: BatchNorm, Dirac convs and RepVGG branches folded
into plain biased convs."""

from __future__ import annotations

import torch
from torch import nn

from models.convs import plain_conv_like, refresh_views
from models.dirac import fold_dirac
from models.repvgg import fold_repvgg


def fold_batchnorm(net: nn.Module) -> nn.Module:
    """Return an eval-mode copy with each conv->BatchNorm pair merged into one biased conv.

    Dirac convs and RepVGG branches (models.repvgg.RepConv) are folded first, so the copy
    is plain convs, with biases, and their activations.
    """
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
                parent._modules[name] = plain_conv_like(conv, weight, bias)
                parent._modules[names[i + 1]] = nn.Identity()
    refresh_views(net)
    return net
