"""The Ray behaviours that `tuning.search.raytune` works around, each checked directly.

Each test pins down one behaviour of Ray (seen with 2.60), not the workaround: when a Ray
release changes it, its test fails, and the workaround named in its docstring can be deleted.
"""

import inspect
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tuning.search import raytune

ROOT = Path(__file__).resolve().parent.parent


def python(code: str, *args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})}, **kw)


def test_ray_reads_whether_to_form_a_cluster_once_at_its_first_import():
    """(5) loopback_only: the setting counts only if it is there when Ray is first imported."""
    code = f"""
        import os
        os.environ.pop("{raytune.LOOPBACK_ENV}", None)
        import ray._private.ray_constants as c
        first = c.ENABLE_RAY_CLUSTER
        os.environ["{raytune.LOOPBACK_ENV}"] = "0"
        import importlib, ray
        print(first, c.ENABLE_RAY_CLUSTER)
    """
    assert python(code).stdout.split() == ["True", "True"]  # set too late: ignored
    early = python("import ray._private.ray_constants as c; print(c.ENABLE_RAY_CLUSTER)",
                   env={raytune.LOOPBACK_ENV: "0"})
    assert early.stdout.split() == ["False"]


def test_tune_fails_to_register_a_checkpoint_when_an_older_one_it_keeps_is_gone():
    """(2) mend_bookkeeping (ray-project/ray#27790): deleting the checkpoints beyond
    num_to_keep raises if Tune's list still holds a folder that is gone."""
    import tempfile

    from ray.train import Checkpoint, CheckpointConfig
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.train._internal.session import _TrainingResult

    folder = Path(tempfile.mkdtemp())
    checkpoints = []
    for i in range(2):
        (folder / f"checkpoint_{i:06d}").mkdir()
        checkpoints.append(Checkpoint(str(folder / f"checkpoint_{i:06d}")))
    manager = _CheckpointManager(CheckpointConfig(num_to_keep=1))
    manager.register_checkpoint(_TrainingResult(checkpoint=checkpoints[0], metrics={}))
    (folder / "checkpoint_000000").rmdir()  # a killed driver had deleted it already
    with pytest.raises(FileNotFoundError):
        manager.register_checkpoint(_TrainingResult(checkpoint=checkpoints[1], metrics={}))


def test_tune_saves_its_experiment_state_on_its_own_schedule_unless_told():
    """(1) tune_environment: the driver's save period is TUNE_GLOBAL_CHECKPOINT_S, "auto" (at
    least every 10 s) unless set, so a killed driver's state lags its trials."""
    from ray.tune.execution.tune_controller import TuneController

    assert 'os.getenv("TUNE_GLOBAL_CHECKPOINT_S", "auto")' in inspect.getsource(TuneController)


@pytest.mark.slow
def test_tunes_new_output_engine_prints_at_verbose_0_and_the_legacy_one_does_not(tmp_path):
    """(6) tune_environment sets RAY_AIR_NEW_OUTPUT=0: the search's own lines speak."""
    code = f"""
        import ray
        from ray import tune
        def f(config):
            tune.report({{"x": 1}})
        ray.init(num_cpus=1, include_dashboard=False, logging_level="error")
        tune.Tuner(f, run_config=tune.RunConfig(storage_path="{tmp_path}", verbose=0)).fit()
    """
    new = python(code, env={"RAY_AIR_NEW_OUTPUT": "1"})
    legacy = python(code, env={"RAY_AIR_NEW_OUTPUT": "0"})
    assert new.returncode == legacy.returncode == 0, new.stderr[-2000:] + legacy.stderr[-2000:]
    assert "Configuration for experiment" in new.stdout
    assert "Configuration for experiment" not in legacy.stdout and legacy.stdout.strip() == ""


TRAINABLE = """
    import os, sys, time, json
    from pathlib import Path
    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = sys.argv[3]
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    import ray
    from ray import tune

    def trainable(config):
        checkpoint = tune.get_checkpoint()
        if os.environ.get("RESTORED"):  # say what Tune handed the restored trial, and stop
            Path(config["out"]).write_text(json.dumps(checkpoint and checkpoint.path))
            return
        for i in range(1000):
            folder = Path(tune.get_context().get_trial_dir()) / f"tmp{i}"
            folder.mkdir()
            tune.report({"i": i}, checkpoint=tune.Checkpoint.from_directory(str(folder)))
            time.sleep(0.3)

    ray.init(num_cpus=1, include_dashboard=False, logging_level="error")
    store = sys.argv[1]
    if sys.argv[2] == "new":
        grid = tune.Tuner(trainable, param_space={"out": f"{store}/handed.json"},
                          run_config=tune.RunConfig(name="exp", storage_path=store,
                                                    verbose=0)).fit()
        trials = grid._experiment_analysis.trials
        print(json.dumps({"returned": True, "statuses": [t.status for t in trials],
                          "last": [(t.last_result or {}).get("i") for t in trials]}))
    elif sys.argv[2] == "fit":  # through raytune.fit: a short run, then one to interrupt
        import signal
        from tuning.search import raytune
        quick = tune.Tuner(lambda config: tune.report({"i": 0}), run_config=tune.RunConfig(
            name="quick", storage_path=store, verbose=0))
        _, quick_stopped = raytune.fit(quick)
        restored = signal.getsignal(signal.SIGINT) is signal.default_int_handler
        print(json.dumps({"quick_stopped": quick_stopped, "restored": restored}), flush=True)
        _, stopped = raytune.fit(tune.Tuner(trainable, param_space={"out": "-"},
                                            run_config=tune.RunConfig(name="exp",
                                                                      storage_path=store,
                                                                      verbose=0)))
        print(json.dumps({"stopped": stopped, "restored": signal.getsignal(signal.SIGINT)
                          is signal.default_int_handler}), flush=True)
    else:
        tune.Tuner.restore(f"{store}/exp", trainable=trainable, resume_unfinished=True).fit()
"""


def _start(tmp_path: Path, save_s: str, mode: str = "new") -> subprocess.Popen:
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(TRAINABLE))
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "store"), mode,
                             save_s], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _stored(tmp_path: Path) -> list[int]:
    return sorted(raytune.checkpoint_index(str(p))
                  for p in (tmp_path / "store" / "exp").glob("*/checkpoint_*"))


def _wait_for_checkpoints(tmp_path: Path, proc: subprocess.Popen, n: int) -> None:
    deadline = time.time() + 180
    while len(_stored(tmp_path)) < n:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.5)


@pytest.mark.slow
def test_a_restored_trial_gets_the_checkpoint_tune_saved_not_its_newest_stored(tmp_path):
    """(1) stored_checkpoints and catch_up: a trial stores its checkpoints as it reports them,
    but a driver killed between two saves of its state restores the trial from the older
    view, and Tune hands the trial no newer checkpoint."""
    proc = _start(tmp_path, save_s="1000")  # the driver saves its state at the start only
    try:
        _wait_for_checkpoints(tmp_path, proc, 4)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    newest = max(_stored(tmp_path))
    script = tmp_path / "driver.py"
    again = subprocess.run([sys.executable, str(script), str(tmp_path / "store"), "restore",
                            "1000"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "RESTORED": "1"})
    assert again.returncode == 0, again.stderr[-3000:]
    handed = json.loads((tmp_path / "store" / "handed.json").read_text())
    assert handed is None or raytune.checkpoint_index(handed) < newest, (handed, newest)


def _interrupt_after_two_checkpoints(tmp_path, **start) -> str:
    """Start the script, send SIGINT once two checkpoints exist; its stdout (exit 0 asserted)."""
    proc = _start(tmp_path, save_s="2", **start)
    try:
        _wait_for_checkpoints(tmp_path, proc, 2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    return out


@pytest.mark.slow
def test_an_interrupted_fit_returns_as_if_it_had_finished(tmp_path):
    """(4) interrupted, and the studies' check in short_cells: on SIGINT, Tuner.fit() saves
    its state and returns a ResultGrid instead of raising. Its trials' states, in the private
    `_experiment_analysis.trials`, are all that say it stopped, and a trial Tune stopped on
    its way out can even look TERMINATED there: only the trial's own count of epochs (or, in
    the search, its study) shows it unfinished."""
    out = _interrupt_after_two_checkpoints(tmp_path)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["returned"] and result["statuses"] and "ERROR" not in result["statuses"]
    assert all(i is not None and i < 999 for i in result["last"])  # none ran to its end


@pytest.mark.slow
def test_fit_says_whether_a_stop_signal_ended_the_run_and_leaves_no_handler_behind(tmp_path):
    """(4) fit: a run that finished says so, and one that SIGINT ended says so, whatever its
    trials' states; after each, SIGINT is Python's own again (Tune leaves its handler)."""
    out = _interrupt_after_two_checkpoints(tmp_path, mode="fit")
    quick, interrupted = (json.loads(line) for line in out.strip().splitlines()[-2:])
    assert quick == {"quick_stopped": False, "restored": True}
    assert interrupted == {"stopped": True, "restored": True}


@pytest.mark.slow
def test_tune_keeps_num_to_keep_checkpoints_after_a_trial_ends(ray_session, tmp_path):
    """(3) keep_newest_checkpoint: a finished trial keeps num_to_keep checkpoints."""
    from ray import tune

    def trainable(config):
        for i in range(4):
            folder = Path(tune.get_context().get_trial_dir()) / f"tmp{i}"
            folder.mkdir()
            tune.report({"i": i}, checkpoint=tune.Checkpoint.from_directory(str(folder)))

    grid = tune.Tuner(trainable, run_config=tune.RunConfig(
        storage_path=str(tmp_path), verbose=0,
        checkpoint_config=tune.CheckpointConfig(num_to_keep=raytune.KEEP_CHECKPOINTS))).fit()
    (result,) = list(grid)
    kept = sorted(Path(result.path).glob("checkpoint_*"))
    assert len(kept) == raytune.KEEP_CHECKPOINTS
    assert raytune.keep_newest_checkpoint(result.checkpoint) == raytune.KEEP_CHECKPOINTS - 1
    assert [p.name for p in Path(result.path).glob("checkpoint_*")] == [kept[-1].name]


@pytest.mark.slow
def test_a_ray_worker_raises_system_exit_on_sigterm(ray_session):
    """(6) quiet_worker: Ray's worker SIGTERM handler raises SystemExit, which Python reports
    as "Exception ignored" when Tune ends a cached worker."""
    import ray

    @ray.remote
    def handler_raises() -> str:
        handler = signal.getsignal(signal.SIGTERM)
        try:
            handler(signal.SIGTERM, None)
        except SystemExit:
            return "SystemExit"
        return "returned"

    assert ray.get(handler_raises.remote()) == "SystemExit"
