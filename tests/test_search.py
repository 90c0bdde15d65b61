"""The search end to end, with real Ray, Optuna and real subprocesses."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState
from searchutil import check_studies_agree_with_tune, rows, search_args, tracking_uri

from tuning.run.config import RunConfig
from tuning.run.train import main as train_main
from tuning.search.cli.search import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("search")


def test_smoke_search_runs_two_cells_each_with_its_chosen_and_tested_trial(ray_session, root,
                                                                          capsys):
    # FIFO, so that every trial completes and each cell's study has curves to compare.
    code = main(search_args(root, "smoke", "--num-samples", "2", "--epochs", "2",
                            "--scheduler", "fifo", depth=None, replicates=2))
    out = capsys.readouterr().out
    assert code == 0, out
    table = rows(root, "smoke")
    assert len(table) == 4 and len({r["trial_id"] for r in table}) == 4
    assert {r["status"] for r in table} <= {"COMPLETED", "STOPPED_EARLY"}
    cells = rows(root, "smoke", "cells.csv")
    assert [c["cell"] for c in cells] == ["depth=18", "depth=34"]
    found = check_studies_agree_with_tune(root, "smoke", per_cell=2)
    for cell in cells:
        mine = [r for r in table if r["cell"] == cell["cell"]]
        assert len(mine) == 2 and {r["depth"] for r in mine} == {cell["cell"][-2:]}
        # Exactly one test evaluation per cell: its chosen trial's, on the selected weights.
        tested = [r for r in mine if r["test_acc"] not in ("", "nan")]
        assert len(tested) == 1 and tested[0]["chosen"] == "True"
        assert tested[0]["trial_id"] == cell["chosen_trial"]
        assert cell["test_acc"] == tested[0]["test_acc"] and 0 < float(cell["test_acc"]) <= 1
        # The chosen trial is the study's best: selected on the last epoch's val accuracy
        # (among equals, the lower trial number: the default configuration, trial 0).
        study = found[cell["cell"]]
        best = [t.user_attrs["ray_trial_id"] for t in study.trials
                if t.value == study.best_value]
        assert cell["chosen_trial"] in best
        assert study.best_value == pytest.approx(float(cell["val_acc"]))
        assert study.user_attrs["chosen"]["test_acc"] == pytest.approx(float(cell["test_acc"]))
        config = Path(cell["config"])
        assert config.parent == root / "ray" / "smoke" / "best" and config.is_file()
    assert "per cell" in out and "cells.csv" in out
    # Replicates: each chosen trial twice more, with the next seeds, each tested once; and
    # each cell's default configuration under the same seeds, unless it was the one chosen.
    replicated = rows(root, "smoke", "replicates.csv")
    again = [r for r in replicated if r["arm"] == "tuned"]
    assert sorted((r["cell"], r["replicate"], r["seed"]) for r in again) == [
        (c, str(i), str(i)) for c in ("depth=18", "depth=34") for i in (1, 2)]
    chosen_ids = {c["cell"]: c["chosen_trial"] for c in cells}
    assert all(r["replicate_of"] == chosen_ids[r["cell"]] and r["status"] == "COMPLETED"
               and 0 < float(r["test_acc"]) <= 1 for r in replicated)
    defaults = {r["trial_id"] for r in table if r.get("default") == "True"}
    assert len(defaults) == 2  # each cell's trial 0
    for cell in cells:
        baseline = [r for r in replicated if r["cell"] == cell["cell"] and r["arm"] == "default"]
        if cell["chosen_trial"] in defaults:
            assert baseline == []  # the tuned arm is the default arm: trained once
        else:
            assert sorted(r["seed"] for r in baseline) == ["1", "2"]  # the replicates' seeds
    from mlflow import MlflowClient

    mlflow = MlflowClient(tracking_uri(root))
    exp = mlflow.get_experiment_by_name("smoke")
    runs = mlflow.search_runs([exp.experiment_id])
    by_trial = {r.data.tags.get("ray_trial_id"): r for r in runs}
    for r in again:  # its own run, linked to the run of the trial it repeats
        run = by_trial[r["trial_id"]]
        assert run.data.tags["role"] == "replicate" and run.info.status == "FINISHED"
        assert run.data.tags["replicate_of"] == by_trial[r["replicate_of"]].info.run_id
        assert run.data.params["seed"] == r["seed"]
        assert run.data.metrics["test/acc"] == pytest.approx(100 * float(r["test_acc"]),
                                                             abs=0.005)
        assert run.info.run_name.endswith(f" · seed {r['seed']}")
    # The report: every cell, mean ± std over its replicates alone, the selected trial apart,
    # the default arm; parallel coordinates; no importances from 2 trials.
    parent = next(r for r in runs if r.data.tags.get("role") == "search")
    logged = {a.path for a in mlflow.list_artifacts(parent.info.run_id, "report")}
    assert {"report/tables.md", "report/tables.csv", "report/replicates.png",
            "report/parallel-depth-18.png", "report/parallel-depth-34.png"} <= logged
    assert not any("importance" in path for path in logged)
    report = (root / "ray" / "smoke" / "report" / "tables.md").read_text()
    assert "| digits | Plain-18 | AlignKD |" in report and "| digits | Plain-34 | AlignKD |" \
        in report
    assert report.count("(n=2)") == 4  # the tuned and the default arm of each cell
    for cell in cells:  # the selected trial's own figure, apart from the replicates'
        assert f"| {100 * float(cell['test_acc']):.2f} |" in report
    for cell in cells:  # importances need max(10, 2 x the searched parameters) trials
        searched = len(found[cell["cell"]].trials[0].distributions)
        assert f"{cell['cell']}: too few trials (n=2, need {max(10, 2 * searched)})" in report
    # A chosen config runs again as a single training run.
    cfg = RunConfig.from_yaml(cells[1]["config"])
    assert cfg.method == "alignkd" and cfg.dataset == "digits" and cfg.depth == 34
    assert Path(cfg.teacher).is_file()
    assert train_main(["--config", cells[1]["config"], "--epochs", "1",
                       "--out", str(root / "again"), "--quiet"]) == 0
    teachers = [p for p in (root / "teachers").iterdir() if p.is_dir()]
    # the alignkd space searches teacher_depth: a ResNet-18 and a ResNet-34 teacher
    assert len(teachers) == 2 and not any(t.name.endswith(".partial") for t in teachers)


def test_methods_search_runs_every_way_to_a_plain_network_in_cells_of_its_own(ray_session,
                                                                              root):
    """The `methods` space end to end: six cells (AlignKD, JointRD, the released JointRD, KD,
    RepVGG alone, RepVGG+AlignKD), each with its chosen trial tested once and replicated, and
    the report comparing each with AlignKD."""
    import torch

    from models import RepConv
    from tuning.run.trainer import load_model

    code = main(search_args(root, "methods", "--num-samples", "1", "--epochs", "1",
                            space="methods", replicates=1))
    assert code == 0
    cells = rows(root, "methods", "cells.csv")
    assert sorted(c["cell"] for c in cells) == sorted(
        f"method={m},block={b}" for m, b in [
            ("alignkd", "plain"), ("alignkd", "repvgg"), ("ce", "repvgg"), ("jointrd", "plain"),
            ("jointrd_released", "plain"), ("kd", "plain")])
    assert all(0 < float(c["test_acc"]) <= 1 for c in cells)
    again = rows(root, "methods", "replicates.csv")
    # One trial per cell: its default configuration, so the tuned arm is also the baseline.
    assert len(again) == 6 and {r["status"] for r in again} == {"COMPLETED"}
    assert {r["arm"] for r in again} == {"tuned"}
    for cell in cells:
        cfg = RunConfig.from_yaml(cell["config"])
        assert cell["cell"] == f"method={cfg.method},block={cfg.block}"
        assert (cfg.teacher is None) == (cfg.method == "ce")
        if cfg.method == "kd":  # its one trial is the default: KD's own alpha and tau
            assert (cfg.alpha, cfg.temperature) == (0.9, 4.0)
        if cfg.method == "ce":  # RepVGG alone: nothing to distil, so nothing searched but
            assert cfg.alpha is None and cfg.resolved("alpha") is None  # lr and decay
    from mlflow import MlflowClient

    mlflow = MlflowClient(tracking_uri(root))
    exp = mlflow.get_experiment_by_name("methods")
    runs = [r for r in mlflow.search_runs([exp.experiment_id]) if r.data.tags.get("cell")]
    released = [r for r in runs if r.data.params.get("method") == "jointrd_released"]
    assert released and all("dis_weight" in r.data.params and "alpha" not in r.data.params
                            for r in released)
    assert all(" · RV18" in r.info.run_name for r in runs if "block=repvgg" in
               r.data.tags["cell"])
    # A RepVGG student's logged model trains with branches, and loads as one.
    chosen = next(r for r in runs if "block=repvgg" in r.data.tags["cell"]
                  and r.data.tags.get("chosen") == "true")
    path = mlflow.download_artifacts(chosen.info.run_id, "model.pt", str(root / "dl"))
    model, _ = load_model(path)
    assert any(isinstance(m, RepConv) for m in model.modules())
    assert torch.isfinite(model(torch.zeros(1, 3, 32, 32))).all()
    table = (root / "ray" / "methods" / "report" / "tables.md").read_text()
    for name in ("AlignKD", "JointRD", "JointRD (released)", "KD", "RepVGG",
                 "RepVGG+AlignKD"):
        assert f"| digits | Plain-18 | {name} | " in table
    for name in ("JointRD", "JointRD (released)", "KD", "RepVGG", "RepVGG+AlignKD"):
        assert f"| digits | Plain-18 | {name} − AlignKD | tuned |" in table
    assert table.count("(n=1)") == 12  # each method's one replicate, tuned and default


def test_optuna_dashboard_shows_each_cells_study(root):
    """The README's optuna-dashboard command, served on 127.0.0.1 and read over its REST API."""
    import json
    import socket
    import urllib.request

    if not (root / "optuna.db").is_file():
        pytest.skip("needs the smoke search of this module")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([str(Path(sys.executable).parent / "optuna-dashboard"),
                             f"sqlite:///{root / 'optuna.db'}", "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)

    def get(path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return json.load(r)

    try:
        deadline = time.time() + 60
        while True:
            try:
                listed = get("/api/studies")["study_summaries"]
                break
            except OSError:
                assert time.time() < deadline and proc.poll() is None, "dashboard did not start"
                time.sleep(0.5)
        ids = {s["study_name"]: s["study_id"] for s in listed}
        assert {"smoke/depth=18", "smoke/depth=34"} <= set(ids)
        detail = get(f"/api/studies/{ids['smoke/depth=34']}")
        assert len(detail["trials"]) == 2
        assert all(t["intermediate_values"] for t in detail["trials"])  # the curves
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_later_search_reuses_the_cached_teacher(ray_session, root, capsys):
    (teacher,) = (root / "teachers").glob("digits-resnet18*/model.pt")  # the smoke search's
    before = teacher.stat().st_mtime_ns
    code = main(search_args(root, "again", "--num-samples", "1", "--epochs", "1",
                            "--scheduler", "fifo"))  # Plain-18 alone: its teacher alone
    assert code == 0
    assert "teachers: 1 needed, 1 in the store" in capsys.readouterr().out
    assert teacher.stat().st_mtime_ns == before


def random_label_npz(path: Path, n: int = 480) -> Path:
    """Images whose labels are noise: a cell whose accuracy stays near chance, far below
    digits' at every epoch."""
    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(path, images=rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8),
             labels=rng.integers(0, 10, n))
    return path


ISOLATION_SPACE = """
fixed: {method: alignkd, shortcut: none, teacher_depth: 18, eta_span: 0.3}
across:
  dataset: [digits, npz]
params:
  lr: {type: choice, values: [0.05, 0.00001]}
  alpha: {type: float, low: 0.0, high: 1.0}
"""


def test_cells_never_compete_in_sampling_or_early_stopping(ray_session, root, tmp_path):
    """digits and a random-label set differ systematically. Pooled, ASHA would stop every
    random-label trial; per cell, each gets its full budget, every stop compared only trials
    of its own cell, and stopped trials are PRUNED in the cell's study."""
    space = tmp_path / "two-sets.yaml"
    space.write_text(ISOLATION_SPACE)
    data = random_label_npz(tmp_path / "noise.npz")
    code = main(search_args(root, "cells", "--num-samples", "4", "--epochs", "4",
                            "--first-rung", "0.5", "--set", f"data_path={data}",
                            space=str(space), smoke=False))
    assert code == 0
    table = rows(root, "cells")
    cell_of = {r["trial_id"]: r["cell"] for r in table}
    assert sorted(cell_of.values()) == ["dataset=digits"] * 4 + ["dataset=npz"] * 4
    found = check_studies_agree_with_tune(root, "cells", per_cell=4)
    # Systematically apart: the best digits trial far above anything random labels allow
    # (the lr 1e-5 trials of either cell stay near chance).
    best = {c: max(float(r["val_acc"]) for r in table if r["cell"] == c) for c in found}
    assert best["dataset=digits"] > best["dataset=npz"] + 0.2, best
    records = [(t, k, v) for cell, study in found.items() for t in study.trials
               for k, v in t.user_attrs.items() if k.startswith("asha_epoch_")]
    assert {r[1] for r in records} == {"asha_epoch_2"}  # the one rung: 0.5 x 4
    for trial, _, record in records:
        mine = cell_of[trial.user_attrs["ray_trial_id"]]
        assert record["cell"] == mine
        assert {c["ray_trial_id"] for c in record["compared"]} <= {
            t for t, c in cell_of.items() if c == mine}  # no other cell's trial compared
        for c in record["compared"]:  # the values compared are those trials' recorded ones
            other = found[mine].trials[c["study_trial"]]
            assert other.intermediate_values[2] == pytest.approx(c["value"])
        assert record["go_on"] is (trial.state != TrialState.PRUNED)
    assert {cell_of[t.user_attrs["ray_trial_id"]] for t, _, _ in records} == set(found)
    pruned = [t for study in found.values() for t in study.trials
              if t.state == TrialState.PRUNED]
    assert pruned, "no trial was stopped: the rung never decided anything"
    for t in pruned:
        assert sorted(t.intermediate_values) == [1, 2] and t.value == t.intermediate_values[2]
    for cell in found:  # each cell: one chosen trial, tested once
        tested = [r for r in table if r["cell"] == cell and r["test_acc"] not in ("", "nan")]
        assert len(tested) == 1 and tested[0]["status"] == "COMPLETED"


def test_acc_time_objective_finds_a_pareto_front_per_cell(ray_session, root):
    code = main(search_args(root, "pareto", "--num-samples", "2", "--epochs", "1",
                            "--objective", "acc-time", space="compare"))
    assert code == 0
    table = rows(root, "pareto")
    assert sorted(r["cell"] for r in table) == ["method=alignkd"] * 2 + ["method=jointrd"] * 2
    for cell, study in check_studies_agree_with_tune(root, "pareto", per_cell=2).items():
        assert len(study.directions) == 2
        front = {t.user_attrs["ray_trial_id"] for t in study.best_trials}
        assert front == {r["trial_id"] for r in table if r["cell"] == cell and
                         r["pareto"] == "True"}


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
    # Two cells, two trials each, early stopping on: the studies and the rung decisions must
    # come through the kill as Tune's trials do.
    args = search_args(root, name, "--set", "checkpoint_interval_s=0", "--num-samples", "2",
                       "--epochs", "3", "--max-concurrent", "1", depth=None)
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
    assert main(search_args(root, name, "--resume", depth=None)) == 0
    table = rows(root, name)
    assert len(table) == 4 and len({r["trial_id"] for r in table}) == 4
    assert all((r["status"], r["epochs"] == "3") in (("COMPLETED", True),
                                                      ("STOPPED_EARLY", False))
               for r in table), table
    # Each study: no trial lost twice or duplicated, each in the state Tune gave it.
    found = check_studies_agree_with_tune(root, name, per_cell=2)
    assert all(len(rows_) == 1 for rows_ in [
        [r for r in rows(root, name, "cells.csv") if r["cell"] == c] for c in found])
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


def _digits_teacher(folder: Path) -> Path:
    """A digits ResNet of width 4: the smoke search's students have width 8."""
    from tuning.run.trainer import train

    train(RunConfig(method="ce", shortcut="all", width=4, epochs=1, batch_size=256,
                    device="cpu", data_root=str(folder / "data")), folder / "w4", quiet=True)
    return folder / "w4" / "model.pt"


def _three_class_teacher(folder: Path) -> Path:
    import numpy as np

    from tuning.run.trainer import train

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
    from tuning.search.cli.search import main

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
    "missing_data_no_download",
    "space_empty_choice", "set_unknown_dataset", "set_unknown_method", "teacher_classes",
    "across_not_a_field", "across_no_values", "across_and_searched", "optuna_unwritable",
    "optuna_unopenable", "resume_other_cells", "resume_other_epochs", "teacher_recipe_range",
    "disk_too_small", "teacher_corrupt", "negative_concurrency",
    # hostile input: names, numbers, files and values that used to give tracebacks or worse
    "name_escape", "name_absolute", "name_dot", "name_dotdot", "negative_epochs",
    "negative_cpus", "gpus_without_a_gpu", "teacher_store_is_a_file", "set_broken_yaml",
    "space_binary", "space_alias_bomb", "space_params_list", "space_grid_list",
    "space_when_list", "space_huge", "garbage_mlflow_db", "resume_corrupt_settings",
    "resume_empty_settings", "resume_writable_by_others", "resume_bad_name",
    "teacher_other_width",
    # what a reviewer's answer asks of a search: its baseline, choice rule and budget
    "unknown_baseline", "choose_negative", "choose_without_front", "choose_unknown",
    "budget_below_a_trial", "negative_sampler_seed", "unknown_sampler", "first_rung_above_one",
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
        "across_not_a_field": "across: {eta_span: [0.2, 0.4]}\n",
        "across_no_values": "across: {dataset: []}\n",
        "across_and_searched": "across: {depth: [18, 34]}\n"
                               "params:\n  depth: {type: choice, values: [18, 34]}\n",
        "teacher_recipe_range": "fixed: {method: alignkd}\n"
                                "params:\n  batch_size: {type: int, low: 32, high: 64}\n",
        "space_alias_bomb": "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
                            "b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                            "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
                            "params: {alpha: {type: float, low: 0, high: *c}}\n",
        "space_params_list": "params: [alpha, lr]\n",
        "space_grid_list": "fixed: {method: alignkd}\ngrid: [0.1, 0.2]\n",
        "space_when_list": "params:\n  alpha: {type: float, low: 0, high: 1, when: [1, 2]}\n",
        "space_huge": "# " + "x" * (70 << 10) + "\n" + GOOD_SPACE,
    }
    space_file = tmp_path / "space.yaml"
    space_file.write_text(spaces.get(case, GOOD_SPACE))
    if case == "space_binary":
        space_file.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary")
    garbage_db = tmp_path / "garbage.db"
    garbage_db.write_bytes(b"this is not a database" * 100)
    # A search folder of our own, for the resume cases (settings copied from the smoke search).
    own = tmp_path / "ray"
    if case.startswith("resume_") and case not in ("resume_other_space", "resume_other_cells",
                                                   "resume_other_epochs", "resume_missing",
                                                   "resume_bad_name"):
        (own / "mine").mkdir(parents=True)
        smoke = root / "ray" / "smoke" / "search.yaml"
        text = {"resume_corrupt_settings": "name: [mine\n", "resume_empty_settings": "",
                "resume_writable_by_others": smoke.read_text() if smoke.exists() else ""}[case]
        (own / "mine" / "search.yaml").write_text(text)
        if case == "resume_writable_by_others":
            if not smoke.exists():
                pytest.skip("needs the smoke search of this module")
            os.chmod(own / "mine", 0o777)
    teacher = tmp_path / "teacher.pt"
    if case == "teacher_classes":
        teacher = _three_class_teacher(tmp_path)
    elif case == "teacher_other_width":
        teacher = _digits_teacher(tmp_path)
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
        # Offline: the download fails, and the line names both ways forward.
        "missing_data": (["--set", "dataset=cifar100", "--data-root", str(tmp_path / "none")],
                         "without network, run the smoke search with --smoke"),
        "missing_data_no_download": (["--set", "dataset=cifar100", "--no-download",
                                      "--data-root", str(tmp_path / "none")],
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
        "across_not_a_field": (["--space", str(space_file)], "must be a run-config field"),
        "across_no_values": (["--space", str(space_file)], "must be a non-empty list"),
        "across_and_searched": (["--space", str(space_file)], "is both run across and searched"),
        "teacher_recipe_range": (["--space", str(space_file)],
                                 "params.batch_size: each trial's teacher is trained"),
        "optuna_unwritable": (["--optuna-storage", f"sqlite:///{blocker}/sub/o.db"],
                              "is not a writable folder"),
        "optuna_unopenable": (["--optuna-storage", "nosuchdb://127.0.0.1:9/x"],
                              "--optuna-storage nosuchdb://127.0.0.1:9/x cannot be opened"),
        "resume_other_cells": (["--resume", "--name", "smoke", "--set", "depth=34"],
                               "runs the cells depth=18, depth=34; with --set depth=34 it "
                               "would run all"),
        "resume_other_epochs": (["--resume", "--name", "smoke", "--epochs", "9"],
                                "a resumed search keeps its settings"),
        "disk_too_small": (["--num-samples", "1000000", "--set", "width=64"],
                           "GB are free under"),
        "name_escape": (["--name", "../../escape"], "is not a valid search name"),
        "name_absolute": (["--name", "/abs"], "is not a valid search name"),
        "name_dot": (["--name", "."], "is not a valid search name"),
        "name_dotdot": (["--name", ".."], "is not a valid search name"),
        "negative_epochs": (["--epochs", "-1"], "--epochs must be at least 1; got -1"),
        "negative_cpus": (["--cpus-per-trial", "-1"], "--cpus-per-trial must be more than 0"),
        "gpus_without_a_gpu": (["--gpus-per-trial", "1"], "asks for more GPUs than this "
                                                          "machine has (0)"),
        "teacher_store_is_a_file": (["--teacher-store", str(blocker)],
                                    f"--teacher-store {blocker} is not writable"),
        "set_broken_yaml": (["--set", "lr=[0.1"], "is not a value"),
        "space_binary": (["--space", str(space_file)], "not a text (UTF-8) file"),
        "space_alias_bomb": (["--space", str(space_file)], "anchors and aliases"),
        "space_params_list": (["--space", str(space_file)], "params: must be a mapping"),
        "space_grid_list": (["--space", str(space_file)], "grid: must be a mapping"),
        "space_when_list": (["--space", str(space_file)], "when: must be a mapping"),
        "space_huge": (["--space", str(space_file)], "larger than 64 KB"),
        "garbage_mlflow_db": (["--tracking-uri", f"sqlite:///{garbage_db}"],
                              "is not an SQLite database"),
        "resume_corrupt_settings": (["--resume", "--name", "mine"],
                                    "search.yaml is not valid YAML; restore it"),
        "resume_empty_settings": (["--resume", "--name", "mine"], "is empty, truncated"),
        "resume_writable_by_others": (["--resume", "--name", "mine"],
                                      "can be written by another user"),
        "resume_bad_name": (["--resume", "--name", "../x"], "is not a valid search name"),
        "teacher_other_width": (["--set", f"teacher={teacher}"],
                                "has width 4 but the search's students have width 8"),
        "set_unknown_dataset": (["--set", "dataset=mnist"], "dataset must be one of"),
        "set_unknown_method": (["--set", "method=dino"], "method must be one of"),
        "teacher_classes": (["--set", f"teacher={teacher}"],
                            "was trained on npz (3 classes) but the search runs digits"),
        "teacher_corrupt": (["--set", f"teacher={teacher}"], "truncated or corrupt"),
        "negative_concurrency": (["--max-concurrent", "-1"], "--max-concurrent must be"),
        "unknown_baseline": (["--baseline", "maybe"], "argument --baseline: invalid choice"),
        "choose_negative": (["--choose", "fastest-within:-1"], "as a number >= 0; got '-1'"),
        "choose_without_front": (["--choose", "knee"], "which only --objective acc-time"),
        "choose_unknown": (["--choose", "cheapest"], "--choose must be best, knee or"),
        "budget_below_a_trial": (["--budget-epochs", "3"], "is less than one trial (4 epochs)"),
        "negative_sampler_seed": (["--sampler-seed", "-1"], "--sampler-seed must be 0 or more"),
        "unknown_sampler": (["--sampler", "cmaes"], "argument --sampler: invalid choice"),
        "first_rung_above_one": (["--first-rung", "1.5"], "--first-rung must be a fraction"),
    }[case]
    base = ["--storage-path", str(tmp_path / "ray"), "--teacher-store", str(tmp_path / "t"),
            "--data-root", str(tmp_path / "datasets"), "--smoke",
            "--tracking-uri", tracking_uri(tmp_path)]
    kept = ("resume_other_space", "name_exists", "resume_other_cells", "resume_other_epochs")
    if case in kept:
        if before is None:
            pytest.skip("needs the smoke search of this module")
        # The smoke search's own folders: a resume that names others is refused for that.
        base[1], base[3], base[5] = (str(root / "ray"), str(root / "teachers"),
                                     str(root / "datasets"))
    try:
        code = main(base + args)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and expect in err, err
    assert len(err.strip().splitlines()) == 1, err
    if case not in kept and not case.startswith("resume_"):
        assert not (tmp_path / "ray").exists() and not (tmp_path / "t").exists()
        assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "optuna.db").exists()
        assert not (tmp_path / "none").exists()  # no data folder from a failed download
    if before is not None:
        assert sorted(p.name for p in existing.iterdir()) == before


def test_test_accuracy_only_for_a_checkpoint_of_the_reported_epoch(tmp_path, capsys):
    """A trial stopped between checkpoints has no checkpoint of its last epoch: its test
    accuracy would be an older model's, so there is none."""
    import math

    from tuning.run.trainer import train
    from tuning.search import results

    cfg = RunConfig(method="ce", shortcut="all", width=4, epochs=2, batch_size=64, device="cpu",
                    data_root=str(tmp_path / "data"))
    train(cfg, tmp_path / "run", quiet=True, evaluate_test=False)
    acc = results.test_accuracy(cfg, tmp_path / "run", epoch=2)
    assert 0.0 <= acc <= 1.0
    assert math.isnan(results.test_accuracy(cfg, tmp_path / "run", epoch=3))
    assert "its last checkpoint is of epoch 2" in capsys.readouterr().out
