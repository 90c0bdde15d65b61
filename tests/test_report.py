"""The report's statistics against hand-worked values and scipy, its tables from records,
importances against optuna-dashboard's, and how a cell chooses its trial."""

import math

import optuna
import pytest

from tuning.search.report import tables
from tuning.search.report.stats import Summary, compare, holm, paired, verdict, welch
from tuning.search.results import choose, parse_choose

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_welch_interval_matches_a_hand_worked_example():
    # a = 1, 2, 3 and b = 4, 5, 6: means 2 and 5, variances 1 and 1, n = 3 each.
    # se = sqrt(1/3 + 1/3) = 0.81650; df = (2/3)^2 / (2 * (1/3)^2 / 2) = 4;
    # t(0.975, 4) = 2.776445; half-width = 2.26696.
    d = welch([1, 2, 3], [4, 5, 6])
    assert d.diff == -3 and d.test == "welch" and d.n == 6
    assert d.low == pytest.approx(-5.26696, abs=1e-5)
    assert d.high == pytest.approx(-0.73304, abs=1e-5)
    assert verdict(d, "AlignKD", "JointRD") == "JointRD better"


def test_paired_interval_matches_a_hand_worked_example_and_scipy():
    from scipy.stats import ttest_ind, ttest_rel

    # Differences 5, 4, 8 pp: mean 5.6667, sd sqrt(13/3) = 2.08167, se 1.20185;
    # t(0.975, 2) = 4.302653; half-width 5.17114.
    a = {1: 0.90, 2: 0.92, 3: 0.94}
    b = {1: 0.85, 2: 0.88, 3: 0.86}
    d = paired(a, b)
    assert d.test == "paired" and d.n == 3 and d.diff == pytest.approx(0.056667, abs=1e-6)
    assert (d.low, d.high) == (pytest.approx(0.0049553, abs=1e-6),
                               pytest.approx(0.1083780, abs=1e-6))
    ci = ttest_rel([0.90, 0.92, 0.94], [0.85, 0.88, 0.86]).confidence_interval(0.95)
    assert (d.low, d.high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    used, w = compare(a, b)
    assert used == d  # two or more pairs: the verdict reads the paired test
    ci = ttest_ind([0.90, 0.92, 0.94], [0.85, 0.88, 0.86], equal_var=False)
    assert (w.low, w.high) == (pytest.approx(ci.confidence_interval(0.95).low),
                               pytest.approx(ci.confidence_interval(0.95).high))
    # Seeds that do not pair up fall back to Welch's.
    used, w = compare({1: 0.9, 2: 0.92}, {3: 0.85, 4: 0.86})
    assert used == w and used.test == "welch"


def test_holm_adjusts_step_down_and_keeps_order():
    # sorted 0.01, 0.03, 0.04 -> 3 x 0.01 = 0.03, 2 x 0.03 = 0.06, max(0.06, 1 x 0.04) = 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    adjusted = holm([0.2, math.nan, 0.001])
    assert adjusted[0] == pytest.approx(0.2) and math.isnan(adjusted[1])
    assert adjusted[2] == pytest.approx(0.002)
    d = paired({1: 0.90, 2: 0.92, 3: 0.94}, {1: 0.85, 2: 0.88, 3: 0.86})  # p ~ 0.04
    assert verdict(d, "A", "B") == "A better"
    assert verdict(d, "A", "B", p_adjusted=3 * d.p) == "no difference at this n"


def test_summary_counts_a_run_without_a_figure_as_failed():
    s = Summary.of([0.90, 0.92, math.nan, 0.94])
    assert (s.n, s.failed, s.mean, s.std) == (3, 1, pytest.approx(0.92), pytest.approx(0.02))
    assert s.high - s.mean == pytest.approx(4.302653 * 0.02 / math.sqrt(3), rel=1e-5)
    assert math.isnan(Summary.of([0.9]).std)
    assert verdict(welch([0.9], [0.8, 0.85]), "A", "J") == "n<2"
    same = welch([0.9, 0.9], [0.8, 0.8])  # no spread: no interval, and no winner
    assert math.isnan(same.low) and verdict(same, "AlignKD", "JointRD") == "no spread"


def run(run_id, method, acc, *, depth=18, chosen=False, role="trial", arm="tuned", seed=0,
        time=60.0, status="FINISHED", default_config=False, dataset="cifar10"):
    return {"run_id": run_id, "status": status, "method": method, "dataset": dataset,
            "depth": depth, "cell": f"method={method},depth={depth}", "role": role,
            "arm": arm, "seed": seed, "chosen": chosen, "default_config": default_config,
            "replicate_of": "", "teacher_run_id": "T", "val_acc": acc, "test_acc": acc,
            "train_time": time, "epochs": 10, "epoch_time": time / 10, "study_trial": 0,
            "stopped_early": False, "concurrency": "2 at a time, 1 CPU each"}


def reps(method, accs, arm="tuned", **kw):
    return [run(f"{method}-{arm}-{s}", method, a, role="replicate", arm=arm, seed=s, **kw)
            for s, a in enumerate(accs, 1)]


def test_the_headline_is_the_replicates_alone_with_the_selected_trial_apart():
    runs = [run("a", "alignkd", 0.99, chosen=True),  # lucky on test: it won on validation
            *reps("alignkd", [0.90, 0.92, 0.94]),
            *reps("alignkd", [0.85, 0.88, 0.86], arm="default"),
            run("ax", "alignkd", 0.995),  # another trial of the cell: not a finalist
            run("j", "jointrd", 0.80, chosen=True, time=90.0),
            *reps("jointrd", [0.84, 0.86, 0.85], time=90.0),
            *reps("jointrd", [0.83, 0.82, 0.87], arm="default", time=90.0)]
    (row,) = tables.tables(runs, {"T": 0.95})
    assert (row["alignkd_n"], row["alignkd_mean"]) == (3, pytest.approx(0.92))
    assert row["alignkd_selected"] == 0.99 and row["teacher"] == 0.95
    assert row["alignkd_default_mean"] == pytest.approx((0.85 + 0.88 + 0.86) / 3)
    gain = paired({1: 0.90, 2: 0.92, 3: 0.94}, {1: 0.85, 2: 0.88, 3: 0.86})
    assert (row["alignkd_gain"], row["alignkd_gain_low"], row["alignkd_gain_high"]) == (
        pytest.approx(gain.diff), pytest.approx(gain.low), pytest.approx(gain.high))
    diff = paired({1: 0.90, 2: 0.92, 3: 0.94}, {1: 0.84, 2: 0.86, 3: 0.85})
    assert (row["diff"], row["diff_low"], row["diff_test"]) == (
        pytest.approx(diff.diff), pytest.approx(diff.low), "paired")
    w = welch([0.90, 0.92, 0.94], [0.84, 0.86, 0.85])
    assert row["diff_welch_low"] == pytest.approx(w.low)
    at_defaults = paired({1: 0.85, 2: 0.88, 3: 0.86}, {1: 0.83, 2: 0.82, 3: 0.87})
    assert row["diff_default"] == pytest.approx(at_defaults.diff)
    # Four comparisons (two gains, the methods tuned and at their defaults), Holm-corrected.
    assert row["comparisons"] == 4
    ps = [row[f"{k}_p"] for k in ("alignkd_gain", "jointrd_gain", "diff", "diff_default")]
    assert [row[f"{k}_p_holm"] for k in ("alignkd_gain", "jointrd_gain", "diff",
                                         "diff_default")] == pytest.approx(holm(ps))
    assert row["time_ratio"] == pytest.approx(6.0 / 9.0)
    columns = tables.csv_text([row]).splitlines()[0].split(",")
    assert {"alignkd_default_mean", "alignkd_gain", "alignkd_gain_low", "alignkd_gain_high",
            "jointrd_default_mean", "jointrd_gain", "jointrd_gain_low",
            "jointrd_gain_high"} <= set(columns)
    md = tables.markdown([row])
    assert "| cifar10 | Plain-18 | AlignKD | 92.00 ± 2.00 (n=3) | 99.00 | 86.33 ± 1.53 (n=3) |" \
        in md
    assert "Holm-corrected over the 4 comparisons" in md
    assert "It does not cover another search's choice, another teacher" in md
    assert "| AlignKD − JointRD | default |" in md and "train min (loop only)" in md


def test_failed_replicates_count_as_failed_and_a_chosen_default_is_its_own_baseline():
    runs = [run("a", "alignkd", 0.91, chosen=True, default_config=True),
            *reps("alignkd", [0.90, math.nan, 0.94]),
            run("k", "alignkd", 0.5, role="replicate", seed=2, status="KILLED")]
    (row,) = tables.tables(runs, {})
    assert (row["alignkd_n"], row["alignkd_failed"]) == (2, 1)
    assert row["alignkd_gain"] == 0 and row["alignkd_gain_verdict"] == tables.CHOSE_DEFAULT
    assert row["alignkd_default_mean"] == row["alignkd_mean"]
    md = tables.markdown([row])
    assert "92.00 ± 2.83 (n=2, 1 failed)" in md and tables.CHOSE_DEFAULT in md
    assert row["comparisons"] == 0 and "Holm" not in md


def test_more_methods_are_each_compared_with_alignkd():
    def variant(run_id, method, block, acc, **kw):
        r = run(run_id, method, acc, **kw)
        r["cell"] = f"method={method},block={block},depth=18"
        r["method"] = tables.method_label(method, r["cell"])
        return r

    runs = [variant("a", "alignkd", "plain", 0.90, chosen=True),
            *[variant(f"a{s}", "alignkd", "plain", v, role="replicate", seed=s)
              for s, v in ((1, 0.90), (2, 0.92))],
            variant("r", "ce", "repvgg", 0.80, chosen=True),
            *[variant(f"r{s}", "ce", "repvgg", v, role="replicate", seed=s)
              for s, v in ((1, 0.80), (2, 0.81))],
            variant("k", "kd", "plain", 0.88, chosen=True)]
    assert runs[3]["method"] == "repvgg+ce"
    (row,) = tables.tables(runs, {"T": 0.95})  # blocks share one row: same data set, depth
    expected = paired({1: 0.80, 2: 0.81}, {1: 0.90, 2: 0.92})
    assert row["repvgg+ce_vs_alignkd"] == pytest.approx(-0.105)
    assert row["repvgg+ce_vs_alignkd_low"] == pytest.approx(expected.low)
    assert row["kd_vs_alignkd_verdict"] == "n<2"
    md = tables.comparison_markdown([row])
    assert "| RepVGG − AlignKD | tuned | -10.50 [" in md


def test_an_npz_data_set_is_named_by_its_file():
    assert tables.data_name({"dataset": "npz", "data_path": "/d/cifar10-train-subset.npz"}) \
        == "cifar10-train-subset"
    assert tables.data_name({"dataset": "cifar10"}) == "cifar10"


def rows_for_choose():
    def row(n, val, time, status="COMPLETED"):
        return {"cell": "c", "study_trial": n, "status": status, "val_acc": val,
                "train_time": time, "chosen": False}
    return [row(0, 0.80, 50), row(1, 0.80, 10), row(2, 0.90, 100), row(3, 0.86, 30),
            row(4, 0.95, 500, status="STOPPED_EARLY")]


def test_choosing_breaks_ties_by_trial_number_and_applies_a_stated_rule():
    rows = rows_for_choose()
    assert choose(rows)["c"]["study_trial"] == 2
    tie = rows_for_choose()[:2]  # equal accuracy: the lower trial number, never the faster
    assert choose(tie)["c"]["study_trial"] == 0
    front = {"c": {1, 2, 3}}
    assert choose(rows_for_choose(), "fastest-within:5", front)["c"]["study_trial"] == 3
    assert choose(rows_for_choose(), "fastest-within:10", front)["c"]["study_trial"] == 1
    assert choose(rows_for_choose(), "fastest-within:0", front)["c"]["study_trial"] == 2
    # The knee: scaled to the front, (10 s, 0.80) -> (0, 0), (30 s, 0.86) -> (0.22, 0.6),
    # (100 s, 0.90) -> (1, 1): trial 3 lies farthest above the diagonal.
    assert choose(rows_for_choose(), "knee", front)["c"]["study_trial"] == 3
    for bad in ("fastest-within:-1", "fastest-within:x", "fastest", "knee:1"):
        with pytest.raises(ValueError, match="--choose"):
            parse_choose(bad)


def study_of(values, params=("x", "y"), pruned_at=None):
    """A real in-memory study: trial i has x = i, y = (7 i) mod 5 and the value given."""
    study = optuna.create_study(direction="maximize")
    dists = {"x": optuna.distributions.FloatDistribution(0, 100),
             "y": optuna.distributions.FloatDistribution(0, 10)}
    for i, v in enumerate(values):
        ps = {"x": float(i), "y": float((7 * i) % 5)}
        curve = {1: v / 2, 2: v}
        state = optuna.trial.TrialState.COMPLETE
        if pruned_at is not None and i in pruned_at:
            curve, state = {1: v / 2}, optuna.trial.TrialState.PRUNED
        study.add_trial(optuna.trial.create_trial(
            params={k: ps[k] for k in params}, distributions={k: dists[k] for k in params},
            value=None if state == optuna.trial.TrialState.PRUNED else v,
            intermediate_values=curve, state=state))
    return study


def test_importances_are_withheld_below_the_threshold():
    from tuning.search.report.importance import cell_importance

    result = cell_importance(study_of([0.1, 0.5, 0.3]))
    assert not result.enough and result.by_objective == {}
    assert result.describe() == "too few trials (n=3, need 10)"
    wide = cell_importance(study_of([0.1 * i for i in range(11)], params=("x", "y")))
    assert wide.enough  # 11 >= max(10, 2 x 2)


def test_importances_are_the_dashboards_numbers_with_n():
    from optuna_dashboard._importance import get_param_importance_from_trials_cache

    from tuning.search.report.importance import cell_importance

    values = [0.5 + 0.03 * i - 0.01 * ((7 * i) % 5) for i in range(14)]
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, direction="maximize", study_name="c")
    study.add_trials(study_of(values).trials)
    ours = cell_importance(study)
    shown = get_param_importance_from_trials_cache(None, storage, study._study_id, 0,
                                                   study.get_trials(deepcopy=False))
    assert ours.n == 14 and ours.epoch is None
    assert ours.by_objective["objective 0"] == pytest.approx(
        {i["name"]: i["importance"] for i in shown})
    assert "(n=14)" in ours.describe()


def test_stopped_trials_count_at_the_last_epoch_all_reached():
    from tuning.search.report.importance import cell_importance

    values = [0.5 + 0.03 * i for i in range(12)]
    result = cell_importance(study_of(values, pruned_at={3, 5, 7}))
    assert result.n == 12 and result.epoch == 1
    assert "at epoch 1" in result.describe()


def test_a_multi_objective_cell_has_importances_per_objective():
    from tuning.search.report.importance import cell_importance

    study = optuna.create_study(directions=["maximize", "minimize"])
    with pytest.warns(optuna.exceptions.ExperimentalWarning):
        study.set_metric_names(["val_acc", "train_time"])
    dist = {"x": optuna.distributions.FloatDistribution(0, 100),
            "y": optuna.distributions.FloatDistribution(0, 10)}
    for i in range(10):
        study.add_trial(optuna.trial.create_trial(
            params={"x": float(i), "y": float((3 * i) % 7)}, distributions=dist,
            values=[0.5 + 0.01 * i, 10.0 + (3 * i) % 7]))
    result = cell_importance(study)
    assert set(result.by_objective) == {"val_acc", "train_time"}
    assert "val_acc (n=10)" in result.describe() and "train_time (n=10)" in result.describe()


def test_methods_that_both_kept_their_defaults_are_compared_once():
    """Where each search chose its default, the default arms are the tuned ones: comparing
    them again would count one test twice in Holm's correction."""
    runs = [run("a", "alignkd", 0.9, chosen=True, default_config=True),
            *reps("alignkd", [0.90, 0.92, 0.94]),
            run("j", "jointrd", 0.8, chosen=True, default_config=True),
            *reps("jointrd", [0.84, 0.86, 0.85])]
    (row,) = tables.tables(runs, {})
    assert "diff" in row and "diff_default" not in row
    assert row["comparisons"] == 1 and row["diff_p_holm"] == pytest.approx(row["diff_p"])
