"""Helpers for the fault tests: search drivers as killable processes, and what they left behind."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def spawn(argv: list[str], log: Path, **kw) -> subprocess.Popen:
    """A Python child in its own session, so that it and every process it starts (Ray's
    GCS, raylet and workers) share one process group that can be SIGKILLed at once."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **kw.pop("env", {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    cwd = kw.pop("cwd", REPO)
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, *argv], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=cwd, env=env, **kw)


def spawn_search(args: list[str], log: Path) -> subprocess.Popen:
    return spawn(["-m", "tuning.search", *args], log)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_group(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGKILL the whole process group of `proc` and wait until every member is gone."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    deadline = time.time() + timeout
    while group_alive(proc.pid) and time.time() < deadline:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    assert not group_alive(proc.pid), f"processes of group {proc.pid} outlived SIGKILL"


def wait_for(predicate: Callable[[], object], timeout: float, proc: subprocess.Popen | None = None,
             log: Path | None = None, interval: float = 0.1):
    """Poll until `predicate()` is truthy and return its value; fail with the log on timeout or
    when `proc` exits first."""
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        tail = log.read_text()[-4000:] if log is not None and log.exists() else ""
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) before the condition "
                                 f"held:\n{tail}")
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting:\n{tail}")
        time.sleep(interval)


def settled(measure: Callable[[], object], quiet: float = 8, timeout: float = 120):
    """`measure()` once it has not changed for `quiet` seconds: after a driver is killed, a
    trial's worker may still finish the epoch it was in before Ray reaps it."""
    deadline, value, since = time.time() + timeout, measure(), time.time()
    while time.time() - since < quiet:
        assert time.time() < deadline, f"still changing after {timeout:.0f}s: {value}"
        time.sleep(1)
        now = measure()
        if now != value:
            value, since = now, time.time()
    return value


def trial_dirs(experiment: Path) -> dict[str, Path]:
    """trial id -> the trial's folder in the experiment (run_trial_<id>_<n>_...)."""
    return {p.name.split("_")[2]: p for p in sorted(experiment.glob("run_trial_*")) if p.is_dir()}


def checkpoint_files(trial_dir: Path) -> list[Path]:
    """The trial's Tune checkpoint files, oldest first by Tune's index."""
    return sorted(trial_dir.glob("checkpoint_*/checkpoint.pt"), key=lambda p: p.parent.name)


_EPOCHS: dict[tuple, int | None] = {}


def checkpoint_epoch(path: Path) -> int | None:
    """The epoch a checkpoint file holds, or None when it cannot be read (yet)."""
    try:
        st = path.stat()
    except OSError:
        return None
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _EPOCHS:
        try:
            _EPOCHS[key] = int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
        except Exception:  # noqa: BLE001 - a half-written or damaged file counts as none
            return None  # not cached: it may be complete at the next look
    return _EPOCHS[key]


def last_checkpoint_epoch(trial_dir: Path) -> int:
    epochs = [e for e in map(checkpoint_epoch, checkpoint_files(trial_dir)) if e is not None]
    return max(epochs, default=0)


def progress_iterations(trial_dir: Path) -> list[int]:
    """training_iteration of every row Tune wrote to the trial's progress.csv."""
    path = trial_dir / "progress.csv"
    if not path.is_file():
        return []
    with open(path) as f:
        return [int(r["training_iteration"]) for r in csv.DictReader(f)
                if r.get("training_iteration")]


def result_epochs(trial_dir: Path) -> list[tuple[int, float]]:
    """(epoch, train_time) of every result Tune logged to the trial's result.json (one JSON
    a line). An epoch handed to Tune again after a resume, not trained again, repeats with the
    same train_time."""
    path = trial_dir / "result.json"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            result = json.loads(line)
            out.append((int(result["epoch"]), float(result["train_time"])))
        except (ValueError, KeyError):
            continue
    return out


def mlflow_trials(uri: str, name: str) -> dict:
    """Every trial run of search `name`: trial id -> list of runs, each with its status and
    the steps of every val/acc it logged (a step logged twice was an epoch trained twice)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    assert exp is not None, f"no MLflow experiment {name}"
    out: dict[str, list[dict]] = {}
    for run in client.search_runs([exp.experiment_id], max_results=1000):
        if "mlflow.parentRunId" not in run.data.tags:
            continue
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")]
        out.setdefault(run.data.tags["ray_trial_id"], []).append({
            "run_id": run.info.run_id, "status": run.info.status, "steps": sorted(steps),
            "tags": run.data.tags})
    return out


def parent_status(uri: str, name: str) -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    return [r.info.status for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("role") == "search"]


def lost_epochs(steps: list[int]) -> int:
    """Epochs trained more than once: every epoch report beyond the first of its epoch."""
    return sum(n - 1 for n in Counter(steps).values())


def known_checkpoints(experiment: Path) -> dict[str, str | None]:
    """trial id -> the checkpoint folder Tune's last saved state names for it (None: none)."""
    states = sorted(experiment.glob("experiment_state-*.json"))
    if not states:
        return {}
    out = {}
    for entry in json.loads(states[-1].read_text())["trial_data"]:
        meta, run = (json.loads(p) if isinstance(p, str) else p for p in entry)
        out[meta["trial_id"]] = (run.get("last_result") or {}).get("checkpoint_dir_name")
    return out
