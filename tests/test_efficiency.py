"""Does the search pay? The measurement end to end: real searches through the real CLI, each
scored by its chosen configuration's replicates, beside the default configuration's."""

import json
import math

import numpy as np
import pytest

from tuning.measure.efficiency import main, markdown

pytestmark = pytest.mark.slow


def test_two_strategies_and_the_default_at_one_budget(tmp_path, capsys):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 240)
    images = (labels[:, None, None, None] * 60 + rng.integers(0, 40, (240, 32, 32, 3)))
    data = tmp_path / "toy.npz"
    np.savez(data, images=images.astype(np.uint8), labels=labels)
    out = tmp_path / "eff.json"
    code = main(["--data-path", str(data), "--width", "4", "--epochs", "2",
                 "--teacher-epochs", "1", "--budget-trials", "2", "--seeds", "0",
                 "--strategies", "tpe-fifo", "random-fifo", "--replicates", "2",
                 "--work", str(tmp_path / "work"), "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    rows = json.loads(out.read_text())
    assert isinstance(rows, list)
    by = {r["strategy"]: r for r in rows}
    assert set(by) == {"tpe-fifo", "random-fifo", "default"}
    for strategy in ("tpe-fifo", "random-fifo"):
        r = by[strategy]
        # FIFO at a budget of 2 trials of 2 epochs: exactly 2 trials, 4 epochs, trial 0 the
        # default configuration; scored by the chosen configuration's 2 replicates.
        assert (r["seed"], r["budget_epochs"], r["epochs_spent"], r["trials"]) == (0, 4, 4, 2)
        assert r["test_acc_n"] == 2 and 0 < r["test_acc_mean"] <= 1
        assert set(r["test_acc_by_seed"]) == {"1", "2"}  # the same replicate seeds for all
        assert "gain_vs_default" in r
    assert by["default"]["test_acc_n"] == 2 and by["default"]["budget_epochs"] == 0
    assert math.isfinite(by["default"]["test_acc_mean"])
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "| tpe-fifo | 1 | 4 |" in markdown(rows) and "| tpe-fifo |" in printed
    # Run again: every search had finished, so none runs again and the figures agree.
    assert main(["--data-path", str(data), "--width", "4", "--epochs", "2",
                 "--teacher-epochs", "1", "--budget-trials", "2", "--seeds", "0",
                 "--strategies", "tpe-fifo", "random-fifo", "--replicates", "2",
                 "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    assert "efficiency: " not in capsys.readouterr().out
    assert json.loads(out.read_text()) == rows


def test_ctrl_c_waits_for_the_child_search_then_says_how_to_go_on(tmp_path):
    """The measurements' Ctrl-C (SIGINT to the whole group): the child search, which had it
    too, is left to save its state and exit (never killed), then the command says how to go
    on in one line, exit 130, no traceback."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from faultutil import REPO

    child = ("import signal, sys, time, pathlib\n"
             "def saved(*_):\n"
             "    time.sleep(2)  # saving its state\n"
             "    pathlib.Path('saved').write_text('yes')\n"
             "    sys.exit(130)\n"
             "signal.signal(signal.SIGINT, saved)\n"
             "pathlib.Path('started').write_text('yes')\n"
             "time.sleep(60)\n")
    parent = ("import sys\n"
              "from pathlib import Path\n"
              "from tuning.measure.children import interrupted, run_logged\n"
              "try:\n"
              f"    run_logged([sys.executable, '-c', {child!r}], Path('.'), Path('c.log'))\n"
              "except KeyboardInterrupt:\n"
              "    sys.exit(interrupted('tuning.warmgain', ['--source', 'a b']))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", parent], cwd=tmp_path, env=env,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 60
    while not (tmp_path / "started").exists() and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert (tmp_path / "saved").read_text() == "yes"  # the child finished saving
    assert err.strip().splitlines() == [
        "interrupted; what finished is kept: run `python -m tuning.warmgain --source 'a b'` "
        "again to go on"]
