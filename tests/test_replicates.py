"""Replicated finalists with real Ray, Optuna and MLflow: a SIGKILLed driver during the
replicate phase, `tuning.replicate` on a finished search, and its bad input."""

from pathlib import Path

import pytest
from faultutil import kill_group, lost_epochs, mlflow_trials, spawn_search, wait_for
from searchutil import rows, search_args, tracking_uri

from tuning.search.cli.replicate import main as replicate_main
from tuning.search.cli.search import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("replicates")


def test_a_driver_killed_during_the_replicates_resumes_them_without_rerunning(
        ray_session, root, tmp_path):
    name = "rep-killed"
    args = search_args(root, name, "--set", "checkpoint_interval_s=0", "--num-samples", "1",
                       "--epochs", "3", "--max-concurrent", "1", "--scheduler", "fifo",
                       replicates=2)
    log = tmp_path / "driver.log"
    proc = spawn_search(args, log)
    replicates = root / "ray" / name / "replicates"

    def first_replicate_done_second_started() -> bool:
        done = [p for p in replicates.glob("run_trial_*") if (p / "result.json").is_file()
                and p.joinpath("result.json").read_text().count("\n") >= 3]
        started = [p for p in replicates.glob("run_trial_*/checkpoint_*")]
        return len(done) >= 1 and len({p.parent for p in started}) >= 2

    try:
        wait_for(first_replicate_done_second_started, 420, proc, log)
    finally:
        kill_group(proc)
    assert not (root / "ray" / name / "replicates.csv").exists()  # died in the phase
    before = {k: v for k, v in mlflow_trials(tracking_uri(root), name).items()}
    assert main(search_args(root, name, "--resume")) == 0
    again = rows(root, name, "replicates.csv")
    assert [(r["replicate"], r["status"], r["epochs"]) for r in again] == [
        ("1", "COMPLETED", "3"), ("2", "COMPLETED", "3")]
    runs = mlflow_trials(tracking_uri(root), name)
    trial = rows(root, name)[0]["trial_id"]
    assert runs[trial] == before[trial]  # the search phase was not run again
    for r in again:
        found = [x for x in runs[r["trial_id"]] if x["status"] != "KILLED"]
        assert len(found) == 1 and found[0]["status"] == "FINISHED"
        assert sorted(set(found[0]["steps"])) == [1, 2, 3]
        assert lost_epochs(found[0]["steps"]) <= 1  # at most the epoch in flight
    finished_before = [t for t, found in before.items() if t != trial and
                       found[0]["status"] == "FINISHED"]
    assert finished_before  # the first replicate had finished: it was kept, not rerun
    for t in finished_before:
        assert runs[t] == before[t]


def test_replicate_adds_replicates_to_a_finished_search(ray_session, root):
    name = "rep-later"
    assert main(search_args(root, name, "--num-samples", "1", "--epochs", "1",
                            "--scheduler", "fifo")) == 0
    assert not (root / "ray" / name / "replicates.csv").exists()
    code = replicate_main([name, "--replicates", "2", "--storage-path", str(root / "ray")])
    assert code == 0
    again = rows(root, name, "replicates.csv")
    chosen = rows(root, name, "cells.csv")[0]["chosen_trial"]
    assert [(r["replicate"], r["replicate_of"], r["status"]) for r in again] == [
        ("1", chosen, "COMPLETED"), ("2", chosen, "COMPLETED")]
    table = (root / "ray" / name / "report" / "tables.md").read_text()
    assert "(n=2)" in table  # the replicates alone: the chosen trial is shown apart


@pytest.mark.parametrize("case", ["negative", "unknown", "nothing_finished", "other_count"])
def test_replicate_bad_input_is_one_line_exit_2(ray_session, root, tmp_path, capsys, case):
    storage = root / "ray"
    if case == "nothing_finished":
        space = tmp_path / "wild.yaml"
        space.write_text("fixed: {method: alignkd, lr: 100000.0}\n"
                         "params:\n  alpha: {type: float, low: 0, high: 1}\n")
        assert main(search_args(root, "rep-none", "--num-samples", "1", "--epochs", "1",
                                space=str(space))) == 1
    args, expect = {
        "negative": (["rep-later", "--replicates", "-1"], "--replicates must be 1 or more"),
        "unknown": (["ghost"], "no search named 'ghost'"),
        "nothing_finished": (["rep-none"], "has no finished trial to replicate"),
        "other_count": (["rep-later", "--replicates", "3"], "already has 2 replicates"),
    }[case]
    if case == "other_count" and not (storage / "rep-later" / "replicates.csv").exists():
        pytest.skip("needs the replicated search of this module")
    capsys.readouterr()
    storage.mkdir(parents=True, exist_ok=True)
    before = sorted(p.name for p in storage.iterdir())
    assert replicate_main([*args, "--storage-path", str(storage)]) == 2
    err = capsys.readouterr().err
    assert expect in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in storage.iterdir()) == before


def test_search_refuses_a_negative_replicate_count(root, tmp_path, capsys):
    code = main(search_args(tmp_path, "neg", replicates=-1))
    err = capsys.readouterr().err
    assert code == 2 and "--replicates must be 0 (none) or more; got -1" in err
    assert not (tmp_path / "ray").exists()


def test_the_default_baseline_trains_under_the_replicates_seeds(ray_session, root, tmp_path):
    """A space whose lr range excludes the default: trial 0 runs the nearest lr it allows and
    is the cell's only trial, so it is chosen; the true default (lr 0.01) is the baseline arm,
    trained under the tuned arm's seeds, and the report gives the gain and says what moved."""
    import csv

    from mlflow import MlflowClient

    space = tmp_path / "narrow.yaml"
    space.write_text("fixed: {method: alignkd, teacher_depth: 18}\n"
                     "params:\n  lr: {type: choice, values: [0.05, 0.02]}\n"
                     "  alpha: {type: float, low: 0.0, high: 1.0}\n")
    name = "baseline"
    assert main(search_args(root, name, "--num-samples", "1", "--epochs", "1",
                            space=str(space), replicates=2)) == 0
    (trial,) = rows(root, name)
    assert trial["default"] == "True" and float(trial["lr"]) == 0.02  # clipped into the space
    again = rows(root, name, "replicates.csv")
    arms = {(r["arm"], r["seed"]) for r in again}
    assert arms == {("tuned", "1"), ("tuned", "2"), ("default", "1"), ("default", "2")}
    assert all(r["status"] == "COMPLETED" for r in again)
    runs = MlflowClient(tracking_uri(root)).search_runs(
        [MlflowClient(tracking_uri(root)).get_experiment_by_name(name).experiment_id])
    lr = {(r.data.tags.get("arm"), r.data.params["seed"]): r.data.params["lr"] for r in runs
          if r.data.tags.get("role") == "replicate"}
    assert lr == {("tuned", "1"): "0.02", ("tuned", "2"): "0.02", ("default", "1"): "0.01",
                  ("default", "2"): "0.01"}
    with open(root / "ray" / name / "report" / "tables.csv") as f:
        (row,) = list(csv.DictReader(f))
    by_seed = {(r["arm"], r["seed"]): float(r["test_acc"]) for r in again}
    gain = sum(by_seed[("tuned", s)] - by_seed[("default", s)] for s in "12") / 2
    # (MLflow keeps accuracies in % to 2 decimals: the report's figures agree to 1e-4)
    assert float(row["alignkd_gain"]) == pytest.approx(gain, abs=1e-4)
    assert float(row["alignkd_default_mean"]) == pytest.approx(
        (by_seed[("default", "1")] + by_seed[("default", "2")]) / 2, abs=1e-4)
    table = (root / "ray" / name / "report" / "tables.md").read_text()
    assert "the space excludes the default lr: 0.01 -> 0.02" in table
