"""Hostile but honest use of the search CLI, with real driver processes: Ctrl-C, two drivers
under one name, and the network a self-started Ray listens on."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faultutil import kill_group, mlflow_trials, parent_status, spawn_search, wait_for
from searchutil import search_args, tracking_uri

pytestmark = pytest.mark.slow


def long_search(root: Path, name: str, *extra: str) -> list[str]:
    return search_args(root, name, "--set", "checkpoint_interval_s=0", "--num-samples", "2",
                       "--epochs", "30", "--max-concurrent", "1", "--scheduler", "fifo", *extra)


def trial_checkpointed(root: Path, name: str):
    return lambda: list((root / "ray" / name).glob("run_trial_*/checkpoint_00000*"))


def test_ctrl_c_is_an_interrupted_search_not_a_finished_one(tmp_path):
    name = "ctrl-c"
    log = tmp_path / "driver.log"
    proc = spawn_search(long_search(tmp_path, name), log)
    try:
        wait_for(trial_checkpointed(tmp_path, name), 420, proc, log)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends the driver
        code = proc.wait(timeout=180)
    finally:
        kill_group(proc)
    text = log.read_text()
    assert code == 130, text[-3000:]
    assert "interrupted" in text and f"--resume --name {name}" in text
    folder = tmp_path / "ray" / name
    assert not (folder / "results.csv").exists() and not (folder / "cells.csv").exists()
    assert not (folder / "best").exists()  # nothing chosen from a partial search
    assert parent_status(tracking_uri(tmp_path), name) == ["KILLED"]
    from mlflow import MlflowClient

    exp = MlflowClient(tracking_uri(tmp_path)).get_experiment_by_name(name)
    parent = next(r for r in MlflowClient(tracking_uri(tmp_path)).search_runs(
        [exp.experiment_id]) if r.data.tags.get("role") == "search")
    assert parent.data.tags["state"] == "interrupted"
    runs = mlflow_trials(tracking_uri(tmp_path), name)
    assert all(r["status"] != "RUNNING" for found in runs.values() for r in found)


def _stopped_like_ctrl_c(tmp_path: Path, name: str, text: str, code: int, expect: int) -> None:
    """What an interrupted search must leave: the exit code, the resume hint, nothing chosen,
    the parent run KILLED and tagged, and no run of the search left RUNNING."""
    from mlflow import MlflowClient

    assert code == expect, text[-3000:]
    assert "Traceback" not in text and "SIGTERM received" not in text, text[-3000:]
    assert f"--resume --name {name}" in text
    assert parent_status(tracking_uri(tmp_path), name) == ["KILLED"]
    client = MlflowClient(tracking_uri(tmp_path))
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    assert [r.info.status for r in runs if r.info.status == "RUNNING"] == []
    parent = next(r for r in runs if r.data.tags.get("role") == "search")
    assert parent.data.tags["state"] == "interrupted"


def test_sigterm_stops_a_search_as_ctrl_c_does(tmp_path):
    """Schedulers and `timeout` send SIGTERM: exit 143, the resume hint, every run KILLED,
    and the search resumes."""
    name = "term"
    log = tmp_path / "driver.log"
    proc = spawn_search(long_search(tmp_path, name), log)
    try:
        wait_for(trial_checkpointed(tmp_path, name), 420, proc, log)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=180)
    finally:
        kill_group(proc)
    _stopped_like_ctrl_c(tmp_path, name, log.read_text(), code, 143)
    assert not (tmp_path / "ray" / name / "results.csv").exists()
    log = tmp_path / "resume.log"
    resumed = spawn_search(search_args(tmp_path, name, "--resume"), log)
    try:
        wait_for(lambda: "started" in log.read_text() or "restarted" in log.read_text(), 300,
                 resumed, log)
    finally:
        kill_group(resumed)


def test_sigterm_during_the_replicates_ends_their_runs_too(tmp_path):
    name = "term-rep"
    log = tmp_path / "driver.log"
    proc = spawn_search(search_args(tmp_path, name, "--set", "checkpoint_interval_s=0",
                                    "--num-samples", "1", "--epochs", "1", "--scheduler",
                                    "fifo", "--max-concurrent", "1", replicates=2), log)
    replicates = tmp_path / "ray" / name / "replicates"
    try:
        wait_for(lambda: list(replicates.glob("run_trial_*")), 420, proc, log)
        time.sleep(3)  # its run exists
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=180)
    finally:
        kill_group(proc)
    _stopped_like_ctrl_c(tmp_path, name, log.read_text(), code, 143)
    assert "the replicates were interrupted" in log.read_text()


def test_two_quick_ctrl_cs_leave_no_run_running(tmp_path):
    name = "twice-c"
    log = tmp_path / "driver.log"
    proc = spawn_search(long_search(tmp_path, name), log)
    try:
        wait_for(trial_checkpointed(tmp_path, name), 420, proc, log)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)  # while Tune saves its state
        code = proc.wait(timeout=180)
    finally:
        kill_group(proc)
    _stopped_like_ctrl_c(tmp_path, name, log.read_text(), code, 130)


def test_a_second_driver_under_the_same_name_is_refused(tmp_path):
    name = "twice"
    log = tmp_path / "first.log"
    first = spawn_search(long_search(tmp_path, name), log)
    try:
        wait_for(lambda: (tmp_path / "ray" / name / "search.yaml").exists(), 300, first, log)
        # The same command again: the name is taken. With --resume: its driver still runs.
        for extra, expect in (((), f"a search named {name!r} already exists"),
                              (("--resume",), f"search {name!r} is being run by driver pid "
                                              f"{first.pid}")):
            second = subprocess.run([sys.executable, "-m", "tuning.search",
                                     *long_search(tmp_path, name, *extra)], capture_output=True,
                                    text=True, timeout=300,
                                    cwd=Path(__file__).resolve().parent.parent)
            assert second.returncode == 2, second.stderr[-2000:]
            lines = second.stderr.strip().splitlines()
            assert len(lines) == 1 and expect in lines[0], lines
            assert first.poll() is None  # the first driver is untouched
    finally:
        kill_group(first)  # SIGKILL: the lock must not outlive it
    # Once the first driver is gone, the name is free to resume.
    log = tmp_path / "resume.log"
    resumed = spawn_search(search_args(tmp_path, name, "--resume"), log)
    try:
        wait_for(lambda: "started" in log.read_text(), 300, resumed, log)
    finally:
        kill_group(resumed)
    assert "is being run by" not in log.read_text()


def _listen_table() -> dict[str, str]:
    """Socket inode -> local IP of every listening TCP socket (Linux /proc/net/tcp[6])."""
    table = {}
    for name, width in (("tcp", 8), ("tcp6", 32)):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            raw = fields[1].split(":")[0]
            if width == 8:
                ip = ".".join(str(int(raw[i:i + 2], 16)) for i in (6, 4, 2, 0))
            else:
                words = [raw[i:i + 8] for i in range(0, 32, 8)]
                host = "".join(w[6:8] + w[4:6] + w[2:4] + w[0:2] for w in words).lower()
                ip = ":".join(host[i:i + 4] for i in range(0, 32, 4))
                if host.startswith("0" * 20 + "ffff"):
                    mapped = host[24:]
                    ip = ".".join(str(int(mapped[i:i + 2], 16)) for i in range(0, 8, 2))
                elif host == "0" * 31 + "1":
                    ip = "::1"
                elif set(host) == {"0"}:
                    ip = "::"
            table[fields[9]] = ip
    return table


def listening(pgid: int) -> set[str]:
    """Addresses that the processes of group `pgid` listen on (TCP)."""
    table, out = _listen_table(), set()
    for pid in (p.name for p in Path("/proc").iterdir() if p.name.isdigit()):
        try:
            if os.getpgid(int(pid)) != pgid:
                continue
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in table:
                    out.add(table[target[8:-1]])
        except (OSError, ProcessLookupError):
            continue
    return out


def test_a_search_that_starts_its_own_ray_listens_on_loopback_only(tmp_path):
    name = "loopback"
    log = tmp_path / "driver.log"
    proc = spawn_search(long_search(tmp_path, name), log)
    try:
        wait_for(trial_checkpointed(tmp_path, name), 420, proc, log)
        time.sleep(2)
        addresses = listening(proc.pid)
    finally:
        kill_group(proc)
    assert addresses, "found no listening socket of the search's processes"
    assert addresses <= {"127.0.0.1", "::1"}, addresses  # never 0.0.0.0, :: or the host's IP


def test_losing_the_tracking_store_mid_search_loses_no_training(tmp_path):
    """mlflow.db deleted while trials train: training goes on, the driver says in one line
    what it could not record and how to complete it, and `tuning.report --repair` rebuilds
    every run from the trials' checkpoints."""
    from mlflow import MlflowClient

    name = "lost-store"
    epochs = 6
    log = tmp_path / "driver.log"
    args = search_args(tmp_path, name, "--set", "checkpoint_interval_s=0", "--num-samples",
                       "2", "--epochs", str(epochs), "--max-concurrent", "1", "--scheduler",
                       "fifo")
    proc = spawn_search(args, log)
    db = tmp_path / "mlflow.db"
    try:
        wait_for(trial_checkpointed(tmp_path, name), 420, proc, log)
        db.unlink()  # the tracking store is lost mid-search
        code = proc.wait(timeout=600)
    finally:
        kill_group(proc)
    text = log.read_text()
    assert code in (0, 3), text[-3000:]
    table = (tmp_path / "ray" / name / "results.csv").read_text().splitlines()
    assert len(table) == 3 and all(",COMPLETED," in r for r in table[1:]), table  # trained
    if code == 3:
        assert "tuning.report" in text and "--repair" in text
    repaired = subprocess.run(
        [sys.executable, "-m", "tuning.report", name, "--repair", "--storage-path",
         str(tmp_path / "ray"), "--tracking-uri", tracking_uri(tmp_path), "--out",
         str(tmp_path / "report")], capture_output=True, text=True, timeout=600,
        cwd=Path(__file__).resolve().parent.parent)
    assert repaired.returncode == 0, repaired.stderr[-3000:]
    client = MlflowClient(tracking_uri(tmp_path))
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id])
    trials = [r for r in runs if r.data.tags.get("role") == "trial"]
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in runs)
    for run in trials:
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/acc"))
        assert steps == list(range(1, epochs + 1))
