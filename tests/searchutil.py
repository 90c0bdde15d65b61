"""Shared by the search tests: arguments that keep every file inside the test's folder."""

import csv
from pathlib import Path


def tracking_uri(root: Path) -> str:
    return f"sqlite:///{root / 'mlflow.db'}"


def optuna_uri(root: Path) -> str:
    return f"sqlite:///{root / 'optuna.db'}"


def search_args(root: Path, name: str, *extra: str, space: str = "alignkd",
                depth: int | None = 18, smoke: bool = True, replicates: int = 0) -> list[str]:
    """A smoke search in `root`. With `depth` fixed (the default) the smoke search's depth
    cells collapse into one, which is all most tests need; depth=None keeps both. Without
    `smoke`, the same thin networks, but the space's own data sets. No replicates unless
    asked for."""
    cells = ["--set", f"depth={depth}"] if depth is not None else []
    if "--resume" not in extra:
        cells += ["--replicates", str(replicates)]
    if smoke:
        cells.insert(0, "--smoke")
    else:
        cells += ["--set", "width=8", "--set", "batch_size=64", "--max-concurrent", "2"]
    if "--resume" not in extra:  # a resumed search keeps its own
        cells += ["--teacher-epochs", "2"]
    return ["--space", space, "--name", name, "--storage-path", str(root / "ray"),
            "--teacher-store", str(root / "teachers"), "--data-root", str(root / "datasets"),
            "--tracking-uri", tracking_uri(root), *cells, *extra]


def rows(root: Path, name: str, table: str = "results.csv") -> list[dict]:
    with open(root / "ray" / name / table) as f:
        return list(csv.DictReader(f))


def studies(root: Path, name: str) -> dict:
    """cell key -> its Optuna study, from the search's storage."""
    import optuna

    storage = optuna.storages.RDBStorage(optuna_uri(root))
    return {s.study_name.split("/", 1)[1]: optuna.load_study(study_name=s.study_name,
                                                             storage=storage)
            for s in storage.get_all_studies() if s.study_name.startswith(f"{name}/")}


def check_studies_agree_with_tune(root: Path, name: str, per_cell: int) -> dict:
    """Each cell's study holds exactly the trials Tune ran for it (none lost twice, none
    duplicated), each in the state Tune gave it; returns cell -> study."""
    from optuna.trial import TrialState

    table = rows(root, name)
    found = studies(root, name)
    expected = {"COMPLETED": TrialState.COMPLETE, "STOPPED_EARLY": TrialState.PRUNED,
                "FAILED": TrialState.FAIL}
    seen = []
    for cell, study in found.items():
        counted = [t for t in study.trials if "lost" not in t.user_attrs]
        assert len(counted) == per_cell, (cell, [t.user_attrs for t in study.trials])
        for t in study.trials:
            if "lost" in t.user_attrs:
                assert t.state == TrialState.FAIL
                assert t.user_attrs["ray_trial_id"] not in {r["trial_id"] for r in table}
        tune_rows = {r["trial_id"]: r for r in table if r["cell"] == cell}
        assert sorted(t.user_attrs["ray_trial_id"] for t in counted) == sorted(tune_rows)
        for t in counted:
            row = tune_rows[t.user_attrs["ray_trial_id"]]
            assert t.state == expected[row["status"]], (row, t.state)
            assert int(row["study_trial"]) == t.number
            seen.append(t.user_attrs["ray_trial_id"])
    assert len(seen) == len(set(seen)) == len(table)
    return found
