"""The report's statistics against hand-worked values and scipy, and its tables from records."""

import math

import pytest

from tuning import report
from tuning.stats import Summary, verdict, welch


def test_welch_interval_matches_a_hand_worked_example():
    # a = 1, 2, 3 and b = 4, 5, 6: means 2 and 5, variances 1 and 1, n = 3 each.
    # se = sqrt(1/3 + 1/3) = 0.81650; df = (2/3)^2 / (2 * (1/3)^2 / 2) = 4;
    # t(0.975, 4) = 2.776445; half-width = 2.26696.
    d = welch([1, 2, 3], [4, 5, 6])
    assert d.diff == -3 and d.df == pytest.approx(4.0)
    assert d.low == pytest.approx(-5.26696, abs=1e-5)
    assert d.high == pytest.approx(-0.73304, abs=1e-5)
    assert verdict(d, "AlignKD", "JointRD") == "JointRD better"


def test_welch_interval_agrees_with_scipy_on_unequal_variances():
    from scipy.stats import ttest_ind

    a, b = [0.921, 0.925, 0.918, 0.930], [0.915, 0.935, 0.905]
    d = welch(a, b)
    ci = ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (d.low, d.high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert verdict(d, "AlignKD", "JointRD") == "no difference at this n"


def test_summary_and_the_cases_without_spread():
    s = Summary.of([0.90, 0.92, 0.94])
    assert (s.n, s.mean, s.std) == (3, pytest.approx(0.92), pytest.approx(0.02))
    assert s.high - s.mean == pytest.approx(4.302653 * 0.02 / math.sqrt(3), rel=1e-5)
    assert math.isnan(Summary.of([0.9]).std)
    one = welch([0.9], [0.8, 0.85])
    assert math.isnan(one.low) and verdict(one, "A", "J") == "n<2"
    same = welch([0.9, 0.9], [0.8, 0.8])  # no spread: no interval, and no winner
    assert math.isnan(same.low) and verdict(same, "AlignKD", "JointRD") == "no spread"


def run(run_id, method, acc, *, depth=18, chosen=False, of="", role="trial", time=60.0):
    return {"run_id": run_id, "status": "FINISHED", "method": method, "dataset": "cifar10",
            "depth": depth, "cell": f"method={method},depth={depth}", "role": role,
            "chosen": chosen, "replicate_of": of, "teacher_run_id": "T", "val_acc": acc,
            "test_acc": acc, "train_time": time, "epochs": 10, "epoch_time": time / 10,
            "stopped_early": False}


def test_tables_pool_each_chosen_trial_with_its_replicates():
    runs = [
        run("a", "alignkd", 0.90, chosen=True), run("a1", "alignkd", 0.92, of="a",
                                                    role="replicate"),
        run("a2", "alignkd", 0.94, of="a", role="replicate"),
        run("ax", "alignkd", 0.99),  # another trial of the cell: not a finalist
        run("j", "jointrd", 0.85, chosen=True, time=90.0),
        run("j1", "jointrd", 0.86, of="j", role="replicate", time=90.0),
        run("p", "alignkd", 0.70, depth=34, chosen=True),  # a cell with one run
        run("q", "jointrd", 0.71, depth=34, chosen=True),
    ]
    rows = report.tables(runs, {"T": 0.95})
    assert [(r["dataset"], r["student"]) for r in rows] == [("cifar10", "Plain-18"),
                                                            ("cifar10", "Plain-34")]
    r18, r34 = rows
    assert (r18["alignkd_n"], r18["alignkd_mean"]) == (3, pytest.approx(0.92))
    assert r18["jointrd_n"] == 2 and r18["teacher"] == 0.95
    assert r18["time_ratio"] == pytest.approx(6.0 / 9.0)
    expected = welch([0.90, 0.92, 0.94], [0.85, 0.86])
    assert (r18["diff_low"], r18["diff_high"]) == (pytest.approx(expected.low),
                                                   pytest.approx(expected.high))
    assert r34["verdict"] == "n<2"
    md = report.markdown(rows)
    assert "| cifar10 | Plain-18 | 92.00 ± 2.00 (n=3) |" in md
    assert "70.00 (n=1)" in md and "| n<2 |" in md
    assert "AlignKD − JointRD (pp), 95% CI (Welch)" in md
    assert report.csv_text(rows).splitlines()[0].startswith("dataset,student,alignkd_mean")


def test_a_search_across_methods_and_blocks_compares_each_with_alignkd():
    def variant(run_id, method, block, acc, **kw):
        r = run(run_id, method, acc, **kw)
        r["cell"] = f"method={method},block={block},depth=18"
        r["method"] = report.method_label(method, r["cell"])
        return r

    runs = [variant("a", "alignkd", "plain", 0.90, chosen=True),
            variant("a1", "alignkd", "plain", 0.92, of="a", role="replicate"),
            variant("r", "ce", "repvgg", 0.80, chosen=True),
            variant("r1", "ce", "repvgg", 0.81, of="r", role="replicate"),
            variant("k", "kd", "plain", 0.88, chosen=True),
            variant("ra", "alignkd", "repvgg", 0.89, chosen=True)]
    assert runs[2]["method"] == "repvgg+ce" and runs[0]["method"] == "alignkd"
    (row,) = report.tables(runs, {"T": 0.95})  # blocks share one row: same data set, depth
    assert row["student"] == "Plain-18"
    expected = welch([0.80, 0.81], [0.90, 0.92])
    assert row["repvgg+ce_vs_alignkd"] == pytest.approx(-0.105)
    assert row["repvgg+ce_vs_alignkd_low"] == pytest.approx(expected.low)
    assert row["repvgg+ce_vs_alignkd_verdict"] == "AlignKD better" == verdict(
        expected, "RepVGG", "AlignKD")
    assert row["kd_vs_alignkd_verdict"] == "n<2"
    md = report.methods_markdown([row])
    lines = md.splitlines()
    assert len(lines) == 2 + 4
    assert "| cifar10 | Plain-18 | AlignKD | 91.00 ± 1.41 (n=2) | (baseline) |" in md
    assert f"| RepVGG | 80.50 ± 0.71 (n=2) | -10.50 [{100 * expected.low:+.2f}, " in md
    assert "| RepVGG+AlignKD | 89.00 (n=1) | -2.00 | n<2 |" in md


def test_pareto_front_of_points():
    assert report.pareto_front([(1, 0.5), (2, 0.4), (3, 0.7), (4, 0.6)]) == [(1, 0.5),
                                                                          (3, 0.7)]
