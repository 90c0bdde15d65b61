"""JointRD's objective as its authors released it: procedure JOINT, with a frozen teacher.

Per step:

    L = 1/4 · [CE(z_S, y) + m · Σ_{i=1..3} CE(h_i, y)]
      + 1/4 · dis_weight · [m · Σ_{i=1..3} D_i + D_4]

- m is eta, the η schedule value (the released code's cosine "m" from 1 to `dc` over 60
  epochs); D_4, the student's own feature term, is not multiplied by m.
- h_i = C^T(f^T_{i+1..4}(s_i)), the hybrid logits of `losses.objectives.hybrid_logits`.
- D_i = ofd_distance(connector_i(p_i), p_T, margin): p_i is the pre-ReLU stage-4 feature of
  hybrid path i (s_i through the teacher's stages i+1..3 and the teacher's layer4, stopped
  before its last ReLU), p_4 the student's own pre-ReLU stage-4 feature, p_T the teacher's
  (under no_grad), and the margin comes from the teacher's layer4[-1].bn2 (OFD, Heo et al.
  2019). The connectors (1x1 conv + BN) train with the student, weight decay included.

The released JOINT procedure also trains the teacher from scratch, one CE step on the
teacher before each student step. Here the teacher is a trained, frozen one (as every other
method's), so that step is dropped and the teacher's BatchNorm uses its running statistics
on every path, p_T included.

Assumption, dis_weight: default 1e-3, the released training script's argparse default and
the OFD paper's CIFAR weight (its code comments: 1e-3 for 32x32 images, 1e-4 for 224x224).
Note that the released CIFAR launch script passes `--dis_weight 0.`, which switches every
D_i off; dis_weight=0 reproduces that run.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from losses.objectives import Result, _check, _require_frozen

DEFAULT_DIS_WEIGHT = 1e-3
_TAIL_MIN = 1e-3  # OFD: below this Phi(-beta/gamma) the margin is -3*gamma


def ofd_margin(bn: nn.BatchNorm2d) -> torch.Tensor:
    """Per channel, E[x | x < 0] for x ~ N(beta, gamma^2), beta = bn.bias, gamma = |bn.weight|.

    m = beta - gamma * phi(beta/gamma) / Phi(-beta/gamma); where Phi(-beta/gamma) <= 1e-3
    (almost no mass below 0) m = -3*gamma, as the OFD paper does. Shape [C], bn's dtype.
    """
    with torch.no_grad():
        if bn.weight is None:
            raise ValueError("ofd_margin needs an affine BatchNorm (its weight and bias)")
        gamma = bn.weight.detach().double().abs()
        beta = bn.bias.detach().double()
        # gamma = 0: a point mass at beta; the clamp gives beta (beta < 0) or -0 (beta >= 0).
        z = beta / gamma.clamp_min(1e-12)
        tail = torch.special.ndtr(-z)
        pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
        closed = beta - gamma * pdf / tail.clamp_min(_TAIL_MIN)
        margin = torch.where(tail > _TAIL_MIN, closed, -3.0 * gamma)
        return margin.to(bn.weight.dtype)


def ofd_distance(s: torch.Tensor, t: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """OFD's partial L2: Σ (s - t')^2 over (s > t') | (t' > 0), t' = max(t, margin), / batch.

    s, t: [B, C, H, W]; margin: [C], <= 0 as ofd_margin gives it. The released code writes the
    same sum as three cases (t <= m: (s - m)^2 where s > m; m < t <= 0: (s - t)^2 where s > t;
    t > 0: (s - t)^2), equal to this one for any margin <= 0. Computed in float32 (also under
    autocast).
    """
    s, t = s.float(), t.float()
    t = torch.maximum(t, margin.float().view(1, -1, 1, 1))
    mask = (s > t) | (t > 0)
    return ((s - t).square() * mask).sum() / s.shape[0]


def connector(cin: int, cout: int) -> nn.Sequential:
    """1x1 conv (no bias) + BN mapping a student feature to the teacher's channels."""
    conv = nn.Conv2d(cin, cout, 1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, nn.BatchNorm2d(cout))


def make_connectors(student: nn.Module, teacher: nn.Module) -> nn.ModuleList:
    """Four connectors (paths 1..3, then the student's own) on the student's device/dtype.

    Widths: each network's stage-4 channels, read from its fc's inputs. Paths 1..3 end in
    the teacher's layer4, so their connectors map the teacher's channels; the fourth maps the
    student's.
    """
    s_ch, t_ch = student.fc.in_features, teacher.fc.in_features
    p = next(student.parameters())
    convs = [connector(t_ch, t_ch) for _ in range(3)] + [connector(s_ch, t_ch)]
    return nn.ModuleList(convs).to(p.device, p.dtype)


def stage4_pre_relu(net: nn.Module, x4_input: torch.Tensor) -> torch.Tensor:
    """layer4 on a stage-3 output, returning its last block's output before the final ReLU.

    Works for BasicBlock (with or without shortcut) and any block with its attribute names
    (conv1, bn1, relu, conv2, bn2, add_shortcut, downsample).
    """
    layer = net.stages[-1]
    x = x4_input
    for blk in list(layer)[:-1]:
        x = blk(x)
    blk = layer[-1]
    out = blk.relu(blk.bn1(blk.conv1(x)))
    out = blk.bn2(blk.conv2(out))
    if getattr(blk, "add_shortcut", False):
        out = out + (x if blk.downsample is None else blk.downsample(x))
    return out


def released_loss(student: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                  connectors: nn.ModuleList, eta: float,
                  dis_weight: float = DEFAULT_DIS_WEIGHT) -> Result:
    """The released JOINT objective with a frozen teacher (see the module docstring).

    Terms: ce, hybrid_ce_1..3, ofd_1..4 (each unweighted). Logits: the student's.
    """
    _check("eta", eta, 0.0)
    _check("dis_weight", dis_weight, 0.0)
    _require_frozen(teacher)
    if len(connectors) != 4:
        raise ValueError(f"need 4 connectors (3 hybrid paths, the student), got {len(connectors)}")
    t_stages, s_stages = teacher.stages, student.stages
    with torch.no_grad():
        t = x
        for stage in t_stages[:-1]:
            t = stage(t)
        p_t = stage4_pre_relu(teacher, t)
        margin = ofd_margin(t_stages[-1][-1].bn2)
    s = []
    feat = x
    for stage in s_stages[:-1]:
        feat = stage(feat)
        s.append(feat)
    p_s = stage4_pre_relu(student, s[-1])
    logits = student.head(F.relu(p_s))
    # Hybrid paths 1..3, batched as in hybrid_logits: teacher stage j runs once on every
    # path that needs it (running BN statistics make this equal to separate runs).
    path = s[0]
    for j in range(1, len(t_stages) - 1):
        path = torch.cat([t_stages[j](path), s[j]])
    p_h = stage4_pre_relu(teacher, path)
    h = teacher.head(F.relu(p_h)).split(x.shape[0])
    feats = list(p_h.split(x.shape[0])) + [p_s]

    ce = F.cross_entropy(logits, y)
    hybrid_ce = [F.cross_entropy(h_i, y) for h_i in h]
    dist = [ofd_distance(conn(f), p_t, margin) for conn, f in zip(connectors, feats, strict=True)]
    total = 0.25 * (ce + eta * torch.stack(hybrid_ce).sum()) + 0.25 * dis_weight * (
        eta * torch.stack(dist[:-1]).sum() + dist[-1])
    terms = {"ce": ce.detach()}
    terms.update({f"hybrid_ce_{i + 1}": v.detach() for i, v in enumerate(hybrid_ce)})
    terms.update({f"ofd_{i + 1}": v.detach() for i, v in enumerate(dist)})
    return total, terms, logits
