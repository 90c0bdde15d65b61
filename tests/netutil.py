"""Shared by the network tests: weights that make equality checks meaningful."""

import torch
from torch import nn


def randomize(net: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm affine and statistics, and random Dirac scales.

    Conv and fc weights are already random; default BatchNorm (identity) would let a
    wrong folding or a missing layer pass unnoticed.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(net.named_parameters()) + list(net.named_buffers()):
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("running_var", "dirac_a") or (leaf == "weight" and t.ndim == 1):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif leaf in ("running_mean", "bias", "dirac_b"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return net
