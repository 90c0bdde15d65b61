"""The README's cluster commands as a user types them, on this one machine.

`ray start --head` and `ray start --address HEAD:PORT` run as real `ray` CLI processes (each
node its own session and `--temp-dir`), the search joins them with `--address`, and the
worker node is SIGKILLed, every process of it at once as a lost machine would die, while a
trial runs on it. The search must still exit 0 with both trials complete, the lost one
continued from its checkpoint on the head node (not restarted from epoch 1).

tests/test_faults.py::test_a_lost_worker_node_restarts_its_trial_from_a_checkpoint loses a
node of a `ray.cluster_utils.Cluster`, which the driver starts in-process; this test checks
what that cannot: the CLI's own node start-up and the `--address` the README gives.

Every process this test starts runs in a session of its own (`start_new_session`), and is
stopped by SIGKILLing every member of that session, never with `ray stop`, which would stop
the other Ray instances on the machine as well.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from faultutil import REPO, lost_epochs, mlflow_trials, parent_status, spawn, trial_dirs, wait_for
from searchutil import rows, search_args, tracking_uri

pytestmark = pytest.mark.slow

RAY = Path(sys.executable).with_name("ray")  # the venv's `ray` CLI
# A local ray.init() turns token auth on; every process of this test's cluster runs without.
ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0",
       "PYTHONUNBUFFERED": "1"}
EPOCHS = 6
# One teacher (ResNet-18 on digits) for both trials: the search trains it once, quickly.
SPACE = """\
fixed: {method: alignkd, shortcut: none, teacher_depth: 18}
params:
  alpha: {type: float, low: 0.0, high: 1.0}
  lr: {type: float, low: 0.005, high: 0.05, log: true}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else f"({path} not written)"


def ray_start(args: list[str], log: Path, cwd: Path) -> subprocess.Popen:
    """`ray start ... --block` as typed in a shell, in a session of its own: the node's GCS,
    raylet, agents and workers all belong to it."""
    with open(log, "w") as out:
        return subprocess.Popen([str(RAY), "start", *args], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd,
                                env={**os.environ, **ENV})


def session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes of session `sid`: a session leader's children stay in its
    session even if they move to process groups of their own."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:
            found.append(int(entry.name))
    return found


def kill_session(proc: subprocess.Popen, timeout: float = 60) -> list[int]:
    """SIGKILL every process of `proc`'s session (its process group and any group inside the
    session); returns the ones still alive after `timeout` (none, normally)."""
    deadline = time.time() + timeout
    while True:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in session_members(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass
        left = session_members(proc.pid)
        if (not left and proc.poll() is not None) or time.time() > deadline:
            return left
        time.sleep(0.2)


def node_id(temp_dir: Path) -> str:
    """The node's id, from the port files its session folder names with it."""
    files = sorted(temp_dir.glob("session_*/metrics_agent_port_*"))
    assert files, f"no session in {temp_dir}"
    return files[0].name.rsplit("_", 1)[1]


def results(trial_dir: Path) -> list[dict]:
    """Every result Tune logged for the trial (result.json, written by the driver)."""
    path = trial_dir / "result.json"
    out = []
    for line in (path.read_text().splitlines() if path.is_file() else []):
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line being written
    return out


def wait_until_started(node: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    wait_for(lambda: "Ray runtime started" in log.read_text(errors="replace"), timeout, node, log,
             interval=0.5)


def active_nodes(address: str, log: Path) -> int:
    """`ray status --address ...`: how many nodes the cluster counts as active."""
    done = subprocess.run([str(RAY), "status", f"--address={address}"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **ENV})
    log.write_text(done.stdout + done.stderr)
    text = done.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return sum(" node_" in line for line in text.splitlines())


def test_the_readme_cluster_commands_survive_a_lost_worker_node(tmp_path):
    root = tmp_path
    (root / "space.yaml").write_text(SPACE)
    name = "cli-cluster"
    port = free_port()
    address = f"127.0.0.1:{port}"
    head_log, worker_log, search_log = (root / "head.log", root / "worker.log",
                                        root / "search.log")
    # Each node's --temp-dir is in tmp_path, but named through a short link: a node's socket
    # paths (<temp-dir>/session_<date>_<pid>/sockets/plasma_store) must stay within 107 bytes.
    links = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))
    head_dir, worker_dir = links / "h", links / "w"
    for link in (head_dir, worker_dir):
        (root / link.name).mkdir()
        link.symlink_to(root / link.name, target_is_directory=True)
    experiment = root / "ray" / name
    started: dict[str, subprocess.Popen] = {}
    try:
        # 1. The cluster, as the README's comment says: `ray start --head` on one node,
        #    `ray start --address HEAD:PORT` on the other; one CPU each.
        head = ray_start(["--head", f"--port={port}", "--num-cpus=1",
                          "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                          f"--temp-dir={head_dir}", "--disable-usage-stats", "--block"],
                         head_log, root)
        started["head"] = head
        wait_until_started(head, head_log)
        worker = ray_start([f"--address={address}", "--num-cpus=1", f"--temp-dir={worker_dir}",
                            "--disable-usage-stats", "--block"], worker_log, root)
        started["worker"] = worker
        wait_until_started(worker, worker_log)
        status_log = root / "status.log"
        wait_for(lambda: active_nodes(address, status_log) == 2, 90, worker, status_log,
                 interval=1)
        head_id, worker_id = node_id(head_dir), node_id(worker_dir)
        assert head_id != worker_id

        # 2. The search joins it with --address; each trial takes a node's one CPU.
        args = search_args(root, name, "--num-samples", "2", "--epochs", str(EPOCHS),
                           "--max-concurrent", "2", "--scheduler", "fifo",
                           "--set", "checkpoint_interval_s=0", "--address", address,
                           space=str(root / "space.yaml"))
        search = spawn(["-m", "tuning.search", *args], search_log, env=ENV, cwd=REPO)
        started["search"] = search

        # 3. Lose the worker node once Tune has recorded a checkpoint of the trial on it,
        #    with at least two epochs still to go.
        def worker_trial_checkpointed():
            for trial_id, trial_dir in trial_dirs(experiment).items():
                saved = [r["epoch"] for r in results(trial_dir)
                         if r.get("node_id") == worker_id and r.get("checkpoint_dir_name")]
                if saved and 1 <= saved[-1] <= EPOCHS - 2:
                    return trial_id, saved[-1]
            return None

        moved, saved_at_kill = wait_for(worker_trial_checkpointed, 300, search, search_log,
                                        interval=0.2)
        left = kill_session(worker)
        assert not left, f"processes {left} of the worker node outlived SIGKILL"
        assert search.poll() is None and head.poll() is None, tail(search_log)

        # 4. The search goes on: the lost trial waits for the head's CPU and continues there.
        try:
            code = search.wait(timeout=420)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the search did not finish after the node loss:\n{tail(search_log)}")
        assert code == 0, f"the search exited {code}:\n{tail(search_log)}"
        assert head.poll() is None, f"the head node died:\n{tail(head_log)}"
    finally:
        # The driver first, then the nodes; each by its own session, nothing else.
        survivors = {label: kill_session(p) for label, p in reversed(started.items())}
        shutil.rmtree(links)  # the links only; the nodes' files stay in tmp_path
    assert not any(survivors.values()), f"processes outlived SIGKILL: {survivors}"

    log = tail(search_log)
    table = rows(root, name)
    recorded = {r["trial_id"] for r in table}
    assert len(table) == 2 and len(recorded) == 2, table
    assert all(r["status"] == "COMPLETED" and r["epochs"] == str(EPOCHS) for r in table), table
    assert moved in recorded, (moved, table)

    # Where each trial ran: the lost one on the worker, then on the head; the other on the head.
    dirs = trial_dirs(experiment)
    other = next(t for t in recorded if t != moved)
    assert {r["node_id"] for r in results(dirs[other])} == {head_id}, log
    lost = results(dirs[moved])
    nodes = [r["node_id"] for r in lost]
    split = nodes.index(head_id) if head_id in nodes else len(nodes)
    assert nodes[:split] == [worker_id] * split and nodes[split:] == [head_id] * (
        len(nodes) - split) and 0 < split < len(nodes), \
        f"the lost trial did not move from the worker node to the head: {nodes}\n{log}"
    # It continued from its checkpoint: the first epoch it trained on the head (an epoch that
    # is only reported again keeps its train_time) comes after the checkpoint Tune had
    # recorded when the node was lost, so no epoch up to it was trained twice.
    before = {(r["epoch"], r["train_time"]) for r in lost[:split]}
    trained = [r["epoch"] for r in lost[split:] if (r["epoch"], r["train_time"]) not in before]
    assert trained and trained[0] > saved_at_kill >= 1, \
        f"the lost trial restarted at epoch {trained[:1]} although epoch {saved_at_kill} was " \
        f"checkpointed: {[(r['epoch'], r['node_id'][:8]) for r in lost]}"
    assert trained[-1] == EPOCHS, trained

    # MLflow: one run per trial, FINISHED, every epoch logged; an epoch retrained at most once
    # (the one in flight when the node died), none before the checkpoint.
    runs = mlflow_trials(tracking_uri(root), name)
    assert set(runs) == recorded, (runs.keys(), recorded)
    for trial_id, found in runs.items():
        assert len(found) == 1, f"trial {trial_id} has {len(found)} MLflow runs"
        assert found[0]["status"] == "FINISHED", (trial_id, found[0]["status"])
        assert sorted(set(found[0]["steps"])) == list(range(1, EPOCHS + 1)), found[0]["steps"]
    steps = runs[moved][0]["steps"]
    assert all(steps.count(e) == 1 for e in range(1, saved_at_kill + 1)), (saved_at_kill, steps)
    assert lost_epochs(steps) <= 1 and lost_epochs(runs[other][0]["steps"]) == 0, runs
    assert parent_status(tracking_uri(root), name) == ["FINISHED"]
    print(f"worker node lost at epoch {saved_at_kill}; continued on the head at epoch "
          f"{trained[0]}; epochs retrained: {lost_epochs(steps)}")
