"""Every place the search works around a behaviour of Ray Tune, in one module.

Ray itself is imported inside the functions that need it: a command imports this module
before it may import Ray (see `loopback_only`).

Each workaround below names the behaviour it answers and the Ray version it was seen with
(2.60). `tests/test_raytune.py` checks each behaviour itself, not the workaround: when a Ray
release changes one, its test fails, and the workaround can be deleted.

1. **A driver's saved view lags the trials' stored checkpoints.** A trial stores each
   checkpoint in Tune's storage as it reports it, but the driver saves its experiment state
   only every `TUNE_GLOBAL_CHECKPOINT_S` seconds (10 s or more by default, "auto"). A driver
   killed in between restores the trial from an older checkpoint than its newest stored one,
   and Tune knows nothing of the later ones. `stored_checkpoints` finds them, `catch_up`
   hands their epochs to Tune again (reported, not retrained), and `tune_environment` saves
   the state every 2 s so the window stays short.
2. **Tune's checkpoint bookkeeping breaks on a folder it expects but cannot find**
   (ray-project/ray#27790). After such a restore, Tune deletes the trial's older
   checkpoints by the list it restored; one that a killed driver had already deleted makes the
   deletion fail and leaves Tune's count of kept checkpoints wrong. `mend_bookkeeping` puts
   the missing folders back, empty.
3. **Tune keeps `num_to_keep` checkpoints of a trial after it has ended.** A finished
   trial needs only its newest; `keep_newest_checkpoint` deletes the rest once Tune has
   returned (`KEEP_CHECKPOINTS` = 2 while trials run: the current one and its fallback).
4. **An interrupted `Tuner.fit()` returns as if it had finished.** On SIGINT Tune saves its
   state and returns a `ResultGrid`; only its private `_experiment_analysis.trials` tells
   which trials were left unfinished (`interrupted`), and a signal that arrives as the last
   trial ends leaves none unfinished. Tune also leaves its SIGINT handler installed after
   `fit()` returns, so that a Ctrl-C between two phases would be caught by a finished run's
   handler and ignored. `fit` runs `Tuner.fit()` with a handler of ours underneath: Tune hands
   the signal back to the handler it replaced once it has caught one, so finding ours again
   afterwards says a stop signal ended the run; and ours is removed after every fit.
5. **Ray reads whether to form a cluster once, at its first import.** A Ray this process
   starts for itself listens on the loopback interface only if
   `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` was set when Ray was first imported
   (`loopback_only`); setting it later has no effect.
6. **Tune's console and loggers.** The new output engine prints trial tables even at
   `verbose=0` (`RAY_AIR_NEW_OUTPUT=0` selects the legacy, silent one); Tune adds JSON, CSV
   and TensorBoard loggers by itself unless `TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1`; and it
   warns whenever saving the experiment takes longer than a threshold
   (`tune_environment`). In the workers, Ray's SIGTERM handler raises SystemExit when Tune
   ends a cached worker, which Python reports as "Exception ignored" (`quiet_worker`).
7. **`ray.init` gives the driver a SIGTERM handler that calls `sys.exit`.** Raised in the
   middle of Tune's loop, that exit aborts Ray's core (SIGABRT, exit 134, a C++ dump) instead
   of stopping the search; Tune itself stops gracefully on SIGINT only (and SIGUSR1).
   `sigterm_as_interrupt` hands SIGTERM to Tune as SIGINT, so that schedulers and `timeout`
   stop a search as Ctrl-C does, and the command exits 143 (`interrupt_code`).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import warnings
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from tuning.run import envvars
from tuning.run.checkpoint import CheckpointError
from tuning.run.trainer import CHECKPOINT_NAME

if TYPE_CHECKING:  # Ray itself is imported where it is used
    from ray import tune

RAY_VERSION_SEEN = "2.60"
CHECKPOINT_DIR = re.compile(r"checkpoint_(\d+)$")  # Tune's name for a trial's checkpoints
KEEP_CHECKPOINTS = 2  # Tune keeps each trial's newest 2: the current one and its fallback
STATE_SAVE_S = "2"  # (1) how often the driver saves its view, in seconds
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # (5)


def checkpoint_index(path: str) -> int:
    """The index in a Tune checkpoint folder's name (`checkpoint_000004` -> 4); -1 if none."""
    match = CHECKPOINT_DIR.search(PurePosixPath(path).name)
    return int(match.group(1)) if match else -1


def tune_environment() -> None:
    """(1, 6) The driver's Tune settings; a user's own values win where they can."""
    # A trial Tune has not saved yet is one that a resume after a killed driver cannot
    # continue: every 2 s keeps that window shorter than a trial's start-up.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", STATE_SAVE_S)
    # Every epoch may write a checkpoint; the warning about frequent saves is expected.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # The search's own progress lines speak; Ray's tables and automatic loggers are off (the
    # search adds Tune's JSON and CSV loggers itself, without TensorBoard's files and hint).
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"


def loopback_only(address: str | None) -> contextlib.AbstractContextManager:
    """(5) Within, a Ray this process starts for itself (no --address) serves this machine
    alone: its node address is 127.0.0.1, and the GCS, raylet and workers listen on the
    loopback interface only. The commands import Ray inside this block. Joining a cluster
    (--address) is the user's choice, and the setting is put back afterwards: a `ray start`
    this process runs later must not inherit it, or it refuses to form a cluster."""
    return envvars.defaults({} if address is not None else {LOOPBACK_ENV: "0"})


def fit(tuner) -> tuple[Any, bool]:
    """(4) `tuner.fit()`'s ResultGrid, and whether a stop signal (Ctrl-C, or SIGTERM through
    `sigterm_as_interrupt`) ended it."""
    def beneath_tune(signum, frame) -> None:  # a second Ctrl-C, once Tune has let go of it
        raise KeyboardInterrupt

    catches = (threading.current_thread() is threading.main_thread()
               and not int(os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") or 0))
    if not catches:  # Tune leaves SIGINT alone: a Ctrl-C raises KeyboardInterrupt through fit
        return tuner.fit(), False
    before = signal.signal(signal.SIGINT, beneath_tune)
    try:
        grid = tuner.fit()
        return grid, signal.getsignal(signal.SIGINT) is beneath_tune
    finally:
        signal.signal(signal.SIGINT, before)


def interrupted(grid) -> list[str]:
    """(4) Trials that Tune left unfinished: the search was interrupted (Ctrl-C, SIGTERM), and
    Tune saved its state and returned instead of raising."""
    trials = getattr(getattr(grid, "_experiment_analysis", None), "trials", None) or []
    return [t.trial_id for t in trials if t.status not in ("TERMINATED", "ERROR")]


def stored_checkpoints(experiment_path: str | None) -> list[tune.Checkpoint]:
    """(1) This trial's checkpoints in the search's storage, oldest first by Tune's index.

    They can be newer than the one Tune restores the trial with.
    """
    import pyarrow.fs
    from ray import tune

    restored = tune.get_checkpoint()
    if restored is not None:
        fs, folder = restored.filesystem, str(PurePosixPath(restored.path).parent)
    elif experiment_path:
        fs, root = pyarrow.fs.FileSystem.from_uri(experiment_path)
        folder = f"{root.rstrip('/')}/{Path(tune.get_context().get_trial_dir()).name}"
    else:
        return []
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True))
    except OSError:
        return []
    found = [i.path for i in infos
             if i.type == pyarrow.fs.FileType.Directory and checkpoint_index(i.path) >= 0]
    return [tune.Checkpoint(p, filesystem=fs) for p in sorted(found, key=checkpoint_index)]


def mend_bookkeeping(stored: list[tune.Checkpoint]) -> None:
    """(2) Put back (empty) the checkpoint folders Tune's restored state still keeps but a
    killed driver had already deleted after newer epochs. Tune deletes them again at the
    trial's next checkpoint."""
    from ray import tune

    restored = tune.get_checkpoint()
    if restored is None:
        return
    known, have = checkpoint_index(restored.path), {checkpoint_index(c.path) for c in stored}
    folder = PurePosixPath(restored.path).parent
    for index in range(max(0, known - KEEP_CHECKPOINTS + 1), known):
        if index not in have:
            try:
                restored.filesystem.create_dir(str(folder / f"checkpoint_{index:06d}"))
            except OSError:
                pass  # only Tune's log suffers


def _epochs(state: dict) -> list[tuple]:
    return [(h.get("epoch"), h.get("train_time")) for h in state.get("history", [])]


def catch_up(run_dir: Path, resume_from: Path | None, state: dict,
             stored: list[tune.Checkpoint], *,
             fetch: Callable[[tune.Checkpoint, Path, str], dict],
             report: Callable[[dict, Path | None], None]) -> tuple[Path | None, dict]:
    """(1) Hand Tune the epochs this trial stored after the checkpoint Tune restored it with.

    Those epochs are reported again (not trained again), each checkpointed one with its
    checkpoint and the epochs between with their metrics alone, so Tune's count of epochs
    stays the trial's. Only checkpoints that continue the current one are taken. `fetch`
    loads a stored checkpoint into a file; `report` reports an epoch to Tune.
    """
    from ray import tune

    restored = tune.get_checkpoint()
    known = checkpoint_index(restored.path) if restored is not None else -1
    epoch = state.get("epoch", 0)
    if restored is not None and resume_from is None:
        return resume_from, state  # a fresh start: nothing stored continues it
    current, nxt = run_dir / CHECKPOINT_NAME, run_dir / (CHECKPOINT_NAME + ".next")
    for checkpoint in (c for c in stored if checkpoint_index(c.path) > known):
        try:
            new = fetch(checkpoint, nxt, f"the trial goes on from epoch {epoch}")
        except CheckpointError as err:
            warnings.warn(str(err), stacklevel=2)
            break
        later = new.get("epoch", 0)
        if later <= epoch or len(new.get("history", [])) != later or \
                _epochs(new)[:epoch] != _epochs(state):
            break  # it does not continue this trial's epochs (it restarted since, or fell back)
        os.replace(nxt, current)
        for metrics in new["history"][epoch:-1]:  # epochs that wrote no checkpoint
            report(dict(metrics), None)
        report(dict(new["history"][-1]), current)
        resume_from, state, epoch = current, new, later
    nxt.unlink(missing_ok=True)
    return resume_from, state


def keep_newest_checkpoint(checkpoint) -> int:
    """(3) Delete every checkpoint of an ended trial in Tune's storage but `checkpoint`, its
    newest: that one holds its last model and every epoch's metrics (for `--repair`). Call it
    once Tune has returned: until then a resumed driver may restore from the older one.
    Returns how many were deleted."""
    import pyarrow.fs

    if checkpoint is None:
        return 0
    fs, folder = checkpoint.filesystem, str(PurePosixPath(checkpoint.path).parent)
    keep = checkpoint_index(checkpoint.path)
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True))
        older = [i.path for i in infos if i.type == pyarrow.fs.FileType.Directory
                 and 0 <= checkpoint_index(i.path) < keep]
        for path in older:
            fs.delete_dir(path)
    except OSError:
        return 0
    return len(older)


def quiet_worker() -> None:
    """(6) Keep a worker's routine chatter out of the driver's console: Ray's note on every
    stored checkpoint, and the SystemExit Ray's SIGTERM handler raises when Tune ends a
    cached worker (Python reports it as "Exception ignored" while the process exits)."""
    import logging
    import sys

    for name in ("ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    default = sys.__unraisablehook__

    def hook(unraisable) -> None:
        if not isinstance(unraisable.exc_value, SystemExit):
            default(unraisable)

    sys.unraisablehook = hook


_TERMINATED = False  # (7) set when this process was asked to stop by SIGTERM


@contextlib.contextmanager
def sigterm_as_interrupt():
    """(7) Within, SIGTERM interrupts the search as SIGINT does (Tune saves its state and
    returns, or a KeyboardInterrupt reaches the command). Install it after `ray.init`."""
    global _TERMINATED

    def handler(signum, frame) -> None:
        global _TERMINATED
        _TERMINATED = True
        signal.raise_signal(signal.SIGINT)

    before = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def interrupt_code() -> int:
    """The exit code of an interrupted command: 143 after SIGTERM (128 + 15), else 130."""
    return 128 + signal.SIGTERM if _TERMINATED else 128 + signal.SIGINT
