"""The end of a search: the table of every trial, the best trial's test accuracy and config."""

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
from tuning.checkpoint import atomic_write_text, load_checkpoint
from tuning.config import RunConfig
from tuning.trainer import CHECKPOINT_NAME, evaluate, resolve_device

FIRST_COLUMNS = ["trial_id", "status", "method", "dataset", "depth", "val_acc", "test_acc",
                 "train_time", "epochs", "pareto"]


def error_reason(error: Any) -> str:
    """The cause of a trial's error: the last line of Ray's report, without colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:500] if lines else type(error).__name__


def trial_status(error: Any, epochs_done: int, epochs: int) -> str:
    if error is not None:
        return "ERROR"
    return "TERMINATED" if epochs_done >= epochs else "STOPPED_EARLY"


def trial_rows(results, context) -> list[dict[str, Any]]:
    """One row per trial of a Ray ResultGrid, with the trial's sampled parameters."""
    rows = []
    for result in results:
        sample = dict(result.config or {})
        cfg = context.run_config(sample)
        metrics = result.metrics or {}
        epochs_done = int(metrics.get("epoch", 0))
        rows.append({
            "trial_id": metrics.get("trial_id", Path(result.path).name if result.path else ""),
            "status": trial_status(result.error, epochs_done, cfg.epochs),
            "method": cfg.method, "dataset": cfg.dataset, "depth": cfg.depth,
            "val_acc": metrics.get("best_val_acc", math.nan),
            "test_acc": math.nan,
            "train_time": metrics.get("train_time", math.nan),
            "epochs": epochs_done, "node_id": metrics.get("node_id", ""),
            **{k: v for k, v in sample.items() if k not in ("method", "dataset", "depth")},
            "error": error_reason(result.error) if result.error else "",
            "_result": result, "_config": cfg,
        })
    return rows


def mark_pareto(rows: list[dict[str, Any]]) -> None:
    """Flag the trials no other trial beats on both val accuracy and training time."""
    ok = [r for r in rows if r["status"] != "ERROR" and not math.isnan(r["val_acc"])]
    for r in rows:
        r["pareto"] = r in ok and not any(
            o["val_acc"] >= r["val_acc"] and o["train_time"] <= r["train_time"]
            and (o["val_acc"] > r["val_acc"] or o["train_time"] < r["train_time"]) for o in ok)


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The selection: highest validation accuracy among trials that did not fail."""
    ok = [r for r in rows if r["status"] != "ERROR" and not math.isnan(r["val_acc"])]
    return max(ok, key=lambda r: r["val_acc"]) if ok else None


def test_accuracy(cfg: RunConfig, checkpoint_dir: Path, epoch: int | None = None) -> float:
    """Evaluate a trial's last checkpoint on the test split: once, for the chosen trial only.

    NaN, with a note, when that checkpoint is not of the trial's last reported `epoch` (a
    trial stopped early between checkpoints): its test accuracy would be another model's.
    """
    device = resolve_device(cfg.device)
    state = load_checkpoint(Path(checkpoint_dir) / CHECKPOINT_NAME)
    if epoch is not None and state["epoch"] != epoch:
        print(f"no test accuracy: the best trial stopped at epoch {epoch}, and its last "
              f"checkpoint is of epoch {state['epoch']}")
        return math.nan
    data = build_data(cfg.dataset, cfg.data_root, batch_size=cfg.batch_size,
                      val_fraction=cfg.val_fraction, split_seed=cfg.split_seed, device=device,
                      **({"path": cfg.data_path} if cfg.data_path else {}))
    net = resnet(cfg.depth, shortcut=cfg.shortcut, stem=data.stem, num_classes=data.num_classes,
                 width=cfg.width, dirac=cfg.dirac).to(device)
    net.load_state_dict(state["model"])
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    return evaluate(net, data.test, device)


def table_text(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table for the terminal."""
    columns = [c for c in table_columns(rows) if c != "error"]
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


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    columns = table_columns(rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    text = str(value)
    return text[:8] if len(text) > 24 else text  # run and node ids: the CSV has them whole
