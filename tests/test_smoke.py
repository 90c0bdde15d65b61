"""The README's main command, end to end, as a new user runs it: the fast tier's one search.

`python -m tuning.search --space alignkd --smoke` in an empty folder: local Ray, MLflow on
SQLite, the bundled digits, no download, no GPU. It must finish, and leave the tables,
replicates, report and records the README promises.
"""

import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_main_command_runs_the_smoke_search_and_writes_what_it_promises(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "tuning.search", "--space", "alignkd",
                           "--smoke", "--name", "smoke"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    folder = tmp_path / "ray_results" / "smoke"
    with open(folder / "cells.csv") as f:
        cells = list(csv.DictReader(f))
    assert [c["cell"] for c in cells] == ["depth=18", "depth=34"]
    assert all(0 < float(c["test_acc"]) <= 1 for c in cells)
    with open(folder / "replicates.csv") as f:
        replicates = list(csv.DictReader(f))
    tuned = sorted((r["cell"], r["seed"]) for r in replicates if r["arm"] == "tuned")
    assert tuned == [("depth=18", "1"), ("depth=18", "2"), ("depth=34", "1"), ("depth=34", "2")]
    report = (folder / "report" / "tables.md").read_text()
    assert "| digits | Plain-18 | AlignKD |" in report and "(n=2)" in report
    for name in ("results.csv", "search.yaml", "best/depth-18.yaml", "report/replicates.png"):
        assert (folder / name).is_file(), name
    assert (tmp_path / "mlflow.db").is_file() and (tmp_path / "optuna.db").is_file()
    assert "each cell's chosen trial:" in done.stdout and "replicate phase:" in done.stdout
    assert not (tmp_path / "datasets").exists()  # digits is bundled: nothing was downloaded
