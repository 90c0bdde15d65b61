"""Tuning distillation into plain networks, in layers that import downwards only:

- the commands (`python -m tuning.train`, `tuning.search`, `tuning.report`, ...): thin entry
  points in this folder;
- `measure/`: benchmarks, the search's cost and worth, and export;
- `search/`: the hyperparameter search, its replicates, rungs and report;
- `run/`: one training run;
- below them, the packages `models`, `losses` and `data`.

`lint-imports` checks the order (the contracts are in pyproject.toml).
"""
