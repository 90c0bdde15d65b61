"""One study per cell: the searcher's budgets, the scheduler's rungs and decisions, and the
states it leaves in a real Optuna storage (SQLite). Ray Tune's own loop is exercised end to end
in test_search.py; here the same objects are driven directly, so every case is deterministic."""

import json
import math

import optuna
import pytest
import torch
from optuna.trial import TrialState
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import Searcher

from tuning.search.schedule import promotes, rung_epochs
from tuning.search.space import parse_space
from tuning.search.studies import (
    DEFAULT,
    LOST,
    CellScheduler,
    CellSearcher,
    StudyBook,
    decisions,
    mark_lost,
    tell,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = """
fixed: {method: alignkd}
across:
  dataset: [digits, npz]
params:
  alpha: {type: float, low: 0.0, high: 1.0}
"""


@pytest.fixture
def book(tmp_path):
    space = parse_space(SPACE, source="two.yaml", name="two")
    return StudyBook(f"sqlite:///{tmp_path / 'optuna.db'}", "s", space, seed=0,
                     multi_objective=False, budget=3)


def lr_peak_epoch(epochs: int, steps: int = 7, pct_start: float = 0.3) -> int:
    """The epoch in which a real OneCycleLR reaches its highest lr (1-based)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=epochs * steps,
                                                pct_start=pct_start)
    lrs = []
    for _ in range(epochs * steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs.index(max(lrs)) // steps + 1


@pytest.mark.parametrize("epochs", [2, 3, 4, 10, 15, 20, 50, 200, 201])
def test_no_rung_comes_before_the_lr_peak(epochs):
    rungs = rung_epochs(epochs, 0.3, 2)
    assert all(r >= lr_peak_epoch(epochs) for r in rungs) and all(r < epochs for r in rungs)


def test_rungs_of_the_default_recipe():
    assert rung_epochs(200, 0.3, 2) == (60, 120)
    assert rung_epochs(4, 0.3, 2) == (2,)
    assert rung_epochs(1, 0.3, 2) == ()


@pytest.mark.parametrize(("value", "compared", "expected"), [
    (0.5, [0.5], True),               # the first at a rung always goes on
    (0.4, [0.5, 0.4], False),         # two: only the better half (1 of 2)
    (0.5, [0.5, 0.4], True),
    (0.5, [0.5, 0.5], True),          # a tie with the best goes on
    (0.6, [0.9, 0.8, 0.6], False),    # three: floor(3/2) = 1 goes on
    (0.8, [0.9, 0.8, 0.6, 0.1], True),  # four: the top 2
    (0.6, [0.9, 0.8, 0.6, 0.1], False),
    (math.nan, [0.9, math.nan], False),
])
def test_successive_halving_rule_on_hand_worked_cases(value, compared, expected):
    assert promotes(value, compared, 2) is expected


def ask(searcher, n):
    return [(f"t{i}", searcher.suggest(f"t{i}")) for i in range(n)]


def test_each_cell_gets_exactly_its_budget_round_robin(book):
    searcher = CellSearcher(book, book.space.cells(), epochs=4)
    asked = ask(searcher, 6)
    assert [c["dataset"] for _, c in asked] == ["digits", "npz"] * 3
    assert all(0.0 <= c["alpha"] <= 1.0 and "method" not in c for _, c in asked)  # fixed
    assert searcher.suggest("t6") == Searcher.FINISHED
    for cell in book.space.cells():
        assert [t.user_attrs["ray_trial_id"] for t in book.study(cell).trials] == [
            tid for tid, c in asked if c["cell"] == cell.key]


def test_a_concurrency_limit_holds_over_all_cells(book):
    searcher = CellSearcher(book, book.space.cells(), epochs=4, max_concurrent=2)
    assert len(ask(searcher, 2)) == 2 and searcher.suggest("t9") is None
    searcher.on_trial_complete("t0", {"epoch": 4, "val_acc": 0.5})
    assert searcher.suggest("t9")["dataset"] == "digits"


def drive(book, scheduler, config, epoch, value):
    from tuning.search.cells import Cell

    cell = Cell.of(config, book.space.dims)
    return scheduler.decide(cell, config["study_trial"], epoch, value)


def test_a_stop_depends_only_on_the_trials_of_its_own_cell(book):
    """digits trials score 0.9, npz trials 0.1 at the rung: pooled, every npz trial would
    stop. Per cell, the first npz trial goes on and only a worse npz trial stops."""
    searcher = CellSearcher(book, book.space.cells(), epochs=4)
    scheduler = CellScheduler(book, (2,), 2)
    configs = dict(ask(searcher, 6))
    values = {"t0": 0.9, "t1": 0.1, "t2": 0.95, "t3": 0.05, "t4": 0.8, "t5": 0.12}
    decided = {}
    for epoch in (1, 2):
        for tid, config in configs.items():
            if decided.get(tid) == TrialScheduler.STOP:
                continue
            decided[tid] = drive(book, scheduler, config, epoch, values[tid] - (2 - epoch) / 10)
    assert decided == {"t0": "CONTINUE", "t1": "CONTINUE", "t2": "CONTINUE", "t3": "STOP",
                       "t4": "STOP", "t5": "CONTINUE"}
    cell_of = {tid: c["cell"] for tid, c in configs.items()}
    records = decisions(book, book.space.cells())
    assert len(records) == 6
    for record in records:
        assert {c["ray_trial_id"] for c in record["compared"]} <= {
            t for t, c in cell_of.items() if c == cell_of[record["ray_trial_id"]]}
        if record["ray_trial_id"] in ("t0", "t1"):  # each cell's trial 0: its default
            assert record["go_on"] and "never stopped" in record["rule"]
            continue
        assert record["go_on"] == promotes(record["value"],
                                           [c["value"] for c in record["compared"]], 2)
    states = {t.user_attrs["ray_trial_id"]: t for c in book.space.cells()
              for t in book.study(c).trials}
    assert {t for t, f in states.items() if f.state == TrialState.PRUNED} == {"t3", "t4"}
    # A pruned trial keeps its curve; Optuna takes its last value as the pruned value.
    assert states["t3"].intermediate_values == {1: pytest.approx(-0.05), 2: 0.05}
    assert states["t3"].value == 0.05
    # The same report again (a resumed trial catching up) gets the recorded decision.
    assert drive(book, scheduler, configs["t3"], 2, 0.99) == TrialScheduler.STOP
    assert drive(book, scheduler, configs["t5"], 2, 0.0) == TrialScheduler.CONTINUE


def test_how_a_trial_ends_is_told_to_its_study(book):
    searcher = CellSearcher(book, book.space.cells(), epochs=4)
    configs = dict(ask(searcher, 4))
    searcher.on_trial_complete("t0", {"epoch": 4, "val_acc": 0.7, "train_time": 3.0})
    searcher.on_trial_complete("t1", None, error=True)
    searcher.on_trial_complete("t2", {"epoch": 2, "val_acc": 0.7})  # ended short, not stopped
    frozen = {t.user_attrs["ray_trial_id"]: t for c in book.space.cells()
              for t in book.study(c).trials}
    assert frozen["t0"].state == TrialState.COMPLETE and frozen["t0"].value == 0.7
    assert frozen["t1"].state == TrialState.FAIL and frozen["t2"].state == TrialState.FAIL
    assert "ended after epoch 2 of 4" in frozen["t2"].user_attrs["failure"]
    assert frozen["t3"].state == TrialState.RUNNING
    # Telling again (after a killed driver) changes nothing.
    cell = next(c for c in book.space.cells() if c.key == configs["t0"]["cell"])
    assert tell(book, cell, 0, {"epoch": 4, "val_acc": 0.1}, error=False, epochs=4).value == 0.7


def test_trials_tune_never_recorded_are_lost_and_replaced(book, tmp_path):
    """A driver killed after asking a study but before Tune saved the trial: on resume the
    study trial is FAIL with a reason, and the cell asks for another in its place."""
    searcher = CellSearcher(book, book.space.cells(), epochs=4)
    ask(searcher, 3)
    searcher.save(str(tmp_path / "state.json"))          # Tune saved t0..t2
    searcher.suggest("t3")                                # then asked for t3, and died
    state = json.loads((tmp_path / "state.json").read_text())
    assert set(state["known"]) == {"t0", "t1", "t2"}     # JSON: nothing to unpickle
    resumed = CellSearcher(book, book.space.cells(), epochs=4)
    resumed.restore(str(tmp_path / "state.json"))
    asked = [resumed.suggest(f"r{i}") for i in range(4)]
    assert asked[-1] == Searcher.FINISHED
    lost = [t for c in book.space.cells() for t in book.study(c).trials if LOST in t.user_attrs]
    assert [t.user_attrs["ray_trial_id"] for t in lost] == ["t3"]
    assert lost[0].state == TrialState.FAIL
    for cell in book.space.cells():
        assert len(book.counted(cell)) == 3
    assert mark_lost(book, book.space.cells(), known={"t0", "t1", "t2", "r0", "r1", "r2"}) == 0


def test_the_studies_pickle_without_their_connections(book):
    import pickle

    searcher = CellSearcher(book, book.space.cells(), epochs=4)
    ask(searcher, 2)
    again = pickle.loads(pickle.dumps(searcher))
    assert again.book._studies == {} and again.book._storage is None
    assert len(again.book.study(book.space.cells()[0]).trials) == 1


def test_a_multi_objective_cell_is_told_accuracy_and_time(tmp_path):
    space = parse_space(SPACE, source="two.yaml", name="two")
    book = StudyBook(f"sqlite:///{tmp_path / 'mo.db'}", "s", space, seed=0,
                     multi_objective=True, budget=2)
    searcher = CellSearcher(book, space.cells(), epochs=2)
    ask(searcher, 2)
    searcher.on_trial_complete("t0", {"epoch": 2, "val_acc": 0.6, "train_time": 9.0})
    frozen = book.study(space.cells()[0]).trials[0]
    assert frozen.values == [0.6, 9.0]
    assert isinstance(book.sampler(space.cells()[0]), optuna.samplers.TPESampler)


def test_rank_correlation_is_scipys_and_its_interval_holds_it():
    import numpy as np
    from scipy.stats import spearmanr

    from tuning.search.report.stats import spearman

    c = spearman([1, 2, 3, 4], [1, 3, 2, 4])
    assert c.rho == pytest.approx(0.8) and c.n == 4  # 1 - 6*2/(4*15)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]).rho)
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.integers(0, 6, 15).astype(float)  # many ties
        y = x + rng.normal(0, 2, 15)
        c = spearman(list(x), list(y))
        assert c.rho == pytest.approx(spearmanr(x, y).statistic)
        assert c.low <= c.rho <= c.high and -1 <= c.low and c.high <= 1
    # A perfect ranking has no spread to resample: its interval is the point itself.
    perfect = spearman([1, 2, 3, 4, 5], [2, 4, 6, 8, 10])
    assert (perfect.rho, perfect.low, perfect.high) == pytest.approx((1.0, 1.0, 1.0))


def test_the_rung_measurement_on_hand_worked_curves():
    from tuning.search.rungs import cell_correlation, replay, settled_from

    curves = [{1: 0.1, 2: 0.3, 3: 0.4}, {1: 0.2, 2: 0.2, 3: 0.5}, {1: 0.3, 2: 0.4, 3: 0.6},
              {1: 0.2, 2: 0.5}]  # the last one never finished: not counted
    result = cell_correlation(curves, epochs=3, rungs=(2,))
    assert result["trials"] == 3 and result["rho_at"][2] == pytest.approx(0.5)  # d = 1, -1, 0
    assert result["rho_at"][1] == pytest.approx(1.0)
    # Halving at epoch 2 in this order: 0.3 goes on; 0.2 < 0.3 stops; 0.4 is the best of 3.
    assert replay(curves[:3], (2,), 3) == {"rungs": [2], "ran_to_the_end": 2, "best_kept": 0.6,
                                           "best": 0.6, "regret": 0.0,
                                           "epoch_share": pytest.approx((3 + 2 + 3) / 9)}
    # Over every order of arrival, the best trial (0.4 at the rung, the highest) always goes
    # on, and the middle one stops whenever it comes after the best.
    r = result["replay"]
    assert r["regret_mean"] == 0 and r["best_kept_share"] == 1
    assert 0 < r["epochs_saved_share"] < 1 / 3
    # rho settles (>= 0.7 for good) at epoch 3 of 3 here, not at epoch 1, which was 1.0 by
    # chance before falling to 0.5.
    assert result["settled_fraction"] == 1.0
    assert settled_from({1: 0.2, 2: 0.75, 3: 0.8, 4: 0.9}, 5) == pytest.approx(2 / 5)
    assert settled_from({1: 0.9, 2: 0.5, 3: 0.8, 4: 0.9}, 5) == pytest.approx(3 / 5)


def test_rung_placement_follows_the_measured_rule():
    """The default first rung is where the committed pilot measured rho to settle, and the
    pilot's own file records the rungs that rule gives it."""
    from pathlib import Path

    from tuning.search.rungs import THRESHOLD, settled_from
    from tuning.search.schedule import FIRST_RUNG_FRACTION, REDUCTION_FACTOR, default_rungs
    from tuning.search.space import load_space

    path = Path(__file__).parents[1] / "bench" / "results" / "rung-correlation-cifar10-cpu.json"
    pilot = json.loads(path.read_text())
    assert pilot["trials"] >= 20 and pilot["threshold"] == THRESHOLD
    rho_at = {int(e): r for e, r in pilot["rho_at"].items()}
    measured = settled_from(rho_at, pilot["epochs"])
    assert FIRST_RUNG_FRACTION == pytest.approx(measured)
    space = load_space("alignkd").with_fixed(pilot["fixed"])
    assert pilot["default_rungs"] == list(default_rungs(space, pilot["epochs"], REDUCTION_FACTOR))


def test_no_rung_judges_a_schedule_in_mid_course():
    from tuning.search.schedule import FIRST_RUNG_FRACTION, default_rungs, settled_fraction

    def space(params: str):
        return parse_space(f"fixed: {{method: alignkd}}\nparams:\n{params}", source="s.yaml",
                           name="s")

    short = space("  alpha: {type: float, low: 0, high: 1}\n")
    # eta at its default: 60 epochs, so a 200-epoch run settles at 0.3; the measured
    # fraction is later and wins.
    assert settled_fraction(short, 200) == pytest.approx(0.3)
    assert default_rungs(short, 200, 2)[0] == math.ceil(FIRST_RUNG_FRACTION * 200)
    # A span searched up to 0.9 of training: no rung before 0.9.
    long = space("  eta_span: {type: float, low: 0.1, high: 0.9}\n")
    assert default_rungs(long, 20, 2, first=0.5) == (18,)
    assert default_rungs(long, 20, 2, first=0.95) == (19,)
    # A constant eta never moves: only the lr peak and the measured fraction count.
    flat = parse_space("fixed: {method: alignkd, eta_kind: constant, eta_epochs: 200}\n"
                       "params:\n  alpha: {type: float, low: 0, high: 1}\n",
                       source="f.yaml", name="f")
    assert settled_fraction(flat, 20) == pytest.approx(0.3)
    # A 4-epoch eta span in a 4-epoch search settles at its end: no rung at all.
    assert default_rungs(space("  alpha: {type: float, low: 0, high: 1}\n"), 4, 2) == ()


def test_each_sampled_cell_starts_from_its_default_which_is_never_stopped(book):
    searcher = CellSearcher(book, book.space.cells(), epochs=4)
    scheduler = CellScheduler(book, (2,), 2)
    configs = dict(ask(searcher, 4))
    assert configs["t0"][DEFAULT] is True and configs["t0"]["alpha"] == 0.5
    assert DEFAULT not in configs["t2"]
    # The default, worst at the rung and not first, still runs to the end.
    drive(book, scheduler, configs["t2"], 2, 0.9)
    assert drive(book, scheduler, configs["t0"], 2, 0.1) == TrialScheduler.CONTINUE
    cell = book.space.cells()[0]
    assert book.study(cell).user_attrs[DEFAULT] == {"params": {"alpha": 0.5}, "clipped": []}
    assert book.study(cell).metric_names == ["val_acc"]


def test_a_default_outside_the_space_is_moved_into_it_and_said(tmp_path):
    from tuning.search.space import cell_defaults

    space = parse_space("fixed: {method: alignkd}\nparams:\n"
                        "  lr: {type: float, low: 0.02, high: 0.1, log: true}\n"
                        "  feature_loss: {type: choice, values: [at, nst]}\n"
                        "  alpha: {type: float, low: 0.0, high: 1.0}\n",
                        source="s.yaml", name="s")
    d = cell_defaults(space, space.cells()[0])
    assert d.values == {"lr": 0.01, "feature_loss": "mse", "alpha": 0.5}
    assert d.enqueued == {"lr": 0.02, "feature_loss": "at", "alpha": 0.5}
    assert d.clipped == ("lr: 0.01 -> 0.02", "feature_loss: 'mse' -> 'at'")
    book = StudyBook(f"sqlite:///{tmp_path / 'c.db'}", "s", space, seed=0,
                     multi_objective=False, budget=2)
    first = CellSearcher(book, space.cells(), epochs=2).suggest("t0")
    assert (first["lr"], first["feature_loss"]) == (0.02, "at")


def test_an_epoch_budget_counts_running_trials_and_gives_back_stopped_epochs(tmp_path):
    space = parse_space(SPACE, source="two.yaml", name="two").with_fixed({"dataset": "digits"})
    book = StudyBook(f"sqlite:///{tmp_path / 'b.db'}", "s", space, seed=0,
                     multi_objective=False, budget=100, epoch_budget=10)
    searcher = CellSearcher(book, space.cells(), epochs=4)
    scheduler = CellScheduler(book, (2,), 2)
    configs = dict(ask(searcher, 2))             # 2 running trials: 8 of 10 epochs spoken for
    assert searcher.suggest("t2") is None        # a third would overrun; wait, not finished
    drive(book, scheduler, configs["t0"], 2, 0.9)
    assert drive(book, scheduler, configs["t1"], 2, 0.1) == TrialScheduler.STOP
    searcher.on_trial_complete("t1", {"epoch": 2, "val_acc": 0.1})
    cell = space.cells()[0]
    assert book.epochs_spent(cell, 4) == 4 + 2   # t0 running (4), t1 stopped at epoch 2
    assert searcher.suggest("t2") is not None    # 6 + 4 = 10 fits
    assert searcher.suggest("t3") is None        # 10 + 4 would not, while trials run
    searcher.on_trial_complete("t0", {"epoch": 4, "val_acc": 0.9})
    searcher.on_trial_complete("t2", {"epoch": 4, "val_acc": 0.5})
    assert searcher.suggest("t3") == Searcher.FINISHED


def test_concurrent_tpe_lies_about_running_trials_and_random_is_random(tmp_path):
    space = parse_space(SPACE, source="two.yaml", name="two")
    cell = space.cells()[0]

    def book(**kw):
        return StudyBook(f"sqlite:///{tmp_path / 'x.db'}", "s", space, seed=0,
                         multi_objective=False, budget=10, **kw)

    assert book(concurrent=True).sampler(cell)._constant_liar is True
    assert book(concurrent=False).sampler(cell)._constant_liar is False
    assert isinstance(book(sampler="random").sampler(cell), optuna.samplers.RandomSampler)


def test_a_grid_cell_runs_each_point_once(tmp_path):
    space = parse_space("fixed: {method: alignkd}\nacross: {depth: [18, 34]}\n"
                        "grid:\n  lr: [0.01, 0.02, 0.03]\n", source="g.yaml", name="g")
    book = StudyBook(f"sqlite:///{tmp_path / 'g.db'}", "s", space, seed=0,
                     multi_objective=False, budget=99)
    searcher = CellSearcher(book, space.cells(), epochs=1)
    asked = ask(searcher, 7)
    assert asked[-1][1] == Searcher.FINISHED  # 2 cells x 3 grid points
    for cell in space.cells():
        assert sorted(c["lr"] for _, c in asked[:-1] if c and c["cell"] == cell.key) == [
            0.01, 0.02, 0.03]
    for tid, _ in asked[:-1]:
        searcher.on_trial_complete(tid, {"epoch": 1, "val_acc": 0.5})
    assert all(t.state == TrialState.COMPLETE for c in space.cells()
               for t in book.study(c).trials)


def test_a_resumed_driver_does_not_replay_its_samplers_first_proposals(book, tmp_path):
    searcher = CellSearcher(book, book.space.cells(), epochs=4)
    first = [c["alpha"] for _, c in ask(searcher, 2)]
    searcher.save(str(tmp_path / "state.json"))
    again = StudyBook(book.storage_url, "s", book.space, seed=0, multi_objective=False,
                      budget=3)  # a new driver process: new samplers, same storage and seed
    resumed = CellSearcher(again, again.space.cells(), epochs=4)
    resumed.restore(str(tmp_path / "state.json"))
    later = [resumed.suggest(f"r{i}")["alpha"] for i in range(2)]
    assert not set(later) & set(first)


def test_a_grid_point_lost_with_a_killed_driver_is_run_again_not_skipped(tmp_path):
    space = parse_space("fixed: {method: alignkd}\ngrid:\n  lr: [0.01, 0.02, 0.03]\n",
                        source="g.yaml", name="g")
    book = StudyBook(f"sqlite:///{tmp_path / 'g.db'}", "s", space, seed=0,
                     multi_objective=False, budget=99)
    searcher = CellSearcher(book, space.cells(), epochs=1)
    ask(searcher, 1)
    searcher.save(str(tmp_path / "state.json"))  # Tune recorded t0 ...
    searcher.suggest("t1")                        # ... but not t1: lost with the driver
    resumed = CellSearcher(book, space.cells(), epochs=1)
    resumed.restore(str(tmp_path / "state.json"))
    assert [resumed.suggest(f"r{i}") is not Searcher.FINISHED for i in range(3)] == [
        True, True, False]
    cell = space.cells()[0]
    assert sorted(t.params["lr"] for t in book.counted(cell)) == [0.01, 0.02, 0.03]


def test_a_decision_the_study_never_heard_of_still_stops_the_trial(book):
    """Killed between recording a stop and telling the study: after the resume the trial may
    report an epoch past its rung; it stops, PRUNED."""
    searcher = CellSearcher(book, book.space.cells(), epochs=8)
    scheduler = CellScheduler(book, (2, 4), 2)
    configs = dict(ask(searcher, 1))
    cell = book.space.cells()[0]
    frozen = book.trial(cell, 0)
    book.storage.set_trial_user_attr(frozen._trial_id, "asha_epoch_2", {
        "epoch": 2, "value": 0.1, "go_on": False, "cell": cell.key, "compared": []})
    assert drive(book, scheduler, configs["t0"], 3, 0.5) == TrialScheduler.STOP
    assert book.trial(cell, 0).state == TrialState.PRUNED


def test_a_trial_its_study_failed_stops_when_tune_runs_it_again(book):
    searcher = CellSearcher(book, book.space.cells(), epochs=8)
    scheduler = CellScheduler(book, (2,), 2)
    configs = dict(ask(searcher, 1))
    searcher.on_trial_complete("t0", None, error=True)  # told; Tune's save came before
    assert drive(book, scheduler, configs["t0"], 1, 0.5) == TrialScheduler.STOP
    assert book.trial(book.space.cells()[0], 0).state == TrialState.FAIL


def pilot_search(tmp_path, finished: int, scheduler: str = "fifo"):
    """A search folder whose study holds `finished` complete trials of 15 epochs each."""
    from tuning.search.settings import SearchSettings

    text = "fixed: {method: alignkd, eta_span: 0.3}\nparams:\n  alpha: {type: float, low: 0, " \
           "high: 1}\n"
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    folder = tmp_path / "ray" / "pilot"
    folder.mkdir(parents=True)
    SearchSettings(name="pilot", space_name="p", space_source="p.yaml", space_text=text,
                   space_digest="0", overrides={}, cells=["all"],
                   tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", optuna_storage=url,
                   storage_path=str(tmp_path / "ray"), teacher_store=str(tmp_path / "t"),
                   epochs=15, teacher_epochs=15, num_samples=finished,
                   trials_per_cell=finished, seed=0, scheduler=scheduler).write(folder)
    study = optuna.create_study(storage=url, study_name="pilot/all", direction="maximize")
    dist = {"alpha": optuna.distributions.FloatDistribution(0, 1)}
    for i in range(finished):
        curve = {e: 0.04 * e + 0.01 * ((i * (16 - e)) % 5) for e in range(1, 16)}
        study.add_trial(optuna.trial.create_trial(
            params={"alpha": i / 10}, distributions=dist, value=curve[15],
            intermediate_values=curve))
    return tmp_path / "ray"


def test_the_rung_tool_writes_its_measurement_and_refuses_too_few_trials(tmp_path, capsys):
    from tuning.search.cli.rungs import main as rungs_main

    storage = pilot_search(tmp_path / "ok", 8)
    out = tmp_path / "ok" / "rho.json"
    assert rungs_main(["pilot", "--storage-path", str(storage), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["trials"] == 8 and set(result["rho_at"]) == {str(e) for e in range(1, 15)}
    assert result["default_rungs"] == [14]  # ceil(14/15 x 15); eta settles at 0.3
    assert "orders of arrival" in capsys.readouterr().out
    for folder, n, scheduler, expect in ((tmp_path / "few", 4, "fifo", "has 4 finished"),
                                         (tmp_path / "asha", 8, "asha", "ran asha")):
        storage = pilot_search(folder, n, scheduler)
        capsys.readouterr()
        assert rungs_main(["pilot", "--storage-path", str(storage),
                           "--out", str(folder / "rho.json")]) == 2
        err = capsys.readouterr().err
        assert expect in err and len(err.strip().splitlines()) == 1, err
        assert not (folder / "rho.json").exists()
