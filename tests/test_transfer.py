"""Transfer across settings, and warm starts from a finished search: the measurement's
figures against a hand-worked example, and the seeds a warm start queues, in real Optuna
studies (SQLite) and through the real command."""

import csv
import json
import time
from pathlib import Path

import optuna
import pytest

from tuning.measure.transfer import markdown, pair_stats
from tuning.search.cells import Cell, study_name
from tuning.search.settings import SearchSettings
from tuning.search.space import cell_defaults, parse_space
from tuning.search.studies import DEFAULT, LOST, WARM, CellSearcher, StudyBook, mark_lost
from tuning.search.warmstart import nearest, plan

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_rho_and_regret_match_a_hand_worked_example():
    # cheap ranks 2, 4, 3, 1 and dear ranks 2, 3, 4, 1: d = 0, 1, -1, 0, so
    # rho = 1 - 6 * 2 / (4 * 15) = 0.8. The cheap winner (0.70, config 1) reaches 0.60 in the
    # dear setting, whose best is 0.80 (config 2): a regret of 20 points.
    result = pair_stats([0.50, 0.70, 0.60, 0.40], [0.55, 0.60, 0.80, 0.30])
    assert result["rho"] == pytest.approx(0.8) and result["configs"] == 4
    assert result["regret_pp"] == pytest.approx(20.0)
    assert (result["cheap_winner"], result["dear_winner"]) == (1, 2)
    assert result["rho_low"] <= 0.8 <= result["rho_high"]
    # A tie for the cheap win goes to the lower index; a winner that is also best: no regret.
    tied = pair_stats([0.7, 0.7, 0.1], [0.9, 0.2, 0.5])
    assert tied["cheap_winner"] == 0 and tied["regret_pp"] == 0


def test_a_setting_that_ranks_every_configuration_alike_has_no_rho():
    """Every configuration at chance in the cheap setting: no ranking, so no rho; the table
    says so rather than printing nan."""
    flat = pair_stats([0.1, 0.1, 0.1, 0.1], [0.5, 0.6, 0.4, 0.7])
    table = markdown({"pairs": [{"pair": "epochs", "from": "short", "to": "long", **flat}]})
    assert "undefined (no spread in one setting)" in table and "nan" not in table.lower()


SOURCE = """
fixed: {method: alignkd}
across:
  dataset: [cifar10, digits]
  depth: [18, 34]
params:
  alpha: {type: float, low: 0.0, high: 1.0}
  lr: {type: float, low: 0.001, high: 0.1, log: true}
"""


def test_each_cell_starts_from_the_nearest_cell_of_its_method():
    source = parse_space(SOURCE, source="s.yaml", name="s").with_fixed({"depth": 18})
    target = parse_space(SOURCE.replace("[cifar10, digits]", "[cifar100, digits, npz]"),
                         source="t.yaml", name="t").with_fixed({"data_path": "/d/x.npz"})
    matches = {c.key: nearest(source, c, target).key for c in target.cells()}
    # cifar100 and the npz file are of CIFAR's family, so they start from cifar10; digits
    # from digits; depth 34 from the nearest depth the source ran, 18.
    assert matches == {"dataset=cifar100,depth=18": "dataset=cifar10",
                       "dataset=cifar100,depth=34": "dataset=cifar10",
                       "dataset=digits,depth=18": "dataset=digits",
                       "dataset=digits,depth=34": "dataset=digits",
                       "dataset=npz,depth=18": "dataset=cifar10",
                       "dataset=npz,depth=34": "dataset=cifar10"}


def finished_source(root: Path, values: list[float],
                    params: list[tuple[float, float]] | None = None) -> SearchSettings:
    """A finished search on disk: its settings, its cells.csv and one study per cell whose
    trials completed with `values` (trial i's (alpha, lr): params[i], else (i / 10, 0.02))."""
    url = f"sqlite:///{root / 'optuna.db'}"
    space = parse_space(SOURCE, source="s.yaml", name="s").with_fixed({"dataset": "digits"})
    settings = SearchSettings(
        name="src", space_name="s", space_source="s.yaml", space_text=SOURCE,
        space_digest="0", overrides={"dataset": "digits"},
        cells=[c.key for c in space.cells()], tracking_uri=f"sqlite:///{root / 'm.db'}",
        optuna_storage=url, storage_path=str(root / "ray"), teacher_store=str(root / "t"),
        epochs=2, teacher_epochs=2, num_samples=len(values), trials_per_cell=len(values),
        seed=0)
    settings.write()
    dist = {"alpha": optuna.distributions.FloatDistribution(0, 1),
            "lr": optuna.distributions.FloatDistribution(0.001, 0.1, log=True)}
    for cell in space.cells():
        study = optuna.create_study(storage=url, study_name=study_name("src", cell),
                                    direction="maximize")
        for i, v in enumerate(values):
            alpha, lr = params[i] if params else (i / 10, 0.02)
            study.add_trial(optuna.trial.create_trial(
                params={"alpha": alpha, "lr": lr}, distributions=dist, value=v))
    with open(settings.folder / "cells.csv", "w") as f:
        writer = csv.writer(f)
        writer.writerow(["cell", "chosen_trial"])
        writer.writerows([c.key, "x"] for c in space.cells())
    return settings


def target_settings(tmp_path: Path, text: str, top: int) -> SearchSettings:
    """A new search of one digits, depth-34 cell, warm-started from `src` with its top `top`."""
    return SearchSettings(
        name="new", space_name="t", space_source="t.yaml", space_text=text,
        space_digest="1", overrides={"dataset": "digits", "depth": 34}, cells=["all"],
        tracking_uri="sqlite:///x.db", optuna_storage=f"sqlite:///{tmp_path / 'new.db'}",
        storage_path=str(tmp_path / "ray"), teacher_store="t", epochs=2, teacher_epochs=2,
        num_samples=6, trials_per_cell=6, seed=0, warm_start="src", warm_start_top=top)


def test_a_warm_start_queues_the_top_configurations_after_the_default(tmp_path):
    finished_source(tmp_path, [0.5, 0.9, 0.7, 0.9, 0.1])
    target_text = SOURCE.replace("high: 1.0}", "high: 0.25}")  # alpha 0.3 is out of range
    space = parse_space(target_text, source="t.yaml", name="t").with_fixed(
        {"dataset": "digits", "depth": 34})
    settings = target_settings(tmp_path, target_text, top=3)
    seeds = plan(settings, space)
    (cell_seeds,) = seeds.values()
    # The top 3 of the source's depth-34 cell (the same data set and depth): 0.9 (trial 1),
    # 0.9 (trial 3, a tie: the lower number first), 0.7 (trial 2); alpha moved into the
    # new range.
    assert [s.origin for s in cell_seeds] == ["src/depth=34#1", "src/depth=34#3",
                                               "src/depth=34#2"]
    assert [s.params["alpha"] for s in cell_seeds] == [0.1, 0.25, 0.2]
    book = StudyBook(settings.optuna_storage, "new", space, seed=0, multi_objective=False,
                     budget=6, warm=seeds)
    searcher = CellSearcher(book, space.cells(), epochs=2)
    asked = [searcher.suggest(f"t{i}") for i in range(5)]
    assert asked[0][DEFAULT] is True and WARM not in asked[0]
    assert [a.get(WARM) for a in asked[1:4]] == [s.origin for s in cell_seeds]
    assert [a["alpha"] for a in asked[1:4]] == [0.1, 0.25, 0.2]
    assert WARM not in asked[4]  # then the sampler's own proposals
    # A resumed driver reopens the study: nothing is queued again.
    again = StudyBook(settings.optuna_storage, "new", space, seed=0, multi_objective=False,
                      budget=6, warm=seeds)
    study = again.study(Cell())
    queued = [t for t in study.trials if WARM in t.user_attrs]
    assert len(queued) == 3 and len(study.trials) == 5


def test_a_source_configuration_equal_to_the_default_or_to_one_taken_is_passed_over(tmp_path):
    """--warm-start-top K queues K new configurations: a source trial that lands on the new
    cell's default (already its trial 0), or on a configuration already taken once moved into
    the new ranges, would not be queued again, so the next best takes its place."""
    finished_source(tmp_path, [0.9, 0.8, 0.7, 0.6, 0.5],
                    params=[(0.5, 0.01), (0.6, 0.02), (0.9, 0.02), (0.1, 0.02), (0.2, 0.05)])
    target_text = SOURCE.replace("high: 1.0}", "high: 0.25}")
    space = parse_space(target_text, source="t.yaml", name="t").with_fixed(
        {"dataset": "digits", "depth": 34})
    (cell,) = space.cells()
    default = cell_defaults(space, cell).enqueued
    assert default == {"alpha": 0.25, "lr": 0.01}  # what source trial 0 becomes
    settings = target_settings(tmp_path, target_text, top=3)
    (cell_seeds,) = plan(settings, space).values()
    # trial 0 -> the default: passed over; trial 1 -> (0.25, 0.02); trial 2 -> (0.25, 0.02)
    # again: passed over; then trials 3 and 4.
    assert [s.origin for s in cell_seeds] == ["src/depth=34#1", "src/depth=34#3",
                                               "src/depth=34#4"]
    assert [s.params for s in cell_seeds] == [{"alpha": 0.25, "lr": 0.02},
                                              {"alpha": 0.1, "lr": 0.02},
                                              {"alpha": 0.2, "lr": 0.05}]
    book = StudyBook(settings.optuna_storage, "new", space, seed=0, multi_objective=False,
                     budget=6, warm={cell.key: cell_seeds})
    study = book.study(cell)
    assert [t.user_attrs.get(WARM) for t in study.trials] == [None] + [
        s.origin for s in cell_seeds]  # all three queued, after the default


def test_a_default_or_seed_lost_with_a_killed_driver_is_queued_again(tmp_path):
    """A driver killed while the default and a warm seed ran, before Tune recorded them (the
    seed before it took its values): the resumed driver marks both lost and queues both again,
    with their marks and all their values, before the sampler's own proposals; a proposed
    trial lost the same way is not queued again."""
    finished_source(tmp_path, [0.5, 0.9])
    space = parse_space(SOURCE, source="s.yaml", name="s").with_fixed(
        {"dataset": "digits", "depth": 34})
    settings = target_settings(tmp_path, SOURCE, top=1)
    seeds = plan(settings, space)
    book = StudyBook(settings.optuna_storage, "new", space, seed=0, multi_objective=False,
                     budget=6, warm=seeds)
    first = CellSearcher(book, space.cells(), epochs=2)
    default = first.suggest("t0")
    # The seed's trial: asked, then the driver was killed before it took any of its values.
    half = book.study(Cell()).ask()
    half.set_user_attr("ray_trial_id", "t1")
    assert half.params == {}
    proposal = first.suggest("t2")
    assert default[DEFAULT] and WARM not in proposal
    # The killed driver's successor: Tune knows none of the three.
    again = StudyBook(settings.optuna_storage, "new", space, seed=0, multi_objective=False,
                      budget=6, warm=seeds)
    assert mark_lost(again, space.cells(), known=set()) == 3
    resumed = CellSearcher(again, space.cells(), epochs=2)
    redo = [resumed.suggest(f"r{i}") for i in range(3)]
    assert redo[0].get(DEFAULT) is True and WARM not in redo[0]
    assert redo[1].get(WARM) == "src/depth=34#1"
    assert {k: redo[1][k] for k in ("alpha", "lr")} == seeds["all"][0].params  # all its values
    assert DEFAULT not in redo[2] and WARM not in redo[2]  # the sampler's again
    study = again.study(Cell())
    assert sum(LOST in t.user_attrs for t in study.trials) == 3
    assert sum(bool(t.user_attrs.get(DEFAULT)) for t in study.trials) == 2  # lost + again


@pytest.mark.parametrize(("case", "expect"), [
    ("unknown", "--warm-start ghost: no search of that name"),
    ("unfinished", "--warm-start src: that search has not finished"),
    ("other_methods", "that search ran plain+alignkd but this one runs plain+jointrd"),
])
def test_a_search_it_cannot_start_from_is_one_line(tmp_path, case, expect):
    from tuning.run.config import UserError

    finished_source(tmp_path, [0.5, 0.6])
    if case == "unfinished":
        (tmp_path / "ray" / "src" / "cells.csv").unlink()
    text = SOURCE if case != "other_methods" else SOURCE.replace("alignkd", "jointrd")
    space = parse_space(text, source="t.yaml", name="t")
    settings = SearchSettings(
        name="new", space_name="t", space_source="t.yaml", space_text=text, space_digest="1",
        overrides={}, cells=[c.key for c in space.cells()], tracking_uri="sqlite:///x.db",
        optuna_storage=f"sqlite:///{tmp_path / 'new.db'}", storage_path=str(tmp_path / "ray"),
        teacher_store="t", epochs=2, teacher_epochs=2, num_samples=2, trials_per_cell=2,
        seed=0, warm_start="ghost" if case == "unknown" else "src")
    with pytest.raises(UserError) as err:
        plan(settings, space)
    assert expect in str(err.value)


@pytest.mark.slow
def test_a_warm_started_search_through_the_command(tmp_path):
    """A finished smoke search, then a second one warm-started from it and killed after its
    first trials: each cell's queued configurations are the source cell's best, tagged in
    MLflow, and the resumed search queues none of them twice."""
    from faultutil import kill_group, spawn_search, wait_for
    from mlflow import MlflowClient
    from searchutil import search_args, tracking_uri

    from tuning.search.cli.search import main

    assert main(search_args(tmp_path, "src", "--num-samples", "3", "--epochs", "1",
                            "--scheduler", "fifo", depth=None)) == 0
    args = search_args(tmp_path, "warm", "--num-samples", "6", "--epochs", "2",
                       "--scheduler", "fifo", "--max-concurrent", "1", "--warm-start", "src",
                       "--warm-start-top", "2", "--set", "checkpoint_interval_s=0", depth=None)
    log = tmp_path / "warm.log"
    proc = spawn_search(args, log)
    try:
        wait_for(lambda: log.read_text().count("completed") >= 3, 600, proc, log)
    finally:
        kill_group(proc)
    assert "warm start: cell depth=18 starts from 2 configuration(s) of src/depth=18" in \
        log.read_text()
    assert main(search_args(tmp_path, "warm", "--resume", depth=None)) == 0
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    for depth in (18, 34):
        source = optuna.load_study(study_name=f"src/depth={depth}", storage=storage)
        study = optuna.load_study(study_name=f"warm/depth={depth}", storage=storage)
        # The source's best two that are not the warm cell's default (its trial 0; the same
        # space, so the same default): one equal to it is passed over for the next best.
        best = sorted((t for t in source.trials if t.value is not None
                       and t.params != study.trials[0].params),
                      key=lambda t: (-t.value, t.number))[:2]
        counted = [t for t in study.trials if "lost" not in t.user_attrs]
        # Each of the source's best ran once: queued after the default, trial 0, and queued
        # again if the kill lost it (a lost trial does not count).
        warm = {t.user_attrs[WARM]: t for t in counted if WARM in t.user_attrs}
        assert len(warm) == len([t for t in counted if WARM in t.user_attrs])
        assert sorted(warm) == sorted(f"src/depth={depth}#{t.number}" for t in best)
        for b in best:
            assert warm[f"src/depth={depth}#{b.number}"].params == pytest.approx(b.params)
        assert sum(bool(t.user_attrs.get(DEFAULT)) for t in counted) == 1
        assert len(counted) == 6
    client = MlflowClient(tracking_uri(tmp_path))
    exp = client.get_experiment_by_name("warm")
    tagged = [r for r in client.search_runs([exp.experiment_id])
              if r.data.tags.get("warm_start_from")]
    assert len({r.data.tags["warm_start_from"] for r in tagged}) == 4
    assert all(r.info.run_name.endswith(" · warm") for r in tagged)


@pytest.mark.slow
def test_a_proxy_width_search_replicates_at_the_target_width(tmp_path):
    from mlflow import MlflowClient
    from searchutil import rows, search_args, tracking_uri

    from tuning.search.cli.search import main

    assert main(search_args(tmp_path, "proxy", "--num-samples", "2", "--epochs", "1",
                            "--scheduler", "fifo", "--proxy-width", "4", replicates=1)) == 0
    trials = rows(tmp_path, "proxy")
    client = MlflowClient(tracking_uri(tmp_path))
    exp = client.get_experiment_by_name("proxy")
    runs = {r.data.tags.get("ray_trial_id"): r for r in client.search_runs([exp.experiment_id])}
    assert {runs[t["trial_id"]].data.params["width"] for t in trials} == {"4"}
    replicated = rows(tmp_path, "proxy", "replicates.csv")
    assert {runs[r["trial_id"]].data.params["width"] for r in replicated} == {"8"}
    report = (tmp_path / "ray" / "proxy" / "report" / "tables.md").read_text()
    assert "The search ran at width 4, a proxy" in report and "at width 8" in report


def test_trials_to_come_within_one_point_of_the_cells_best():
    from tuning.measure.warmgain import trials_to_within

    assert trials_to_within([0.50, 0.62, 0.60, 0.70], 0.70) == 4
    assert trials_to_within([0.50, 0.695, 0.60, 0.70], 0.70) == 2  # 0.695 is within 1 pp
    assert trials_to_within([0.50, float("-inf"), 0.60], 0.70) is None  # never


def test_the_gain_table_gives_the_best_so_far_trial_by_trial():
    from tuning.measure.warmgain import markdown

    rows = [{"strategy": "cold", "seed": 0, "trials": 3, "trials_to_within_1pp": None,
             "curve": [0.30, 0.20, 0.40], "best_val_acc": 0.40},
            {"strategy": "cold", "seed": 1, "trials": 3, "trials_to_within_1pp": 2,
             "curve": [0.30, 0.50, 0.10], "best_val_acc": 0.50}]
    line = markdown(rows).splitlines()[2]
    # after trial 1: (30 + 30) / 2; after 2: (30 + 50) / 2; after 3: (40 + 50) / 2
    assert "| 30.0, 40.0, 45.0 |" in line and "| >3, 2 | 2.0 (1 reached) |" in line, line


@pytest.mark.slow
def test_ctrl_c_stops_the_transfer_measurement_in_one_line(tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while a run trains:
    the command and its workers stop at once, exit 130, one line saying how to go on, no
    traceback and no results file; the same command then finishes what was left."""
    import os
    import signal

    import numpy as np
    from faultutil import group_alive, kill_group, spawn, wait_for

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 255, (200, 32, 32, 3), dtype=np.uint8),
             labels=np.arange(200) % 10)
    args = ["-m", "tuning.transfer", "--data-path", str(tmp_path / "d.npz"), "--configs", "3",
            "--epochs", "1", "--teacher-epochs", "1", "--pairs", "width", "--width", "4",
            "--workers", "2", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "t.json")]
    log = tmp_path / "transfer.log"
    slow = spawn([*args[:7], "200", *args[8:]], log, cwd=tmp_path)  # --epochs 200: still running
    try:
        wait_for(lambda: list((tmp_path / "w" / "runs").glob("*/*/")), 300, slow, log)
        time.sleep(2)
        os.killpg(slow.pid, signal.SIGINT)
        code = slow.wait(timeout=60)
        wait_for(lambda: not group_alive(slow.pid), 30)
    finally:
        kill_group(slow)
    text = log.read_text()
    assert code == 130, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    last = text.strip().splitlines()[-1]
    assert last.startswith("interrupted; what finished is kept: run `python -m tuning.transfer"
                           " --data-path") and last.endswith("again to go on"), last
    assert not (tmp_path / "t.json").exists()
    done = spawn(args, tmp_path / "again.log", cwd=tmp_path)
    assert done.wait(timeout=600) == 0, (tmp_path / "again.log").read_text()[-3000:]
    assert json.loads((tmp_path / "t.json").read_text())["pairs"][0]["configs"] == 3
    # The same work folder at --epochs 2: no run of 1 epoch is taken for one of 2.
    longer = spawn([*args[:7], "2", *args[8:]], tmp_path / "longer.log", cwd=tmp_path)
    assert longer.wait(timeout=600) == 0, (tmp_path / "longer.log").read_text()[-3000:]
    kept = [json.loads(f.read_text()) for f in (tmp_path / "w" / "runs").glob("*/*/result.json")]
    assert len(kept) == 6 and {r["config"]["epochs"] for r in kept} == {2}
