"""What the folds share: a plain conv made from a weight, and a ResNet's views rebuilt after
its modules were swapped."""

from __future__ import annotations

import torch
from torch import nn


def plain_conv_like(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    """A Conv2d shaped like `conv`, holding `weight` and `bias`."""
    # Made in the weight's dtype: a float32 module would round a float64 weight on copy.
    new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                    padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                    bias=bias is not None, device=weight.device, dtype=weight.dtype)
    new.weight.data.copy_(weight)
    if bias is not None:
        new.bias.data.copy_(bias)
    return new


def refresh_views(net: nn.Module) -> None:
    """Rebuild a ResNet's stage/head views after its modules were swapped."""
    rebuild = getattr(net, "_build_views", None)
    if rebuild is not None:
        rebuild()
