"""The search: cells of studies on Ray Tune and Optuna, tracked in MLflow.

`python -m tuning.search --space alignkd` runs it; see `tuning.search.cli`.
"""

from tuning.search.cli import main

__all__ = ["main"]
