"""Stage-wise feature losses for AlignKD (eq. 4 and two cheaper alternatives)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

FEATURE_LOSSES = ("mse", "at", "nst")
# Weights the reference implementations use: AT (Zagoruyko & Komodakis) beta=1000,
# NST (Huang & Wang, as RepDistiller runs it) 50; MSE is the paper's, unweighted.
DEFAULT_BETA = {"mse": 1.0, "at": 1000.0, "nst": 50.0}


def attention_map(f: torch.Tensor) -> torch.Tensor:
    """Channel-mean of squared activations, flattened and L2-normalized per sample."""
    return F.normalize(f.float().pow(2).mean(1).flatten(1), dim=1)


def at_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Attention transfer: mean squared difference of the attention maps."""
    return (attention_map(s) - attention_map(t)).pow(2).mean()


def nst_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Squared MMD with the kernel (x.y)^2 between L2-normalized channel maps.

    The three kernel means come from B x C x C Gram matrices (batched matmul), never
    from the B x C x C x HW broadcast.
    """
    s = F.normalize(s.float().flatten(2), dim=2)
    t = F.normalize(t.float().flatten(2), dim=2)

    def kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.bmm(a, b.transpose(1, 2)).pow(2).mean(dim=(1, 2))

    return (kernel_mean(s, s) + kernel_mean(t, t) - 2 * kernel_mean(s, t)).mean()


def feature_loss(kind: str, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """One stage's unweighted feature loss of the given kind."""
    if kind == "mse":
        return F.mse_loss(s, t)  # eq. 4: the mean over every element
    if kind == "at":
        return at_loss(s, t)
    if kind == "nst":
        return nst_loss(s, t)
    raise ValueError(f"feature_loss must be one of {FEATURE_LOSSES}, got {kind!r}")
