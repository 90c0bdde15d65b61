"""Search spaces: every bundled file loads and samples valid configs; bad files are named."""

import optuna
import pytest

from tuning.config import RunConfig
from tuning.search.space import (
    SpaceError,
    SpaceSampler,
    available_spaces,
    grid_points,
    load_space,
    parse_space,
    trial_values,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def sample_configs(space, n=30, seed=0):
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
    sampler = SpaceSampler(space)
    out = []
    for _ in range(n):
        trial = study.ask()
        sampler(trial)
        out.append(dict(trial.params))
        study.tell(trial, 0.5)
    return out


def test_bundled_spaces_are_the_four_the_product_names():
    assert set(available_spaces()) >= {"alignkd", "jointrd", "compare", "paper"}


@pytest.mark.parametrize("name", ["alignkd", "jointrd", "compare"])
def test_each_space_samples_valid_run_configs(name):
    space = load_space(name)
    for sample in sample_configs(space):
        cfg = RunConfig(**trial_values(space, sample, {"epochs": 200, "teacher": "t.pt"}))
        assert cfg.dataset in ("cifar10", "cifar100", "imagewoof") and cfg.depth in (18, 34)
        assert cfg.eta_end <= cfg.eta_start  # the schedule decays
        assert 20 <= cfg.eta_epochs <= 120  # eta_span 0.1..0.6 of 200 epochs
        assert cfg.shortcut in ("none", "downsample")


def test_alignkd_space_searches_what_the_issue_lists():
    names = {p.name for p in load_space("alignkd").params}
    assert {"alpha", "temperature", "eta_kind", "eta_start", "eta_end", "eta_span", "lr",
            "weight_decay", "dataset", "depth", "feature_loss", "teacher_depth"} <= names


def test_alignkd_samples_every_feature_loss_and_cross_depth_pairs():
    samples = sample_configs(load_space("alignkd"), n=40)
    assert {s["feature_loss"] for s in samples} == {"mse", "at", "nst"}
    assert any(s["teacher_depth"] == 34 and s["depth"] == 18 for s in samples)


def test_jointrd_space_searches_the_original_student_options():
    samples = sample_configs(load_space("jointrd"), n=40)
    assert {s["shortcut"] for s in samples} == {"none", "downsample"}
    assert {s["dirac"] for s in samples} == {False, True}


def test_teacher_plan_covers_every_dataset_and_teacher_depth():
    from tuning.search.teachers import plan_teachers

    space = load_space("alignkd")
    plan = plan_teachers(space, {"seed": 0, "width": 64}, teacher_epochs=200)
    assert sorted((r.config.dataset, r.config.depth) for r in plan) == sorted(
        (d, n) for d in ("cifar10", "cifar100", "imagewoof") for n in (18, 34))
    assert all(r.config.shortcut == "all" and r.config.method == "ce" for r in plan)
    smoke = plan_teachers(space.without({"dataset", "depth"}),
                          {"dataset": "digits", "depth": 18, "width": 8}, teacher_epochs=4)
    assert sorted(r.config.depth for r in smoke) == [18, 34]


def test_compare_parameters_are_conditional_on_the_method():
    samples = sample_configs(load_space("compare"), n=40)
    methods = {s["method"] for s in samples}
    assert methods == {"alignkd", "jointrd"}
    for s in samples:
        if s["method"] == "alignkd":
            assert "alpha" in s and "temperature" in s and "lam" not in s
        else:
            assert "lam" in s and "alpha" not in s and "temperature" not in s
            assert 1e-4 <= s["lam"] <= 1e-1


def test_paper_space_is_the_papers_grid():
    space = load_space("paper")
    points = grid_points(space)
    assert space.grid_size == 12 and len(points) == 12
    assert {(p["method"], p["dataset"], p["depth"]) for p in points} == {
        (m, d, n) for m in ("alignkd", "jointrd") for d in ("cifar10", "cifar100", "imagewoof")
        for n in (18, 34)}
    cfg = RunConfig(**trial_values(space, points[0], {"teacher": "t.pt"}))
    assert (cfg.alpha, cfg.lam, cfg.eta_start, cfg.eta_end, cfg.eta_epochs, cfg.epochs) == (
        0.5, 0.001, 1.0, 0.5, 60, 200)


def test_overrides_remove_parameters_from_the_search():
    space = load_space("alignkd").without({"dataset", "depth"})
    assert not {"dataset", "depth"} & {p.name for p in space.params}


def test_space_sampler_pickles_with_its_space():
    import pickle

    sampler = pickle.loads(pickle.dumps(SpaceSampler(load_space("compare"))))
    assert sampler.space.name == "compare"


GOOD = "fixed: {method: alignkd}\nparams:\n  alpha: {type: float, low: 0.0, high: 1.0}\n"


@pytest.mark.parametrize(("text", "match"), [
    ("params: [alpha\n", "line 2: not valid YAML"),
    ("- 1\n- 2\n", "must be a mapping"),
    ("fixed: {method: alignkd}\nparamz: {}\n", "paramz: unknown top-level key"),
    ("params:\n  alfa: {type: float, low: 0, high: 1}\n", "params.alfa: unknown key"),
    ("params:\n  alpha: {type: float, low: 0.0, high: 1.5}\n",
     "params.alpha.high: alpha must be a number >= 0.0 and <= 1.0; got 1.5"),
    ("params:\n  lam: {type: float, low: -0.1, high: 0.1}\n", "params.lam.low: lam must be"),
    ("params:\n  lr: {type: float, low: 0.1, high: 0.01}\n", "low (0.1) is above high (0.01)"),
    ("params:\n  lr: {type: float, low: 0.0, high: 0.1, log: true}\n",
     "params.lr.low: lr must be a number > 0.0"),
    ("params:\n  dataset: {type: choice, values: []}\n", "params.dataset.values: must be a non"),
    ("params:\n  dataset: {type: choice, values: [mnist]}\n", "dataset must be one of"),
    ("params:\n  alpha: {type: gaussian}\n", "params.alpha.type: must be float, int or choice"),
    ("params:\n  alpha: {type: float, low: 0, high: 1, step: 2}\n", "params.alpha.step: unknown"),
    ("fixed: {eta_start: 0.5, eta_end: 1.0}\nparams:\n  lr: {type: float, low: 0.01, high: 0.1}\n",
     "eta_end: the schedule's end (1.0) is beyond its start"),
    ("params:\n  eta_start: {type: float, low: 0.1, high: 0.4}\n"
     "  eta_end: {type: float, low: 0.5, high: 0.9}\n", "beyond its start"),
    ("fixed: {method: alignkd}\n", "searches nothing"),
    ("fixed: {alpha: 0.5}\nparams:\n  alpha: {type: float, low: 0, high: 1}\n",
     "both fixed and searched"),
    ("params:\n  lam: {type: float, low: 0.001, high: 0.1, when: {method: jointrd}}\n",
     "when.method: must name a choice parameter listed before"),
    ("params:\n  eta_span: {type: float, low: 0.1, high: 1.5}\n", "fraction in [0, 1]"),
])
def test_malformed_space_errors_name_file_key_and_rule(text, match):
    with pytest.raises(SpaceError, match="my.yaml: ") as err:
        parse_space(text, source="my.yaml", name="my")
    assert match in str(err.value)


def test_a_user_space_file_loads_by_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(GOOD)
    assert load_space(str(path)).name == "mine"
    with pytest.raises(SpaceError, match="unknown space 'nope'; bundled spaces are"):
        load_space("nope")
    with pytest.raises(SpaceError, match="does not exist"):
        load_space(str(tmp_path / "missing.yaml"))
