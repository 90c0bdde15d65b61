"""The search: cells of Optuna studies on Ray Tune, tracked in MLflow, and what it reports.

`python -m tuning.search --space alignkd` runs it (`tuning.search.cli.search`). The commands
live in `cli/`, and nothing but their entry points imports them; `report/` turns a search's
records into tables and figures.
"""
