"""JointRD as its authors released it (losses/released.py), and the KD baseline's defaults.

The OFD pieces are checked against independent computations: the margin against numerical
integration, the distance against a sum worked by hand and the released three-case form,
and the whole objective against its formula recomputed from paths run one by one.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import integrate, stats
from torch import nn

from losses import OBJECTIVES, OWN_MODULES, hybrid_logits_naive
from losses.released import (
    make_connectors,
    ofd_distance,
    ofd_margin,
    released_loss,
    stage4_pre_relu,
)
from models import freeze, resnet
from tuning.run.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tuning.run.config import METHOD_DEFAULTS, ConfigError, RunConfig
from tuning.run.step import make_optimizer
from tuning.run.trainer import CHECKPOINT_NAME, objective_kwargs, train
from tuning.search.space import parse_space, trial_values
from tuning.search.tracking import run_params

# ---------------------------------------------------------------------------- the margin


def _bn(weight, bias) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(len(weight))
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(weight))
        bn.bias.copy_(torch.tensor(bias))
    return bn


def _mean_below_zero(beta: float, gamma: float) -> float:
    """E[x | x < 0] for x ~ N(beta, gamma^2), by integrating the density numerically."""
    density = stats.norm(loc=beta, scale=gamma).pdf
    # Integrate over [beta - 40 gamma, 0]: the mass below that is far under float64's epsilon.
    low = min(beta, 0.0) - 40 * gamma
    mass, _ = integrate.quad(density, low, 0.0, epsabs=0, epsrel=1e-12, limit=200)
    first, _ = integrate.quad(lambda x: x * density(x), low, 0.0, epsabs=0, epsrel=1e-12,
                              limit=200)
    return first / mass


# (beta, gamma): mass below zero from 0.9987 down to just above 1e-3; negative gammas are
# the BatchNorm's sign, which the margin ignores (it takes |weight|).
CLOSED = [(0.0, 1.0), (0.5, 1.0), (-1.0, 0.5), (2.0, 1.5), (1.3, -0.7), (-3.0, 0.1),
          (3.0, 1.0), (0.25, 2.0)]


def test_margin_is_the_mean_of_the_negative_part_by_numerical_integration():
    beta = [b for b, _ in CLOSED]
    gamma = [g for _, g in CLOSED]
    got = ofd_margin(_bn(gamma, beta))
    assert got.dtype == torch.float32 and got.shape == (len(CLOSED),)
    for (b, g), m in zip(CLOSED, got.tolist(), strict=True):
        assert stats.norm.cdf(-b / abs(g)) > 1e-3  # the closed form's branch
        assert m == pytest.approx(_mean_below_zero(b, abs(g)), rel=1e-6, abs=1e-7), (b, g)
        assert m < 0


def test_margin_is_minus_three_gamma_where_almost_no_mass_is_below_zero():
    # Phi(-beta/gamma) <= 1e-3: 3.2 sigma (6.9e-4), 4 sigma, 10 sigma, a negative weight.
    cases = [(3.2, 1.0), (4.0, 0.5), (10.0, 2.0), (5.0, -1.5)]
    got = ofd_margin(_bn([g for _, g in cases], [b for b, _ in cases])).tolist()
    for (b, g), m in zip(cases, got, strict=True):
        assert stats.norm.cdf(-b / abs(g)) <= 1e-3
        assert m == pytest.approx(-3 * abs(g), rel=1e-6)


def test_margin_of_a_zero_weight_channel_is_its_point_mass():
    got = ofd_margin(_bn([0.0, 0.0], [-0.8, 0.5])).tolist()
    assert got[0] == pytest.approx(-0.8) and got[1] == 0.0


# -------------------------------------------------------------------------- the distance


def test_distance_by_hand():
    """Two images, two channels of 1x2, margins -1 and -0.5.

    Image 1, channel 0: t = -2 (below the margin: t' = -1), s = 0 > -1: (0 + 1)^2 = 1;
                        t = 0.5 > 0, s = 1.5: (1.5 - 0.5)^2 = 1.
             channel 1: t = -0.25 (above the margin, <= 0), s = 0.25 > t: (0.5)^2 = 0.25;
                        t = 2 > 0 counts even though s = -1 is below: (-1 - 2)^2 = 9.
    Image 2: every position has s <= t' <= 0, so nothing counts: s = -3 below t' = -1;
             s = -0.75 below t = -0.5; s = -0.6 below t' = -0.5; s = -0.1 below t = 0.
    Sum 11.25 over a batch of 2: 5.625.
    """
    s = torch.tensor([[[[0.0, 1.5]], [[0.25, -1.0]]], [[[-3.0, -0.75]], [[-0.6, -0.1]]]])
    t = torch.tensor([[[[-2.0, 0.5]], [[-0.25, 2.0]]], [[[-2.0, -0.5]], [[-1.0, 0.0]]]])
    margin = torch.tensor([-1.0, -0.5])
    assert s.shape == (2, 2, 1, 2)
    assert ofd_distance(s, t, margin).item() == pytest.approx(5.625)
    assert ofd_distance(s[:1], t[:1], margin).item() == pytest.approx(11.25)  # image 1 alone


def _released_distance(s: np.ndarray, t: np.ndarray, m: np.ndarray) -> float:
    """The released code's three-case form, in float64."""
    m = m.reshape(1, -1, 1, 1)
    loss = ((s - m) ** 2 * ((s > m) & (t <= m)) + (s - t) ** 2 * ((s > t) & (t > m) & (t <= 0))
            + (s - t) ** 2 * (t > 0))
    return float(np.abs(loss).sum() / s.shape[0])


def test_distance_equals_the_released_three_case_form():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(5, 7, 3, 3, generator=g), torch.randn(5, 7, 3, 3, generator=g)
    margin = -torch.rand(7, generator=g) * 2
    want = _released_distance(s.double().numpy(), t.double().numpy(), margin.double().numpy())
    assert ofd_distance(s, t, margin).item() == pytest.approx(want, rel=1e-6)


# ------------------------------------------------------------------------- the objective


def _randomize_batchnorm(net: nn.Module, seed: int) -> None:
    """Affine and running statistics away from their defaults, so every BN matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.empty(n).uniform_(0.5, 1.5, generator=g)
                               * torch.where(torch.rand(n, generator=g) < 0.2, -1.0, 1.0))
                m.bias.copy_(torch.randn(n, generator=g) * 0.8)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.empty(n).uniform_(0.5, 1.5, generator=g))


def _pair(depth: int = 18, width: int = 4, shortcut: str = "none"):
    torch.manual_seed(0)
    student = resnet(depth, shortcut=shortcut, width=width)
    teacher = resnet(depth, shortcut="all", width=width)
    _randomize_batchnorm(teacher, 1)
    student.train()
    return student, freeze(teacher)


def _batch(n: int = 6, size: int = 16):
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def _last_block_pre_relu(layer4: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer4's output before its last ReLU, read by hooks off its own forward: the last
    block's bn2 output, plus its input where the block adds a shortcut (an identity there)."""
    seen = {}
    blk = layer4[-1]
    # Copies: the block's in-place ReLU would overwrite a Plain block's bn2 output.
    hooks = [blk.bn2.register_forward_hook(
                 lambda _m, _i, out: seen.__setitem__("bn2", out.clone())),
             blk.register_forward_pre_hook(
                 lambda _m, inp: seen.__setitem__("in", inp[0].clone()))]
    try:
        out = layer4(x)
    finally:
        for h in hooks:
            h.remove()
    pre = seen["bn2"] + seen["in"] if blk.add_shortcut else seen["bn2"]
    assert blk.downsample is None and torch.equal(F.relu(pre), out)
    return pre


def _numpy_margin(bn: nn.BatchNorm2d) -> np.ndarray:
    gamma = np.abs(bn.weight.detach().double().numpy())
    beta = bn.bias.detach().double().numpy()
    tail = stats.norm.cdf(-beta / gamma)
    closed = beta - gamma * stats.norm.pdf(beta / gamma) / tail
    return np.where(tail > 1e-3, closed, -3 * gamma)


@pytest.mark.parametrize(("depth", "eta", "dis_weight"), [(18, 1.0, 1e-3), (18, 0.6, 0.05),
                                                          (34, 0.8, 1e-2)])
def test_released_loss_equals_its_formula_from_paths_run_one_by_one(depth, eta, dis_weight):
    student, teacher = _pair(depth)
    connectors = make_connectors(student, teacher)
    x, y = _batch()
    total, terms, logits = released_loss(student, teacher, x, y, connectors=connectors,
                                         eta=eta, dis_weight=dis_weight)
    with torch.no_grad():
        # Every path separately: s_i through the teacher's remaining stages.
        s = student.stage_outputs(x)
        t_stages = teacher.stages
        feats, h = [], []
        for i in range(3):
            f = s[i]
            for stage in t_stages[i + 1:3]:
                f = stage(f)
            pre = _last_block_pre_relu(t_stages[3], f)
            feats.append(pre)
            h.append(teacher.head(F.relu(pre)))
        naive = hybrid_logits_naive(s, teacher)
        for i in range(3):
            assert torch.allclose(h[i], naive[i], rtol=1e-5, atol=1e-5)
        p_s = _last_block_pre_relu(student.stages[3], s[2])
        feats.append(p_s)
        assert torch.allclose(logits, student.head(F.relu(p_s)), rtol=1e-5, atol=1e-6)
        assert torch.allclose(logits, student(x), rtol=1e-5, atol=1e-6)
        t = x
        for stage in t_stages[:3]:
            t = stage(t)
        p_t = _last_block_pre_relu(t_stages[3], t).double().numpy()
        margin = _numpy_margin(t_stages[3][-1].bn2)
        dist = [_released_distance(conn(f).double().numpy(), p_t, margin)
                for conn, f in zip(connectors, feats, strict=True)]
    ce = F.cross_entropy(logits, y).item()
    hybrid_ce = [F.cross_entropy(h_i, y).item() for h_i in h]
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-6)
    for i in range(3):
        assert terms[f"hybrid_ce_{i + 1}"].item() == pytest.approx(hybrid_ce[i], rel=1e-5)
    for i in range(4):
        assert terms[f"ofd_{i + 1}"].item() == pytest.approx(dist[i], rel=1e-5)
        assert dist[i] > 0
    want = 0.25 * (ce + eta * sum(hybrid_ce)) + 0.25 * dis_weight * (eta * sum(dist[:3])
                                                                      + dist[3])
    assert total.item() == pytest.approx(want, rel=1e-5)
    assert set(terms) == {"ce", "hybrid_ce_1", "hybrid_ce_2", "hybrid_ce_3", "ofd_1", "ofd_2",
                          "ofd_3", "ofd_4"}


def test_total_from_its_own_terms_and_the_student_term_is_not_scaled_by_eta():
    student, teacher = _pair()
    connectors = make_connectors(student, teacher)
    x, y = _batch()

    def loss(eta, dis_weight):
        total, terms, _ = released_loss(student, teacher, x, y, connectors=connectors, eta=eta,
                                        dis_weight=dis_weight)
        return total.item(), {k: v.item() for k, v in terms.items()}

    total, terms = loss(0.7, 2e-3)
    hce = sum(terms[f"hybrid_ce_{i}"] for i in (1, 2, 3))
    ofd = sum(terms[f"ofd_{i}"] for i in (1, 2, 3))
    assert total == pytest.approx(0.25 * (terms["ce"] + 0.7 * hce)
                                  + 0.25 * 2e-3 * (0.7 * ofd + terms["ofd_4"]), rel=1e-6)
    # eta = 0 leaves the student's own two terms, D_4 included.
    total, terms = loss(0.0, 2e-3)
    assert total == pytest.approx(0.25 * terms["ce"] + 0.25 * 2e-3 * terms["ofd_4"], rel=1e-6)


def test_dis_weight_zero_leaves_the_cross_entropies():
    student, teacher = _pair()
    connectors = make_connectors(student, teacher)
    x, y = _batch()
    total, terms, _ = released_loss(student, teacher, x, y, connectors=connectors, eta=0.8,
                                    dis_weight=0.0)
    hce = sum(terms[f"hybrid_ce_{i}"].item() for i in (1, 2, 3))
    assert total.item() == pytest.approx(0.25 * (terms["ce"].item() + 0.8 * hce), rel=1e-6)
    assert all(terms[f"ofd_{i}"].item() > 0 for i in (1, 2, 3, 4))  # computed, weighted 0


def test_gradients_reach_the_connectors_and_the_student_never_the_teacher():
    student, teacher = _pair()
    connectors = make_connectors(student, teacher)
    x, y = _batch()
    total, _, _ = released_loss(student, teacher, x, y, connectors=connectors, eta=1.0,
                                dis_weight=1e-3)
    total.backward()
    for name, p in connectors.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for i, stage in enumerate(student.stages):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stage.parameters()), i
    assert student.fc.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_hybrid_features_reach_the_student_through_the_frozen_teacher():
    """D_1 alone, the feature term of the path from s_1, trains the student's stage 1: its
    gradient crosses the frozen teacher's stages 2-4 and the connector."""
    student, teacher = _pair()
    connectors = make_connectors(student, teacher)
    x, y = _batch()
    _, terms, _ = released_loss(student, teacher, x, y, connectors=connectors, eta=1.0)
    # Backward through D_1 alone: rebuild it as the loss does, from the path of s_1.
    s1 = student.stages[0](x)
    f = s1
    for stage in teacher.stages[1:3]:
        f = stage(f)
    d1 = ofd_distance(connectors[0](stage4_pre_relu(teacher, f)),
                      stage4_pre_relu(teacher, teacher.stages[2](teacher.stages[1](
                          teacher.stages[0](x)))).detach(),
                      ofd_margin(teacher.layer4[-1].bn2))
    assert d1.item() == pytest.approx(terms["ofd_1"].item(), rel=1e-5)
    d1.backward()
    assert student.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_connectors_map_each_path_to_the_teacher_width_on_the_students_device():
    student, teacher = _pair()
    connectors = make_connectors(student, teacher)
    assert len(connectors) == 4
    for conn in connectors:
        conv, bn = conn
        assert conv.kernel_size == (1, 1) and conv.bias is None
        assert conv.in_channels == conv.out_channels == bn.num_features == 32  # width 4 x 8
        # OFD's init: N(0, 2 / fan_out); BN at 1 and 0.
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 32), rel=0.15)
        assert torch.equal(bn.weight, torch.ones(32)) and torch.equal(bn.bias, torch.zeros(32))
    assert OWN_MODULES["jointrd_released"] is make_connectors
    assert OBJECTIVES["jointrd_released"] is released_loss


def test_bad_inputs_name_the_problem():
    student, teacher = _pair()
    connectors = make_connectors(student, teacher)
    x, y = _batch()
    with pytest.raises(ValueError, match="dis_weight must be in"):
        released_loss(student, teacher, x, y, connectors=connectors, eta=1.0, dis_weight=-1.0)
    with pytest.raises(ValueError, match="eta must be in"):
        released_loss(student, teacher, x, y, connectors=connectors, eta=-0.5)
    with pytest.raises(ValueError, match="need 4 connectors"):
        released_loss(student, teacher, x, y, connectors=connectors[:3], eta=1.0)
    with pytest.raises(ValueError, match="teacher must be frozen"):
        released_loss(student, teacher.train(), x, y, connectors=connectors, eta=1.0)
    with pytest.raises(ConfigError, match="dis_weight must be a number >= 0.0"):
        RunConfig(method="jointrd_released", dis_weight=-1e-3)


def test_compiled_objective_takes_the_connectors_and_does_not_recompile_as_eta_changes():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    student, teacher = _pair()
    connectors = make_connectors(student, teacher).eval()  # the same BN numbers for both
    compiled = torch.compile(released_loss, backend="aot_eager")
    x, y = _batch(8)
    cfg = RunConfig(method="jointrd_released", teacher="t.pt")
    for epoch in (0, 15, 30, 45):
        hp = objective_kwargs(cfg, epoch)
        eager, _, _ = released_loss(student, teacher, x, y, connectors=connectors, **hp)
        total, _, _ = compiled(student, teacher, x, y, connectors=connectors, **hp)
        assert total.item() == pytest.approx(eager.item(), rel=1e-5)
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    torch._dynamo.reset()


# --------------------------------------------------------------------- the trainer's run

THIN = dict(dataset="digits", width=4, batch_size=64, device="cpu", checkpoint_interval_s=0)


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    train(RunConfig(method="ce", shortcut="all", epochs=1, **THIN), out, quiet=True)
    return out / "model.pt"


class Stop(Exception):
    pass


def test_training_owns_the_connectors_and_resume_restores_them(tmp_path, teacher_path):
    cfg = RunConfig(method="jointrd_released", teacher=str(teacher_path), epochs=2,
                    dis_weight=1e-2, **THIN)
    heard = []
    full = train(cfg, tmp_path / "full", quiet=True, evaluate_test=False,
                 listeners=[lambda m, _: heard.append(m)])
    assert [m["epoch"] for m in heard] == [1, 2] and math.isfinite(full["train_loss"])
    assert {"loss_ce", "loss_hybrid_ce_1", "loss_hybrid_ce_3", "loss_ofd_1", "loss_ofd_4"} <= \
        set(heard[0])
    assert heard[0]["eta"] == pytest.approx(1.0)

    # model.pt is the student alone; the checkpoint also holds the trained connectors.
    model = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    student = resnet(18, shortcut="none", width=4)
    assert set(model["state_dict"]) == set(student.state_dict())
    state = load_checkpoint(tmp_path / "full" / CHECKPOINT_NAME)
    fresh = make_connectors(student, student)
    assert set(state["connectors"]) == set(fresh.state_dict())
    assert not torch.equal(state["connectors"]["0.0.weight"], fresh.state_dict()["0.0.weight"])
    assert state["connectors"]["3.1.num_batches_tracked"].item() > 0  # BN trained in train mode
    # The optimizer holds the connectors in the weight-decayed group, with momentum.
    decayed = state["optimizer"]["param_groups"][0]
    n_conn = len(list(fresh.parameters()))
    n_student = sum(1 for _ in student.parameters())
    assert decayed["weight_decay"] == cfg.weight_decay
    assert len(decayed["params"]) == n_student + n_conn
    assert len(state["optimizer"]["state"]) == n_student + n_conn

    def stop_after_one(metrics, _):
        if metrics["epoch"] == 1:
            raise Stop

    cut = tmp_path / "cut"
    with pytest.raises(Stop):
        train(cfg, cut, listeners=[stop_after_one], quiet=True)
    mid = load_checkpoint(cut / CHECKPOINT_NAME)
    assert mid["epoch"] == 1 and "connectors" in mid
    resumed = train(cfg, cut, quiet=True, evaluate_test=False, resume_from=cut / CHECKPOINT_NAME)
    assert resumed["train_loss"] == full["train_loss"] and resumed["val_acc"] == full["val_acc"]
    a = model["state_dict"]
    b = torch.load(cut / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    after = load_checkpoint(cut / CHECKPOINT_NAME)["connectors"]
    assert all(torch.equal(state["connectors"][k], after[k]) for k in after)

    # A checkpoint without the connectors cannot resume this run: it would start them afresh.
    mid.pop("connectors")
    lacking = tmp_path / "lacking" / CHECKPOINT_NAME
    lacking.parent.mkdir()
    save_checkpoint(mid, lacking)
    with pytest.raises(CheckpointError, match="does not fit this run.*connectors"):
        train(cfg, lacking.parent, quiet=True, resume_from=lacking)


def test_optimizer_without_connectors_is_unchanged():
    student = resnet(18, shortcut="none", width=4)
    cfg = RunConfig(method="alignkd")
    plain, _ = make_optimizer(student, cfg, 10, torch.device("cpu"))
    assert [len(g["params"]) for g in plain.param_groups] == [len(list(student.parameters()))]
    conns = make_connectors(student, student)
    both, _ = make_optimizer(student, cfg, 10, torch.device("cpu"), connectors=conns)
    assert both.param_groups[0]["params"][-len(list(conns.parameters())):] == \
        list(conns.parameters())


# ------------------------------------------------------------ per-method shared defaults


def test_kd_defaults_are_the_cifar_standard_and_alignkd_keeps_the_papers():
    kd = RunConfig(method="kd", teacher="t.pt")
    assert (kd.alpha, kd.temperature) == (None, None)  # left to the method
    assert (kd.resolved("alpha"), kd.resolved("temperature")) == (0.9, 4.0)
    assert objective_kwargs(kd, 0) == {"alpha": 0.9, "temperature": 4.0}
    align = RunConfig(method="alignkd", teacher="t.pt")
    assert (align.resolved("alpha"), align.resolved("temperature")) == (0.5, 1.0)
    hp = objective_kwargs(align, 0)
    assert (hp["alpha"], hp["temperature"]) == (0.5, 1.0)
    assert METHOD_DEFAULTS == {"kd": {"alpha": 0.9, "temperature": 4.0},
                               "alignkd": {"alpha": 0.5, "temperature": 1.0}}
    # A value given is the value used.
    mine = RunConfig(method="kd", alpha=0.3, temperature=2.0)
    assert objective_kwargs(mine, 0) == {"alpha": 0.3, "temperature": 2.0}
    assert RunConfig(method="jointrd").resolved("alpha") is None


def test_each_method_logs_what_it_uses_at_the_values_it_used():
    kd = run_params(RunConfig(method="kd", teacher="t.pt"))
    assert (kd["alpha"], kd["temperature"]) == (0.9, 4.0)
    assert not {"lam", "dis_weight", "eta_kind"} & set(kd)
    align = run_params(RunConfig(method="alignkd", teacher="t.pt", temperature=3.0))
    assert (align["alpha"], align["temperature"]) == (0.5, 3.0)
    rel = run_params(RunConfig(method="jointrd_released", teacher="t.pt", dis_weight=0.0))
    assert rel["dis_weight"] == 0.0
    assert {"eta_kind", "eta_start", "eta_end", "eta_epochs"} <= set(rel)
    assert not {"alpha", "temperature", "lam", "beta"} & set(rel)
    assert objective_kwargs(RunConfig(method="jointrd_released", dis_weight=0.02), 0) == {
        "eta": 1.0, "dis_weight": 0.02}


def test_a_space_searches_kd_alpha_and_temperature():
    space = parse_space("fixed: {method: kd}\nparams:\n"
                        "  alpha: {type: float, low: 0.5, high: 1.0}\n"
                        "  temperature: {type: float, low: 1.0, high: 8.0, log: true}\n",
                        source="kd.yaml", name="kd")
    assert [p.name for p in space.params] == ["alpha", "temperature"]
    cfg = RunConfig(**trial_values(space.with_fixed({"teacher": "t.pt"}),
                                   {"alpha": 0.7, "temperature": 6.0}))
    assert objective_kwargs(cfg, 0) == {"alpha": 0.7, "temperature": 6.0}
    with pytest.raises(ConfigError, match="alpha must be a number >= 0.0 and <= 1.0"):
        parse_space("fixed: {method: kd}\nparams:\n  alpha: {type: float, low: 0.5, high: 2}\n",
                    source="kd.yaml", name="kd")
