"""Faults, with real processes: a SIGKILLed driver, a lost Ray node, a damaged checkpoint and
interrupted writes. A search must finish after each and lose at most the epoch in flight.

Each scenario records the epochs of work it lost (`lost_epochs`, from the trial's MLflow
curves: an epoch logged twice was trained twice) and the module prints a summary line.
The diverging-trial fault is tests/test_tracking.py::
test_a_diverging_trial_is_failed_with_its_reason_and_the_search_goes_on. Out of GPU memory
is not here: only CUDA raises torch.OutOfMemoryError (a CPU allocation failure is a plain
RuntimeError), so it cannot be caused honestly on a machine without a GPU.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
from faultutil import (
    checkpoint_epoch,
    checkpoint_files,
    kill_group,
    known_checkpoints,
    last_checkpoint_epoch,
    lost_epochs,
    mlflow_trials,
    parent_status,
    result_epochs,
    settled,
    spawn,
    spawn_search,
    trial_dirs,
    wait_for,
)
from searchutil import rows, search_args, tracking_uri

from tuning.run.checkpoint import (
    CheckpointError,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_text,
    load_checkpoint,
    save_checkpoint,
)
from tuning.search.cli.search import main

pytestmark = pytest.mark.slow

# One teacher (ResNet-18 on digits) for every trial; two searched values.
SPACE = """\
fixed: {method: alignkd, shortcut: none, teacher_depth: 18}
params:
  alpha: {type: float, low: 0.0, high: 1.0}
  lr: {type: float, low: 0.005, high: 0.05, log: true}
"""
LOST: dict[str, int] = {}  # scenario -> epochs of work it lost


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    yield
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is None or capture is None or not LOST:
        return
    clean = sum(v == 0 for v in LOST.values())
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_line(f"fault scenarios: {len(LOST)} run, {clean} lost nothing, the "
                            f"largest loss {max(LOST.values())} epoch(s): "
                            + ", ".join(f"{k}={v}" for k, v in LOST.items()))


def record(record_property, scenario: str, lost: int) -> None:
    LOST[scenario] = lost
    record_property("lost_epochs", lost)
    print(f"{scenario}: lost epochs {lost}")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Searches share one teacher store, so only the first trains the teacher."""
    root = tmp_path_factory.mktemp("faults")
    (root / "space.yaml").write_text(SPACE)
    return root


def args_for(root: Path, name: str, *extra: str, interval: float = 0) -> list[str]:
    """Every epoch checkpoints (interval 0) unless a test asks for sparser checkpoints."""
    return search_args(root, name, "--set", f"checkpoint_interval_s={interval}", *extra,
                       space=str(root / "space.yaml"))


def resume_args(root: Path, name: str) -> list[str]:
    return ["--name", name, "--resume", "--storage-path", str(root / "ray"),
            "--tracking-uri", tracking_uri(root)]


def check_finished(root: Path, name: str, trials: int, epochs: int, *,
                   redone: bool = False) -> tuple[dict, int]:
    """Every trial COMPLETED with all its epochs, one MLflow run each, none left RUNNING;
    unless `redone` (a trial fell back to an older checkpoint), Tune saw each epoch once.

    Returns each trial's logged epochs, and the epochs of trials the killed driver had started
    but not recorded (the resumed search cannot continue them; their runs must be KILLED).
    """
    table = rows(root, name)
    recorded = {r["trial_id"] for r in table}
    assert len(table) == trials and len(recorded) == trials
    assert all(r["status"] == "COMPLETED" and r["epochs"] == str(epochs) for r in table), table
    runs = mlflow_trials(tracking_uri(root), name)
    assert recorded <= set(runs), runs.keys()
    orphans = 0
    for trial_id, found in runs.items():
        if trial_id not in recorded:
            assert all(r["status"] == "KILLED" and "was killed before it recorded" in
                       r["tags"]["failure_reason"] for r in found), found
            orphans += sum(len(r["steps"]) for r in found)
            continue
        assert len(found) == 1, f"trial {trial_id} has {len(found)} MLflow runs"
        assert found[0]["status"] == "FINISHED", (trial_id, found[0]["status"])
        assert sorted(set(found[0]["steps"])) == list(range(1, epochs + 1)), found[0]["steps"]
    assert parent_status(tracking_uri(root), name) == ["FINISHED"]
    for trial_dir in trial_dirs(root / "ray" / name).values():
        if trial_dir.name.split("_")[2] not in recorded:
            continue
        done = result_epochs(trial_dir)
        assert done[-1][0] == epochs, f"{trial_dir.name} reported {done}"
        if not redone:  # each epoch trained once: a repeat is the same epoch handed over again
            assert [e for e, _ in dict.fromkeys(done)] == list(range(1, epochs + 1)), \
                f"{trial_dir.name} trained an epoch twice: {done}"
    steps = {t: found[0]["steps"] for t, found in runs.items() if t in recorded}
    return steps, orphans


def start_unrecorded_trial_run(root: Path, name: str) -> str:
    from mlflow import MlflowClient

    mlflow = MlflowClient(tracking_uri(root))
    exp = mlflow.get_experiment_by_name(name)
    runs = mlflow.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("role") == "search")
    trial = next(r for r in runs if "mlflow.parentRunId" in r.data.tags)
    ghost = mlflow.create_run(exp.experiment_id, run_name="run_trial_ghost", tags={
        "mlflow.parentRunId": parent.info.run_id, "ray_trial_id": "ghost"})
    for key in ("method", "dataset", "depth"):  # as a trial's run has from its start
        mlflow.log_param(ghost.info.run_id, key, trial.data.params[key])
    return "ghost"  # it logged no epoch, so it adds nothing to the lost work


def history(path: Path) -> list[tuple]:
    """A checkpoint's epochs as (epoch, cumulative train time): a retrained epoch differs."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return [(h["epoch"], h["train_time"]) for h in state["history"]]


def kill_when(proc, log: Path, condition, timeout: float = 420):
    try:
        return wait_for(condition, timeout, proc, log)
    finally:
        kill_group(proc)


# 1a. The driver is killed while the teacher trains.

def test_driver_killed_during_teacher_training_resumes_the_teacher(ray_session, tmp_path,
                                                                   record_property):
    (tmp_path / "space.yaml").write_text(SPACE)
    name, log = "teacher-kill", tmp_path / "driver.log"
    proc = spawn_search(args_for(tmp_path, name, "--num-samples", "1", "--epochs", "2",
                                 "--scheduler", "fifo", "--teacher-epochs", "3"), log)
    store = tmp_path / "teachers"
    partial = kill_when(proc, log, lambda: next(
        (p for p in store.glob("*.partial") if (p / "checkpoint.pt").is_file()), None))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = load_checkpoint(partial / "checkpoint.pt")
    done_before = [(h["epoch"], h["train_time"]) for h in before["history"]]
    assert 1 <= before["epoch"] < 3, "the teacher was not killed mid-way"
    assert not (store / partial.name.removesuffix(".partial")).exists()

    assert main(args_for(tmp_path, name, "--resume")) == 0
    final = store / partial.name.removesuffix(".partial")
    assert (final / "model.pt").is_file() and not partial.exists()
    after = load_checkpoint(final / "checkpoint.pt")
    history = [(h["epoch"], h["train_time"]) for h in after["history"]]
    assert [e for e, _ in history] == [1, 2, 3]
    # The epochs done before the kill are the same records, not trained again.
    kept = next((i for i, (a, b) in enumerate(zip(done_before, history, strict=False)) if a != b),
                len(done_before))
    lost = len(done_before) - kept
    assert lost <= 1, (done_before, history)
    # Its MLflow run holds each epoch once; the trial ran once and finished.
    from mlflow import MlflowClient

    mlflow = MlflowClient(tracking_uri(tmp_path))
    exp = mlflow.get_experiment_by_name("teachers")
    teacher_runs = [r for r in mlflow.search_runs([exp.experiment_id])
                    if r.data.tags.get("teacher_key") == final.name]
    assert len(teacher_runs) == 1
    steps = [m.step for m in mlflow.get_metric_history(teacher_runs[0].info.run_id, "val/acc")]
    assert sorted(steps) == [1, 2, 3]
    _, orphans = check_finished(tmp_path, name, trials=1, epochs=2)
    assert orphans == 0
    record(record_property, "driver-killed-in-teacher", lost)


# 1b. The driver is killed while trials train.

def test_driver_killed_mid_trial_loses_at_most_the_epoch_in_flight(ray_session, root,
                                                                  record_property):
    name, log = "mid-trial", root / "mid-trial.log"
    proc = spawn_search(args_for(root, name, "--num-samples", "2", "--epochs", "4",
                                 "--max-concurrent", "2", "--scheduler", "fifo"), log)
    experiment = root / "ray" / name

    def mid_trial():
        epochs = [last_checkpoint_epoch(d) for d in trial_dirs(experiment).values()]
        return any(2 <= e < 4 for e in epochs)

    kill_when(proc, log, mid_trial)
    assert not (experiment / "results.csv").exists()
    at_kill = mlflow_trials(tracking_uri(root), name)
    finished = {t for t, r in at_kill.items() if r[0]["status"] == "FINISHED"}

    # What a trial leaves that the driver started but died before recording: a RUNNING run.
    # The resumed search cannot continue it, and must not leave it RUNNING.
    ghost = start_unrecorded_trial_run(root, name)

    assert main(resume_args(root, name)) == 0
    steps, orphans = check_finished(root, name, trials=2, epochs=4)
    assert mlflow_trials(tracking_uri(root), name)[ghost][0]["status"] == "KILLED"
    lost = {t: lost_epochs(s) for t, s in steps.items()}
    assert all(lost[t] == 0 for t in finished), lost  # finished trials were not run again
    assert max(lost.values()) <= 1, lost
    record(record_property, "driver-killed-mid-trial", sum(lost.values()) + orphans)


# 1c. The driver is killed right after a trial finished, before the next one.

def test_driver_killed_between_trials_does_not_rerun_the_finished_one(ray_session, root,
                                                                     record_property):
    name, log = "between", root / "between.log"
    proc = spawn_search(args_for(root, name, "--num-samples", "2", "--epochs", "3",
                                 "--max-concurrent", "1", "--scheduler", "fifo"), log)
    experiment = root / "ray" / name
    first = kill_when(proc, log, lambda: next(
        (t for t, d in trial_dirs(experiment).items() if last_checkpoint_epoch(d) == 3), None))
    finished = history(checkpoint_files(trial_dirs(experiment)[first])[-1])

    assert main(resume_args(root, name)) == 0
    steps, orphans = check_finished(root, name, trials=2, epochs=3)
    assert steps[first] == [1, 2, 3], steps  # each epoch trained and logged once
    # Its last checkpoint is still the one it finished with, record for record.
    assert history(checkpoint_files(trial_dirs(experiment)[first])[-1]) == finished
    lost = {t: lost_epochs(s) for t, s in steps.items()}
    assert max(lost.values()) <= 1 and orphans <= 1, (lost, orphans)
    record(record_property, "driver-killed-between-trials", sum(lost.values()) + orphans)


# 1d. The driver is killed while checkpoints are sparse (a time interval between them).

def test_sparse_checkpoints_lose_only_the_epochs_since_the_last_one(ray_session, root,
                                                                    record_property):
    """Epochs between checkpoints reach Tune and MLflow without one; a trial resumed after a
    kill trains again only the epochs after its last stored checkpoint."""
    name, log, epochs = "sparse", root / "sparse.log", 10
    proc = spawn_search(args_for(root, name, "--num-samples", "1", "--epochs", str(epochs),
                                 "--scheduler", "fifo", interval=3.0), log)
    experiment = root / "ray" / name

    def past_a_checkpoint():
        for trial_id, trial_dir in trial_dirs(experiment).items():
            saved = last_checkpoint_epoch(trial_dir)
            reported = [e for e, _ in result_epochs(trial_dir)]
            if 2 <= saved < epochs - 2 and reported and max(reported) > saved:
                return trial_id, saved, max(reported)
        return None

    trial_id, saved, reported = kill_when(proc, log, past_a_checkpoint)
    trial_dir = trial_dirs(experiment)[trial_id]
    rows_before = [json.loads(line) for line in (trial_dir / "result.json").read_text()
                   .splitlines()]
    assert any(r.get("checkpoint_dir_name") is None for r in rows_before), \
        "every epoch wrote a checkpoint: the interval was not honoured"

    assert main(resume_args(root, name)) == 0
    steps, orphans = check_finished(root, name, trials=1, epochs=epochs, redone=True)
    lost = lost_epochs(steps[trial_id])
    # At most the epochs after the last checkpoint stored before the kill are trained again
    # (a newer one may have been stored in the moment before the kill), plus the one in flight.
    assert lost <= reported - saved + 1, (steps, saved, reported)
    assert orphans == 0
    record(record_property, "driver-killed-sparse-checkpoints", lost)


# 4. A damaged checkpoint after the kill.

@pytest.mark.parametrize("damage", ["restored", "newest"])
def test_a_damaged_checkpoint_falls_back_and_the_search_completes(root, record_property, damage):
    """`restored`: the checkpoint Tune's saved state restores the trial with is torn; `newest`:
    the newest one the trial stored is (it may be newer than the one Tune knows of)."""
    name, log = f"damaged-{damage}", root / f"damaged-{damage}.log"
    proc = spawn_search(args_for(root, name, "--num-samples", "1", "--epochs", "4",
                                 "--scheduler", "fifo"), log)
    experiment = root / "ray" / name
    trial_id = kill_when(proc, log, lambda: next(
        (t for t, d in trial_dirs(experiment).items() if 2 <= last_checkpoint_epoch(d) < 4),
        None))
    trial_dir = trial_dirs(experiment)[trial_id]
    # The epochs done by the kill: MLflow's records may lag the trial's own checkpoints (a
    # worker sends them after the epoch's checkpoint), so the larger of the two counts, once
    # the trial's worker, which may outlive its driver by an epoch, has stopped.
    done_at_kill = settled(lambda: max(
        len(mlflow_trials(tracking_uri(root), name)[trial_id][0]["steps"]),
        last_checkpoint_epoch(trial_dir)))
    if damage == "restored":
        known = wait_for(lambda: known_checkpoints(experiment).get(trial_id), 5)
        victim = trial_dir / known / "checkpoint.pt"
        # The one stored before it, or if Tune knew of no earlier one, a fresh start.
        expect = ("falling back to the previous checkpoint", "starting the trial afresh")
    else:
        victim = checkpoint_files(trial_dir)[-1]
        expect = ("falling back to the previous checkpoint", "goes on from epoch")
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # a torn write, as a full disk would leave
    assert checkpoint_epoch(victim) is None

    resume_log = root / f"damaged-{damage}-resume.log"
    resumed = spawn_search(resume_args(root, name), resume_log)
    assert resumed.wait(timeout=600) == 0, resume_log.read_text()[-4000:]
    text = resume_log.read_text()
    assert f"{victim} is truncated or corrupt" in text, text[-4000:]
    assert any(e in text for e in expect), text[-4000:]
    assert "Error handling checkpoint" not in text, text[-4000:]
    steps, _ = check_finished(root, name, trials=1, epochs=4, redone=True)
    lost = sum(lost_epochs(s) for s in steps.values())
    assert lost <= done_at_kill, steps  # work after the kill is never lost
    record(record_property, f"damaged-checkpoint-{damage}", lost)


# 2. A worker node is lost while a trial runs on it.

NODE_LOSS_SCRIPT = textwrap.dedent("""
    import sys, threading, time
    from pathlib import Path
    from ray.cluster_utils import Cluster
    sys.path.insert(0, sys.argv[1])
    from faultutil import last_checkpoint_epoch, trial_dirs
    from tuning.search.cli.search import main

    experiment, epochs, args = Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()

    def lose_the_worker():
        deadline = time.time() + 400
        while time.time() < deadline:
            done = [last_checkpoint_epoch(d) for d in trial_dirs(experiment).values()]
            if len(done) == 2 and all(1 <= e < epochs for e in done):
                cluster.remove_node(worker, allow_graceful=False)
                print("REMOVED the worker node at epochs", done, flush=True)
                return
            time.sleep(0.1)
        print("NEVER removed the worker node", flush=True)

    watcher = threading.Thread(target=lose_the_worker, daemon=True)
    watcher.start()
    try:
        code = main(args + ["--address", cluster.address])
    finally:
        watcher.join(timeout=5)
        cluster.shutdown()
    sys.exit(code)
""")


def test_a_lost_worker_node_restarts_its_trial_from_a_checkpoint(root, tmp_path,
                                                                 record_property):
    name, epochs = "node-lost", 4
    script = tmp_path / "node_loss.py"
    script.write_text(NODE_LOSS_SCRIPT)
    log = tmp_path / "cluster.log"
    args = args_for(root, name, "--num-samples", "2", "--epochs", str(epochs),
                    "--max-concurrent", "2", "--scheduler", "fifo")
    proc = spawn([str(script), str(Path(__file__).parent), str(root / "ray" / name),
                  str(epochs), *args], log)
    try:
        code = proc.wait(timeout=600)
    finally:
        kill_group(proc)
    text = log.read_text()
    assert code == 0, text[-5000:]
    assert "REMOVED the worker node" in text, text[-5000:]
    steps, orphans = check_finished(root, name, trials=2, epochs=epochs)
    assert orphans == 0
    # The trial that ran on the lost node moved to the head node and went on from its
    # checkpoint: its first epoch was trained once.
    moved = []
    for trial_id, trial_dir in trial_dirs(root / "ray" / name).items():
        lines = (trial_dir / "result.json").read_text().splitlines()
        if len({json.loads(line)["node_id"] for line in lines}) == 2:
            moved.append(trial_id)
    assert len(moved) == 1, moved
    assert steps[moved[0]].count(1) == 1, steps
    lost = {t: lost_epochs(s) for t, s in steps.items()}
    assert max(lost.values()) <= 1, lost
    record(record_property, "worker-node-lost", sum(lost.values()))


# 5. Interrupted writes never leave a half-written file where a complete one was.

class Interrupted(Exception):
    pass


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".new")))


def test_a_writer_that_fails_half_way_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "results.csv"
    atomic_write_text(target, "old,complete\n")

    def half_then_fail(f):
        f.write(b"new,half" * 100_000)
        f.flush()
        raise Interrupted

    with pytest.raises(Interrupted):
        atomic_write_bytes(target, half_then_fail)
    assert target.read_text() == "old,complete\n" and leftovers(tmp_path) == []


def test_a_torch_save_that_fails_half_way_leaves_the_old_model(tmp_path):
    target = tmp_path / "model.pt"
    atomic_torch_save({"format": "x", "w": torch.ones(3)}, target)
    # torch.save writes the tensor, then fails to pickle the lambda.
    with pytest.raises(Exception):  # noqa: B017 - pickling's own error type
        atomic_torch_save({"w": torch.zeros(1_000_000), "bad": lambda: 0}, target)
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(3))
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("write", ["text", "torch", "checkpoint"])
def test_fsync_failing_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch, write):
    def fsync_fails(fd):
        raise OSError(5, "Input/output error")

    target = tmp_path / "file"
    if write == "text":
        atomic_write_text(target, "old")
        monkeypatch.setattr(os, "fsync", fsync_fails)
        with pytest.raises(OSError):
            atomic_write_text(target, "new")
        monkeypatch.undo()
        assert target.read_text() == "old"
    elif write == "torch":
        atomic_torch_save({"v": 1}, target)
        monkeypatch.setattr(os, "fsync", fsync_fails)
        with pytest.raises(OSError):
            atomic_torch_save({"v": 2}, target)
        monkeypatch.undo()
        assert torch.load(target, weights_only=True) == {"v": 1}
    else:
        save_checkpoint({"epoch": 1}, target)
        save_checkpoint({"epoch": 2}, target)
        monkeypatch.setattr(os, "fsync", fsync_fails)
        with pytest.raises(OSError):
            save_checkpoint({"epoch": 3}, target)
        monkeypatch.undo()
        assert load_checkpoint(target)["epoch"] == 2
        assert torch.load(target.with_name("file.prev"), weights_only=True)["epoch"] == 1
    assert leftovers(tmp_path) == []


def test_a_failed_checkpoint_save_keeps_the_last_and_previous_loadable(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"epoch": 1, "w": torch.ones(2)}, path)
    save_checkpoint({"epoch": 2, "w": torch.ones(2) * 2}, path)
    with pytest.raises(Exception):  # noqa: B017
        save_checkpoint({"epoch": 3, "w": torch.zeros(1_000_000), "bad": lambda: 0}, path)
    assert load_checkpoint(path)["epoch"] == 2
    assert leftovers(tmp_path) == []
    # The newest torn in half: the previous one is used, with a warning.
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="falling back to the previous checkpoint"):
        assert load_checkpoint(path)["epoch"] == 1
    # The torn one is set aside, so that the next save cannot rotate it over the good one.
    assert not path.exists() and path.with_name("checkpoint.pt.damaged").read_bytes() == \
        data[: len(data) // 2]
    path.with_name("checkpoint.pt.prev").write_bytes(b"")  # and now the previous one is lost
    with pytest.raises(CheckpointError, match="checkpoint.pt.prev is truncated or corrupt"):
        load_checkpoint(path)


def _no_big_files():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def test_a_full_disk_mid_write_leaves_the_old_file(tmp_path):
    """A real write failing part-way (files capped at 1 MiB, as a full disk would)."""
    target = tmp_path / "results.csv"
    atomic_write_text(target, "old\n")
    code = textwrap.dedent(f"""
        import sys, torch
        from pathlib import Path
        from tuning.run.checkpoint import atomic_write_text, atomic_torch_save
        for write in (lambda: atomic_write_text(Path({str(target)!r}), "x" * (4 << 20)),
                      lambda: atomic_torch_save({{"w": torch.zeros(1 << 20)}},
                                                Path({str(target)!r}))):
            try:
                write()
            except Exception as err:  # torch.save's writer turns EFBIG into a RuntimeError
                print("failed:", type(err).__name__, getattr(err, "errno", None))
            else:
                sys.exit("the write went through")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          preexec_fn=_no_big_files, cwd=Path(__file__).parent.parent,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["failed: OSError 27", "failed: RuntimeError None"], \
        done.stdout  # EFBIG for the text; torch.save fails on the short write
    assert target.read_text() == "old\n" and leftovers(tmp_path) == []


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from tuning.run.checkpoint import atomic_write_bytes, save_checkpoint
    import torch

    target, kind, size = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    i = 0
    while True:
        i += 1
        if kind == "bytes":
            body = bytes([i % 251]) * size
            atomic_write_bytes(target, lambda f: (f.write(i.to_bytes(8, "little")),
                                                  f.write(body)))
        else:
            save_checkpoint({"epoch": i, "w": torch.full((size // 4,), float(i))}, target)
        print(i, flush=True)
""")


@pytest.mark.parametrize("kind", ["bytes", "checkpoint"])
def test_sigkill_mid_write_leaves_a_complete_file(tmp_path, kind):
    """A writer SIGKILLed at chance points, six times: the file is always whole and loadable."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    target, size = tmp_path / "out" / "file.bin", 8 << 20
    for attempt in range(6):
        log = tmp_path / f"writer{attempt}.log"
        proc = spawn([str(script), str(target), kind, str(size)], log)
        wait_for(lambda log=log: log.read_text().count("\n") >= 2, 120, proc, log)
        time.sleep(0.05 + 0.13 * attempt)  # land at a different point of a write each time
        kill_group(proc)
        written = int(log.read_text().split()[-1])
        if kind == "bytes":
            data = target.read_bytes()
            i = int.from_bytes(data[:8], "little")
            assert len(data) == size + 8 and written <= i <= written + 1
            assert data[8:] == bytes([i % 251]) * size, f"file {i} is not whole"
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # killed between the renames: .prev is used
                state = load_checkpoint(target)
            assert written - 1 <= state["epoch"] <= written + 1
            assert torch.equal(state["w"], torch.full((size // 4,), float(state["epoch"])))
    # A kill that lands inside a write leaves its temp file (nothing can remove it): proof that
    # the kills did interrupt writes. Readers never look at those files.
    torn = [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]
    assert torn, "no kill landed inside a write"


def test_a_resumed_teacher_leaves_no_torn_files_in_the_store(tmp_path):
    """A teacher killed inside a write leaves a temp file in `<key>.partial/`; the finished
    teacher must not carry it into the store."""
    from tuning.run.config import RunConfig
    from tuning.search.teachers import teacher_recipe, train_teacher

    trial = RunConfig(dataset="digits", depth=18, width=8, batch_size=64,
                      data_root=str(tmp_path / "datasets"))
    recipe = teacher_recipe(trial, 1)
    partial = tmp_path / "store" / f"{recipe.key}.partial"
    partial.mkdir(parents=True)
    (partial / ".checkpoint.pt.new.x1y2.tmp").write_bytes(b"\0" * 1000)  # as SIGKILL leaves it
    done = train_teacher(recipe, tmp_path / "store")
    final = Path(done["path"]).parent
    assert done["trained"] and final.name == recipe.key and not partial.exists()
    assert sorted(p.name for p in final.iterdir()) == [
        "checkpoint.pt", "config.yaml", "model.pt"]
