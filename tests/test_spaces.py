"""Search spaces: every bundled file loads and samples valid configs; bad files are named."""

from pathlib import Path

import optuna
import pytest

from tuning.run.config import RunConfig
from tuning.search.space import (
    SpaceError,
    SpaceSampler,
    available_spaces,
    load_space,
    parse_space,
    trial_values,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def sample_configs(space, n=30, seed=0):
    """n samples per cell, each with its cell's values, as the search's studies ask them."""
    sampler = SpaceSampler(space)
    out = []
    for cell in space.cells():
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
        for _ in range(n):
            trial = study.ask()
            out.append({**cell.as_dict(), **sampler.sample(trial, cell)})
            study.tell(trial, 0.5)
    return out


def test_bundled_spaces_are_the_four_the_product_names():
    assert set(available_spaces()) >= {"alignkd", "jointrd", "compare", "paper"}


@pytest.mark.parametrize("name", ["alignkd", "jointrd", "compare"])
def test_each_space_samples_valid_run_configs(name):
    space = load_space(name)
    for sample in sample_configs(space):
        cfg = RunConfig(**trial_values(space.with_fixed({"epochs": 200, "teacher": "t.pt"}),
                                       sample))
        assert cfg.dataset in ("cifar10", "cifar100", "imagewoof") and cfg.depth in (18, 34)
        assert cfg.eta_end <= cfg.eta_start  # the schedule decays
        assert 20 <= cfg.eta_epochs <= 120  # eta_span 0.1..0.6 of 200 epochs
        assert cfg.shortcut in ("none", "downsample")


def test_alignkd_space_searches_what_the_issue_lists():
    space = load_space("alignkd")
    assert {"alpha", "temperature", "eta_kind", "eta_start", "eta_end", "eta_span", "lr",
            "weight_decay", "feature_loss"} <= {p.name for p in space.params}
    # A data set or a depth is never a hyperparameter: the search runs across them.
    assert space.dims == ("dataset", "depth") and len(space.cells()) == 6


def test_compare_runs_each_method_in_cells_of_its_own():
    space = load_space("compare")
    assert space.dims == ("method", "dataset", "depth") and len(space.cells()) == 12
    assert "method" not in {p.name for p in space.params}


EXCLUDING = """\
across:
  method: [alignkd, kd, ce]
  dataset: [cifar10, cifar100]
exclude:
  - {method: ce, dataset: cifar100}
  - {method: [kd, ce], dataset: cifar10}
params:
  lr: {type: float, low: 0.01, high: 0.1}
"""


def test_exclude_leaves_out_exactly_the_matching_cells():
    space = parse_space(EXCLUDING, source="x.yaml", name="x")
    # 3 x 2 combinations; ce on cifar100, kd and ce on cifar10 are left out.
    assert [c.key for c in space.cells()] == [
        "method=alignkd,dataset=cifar10", "method=alignkd,dataset=cifar100",
        "method=kd,dataset=cifar100"]


def test_exclude_follows_dimensions_fixed_with_set():
    space = parse_space(EXCLUDING, source="x.yaml", name="x")
    assert [c.key for c in space.with_fixed({"dataset": "cifar100"}).cells()] == [
        "method=alignkd", "method=kd"]
    assert [c.key for c in space.with_fixed({"method": "kd"}).cells()] == ["dataset=cifar100"]
    assert [c.key for c in space.with_fixed({"method": "alignkd"}).cells()] == [
        "dataset=cifar10", "dataset=cifar100"]
    with pytest.raises(SpaceError, match="with --set method=ce, dataset=cifar10 every cell is "
                                         "excluded"):
        space.with_fixed({"method": "ce", "dataset": "cifar10"})


def test_set_may_not_move_the_method_or_a_when_setting_off_the_space():
    """The method, and any setting a parameter's `when` names, decide which parameters are
    searched: --set may narrow them to one of the space's values, never leave them; the data
    set and the depth, which no parameter depends on, may take any value."""
    space = parse_space(EXCLUDING.replace("lr: {type: float, low: 0.01, high: 0.1}",
                                          "lr: {type: float, low: 0.01, high: 0.1, "
                                          "when: {dataset: cifar10}}"),
                        source="x.yaml", name="x")
    assert [c.key for c in space.with_fixed({"method": "kd"}).cells()] == ["dataset=cifar100"]
    with pytest.raises(SpaceError, match=r"--set method=jointrd: space x searches its "
                                         r"parameters for method alignkd, kd, ce only"):
        space.with_fixed({"method": "jointrd"})
    with pytest.raises(SpaceError, match=r"--set dataset=digits: .* for dataset cifar10, "
                                         r"cifar100 only"):
        space.with_fixed({"dataset": "digits"})  # lr's `when` names the data set here
    fixed = load_space("alignkd")  # method fixed to alignkd
    with pytest.raises(SpaceError, match="for method alignkd only"):
        fixed.with_fixed({"method": "kd"})
    assert fixed.with_fixed({"method": "alignkd", "dataset": "digits", "depth": 34}).cells()
    assert load_space("methods").with_fixed({"depth": 34, "dataset": "npz"}).cells()


def test_methods_space_runs_each_way_to_a_plain_network_in_its_own_cell():
    space = load_space("methods")
    got = {(c.as_dict()["method"], c.as_dict()["block"]) for c in space.cells()}
    assert got == {("alignkd", "plain"), ("jointrd", "plain"), ("jointrd_released", "plain"),
                   ("kd", "plain"), ("ce", "repvgg"), ("alignkd", "repvgg")}
    configs = sample_configs(space, n=8)
    for sample in configs:
        cfg = RunConfig(**trial_values(space.with_fixed({"epochs": 100, "teacher": "t.pt"}),
                                       sample))
        assert cfg.shortcut == "none" and cfg.eta_end <= cfg.eta_start
        searched = set(sample) - {"method", "block", "dataset", "depth"}
        # Each method samples only what it uses.
        uses = {"alignkd": {"alpha", "temperature", "eta_kind", "eta_start", "eta_end",
                            "eta_span"},
                "jointrd": {"lam", "eta_kind", "eta_start", "eta_end", "eta_span"},
                "jointrd_released": {"dis_weight", "eta_kind", "eta_start", "eta_end",
                                     "eta_span"},
                "kd": {"alpha", "temperature"}, "ce": set()}[cfg.method]
        assert searched == uses | {"lr", "weight_decay"}, (cfg.method, searched)


def test_alignkd_samples_every_feature_loss():
    samples = sample_configs(load_space("alignkd"), n=40)
    assert {s["feature_loss"] for s in samples} == {"mse", "at", "nst"}


@pytest.mark.parametrize("name", ["alignkd", "jointrd", "compare", "methods", "paper"])
def test_no_bundled_space_searches_what_it_compares(name):
    from tuning.search.space import COMPARED

    space = load_space(name)
    assert not {p.name for p in space.params} & set(COMPARED)


@pytest.mark.parametrize("key", ["method", "dataset", "depth", "teacher_depth", "block",
                                 "dirac", "shortcut", "width", "split_seed", "val_fraction",
                                 "data_path", "seed"])
@pytest.mark.parametrize("section", ["params", "grid"])
def test_what_a_search_compares_is_refused_as_a_hyperparameter(key, section):
    values = {"method": "[alignkd, jointrd]", "dataset": "[cifar10, cifar100]",
              "depth": "[18, 34]", "teacher_depth": "[18, 34]", "block": "[plain, repvgg]",
              "dirac": "[false, true]", "shortcut": "[none, downsample]", "width": "[8, 16]",
              "split_seed": "[0, 1]", "val_fraction": "[0.1, 0.2]",
              "data_path": "[/a.npz, /b.npz]", "seed": "[0, 1]"}[key]
    body = (f"params:\n  {key}: {{type: choice, values: {values}}}\n" if section == "params"
            else f"grid:\n  {key}: {values}\n")
    with pytest.raises(SpaceError, match=rf"{section}\.{key}: {key} defines what the search "
                                         r"compares .* run across it"):
        parse_space("fixed: {method: alignkd, shortcut: none}\n" + body, source="s.yaml",
                    name="s")


def test_a_teacher_of_another_depth_or_the_original_students_are_cells_of_their_own():
    space = parse_space("fixed: {method: jointrd}\nacross:\n  depth: [18]\n"
                        "  teacher_depth: [18, 34]\n  shortcut: [none, downsample]\n"
                        "params:\n  lam: {type: float, low: 1.0e-4, high: 0.1, log: true}\n",
                        source="s.yaml", name="s")
    assert [c.key for c in space.cells()] == [
        "depth=18,teacher_depth=18,shortcut=none", "depth=18,teacher_depth=18,shortcut=downsample",
        "depth=18,teacher_depth=34,shortcut=none", "depth=18,teacher_depth=34,shortcut=downsample"]


def test_teacher_plan_covers_every_dataset_and_teacher_depth():
    from tuning.search.teachers import plan_teachers

    space = load_space("alignkd")
    plan = plan_teachers(space.with_fixed({"seed": 0, "width": 64}), teacher_epochs=200)
    assert sorted((r.config.dataset, r.config.depth) for r in plan) == sorted(
        (d, n) for d in ("cifar10", "cifar100", "imagewoof") for n in (18, 34))
    assert all(r.config.shortcut == "all" and r.config.method == "ce" for r in plan)
    smoke = plan_teachers(space.with_fixed({"dataset": "digits", "width": 8}),
                          teacher_epochs=4)
    assert sorted(r.config.depth for r in smoke) == [18, 34]  # a teacher per depth cell


def _planned_and_asked(space, epochs=3):
    """The teachers planned, and the teacher paths every sampled trial asks for."""
    from tuning.search.teachers import plan_teachers, teacher_path, teacher_recipe

    planned = {r.key for r in plan_teachers(space, teacher_epochs=epochs)}
    asked = set()
    for sample in sample_configs(space, n=12):
        cfg = RunConfig(**trial_values(space, sample))
        asked.add(Path(teacher_path("store", teacher_recipe(cfg, epochs))).parent.name)
    return planned, asked


@pytest.mark.parametrize("fixed", [
    "batch_size: 256", "val_fraction: 0.2", "split_seed: 3", "seed: 5",
    "dataset: npz\n  data_path: /d/x.npz",
])
def test_teachers_are_planned_from_each_trials_merged_config(fixed):
    """A recipe field fixed by the space itself (not by --set) reaches the planned teacher."""
    text = f"fixed:\n  method: alignkd\n  {fixed}\nacross:\n  teacher_depth: [18, 34]\n" \
           "params:\n  alpha: {type: float, low: 0, high: 1}\n"
    space = parse_space(text, source="t.yaml", name="t")
    planned, asked = _planned_and_asked(space)
    assert asked == planned and len(planned) == 2


def test_teachers_follow_a_choice_of_a_recipe_field_and_refuse_a_range():
    from tuning.search.teachers import plan_teachers

    space = parse_space("fixed: {method: alignkd}\nacross: {depth: [18, 34]}\nparams:\n"
                        "  batch_size: {type: choice, values: [64, 128]}\n",
                        source="t.yaml", name="t")
    planned, asked = _planned_and_asked(space)
    assert asked == planned and len(planned) == 4  # 2 depths x 2 batch sizes
    ranged = parse_space("params:\n  batch_size: {type: int, low: 32, high: 256}\n",
                         source="t.yaml", name="t")
    with pytest.raises(SpaceError, match="params.batch_size: each trial's teacher is trained"):
        plan_teachers(ranged, teacher_epochs=3)


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


def test_paper_space_is_the_papers_settings_once_per_cell():
    space = load_space("paper")
    cells = space.cells()
    assert space.kind == "fixed" and len(cells) == 12 and space.cell_budget(20) == 1
    assert {(c.as_dict()["method"], c.as_dict()["dataset"], c.as_dict()["depth"])
            for c in cells} == {
        (m, d, n) for m in ("alignkd", "jointrd") for d in ("cifar10", "cifar100", "imagewoof")
        for n in (18, 34)}
    cfg = RunConfig(**trial_values(space.with_fixed({"teacher": "t.pt"}), cells[0].as_dict()))
    assert (cfg.alpha, cfg.lam, cfg.eta_start, cfg.eta_end, cfg.eta_epochs, cfg.epochs) == (
        0.5, 0.001, 1.0, 0.5, 60, 200)


def test_overrides_remove_parameters_from_the_search_and_dimensions_from_the_cells():
    space = load_space("alignkd").with_fixed({"dataset": "cifar10", "teacher_depth": 18})
    assert "teacher_depth" not in {p.name for p in space.params}
    assert space.dims == ("depth",) and [c.key for c in space.cells()] == ["depth=18",
                                                                             "depth=34"]
    single = space.with_fixed({"depth": 34})
    assert [c.key for c in single.cells()] == ["all"] and single.fixed["depth"] == 34


@pytest.mark.parametrize(("overrides", "check"), [
    ({"eta_epochs": 60}, lambda c: c.eta_epochs == 60),   # not replaced by the searched span
    ({"eta_span": 0.5}, lambda c: c.eta_epochs == 100),
    ({"eta_start": 0.3}, lambda c: c.eta_end <= 0.3),     # bounds the searched end
    ({"eta_end": 0.9}, lambda c: c.eta_start >= 0.9),     # bounds the searched start
])
def test_eta_overrides_combine_with_the_searched_schedule(overrides, check):
    space = load_space("alignkd").with_fixed({"epochs": 200, "teacher": "t.pt", **overrides})
    configs = [RunConfig(**trial_values(space, s)) for s in sample_configs(space, n=20)]
    assert all(check(c) and c.eta_end <= c.eta_start for c in configs)


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
    ("across: {alfa: [1, 2]}\n", "across.alfa: unknown key"),
    ("across: {eta_span: [0.1, 0.2]}\n", "across.eta_span: must be a run-config field"),
    ("across: {dataset: []}\n", "across.dataset: must be a non-empty list"),
    ("across: {dataset: cifar10}\n", "across.dataset: must be a non-empty list"),
    ("across: {depth: [18, 18]}\n", "across.depth: lists a value twice"),
    ("across: {depth: [18, 50]}\n", "depth must be one of"),
    ("across: {depth: [18, 34]}\nparams:\n  depth: {type: choice, values: [18, 34]}\n",
     "across.depth: is both run across and searched"),
    ("across: {epochs: [10, 20]}\n", "epochs: epochs is a setting of the whole search"),
    ("across: [dataset]\n", "across: must be a mapping"),
    ("params:\n  depth: {type: choice, values: [18, 34, 18]}\n", "lists a value twice"),
    ("params: [alpha]\n", "params: must be a mapping"),
    ("params:\n  eta_span: {type: float, low: 0.1, high: 0.5}\n"
     "  eta_epochs: {type: int, low: 10, high: 50}\n", "say the same thing"),
    ("fixed: {alpha: 0.5}\nparams:\n  alpha: {type: float, low: 0, high: 1}\n",
     "both fixed and searched"),
    ("params:\n  lam: {type: float, low: 0.001, high: 0.1, when: {method: jointrd}}\n",
     "when.method: must name an across-dimension or a choice parameter listed before"),
    ("across: {method: [alignkd, jointrd]}\nparams:\n"
     "  lam: {type: float, low: 0.001, high: 0.1, when: {method: dino}}\n",
     "when.method: 'dino' is not one of"),
    ("params:\n  eta_span: {type: float, low: 0.1, high: 1.5}\n", "fraction in [0, 1]"),
    ("across: {depth: [18, 34]}\nexclude: {depth: 18}\n", "exclude: must be a list"),
    ("across: {depth: [18, 34]}\nexclude: [{}]\n", "exclude: must be a list of non-empty"),
    ("across: {depth: [18, 34]}\nexclude: [{dataset: digits}]\n",
     "exclude[0].dataset: must name an across-dimension (depth)"),
    ("across: {depth: [18, 34]}\nexclude: [{depth: 50}]\n", "exclude[0].depth: 50 is not one"),
    ("across: {depth: [18, 34]}\nexclude: [{depth: [18, 34]}]\n",
     "exclude: excludes every cell"),
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


def test_teacher_keys_stay_those_of_teachers_already_stored():
    """A teacher store outlives versions of the code: a key written before the student's
    block and the per-method defaults existed still names the same teacher, whatever student
    asks for it."""
    from tuning.search.teachers import teacher_recipe

    stored = "digits-resnet18-w8-s0-c301b85ac2"  # written by the previous release
    for student in ({}, {"block": "repvgg"}, {"method": "kd", "alpha": 0.9},
                    {"method": "jointrd_released", "dis_weight": 0.01}):
        cfg = RunConfig(dataset="digits", width=8, batch_size=64, **student)
        assert teacher_recipe(cfg, 4).key == stored
