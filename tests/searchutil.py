"""Shared by the search tests: arguments that keep every file inside the test's folder."""

import csv
from pathlib import Path


def tracking_uri(root: Path) -> str:
    return f"sqlite:///{root / 'mlflow.db'}"


def search_args(root: Path, name: str, *extra: str, space: str = "alignkd") -> list[str]:
    return ["--space", space, "--smoke", "--name", name, "--storage-path", str(root / "ray"),
            "--teacher-store", str(root / "teachers"), "--data-root", str(root / "datasets"),
            "--tracking-uri", tracking_uri(root), "--teacher-epochs", "2", *extra]


def rows(root: Path, name: str) -> list[dict]:
    with open(root / "ray" / name / "results.csv") as f:
        return list(csv.DictReader(f))
