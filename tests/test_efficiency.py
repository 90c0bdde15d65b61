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
