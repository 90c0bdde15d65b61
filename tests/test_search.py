"""The search end to end, with real Ray, Optuna and real subprocesses."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from searchutil import rows, search_args, tracking_uri

from tuning.config import RunConfig
from tuning.search import main
from tuning.train import main as train_main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("search")


def test_smoke_search_end_to_end(ray_session, root, capsys):
    code = main(search_args(root, "smoke", "--num-samples", "3", "--epochs", "2"))
    out = capsys.readouterr().out
    assert code == 0, out
    table = rows(root, "smoke")
    assert len(table) == 3 and len({r["trial_id"] for r in table}) == 3
    assert {r["status"] for r in table} <= {"TERMINATED", "STOPPED_EARLY"}
    assert all(0.0 <= float(r["val_acc"]) <= 1.0 for r in table)
    best = max(table, key=lambda r: float(r["val_acc"]))
    assert float(best["test_acc"]) > 0  # evaluated once, for the chosen trial only
    assert sum(r["test_acc"] not in ("", "nan") for r in table) == 1
    assert "best trial" in out and "results.csv" in out
    # The best config runs again as a single training run.
    cfg = RunConfig.from_yaml(root / "ray" / "smoke" / "best_config.yaml")
    assert cfg.method == "alignkd" and cfg.dataset == "digits" and Path(cfg.teacher).is_file()
    assert train_main(["--config", str(root / "ray" / "smoke" / "best_config.yaml"),
                       "--epochs", "1", "--out", str(root / "again"), "--quiet"]) == 0
    teachers = [p for p in (root / "teachers").iterdir() if p.is_dir()]
    # the alignkd space searches teacher_depth: a ResNet-18 and a ResNet-34 teacher
    assert len(teachers) == 2 and not any(t.name.endswith(".partial") for t in teachers)


def test_a_later_search_reuses_the_cached_teacher(ray_session, root, capsys):
    teacher = next(p for p in (root / "teachers").iterdir() if p.is_dir()) / "model.pt"
    before = teacher.stat().st_mtime_ns
    code = main(search_args(root, "again", "--num-samples", "1", "--epochs", "1",
                            "--scheduler", "fifo"))
    assert code == 0
    assert "2 needed, 2 in the store" in capsys.readouterr().out
    assert teacher.stat().st_mtime_ns == before


def test_acc_time_objective_marks_the_pareto_front(ray_session, root):
    code = main(search_args(root, "pareto", "--num-samples", "2", "--epochs", "1",
                            "--objective", "acc-time", space="compare"))
    assert code == 0
    table = rows(root, "pareto")
    assert any(r["pareto"] == "True" for r in table)
    assert {r["method"] for r in table} <= {"alignkd", "jointrd"}


def _wait_for(predicate, timeout: float, proc=None) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.5)
    return False


def test_resume_after_the_driver_is_killed(ray_session, root, tmp_path):
    name = "killed"
    log = open(tmp_path / "driver.log", "w")
    args = search_args(root, name, "--set", "checkpoint_interval_s=0", "--num-samples", "3",
                       "--epochs", "3", "--max-concurrent",
                       "1", "--scheduler", "fifo")
    proc = subprocess.Popen([sys.executable, "-m", "tuning.search", *args], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    experiment = root / "ray" / name

    def second_trial_checkpointed() -> bool:
        done = list(experiment.glob("run_trial_*/checkpoint_00000*"))
        return len({p.parent for p in done}) >= 2

    try:
        assert _wait_for(second_trial_checkpointed, 240, proc), (tmp_path / "driver.log").read_text(
        )
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (experiment / "results.csv").exists()  # it really died mid-search
    assert main(search_args(root, name, "--resume")) == 0
    table = rows(root, name)
    assert len(table) == 3 and len({r["trial_id"] for r in table}) == 3
    assert all(r["status"] == "TERMINATED" and r["epochs"] == "3" for r in table), table
    # MLflow: one child run per trial, none left RUNNING, the parent finished.
    from mlflow import MlflowClient

    mlflow = MlflowClient(tracking_uri(root))
    exp = mlflow.get_experiment_by_name(name)
    runs = mlflow.search_runs([exp.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    # A trial started in the last seconds before the kill, which the driver never recorded,
    # cannot be continued: its run is ended KILLED with the reason, not left RUNNING.
    killed = [r for r in children if r.info.status == "KILLED"]
    assert all("driver was killed" in r.data.tags.get("failure_reason", "") for r in killed)
    kept = [r for r in children if r.info.status != "KILLED"]
    assert sorted(r.data.tags["ray_trial_id"] for r in kept) == sorted(
        r["trial_id"] for r in table)
    assert all(r.info.status in ("FINISHED", "KILLED") for r in runs), [
        r.info.status for r in runs]


GOOD_SPACE = "fixed: {method: alignkd}\nparams:\n  alpha: {type: float, low: 0, high: 1}\n"


def _three_class_teacher(folder: Path) -> Path:
    import numpy as np

    from tuning.trainer import train

    data = folder / "three.npz"
    rng = np.random.default_rng(0)
    np.savez(data, images=rng.integers(0, 255, (60, 32, 32, 3), dtype=np.uint8),
             labels=np.arange(60) % 3)
    train(RunConfig(method="ce", shortcut="all", dataset="npz", data_path=str(data), width=4,
                    epochs=1, batch_size=64, device="cpu"), folder / "three", quiet=True)
    return folder / "three" / "model.pt"


CLUSTER_SCRIPT = textwrap.dedent("""
    import sys
    from ray.cluster_utils import Cluster
    from tuning.search import main

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        code = main(sys.argv[1:] + ["--address", cluster.address])
    finally:
        cluster.shutdown()
    sys.exit(code)
""")


def test_two_node_cluster_runs_trials_on_both_nodes(root, tmp_path):
    script = tmp_path / "cluster.py"
    script.write_text(CLUSTER_SCRIPT)
    args = search_args(root, "cluster", "--num-samples", "2", "--epochs", "1",
                       "--max-concurrent", "2", "--scheduler", "fifo")
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = rows(root, "cluster")
    assert len(table) == 2 and len({r["node_id"] for r in table}) == 2


@pytest.mark.parametrize("case", [
    "unknown_space", "malformed_space", "unreachable_address", "resume_missing",
    "zero_samples", "negative_samples", "bad_set_key", "unwritable_storage", "missing_data",
    "resume_other_space", "name_exists", "bad_flag", "unreachable_tracking",
    "space_yaml", "space_unknown_key", "space_negative_lam", "space_eta_order",
    "space_empty_choice", "set_unknown_dataset", "set_unknown_method", "teacher_classes",
    "teacher_corrupt", "negative_concurrency",
])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(case, root, tmp_path, capsys):
    bad_space = tmp_path / "bad.yaml"
    bad_space.write_text("params:\n  alpha: {type: float, low: 0, high: 3}\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    spaces = {
        "space_yaml": "params: [alpha\n",
        "space_unknown_key": "params:\n  alfa: {type: float, low: 0, high: 1}\n",
        "space_negative_lam": "params:\n  lam: {type: float, low: -0.1, high: 0.1}\n",
        "space_eta_order": "fixed: {eta_start: 0.5, eta_end: 1.0}\n"
                           "params:\n  lr: {type: float, low: 0.01, high: 0.1}\n",
        "space_empty_choice": "params:\n  feature_loss: {type: choice, values: []}\n",
    }
    space_file = tmp_path / "space.yaml"
    space_file.write_text(spaces.get(case, GOOD_SPACE))
    teacher = tmp_path / "teacher.pt"
    if case == "teacher_classes":
        teacher = _three_class_teacher(tmp_path)
    elif case == "teacher_corrupt":
        teacher.write_bytes(b"PK\x03\x04 not a real checkpoint")
    existing = root / "ray" / "smoke"
    before = sorted(p.name for p in existing.iterdir()) if existing.exists() else None
    args, expect = {
        "unknown_space": (["--space", "alignkdd"], "unknown space 'alignkdd'"),
        "malformed_space": (["--space", str(bad_space)], "params.alpha.high: alpha must be"),
        "unreachable_address": (["--address", "127.0.0.1:9"], "no Ray cluster answers"),
        "resume_missing": (["--resume", "--name", "ghost"], "no search named 'ghost'"),
        "zero_samples": (["--num-samples", "0"], "--num-samples must be at least 1"),
        "negative_samples": (["--num-samples", "-3"], "--num-samples must be at least 1"),
        "bad_set_key": (["--set", "alfa=0.3"], "unknown key 'alfa'"),
        "unwritable_storage": (["--storage-path", str(blocker / "sub")], "is not writable"),
        "missing_data": (["--set", "dataset=cifar100", "--data-root", str(tmp_path / "none")],
                         "CIFAR-100 not found"),
        "resume_other_space": (["--resume", "--name", "smoke", "--space", "jointrd"],
                               "was started with space alignkd"),
        "name_exists": (["--name", "smoke"], "already exists"),
        "bad_flag": (["--scheduler", "hyperband"], "invalid choice"),
        "unreachable_tracking": (["--tracking-uri", "http://127.0.0.1:9"],
                                 "MLflow tracking at http://127.0.0.1:9 is unreachable"),
        "space_yaml": (["--space", str(space_file)], "not valid YAML"),
        "space_unknown_key": (["--space", str(space_file)], "params.alfa: unknown key"),
        "space_negative_lam": (["--space", str(space_file)], "params.lam.low: lam must be"),
        "space_eta_order": (["--space", str(space_file)], "end (1.0) is beyond its start"),
        "space_empty_choice": (["--space", str(space_file)], "must be a non-empty list"),
        "set_unknown_dataset": (["--set", "dataset=mnist"], "dataset must be one of"),
        "set_unknown_method": (["--set", "method=dino"], "method must be one of"),
        "teacher_classes": (["--set", f"teacher={teacher}"],
                            "was trained on npz (3 classes) but the search runs digits"),
        "teacher_corrupt": (["--set", f"teacher={teacher}"], "truncated or corrupt"),
        "negative_concurrency": (["--max-concurrent", "-1"], "--max-concurrent must be"),
    }[case]
    base = ["--storage-path", str(tmp_path / "ray"), "--teacher-store", str(tmp_path / "t"),
            "--data-root", str(tmp_path / "datasets"), "--smoke",
            "--tracking-uri", tracking_uri(tmp_path)]
    if case in ("resume_other_space", "name_exists"):
        if before is None:
            pytest.skip("needs the smoke search of this module")
        base[1] = str(root / "ray")
    try:
        code = main(base + args)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and expect in err, err
    assert len(err.strip().splitlines()) == 1, err
    if case not in ("resume_other_space", "name_exists"):
        assert not (tmp_path / "ray").exists() and not (tmp_path / "t").exists()
        assert not (tmp_path / "mlflow.db").exists()
    if before is not None:
        assert sorted(p.name for p in existing.iterdir()) == before


def test_test_accuracy_only_for_a_checkpoint_of_the_reported_epoch(tmp_path, capsys):
    """A trial stopped between checkpoints has no checkpoint of its last epoch: its test
    accuracy would be an older model's, so there is none."""
    import math

    from tuning.search import results
    from tuning.trainer import train

    cfg = RunConfig(method="ce", shortcut="all", width=4, epochs=2, batch_size=64, device="cpu",
                    data_root=str(tmp_path / "data"))
    train(cfg, tmp_path / "run", quiet=True, evaluate_test=False)
    acc = results.test_accuracy(cfg, tmp_path / "run", epoch=2)
    assert 0.0 <= acc <= 1.0
    assert math.isnan(results.test_accuracy(cfg, tmp_path / "run", epoch=3))
    assert "its last checkpoint is of epoch 2" in capsys.readouterr().out
