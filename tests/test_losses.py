"""Objectives against values computed independently: by hand and by numpy from the equations."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from losses import (
    EtaSchedule,
    alignkd_loss,
    at_loss,
    ce_loss,
    hybrid_logits,
    hybrid_logits_naive,
    jointrd_loss,
    kd_loss,
    nst_loss,
)
from models import freeze, resnet


class Toy(nn.Module):
    """Four 1x1-conv stages on 2 channels and a 3-class head: small enough to redo in numpy."""

    def __init__(self, mats, fc_w, fc_b):
        super().__init__()
        self.convs = nn.ModuleList()
        for m in mats:
            conv = nn.Conv2d(2, 2, 1, bias=False)
            conv.weight.data = torch.tensor(m, dtype=torch.float32).view(2, 2, 1, 1)
            self.convs.append(conv)
        self.fc = nn.Linear(2, 3)
        self.fc.weight.data = torch.tensor(fc_w, dtype=torch.float32)
        self.fc.bias.data = torch.tensor(fc_b, dtype=torch.float32)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), self.fc)

    @property
    def stages(self):
        return list(self.convs)

    def stage_outputs(self, x):
        outs = []
        for c in self.convs:
            x = c(x)
            outs.append(x)
        return outs

    def forward(self, x):
        return self.head(self.stage_outputs(x)[-1])


# numpy forms of the paper's pieces, written from the equations
def np_stage(m, f):
    return np.einsum("oc,bchw->bohw", np.asarray(m, dtype=np.float64), f)


def np_head(w, b, f):
    return f.mean(axis=(2, 3)) @ np.asarray(w, dtype=np.float64).T + np.asarray(b)


def np_log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_ce(z, y):
    return -np_log_softmax(z)[np.arange(len(y)), y].mean()


def np_kl(z_s, z_t, tau):
    log_ps, log_pt = np_log_softmax(z_s / tau), np_log_softmax(z_t / tau)
    return (np.exp(log_pt) * (log_pt - log_ps)).sum(axis=1).mean() * tau**2


RNG = np.random.default_rng(0)
S_MATS = [RNG.normal(size=(2, 2)) for _ in range(4)]
T_MATS = [RNG.normal(size=(2, 2)) for _ in range(4)]
S_FC, S_B = RNG.normal(size=(3, 2)), RNG.normal(size=3)
T_FC, T_B = RNG.normal(size=(3, 2)), RNG.normal(size=3)
X = RNG.normal(size=(4, 2, 2, 2))
Y = np.array([0, 2, 1, 2])


def toy_pair():
    return Toy(S_MATS, S_FC, S_B), freeze(Toy(T_MATS, T_FC, T_B))


def np_features(mats, x):
    out = []
    for m in mats:
        x = np_stage(m, x)
        out.append(x)
    return out


def test_alignkd_pencil_value():
    """Identity student, 2x-identity teacher, zero heads, all-ones input.

    Logits are all zero, so KL = 0 and CE = ln 3; the stage outputs are 1 vs 2, 4, 8, 16,
    so the MSEs are 1, 9, 49, 225 (sum 284): total = 0.5 ln 3 + 0.5 * 284.
    """
    eye = np.eye(2)
    zero_w, zero_b = np.zeros((3, 2)), np.zeros(3)
    student = Toy([eye] * 4, zero_w, zero_b)
    teacher = freeze(Toy([2 * eye] * 4, zero_w, zero_b))
    x = torch.ones(2, 2, 2, 2)
    total, terms, _ = alignkd_loss(student, teacher, x, torch.tensor([0, 1]), alpha=0.5, eta=0.5)
    assert total.item() == pytest.approx(0.5 * math.log(3) + 142.0, rel=1e-6)
    assert terms["kl"].item() == pytest.approx(0.0, abs=1e-7)
    assert [terms[f"feat_{i}"].item() for i in range(1, 5)] == pytest.approx([1, 9, 49, 225])


def test_jointrd_pencil_value():
    """Zero heads make every logit zero: each CE is ln 3 and each logit MSE is 0."""
    eye = np.eye(2)
    student = Toy([eye] * 4, np.zeros((3, 2)), np.zeros(3))
    teacher = freeze(Toy([2 * eye] * 4, np.zeros((3, 2)), np.zeros(3)))
    total, terms, _ = jointrd_loss(student, teacher, torch.ones(2, 2, 2, 2), torch.tensor([0, 1]),
                                   eta=1.0, lam=0.001)
    assert total.item() == pytest.approx(4 * math.log(3), rel=1e-6)


@pytest.mark.parametrize(("alpha", "eta", "tau"),
                         [(0.5, 1.0, 1.0), (0.2, 0.7, 4.0), (1.0, 0.0, 2.0)])
def test_alignkd_golden(alpha, eta, tau):
    s_feats, t_feats = np_features(S_MATS, X), np_features(T_MATS, X)
    z_s, z_t = np_head(S_FC, S_B, s_feats[-1]), np_head(T_FC, T_B, t_feats[-1])
    mse = [((a - b) ** 2).mean() for a, b in zip(s_feats, t_feats, strict=True)]
    expect = alpha * np_kl(z_s, z_t, tau) + (1 - alpha) * np_ce(z_s, Y) + eta * sum(mse)
    student, teacher = toy_pair()
    total, terms, logits = alignkd_loss(student, teacher, torch.tensor(X, dtype=torch.float32),
                                        torch.tensor(Y), alpha=alpha, eta=eta, temperature=tau)
    assert total.item() == pytest.approx(expect, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(np_ce(z_s, Y), rel=1e-5)
    assert terms["kl"].item() == pytest.approx(np_kl(z_s, z_t, tau), rel=1e-5, abs=1e-7)
    np.testing.assert_allclose(logits.detach().numpy(), z_s, rtol=1e-5)


@pytest.mark.parametrize(("eta", "lam"), [(1.0, 0.001), (0.5, 0.1), (0.0, 0.01)])
def test_jointrd_golden(eta, lam):
    s_feats = np_features(S_MATS, X)
    z_s = np_head(S_FC, S_B, s_feats[-1])
    z_t = np_head(T_FC, T_B, np_features(T_MATS, X)[-1])
    # h_i = C^T(f^T_{i+1..4}(s_i))
    h = [np_head(T_FC, T_B, np_features(T_MATS[i + 1:], s_feats[i])[-1] if i < 3
                 else s_feats[3]) for i in range(4)]
    expect = np_ce(z_s, Y) + eta * (sum(np_ce(h_i, Y) for h_i in h[:3])
                                    + lam * sum(((h_i - z_t) ** 2).mean() for h_i in h))
    student, teacher = toy_pair()
    total, terms, _ = jointrd_loss(student, teacher, torch.tensor(X, dtype=torch.float32),
                                   torch.tensor(Y), eta=eta, lam=lam)
    assert total.item() == pytest.approx(expect, rel=1e-5)
    assert terms["hybrid_ce_2"].item() == pytest.approx(np_ce(h[1], Y), rel=1e-5)
    assert terms["hybrid_mse_4"].item() == pytest.approx(((h[3] - z_t) ** 2).mean(), rel=1e-5)


def test_kd_and_ce_golden():
    student, teacher = toy_pair()
    z_s = np_head(S_FC, S_B, np_features(S_MATS, X)[-1])
    z_t = np_head(T_FC, T_B, np_features(T_MATS, X)[-1])
    x, y = torch.tensor(X, dtype=torch.float32), torch.tensor(Y)
    total, terms, _ = kd_loss(student, teacher, x, y, alpha=0.3, temperature=3.0)
    assert total.item() == pytest.approx(0.3 * np_kl(z_s, z_t, 3.0) + 0.7 * np_ce(z_s, Y),
                                         rel=1e-5)
    total, terms, _ = ce_loss(student, None, x, y)
    assert total.item() == pytest.approx(np_ce(z_s, Y), rel=1e-5) and set(terms) == {"ce"}


def test_attention_transfer_golden():
    s = RNG.normal(size=(2, 3, 2, 2))
    t = RNG.normal(size=(2, 3, 2, 2))

    def att(f):
        a = (f**2).mean(axis=1).reshape(2, -1)
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    expect = ((att(s) - att(t)) ** 2).mean()
    got = at_loss(torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32))
    assert got.item() == pytest.approx(expect, rel=1e-5)


def test_nst_golden_against_the_naive_kernel_sums():
    s = RNG.normal(size=(2, 3, 2, 2))
    t = RNG.normal(size=(2, 4, 2, 2))

    def maps(f):
        f = f.reshape(f.shape[0], f.shape[1], -1)
        return f / np.linalg.norm(f, axis=2, keepdims=True)

    def k(a, b):  # explicit double loop over channel pairs: (a_i . b_j)^2
        return np.mean([[(a[i] @ b[j]) ** 2 for j in range(len(b))] for i in range(len(a))])

    ms, mt = maps(s), maps(t)
    expect = np.mean([k(ms[n], ms[n]) + k(mt[n], mt[n]) - 2 * k(ms[n], mt[n]) for n in range(2)])
    got = nst_loss(torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32))
    assert got.item() == pytest.approx(expect, rel=1e-5)


@pytest.mark.parametrize("feature_loss_kind", ["mse", "at", "nst"])
def test_alignkd_feature_loss_kinds_weighted_by_beta(feature_loss_kind):
    student, teacher = toy_pair()
    x, y = torch.tensor(X, dtype=torch.float32), torch.tensor(Y)
    t0, terms, _ = alignkd_loss(student, teacher, x, y, eta=0.0,
                                feature_loss_kind=feature_loss_kind)
    t1, _, _ = alignkd_loss(student, teacher, x, y, eta=1.0, feature_loss_kind=feature_loss_kind,
                            beta=2.0)
    feats = sum(terms[f"feat_{i}"].item() for i in range(1, 5))
    assert t1.item() - t0.item() == pytest.approx(2.0 * feats, rel=1e-4)


def _thin_pair(depth=18, teacher_depth=None):
    torch.manual_seed(0)
    student = resnet(depth, shortcut="none", width=4)
    teacher = freeze(resnet(teacher_depth or depth, shortcut="all", width=4))
    return student, teacher


@pytest.mark.parametrize("method", ["alignkd", "jointrd", "kd"])
def test_gradients_reach_every_student_stage_and_never_the_teacher(method):
    student, teacher = _thin_pair()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    fn = {"alignkd": lambda: alignkd_loss(student, teacher, x, y, eta=1.0),
          "jointrd": lambda: jointrd_loss(student, teacher, x, y, eta=1.0),
          "kd": lambda: kd_loss(student, teacher, x, y)}[method]
    total, _, _ = fn()
    total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    for stage in student.stages:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in stage.parameters())
    assert not teacher.training


def test_jointrd_hybrid_terms_send_gradient_through_the_teacher():
    """With eta > 0 the first student stage gets extra gradient via h_1..h_3."""
    student, teacher = _thin_pair()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    grads = []
    for eta in (0.0, 1.0):
        student.zero_grad()
        jointrd_loss(student, teacher, x, y, eta=eta)[0].backward()
        grads.append(student.conv1.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize(("depth", "teacher_depth"), [(18, 18), (34, 34), (18, 34)])
def test_batched_jointrd_equals_naive(depth, teacher_depth):
    student, teacher = _thin_pair(depth, teacher_depth)
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    s = student.stage_outputs(x)
    for a, b in zip(hybrid_logits(s, teacher), hybrid_logits_naive(s, teacher), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    results = []
    for batched in (True, False):
        student.zero_grad()
        total, terms, _ = jointrd_loss(student, teacher, x, y, eta=0.8, lam=0.01, batched=batched)
        total.backward()
        results.append((total.detach(), terms, [p.grad.clone() for p in student.parameters()]))
    (t1, terms1, g1), (t2, terms2, g2) = results
    torch.testing.assert_close(t1, t2, rtol=1e-5, atol=1e-6)
    for k in terms1:
        torch.testing.assert_close(terms1[k], terms2[k], rtol=1e-4, atol=1e-6)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_cross_depth_alignkd_runs_on_equal_stage_shapes():
    student, teacher = _thin_pair(18, 34)
    total, terms, logits = alignkd_loss(student, teacher, torch.randn(2, 3, 32, 32),
                                        torch.tensor([1, 2]), eta=1.0)
    assert torch.isfinite(total) and logits.shape == (2, 10) and len(terms) == 6


@pytest.mark.parametrize(
    ("call", "name"),
    [(lambda s, t, x, y: alignkd_loss(s, t, x, y, alpha=1.5, eta=1.0), "alpha"),
     (lambda s, t, x, y: alignkd_loss(s, t, x, y, alpha=-0.1, eta=1.0), "alpha"),
     (lambda s, t, x, y: alignkd_loss(s, t, x, y, eta=-1.0), "eta"),
     (lambda s, t, x, y: alignkd_loss(s, t, x, y, eta=1.0, temperature=0.0), "temperature"),
     (lambda s, t, x, y: alignkd_loss(s, t, x, y, eta=float("nan")), "eta"),
     (lambda s, t, x, y: alignkd_loss(s, t, x, y, eta=1.0, feature_loss_kind="l1"),
      "feature_loss"),
     (lambda s, t, x, y: jointrd_loss(s, t, x, y, eta=1.0, lam=-0.001), "lam"),
     (lambda s, t, x, y: jointrd_loss(s, t, x, y, eta=-0.5), "eta"),
     (lambda s, t, x, y: kd_loss(s, t, x, y, temperature=-1.0), "temperature")],
)
def test_bad_hyperparameters_name_the_parameter_and_range(call, name):
    student, teacher = toy_pair()
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        call(student, teacher, torch.tensor(X, dtype=torch.float32), torch.tensor(Y))


def test_unfrozen_teacher_is_refused():
    student, _ = toy_pair()
    with pytest.raises(ValueError, match="freeze"):
        alignkd_loss(student, Toy(T_MATS, T_FC, T_B), torch.zeros(1, 2, 2, 2),
                     torch.tensor([0]), eta=1.0)


def test_eta_cosine_boundaries_match_the_paper_default():
    eta = EtaSchedule()  # cosine 1.0 -> 0.5 over 60 epochs
    assert eta(0) == pytest.approx(1.0)
    assert eta(30) == pytest.approx(0.75)
    assert eta(15) == pytest.approx(0.5 + 0.25 * (1 + math.cos(math.pi / 4)))
    assert eta(59) > 0.5
    assert eta(60) == pytest.approx(0.5) and eta(199) == pytest.approx(0.5)


def test_eta_linear_and_constant_boundaries():
    lin = EtaSchedule("linear", start=2.0, end=0.0, epochs=10)
    assert [lin(e) for e in (0, 5, 10, 11)] == pytest.approx([2.0, 1.0, 0.0, 0.0])
    const = EtaSchedule("constant", start=0.3, end=0.0, epochs=5)
    assert [const(e) for e in (0, 5, 100)] == pytest.approx([0.3] * 3)
    assert EtaSchedule("cosine", 1.0, 0.2, epochs=0)(0) == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"kind": "step"}, "kind"), ({"start": -1.0}, "start"), ({"end": float("inf")}, "end"),
     ({"epochs": -3}, "epochs"), ({"epochs": 2.5}, "epochs")],
)
def test_eta_schedule_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EtaSchedule(**kwargs)
