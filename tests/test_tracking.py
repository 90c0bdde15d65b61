"""MLflow tracking of real searches: SQLite, and a real `mlflow server` read over REST."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient
from searchutil import rows, search_args, tracking_uri

from tuning.search.cli.search import main
from tuning.search.report import build as report
from tuning.search.tracking import scrub

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def searched(ray_session, tmp_path_factory):
    """One compare search with ASHA: two cells (alignkd, jointrd), two trials each."""
    root = tmp_path_factory.mktemp("tracked")
    assert main(search_args(root, "tracked", "--num-samples", "2", "--epochs", "3",
                            space="compare")) == 0
    return root


def runs_of(root: Path, name: str):
    mlflow = MlflowClient(tracking_uri(root))
    exp = mlflow.get_experiment_by_name(name)
    assert exp is not None, f"no experiment named {name}"
    runs = mlflow.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("role") == "search"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return mlflow, parent, children


def test_one_experiment_one_parent_and_a_nested_run_per_trial(searched):
    mlflow, parent, children = runs_of(searched, "tracked")
    table = rows(searched, "tracked")
    assert len(parent) == 1 and len(children) == len(table) == 4
    p = parent[0]
    assert {"space", "sampler", "scheduler", "num_samples", "seed"} <= set(p.data.params)
    assert p.data.params["sampler"] == "tpe" and p.data.params["num_samples"] == "2"
    artifacts = {a.path for a in mlflow.list_artifacts(p.info.run_id)}
    assert {"results.csv", "cells.csv", "best", "search.yaml", "report"} <= artifacts
    chosen = {a.path for a in mlflow.list_artifacts(p.info.run_id, "best")}
    assert chosen == {"best/method-alignkd.yaml", "best/method-jointrd.yaml"}
    plots = {a.path for a in mlflow.list_artifacts(p.info.run_id, "report")}
    assert {"report/val_acc_per_epoch.png", "report/acc_vs_time.png", "report/tables.md",
            "report/replicates.png"} <= plots
    assert all(c.data.tags["mlflow.parentRunId"] == p.info.run_id for c in children)
    assert {r.info.status for r in [p, *children]} == {"FINISHED"}


def test_trial_runs_hold_params_curves_tags_and_artifacts(searched):
    mlflow, _, children = runs_of(searched, "tracked")
    table = {r["trial_id"]: r for r in rows(searched, "tracked")}
    teacher_exp = mlflow.get_experiment_by_name("teachers")
    teacher_ids = {r.info.run_id for r in mlflow.search_runs([teacher_exp.experiment_id])}
    for run in children:
        params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
        row = table[tags["ray_trial_id"]]
        # Named for a chart legend; its method's hyperparameters only, and its cell.
        default = " · default" if row["default"] == "True" else ""
        assert run.info.run_name == (f"{params['method']} · digits · P18 · "
                                     f"#{int(row['study_trial']):02d}{default}")
        assert tags["default_config"] == ("true" if default else "false")
        # Each searched value under the name the space gives it (eta_span, not only the
        # eta_epochs it sets), so that views over the space's parameters find it.
        assert tags["searched"].split(", ") and all(
            k in params for k in tags["searched"].split(", "))
        assert "eta_span" in params and "eta_epochs" in params
        assert {"method", "dataset", "depth", "teacher_depth", "width", "teacher", "seed",
                "lr", "weight_decay", "eta_kind", "momentum", "cell"} <= set(params)
        own = {"alignkd": {"alpha", "temperature", "feature_loss", "beta"}, "jointrd": {"lam"}}
        other = "jointrd" if params["method"] == "alignkd" else "alignkd"
        assert own[params["method"]] <= set(params) and not own[other] & set(params)
        assert not {"device", "data_root", "compile", "checkpoint_interval_s"} & set(params)
        assert not any(k.startswith("sampled.") for k in params)
        assert {"ray_trial_id", "search", "git_commit", "device", "cell", "study_trial",
                "chosen", "searched"} <= set(tags)
        assert tags["cell"] == f"method={params['method']}" == params["cell"]
        assert tags["teacher_run_id"] in teacher_ids  # links to the teacher's own run
        # Metrics in sections, accuracies in percent.
        history = mlflow.get_metric_history(run.info.run_id, "val/acc")
        assert sorted(m.step for m in history) == list(range(1, int(row["epochs"]) + 1))
        assert history[-1].value == pytest.approx(100 * float(row["val_acc"]), abs=0.005)
        assert {"train/loss", "loss/ce", "opt/lr", "opt/momentum", "opt/eta", "time/epoch_s",
                "time/images_per_s", "val/best_acc", "time/train_total_s"} <= set(metrics)
        assert not {"val_acc", "train_time", "best_val_acc"} & set(metrics)
        term = "loss/kl" if params["method"] == "alignkd" else "loss/hybrid_ce_1"
        assert term in metrics
        # Every trial keeps its model and config; one stopped early, those of its last epoch.
        artifacts = {a.path for a in mlflow.list_artifacts(run.info.run_id)}
        assert {"model.pt", "config.yaml"} <= artifacts
        if row["status"] == "COMPLETED":
            assert tags["stopped_early"] == "false"
        else:
            assert row["status"] == "STOPPED_EARLY" and tags["stopped_early"] == "true"
            assert tags["model_epoch"] == row["epochs"]
    exp = mlflow.get_experiment_by_name("tracked")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on runs
    assert "method=alignkd" in exp.tags["mlflow.note.content"]
    teacher_names = {r.info.run_name for r in mlflow.search_runs([teacher_exp.experiment_id])}
    assert "teacher · digits · R18" in teacher_names
    # Each cell's chosen trial, and only it, has a test accuracy, logged to its run.
    for cell in ("method=alignkd", "method=jointrd"):
        mine = [r for r in table.values() if r["cell"] == cell]
        best = max((r for r in mine if r["status"] == "COMPLETED"),
                   key=lambda r: float(r["val_acc"]))
        assert best["chosen"] == "True"
        runs = {c.data.tags["ray_trial_id"]: c for c in children}
        assert runs[best["trial_id"]].data.metrics["test/acc"] == pytest.approx(
            100 * float(best["test_acc"]), abs=0.005)
        assert runs[best["trial_id"]].data.tags["chosen"] == "true"
        assert all("test/acc" not in runs[r["trial_id"]].data.metrics
                   for r in mine if r is not best)


def test_report_prints_the_tables_and_writes_plots(searched, tmp_path):
    text, files = report.build(tracking_uri(searched), "tracked", tmp_path,
                               log_to_parent=False)
    assert "search tracked: 4 trial runs, 0 replicate runs" in text
    assert "| digits | Plain-18 |" in text and "AlignKD" in text and "JointRD" in text
    assert "n<2" in text  # one run per method: no interval, and the report still succeeds
    for png in (f for f in files if f.suffix == ".png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_a_diverging_trial_is_failed_with_its_reason_and_the_search_goes_on(ray_session,
                                                                            tmp_path):
    space = tmp_path / "wild.yaml"
    space.write_text("fixed: {method: alignkd}\ngrid:\n  lr: [0.02, 100000.0]\n")
    # a grid runs every point in its cell: two trials
    code = main(search_args(tmp_path, "wild", "--epochs", "2", "--scheduler", "fifo",
                            space=str(space)))
    assert code == 0
    table = {float(r["lr"]): r for r in rows(tmp_path, "wild")}
    assert table[0.02]["status"] == "COMPLETED"
    assert table[100000.0]["status"] == "FAILED"
    assert "training loss became" in table[100000.0]["error"]
    _, _, children = runs_of(tmp_path, "wild")
    failed = [c for c in children if c.info.status == "FAILED"]
    assert len(children) == 2 and len(failed) == 1
    assert "training loss became" in failed[0].data.tags["failure_reason"]
    # It would diverge again: it failed once, and Tune did not restart it from a checkpoint.
    states = sorted((tmp_path / "ray" / "wild").glob("experiment_state-*.json"))
    trials = json.loads(states[-1].read_text())["trial_data"]
    failures = {}
    for entry in trials:
        meta, run = (json.loads(p) if isinstance(p, str) else p for p in entry)
        failures[meta["trial_id"]] = run.get("num_failures", 0)
    assert failures == {r["trial_id"]: 0 for r in table.values()}


def test_credentials_never_become_params_or_tags():
    assert scrub("aws_secret_access_key", "x") is None
    assert scrub("tracking", "http://user:pw@host:5000") is None
    assert scrub("note", "token=abc") is None
    assert scrub("lr", 0.1) == "0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_runs_reach_a_real_mlflow_server_read_over_rest(ray_session, tmp_path):
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "server did not start"
                time.sleep(1)
        # With a tracking server, the studies' default is ./optuna.db: keep them in the test.
        args = search_args(tmp_path, "served", "--num-samples", "1", "--epochs", "1",
                           "--scheduler", "fifo", "--optuna-storage",
                           f"sqlite:///{tmp_path / 'optuna.db'}")
        args[args.index("--tracking-uri") + 1] = base
        assert main(args) == 0
        exp = _get(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=served")
        exp_id = exp["experiment"]["experiment_id"]
        found = _get(f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id]})["runs"]
        tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in found]
        assert sum(t.get("role") == "search" for t in tags) == 1
        child = [r for r, t in zip(found, tags, strict=True) if "mlflow.parentRunId" in t]
        assert len(child) == 1 and child[0]["info"]["status"] == "FINISHED"
        keys = {m["key"] for m in child[0]["data"]["metrics"]}
        assert {"val/acc", "train/loss", "time/images_per_s"} <= keys
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # the server's workers too
        server.wait()


def test_export_takes_a_finished_trials_mlflow_run_id(searched, tmp_path, monkeypatch):
    from tuning.measure import export

    _, _, children = runs_of(searched, "tracked")
    done = next(c for c in children if c.data.tags["stopped_early"] == "false")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri(searched))
    monkeypatch.chdir(tmp_path)
    assert export.main([done.info.run_id, "--out", str(tmp_path / "out"),
                        "--formats", "torchscript"]) == 0
    assert (tmp_path / "out" / "model.ts").is_file()
    assert (tmp_path / "exports" / done.info.run_id / "model.pt").is_file()


def _serve(port: int, root: Path) -> subprocess.Popen:
    """A real `mlflow server` on 127.0.0.1:port over the store in `root`."""
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
         "--artifacts-destination", str(root / "server-artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            assert time.time() < deadline and server.poll() is None, "server did not start"
            time.sleep(1)


def _stop(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()


def test_a_tracking_outage_loses_no_epoch_and_no_training(tmp_path):
    """The server is stopped mid-search for several epochs, then started again on the same
    port and store: every trial finishes, every epoch is in MLflow once, nothing is RUNNING."""
    from faultutil import kill_group, spawn_search, wait_for

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = _serve(port, tmp_path)
    epochs = 8
    args = search_args(tmp_path, "outage", "--num-samples", "2", "--epochs", str(epochs),
                       "--scheduler", "fifo", "--max-concurrent", "1", "--optuna-storage",
                       f"sqlite:///{tmp_path / 'optuna.db'}")
    args[args.index("--tracking-uri") + 1] = base
    log = tmp_path / "driver.log"
    proc = spawn_search(args, log)

    def first_epoch_logged() -> bool:
        try:
            exp = _get(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=outage")
            runs = _get(f"{base}/api/2.0/mlflow/runs/search",
                        {"experiment_ids": [exp["experiment"]["experiment_id"]]}).get("runs", [])
        except OSError:
            return False
        return any(m["key"] == "val/acc" for r in runs for m in r["data"].get("metrics", []))

    try:
        wait_for(first_epoch_logged, 420, proc, log, interval=0.5)
        _stop(server)
        time.sleep(25)  # several epochs of a thin network on digits
        server = _serve(port, tmp_path)
        assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
        text = log.read_text()
        assert "tracking unreachable" in text  # the outage did reach a training trial
        exp = _get(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=outage")
        exp_id = exp["experiment"]["experiment_id"]
        found = _get(f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id]})["runs"]
        assert {r["info"]["status"] for r in found} == {"FINISHED"}  # none RUNNING
        children = [r for r in found
                    if any(t["key"] == "mlflow.parentRunId" for t in r["data"].get("tags", []))]
        table = rows(tmp_path, "outage")
        trial_ids = {t["value"] for r in children for t in r["data"]["tags"]
                     if t["key"] == "ray_trial_id"}
        assert len(children) == 2 and trial_ids == {r["trial_id"] for r in table}
        for run in children:
            history = _get(f"{base}/api/2.0/mlflow/metrics/get-history?run_id="
                           f"{run['info']['run_id']}&metric_key=val%2Facc")["metrics"]
            assert sorted(m["step"] for m in history) == list(range(1, epochs + 1))  # once each
    finally:
        kill_group(proc)
        _stop(server)
