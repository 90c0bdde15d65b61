"""The end of a search: every trial's row, each cell's chosen trial and its test accuracy."""

from __future__ import annotations

import csv
import io
import math
import re
from pathlib import Path
from typing import Any

import torch

from data import build_data
from models import resnet
from tuning.run.checkpoint import atomic_write_text, load_checkpoint
from tuning.run.config import RunConfig
from tuning.run.trainer import CHECKPOINT_NAME, evaluate, resolve_device

FIRST_COLUMNS = ["cell", "trial_id", "study_trial", "status", "chosen", "method", "dataset",
                 "depth", "val_acc", "test_acc", "train_time", "epochs", "pareto"]
CELL_COLUMNS = ["cell", "trials", "completed", "stopped_early", "failed", "chosen_trial",
                "study_trial", "val_acc", "test_acc", "train_time", "epochs", "config"]
META = ("cell", "study_trial", "method", "dataset", "depth")


def error_reason(error: Any) -> str:
    """The cause of a trial's error: the last line of Ray's report, without colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:500] if lines else type(error).__name__


def trial_status(error: Any, epochs_done: int, epochs: int, failed: str | None = None) -> str:
    """COMPLETED, STOPPED_EARLY or FAILED: an error Tune raised (after its retries), or a
    failure the trial reported itself (one that would recur; see trainable.DETERMINISTIC)."""
    if error is not None or failed:
        return "FAILED"
    return "COMPLETED" if epochs_done >= epochs else "STOPPED_EARLY"


def trial_rows(results, context) -> list[dict[str, Any]]:
    """One row per trial of a Ray ResultGrid, with its cell and sampled parameters.

    `val_acc` is the last reported epoch's validation accuracy: for a trial that completed,
    the figure it is selected on, measured on the weights its test accuracy is measured on.
    """
    rows = []
    for result in results:
        sample = dict(result.config or {})
        cfg = context.run_config(sample)
        metrics = result.metrics or {}
        epochs_done = int(metrics.get("epoch", 0))
        rows.append({
            "cell": sample.get("cell", ""), "study_trial": sample.get("study_trial", ""),
            "trial_id": metrics.get("trial_id", Path(result.path).name if result.path else ""),
            "status": trial_status(result.error, epochs_done, cfg.epochs,
                                   metrics.get("failed")), "chosen": False,
            "method": cfg.method, "dataset": cfg.dataset, "depth": cfg.depth,
            "val_acc": metrics.get("val_acc", math.nan), "test_acc": math.nan,
            "train_time": metrics.get("train_time", math.nan),
            "epochs": epochs_done, "node_id": metrics.get("node_id", ""),
            **{k: v for k, v in sample.items() if k not in META},
            "error": error_reason(result.error) if result.error else
            metrics.get("failed") or "",
            "_result": result, "_config": cfg,
        })
    return sorted(rows, key=lambda r: (str(r["cell"]), _number(r["study_trial"])))


def _number(value: Any) -> int:
    return value if isinstance(value, int) else -1


def completed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Trials that ran every epoch: the only ones whose accuracy is a final one."""
    return [r for r in rows if r["status"] == "COMPLETED" and math.isfinite(r["val_acc"])]


def mark_pareto(rows: list[dict[str, Any]], fronts: dict[str, set[int]] | None) -> None:
    """Flag each trial on its cell's Pareto front of val accuracy against training time, as
    its multi-objective study computes it (`fronts`: cell -> study trial numbers). Without
    fronts (a single objective), the column is empty: no front was searched."""
    for r in rows:
        r["pareto"] = "" if fronts is None else r["study_trial"] in fronts.get(r["cell"], set())


def by_cell(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["cell"], []).append(r)
    return out


CHOOSE_RULES = ("best", "knee", "fastest-within:PP")


def parse_choose(text: str) -> tuple[str, float]:
    """`best`, `knee` or `fastest-within:PP` -> (rule, PP); ValueError says what is wrong."""
    if text in ("best", "knee"):
        return text, 0.0
    rule, sep, value = text.partition(":")
    if rule == "fastest-within" and sep:
        try:
            pp = float(value)
        except ValueError:
            pp = math.nan
        if math.isfinite(pp) and pp >= 0:
            return rule, pp
        raise ValueError(f"--choose fastest-within:PP needs PP, percentage points of "
                         f"validation accuracy, as a number >= 0; got {value!r}")
    raise ValueError(f"--choose must be best, knee or fastest-within:PP (e.g. "
                     f"fastest-within:0.5); got {text!r}")


def _knee(front: list[dict[str, Any]]) -> dict[str, Any]:
    """The front's point farthest from the line between its fastest and its most accurate
    point, both axes scaled to the front's range (the point of diminishing returns)."""
    fast = min(front, key=lambda r: (r["train_time"], _number(r["study_trial"])))
    best = max(front, key=lambda r: (r["val_acc"], -_number(r["study_trial"])))
    dt = best["train_time"] - fast["train_time"] or 1.0
    da = best["val_acc"] - fast["val_acc"] or 1.0

    def distance(r: dict[str, Any]) -> float:
        x, y = (r["train_time"] - fast["train_time"]) / dt, (r["val_acc"] - fast["val_acc"]) / da
        return y - x  # above the diagonal from (0, 0) to (1, 1): more accuracy than time

    return max(front, key=lambda r: (round(distance(r), 12), -_number(r["study_trial"])))


def choose(rows: list[dict[str, Any]], rule: str = "best",
           fronts: dict[str, set[int]] | None = None) -> dict[str, dict[str, Any]]:
    """Each cell's chosen trial among its completed trials; marks it `chosen`.

    - `best`: the highest last-epoch validation accuracy. A tie goes to the lower study trial
      number, so the default configuration (each sampled cell's trial 0) is chosen unless
      another beats it.
    - `knee` (multi-objective): the knee of the cell's Pareto front (`_knee`).
    - `fastest-within:PP` (multi-objective): the fastest trial of the front whose accuracy
      is within PP percentage points of the front's best.
    """
    name, pp = parse_choose(rule)
    chosen = {}
    for cell, cell_rows in by_cell(completed(rows)).items():
        front = [r for r in cell_rows if fronts and r["study_trial"] in fronts.get(cell, set())]
        if name == "best" or not front:
            best = max(cell_rows, key=lambda r: (r["val_acc"], -_number(r["study_trial"])))
        elif name == "knee":
            best = _knee(front)
        else:
            top = max(r["val_acc"] for r in front)
            near = [r for r in front if r["val_acc"] >= top - pp / 100 - 1e-12]
            best = min(near, key=lambda r: (r["train_time"], _number(r["study_trial"])))
        best["chosen"] = True
        chosen[cell] = best
    return chosen


def cell_rows(rows: list[dict[str, Any]], cells: list[str],
              configs: dict[str, str]) -> list[dict[str, Any]]:
    """One row per cell: its trials by outcome, and its chosen trial's figures."""
    out = []
    grouped = by_cell(rows)
    for cell in cells:
        mine = grouped.get(cell, [])
        best = next((r for r in mine if r["chosen"]), None)
        out.append({
            "cell": cell, "trials": len(mine),
            "completed": sum(r["status"] == "COMPLETED" for r in mine),
            "stopped_early": sum(r["status"] == "STOPPED_EARLY" for r in mine),
            "failed": sum(r["status"] == "FAILED" for r in mine),
            "chosen_trial": best["trial_id"] if best else "",
            "study_trial": best["study_trial"] if best else "",
            "val_acc": best["val_acc"] if best else math.nan,
            "test_acc": best["test_acc"] if best else math.nan,
            "train_time": best["train_time"] if best else math.nan,
            "epochs": best["epochs"] if best else "", "config": configs.get(cell, ""),
        })
    return out


def test_accuracy(cfg: RunConfig, checkpoint_dir: Path, epoch: int | None = None) -> float:
    """Evaluate a trial's last checkpoint on the test split: once per cell, for its chosen trial.

    NaN, with a note, when that checkpoint is not of the trial's last reported `epoch` (a
    trial stopped early between checkpoints): its test accuracy would be another model's.
    """
    device = resolve_device(cfg.device)
    state = load_checkpoint(Path(checkpoint_dir) / CHECKPOINT_NAME)
    if epoch is not None and state["epoch"] != epoch:
        print(f"no test accuracy: the trial stopped at epoch {epoch}, and its last "
              f"checkpoint is of epoch {state['epoch']}")
        return math.nan
    data = build_data(cfg.dataset, cfg.data_root, batch_size=cfg.batch_size,
                      val_fraction=cfg.val_fraction, split_seed=cfg.split_seed, device=device,
                      **cfg.data_options())
    net = resnet(cfg.depth, shortcut=cfg.shortcut, stem=data.stem, num_classes=data.num_classes,
                 width=cfg.width, block=cfg.block).to(device)
    net.load_state_dict(state["model"])
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    return evaluate(net, data.test, device)


def stored_test_accuracy(cfg: RunConfig, checkpoint, epoch: int) -> float:
    """test_accuracy of a checkpoint in Tune's storage (a Ray task: it runs where it fits)."""
    with checkpoint.as_directory() as folder:
        return test_accuracy(cfg, Path(folder), epoch=epoch)


TERMINAL_HIDDEN = {"error", "run_name", "mlflow_run_id", "node_id"}  # in the CSV only


def table_text(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A fixed-width table for the terminal."""
    columns = columns or [c for c in table_columns(rows) if c not in TERMINAL_HIDDEN]
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
              for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def table_columns(rows: list[dict[str, Any]]) -> list[str]:
    extra = sorted({k for r in rows for k in r if not k.startswith("_")} - set(FIRST_COLUMNS)
                   - {"error"})
    return FIRST_COLUMNS + extra + ["error"]


def write_csv(rows: list[dict[str, Any]], path: Path, columns: list[str] | None = None) -> None:
    columns = columns or table_columns(rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    text = str(value)
    return text[:8] if len(text) > 24 and "=" not in text else text  # ids: the CSV has them
