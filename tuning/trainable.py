"""The Ray Tune function trainable: one trial is one trainer run, reporting every epoch."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune

from tuning.checkpoint import CheckpointError
from tuning.config import RunConfig
from tuning.space import Space, trial_values
from tuning.teachers import teacher_path, teacher_recipe
from tuning.trainer import CHECKPOINT_NAME, Listener, train


@dataclass
class SearchContext:
    """What every trial of a search shares; passed to the trainable with tune.with_parameters."""

    space: Space
    overrides: dict[str, Any]
    teacher_store: str
    teacher_epochs: int
    search_name: str
    tracking: dict[str, Any] = field(default_factory=dict)

    def run_config(self, sample: dict[str, Any]) -> RunConfig:
        """The trial's RunConfig: space, sample, overrides, and its teacher's path."""
        cfg = RunConfig(**trial_values(self.space, sample, self.overrides))
        if cfg.method != "ce" and not cfg.teacher:
            recipe = teacher_recipe(cfg, self.teacher_epochs)
            cfg.teacher = str(teacher_path(Path(self.teacher_store), recipe))
        return cfg


def report_to_tune(metrics: dict[str, Any], ckpt: Path) -> None:
    """Report an epoch together with its checkpoint, as Tune's function-trainable API wants."""
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy2(ckpt, Path(tmp) / CHECKPOINT_NAME)
        node = ray.get_runtime_context().get_node_id()
        tune.report({**metrics, "node_id": node},
                    checkpoint=tune.Checkpoint.from_directory(tmp))


def restored_checkpoint(run_dir: Path) -> Path | None:
    """Copy the checkpoint Tune restored this trial with into the run dir, if there is one."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        src = Path(folder) / CHECKPOINT_NAME
        if not src.is_file():
            warnings.warn(f"restored checkpoint {folder} has no {CHECKPOINT_NAME}; "
                          "starting the trial afresh", stacklevel=2)
            return None
        run_dir.mkdir(parents=True, exist_ok=True)
        dst = run_dir / CHECKPOINT_NAME
        shutil.copy2(src, dst)
        return dst


def extra_listeners(context: SearchContext, cfg: RunConfig, sample: dict) -> list[Listener]:
    """Listeners beyond Tune's own; tracking adds itself here."""
    return []


def run_trial(config: dict[str, Any], context: SearchContext) -> None:
    """The trainable: build the trial's config, resume from Tune's checkpoint, train."""
    cfg = context.run_config(config)
    run_dir = Path.cwd() / "run"  # Tune runs each trial in its own trial directory
    resume_from = restored_checkpoint(run_dir)
    listeners = [*extra_listeners(context, cfg, config), report_to_tune]
    try:
        train(cfg, run_dir, listeners=listeners, resume_from=resume_from, evaluate_test=False,
              quiet=True)
    except CheckpointError as err:
        if resume_from is None:
            raise
        warnings.warn(f"{err}; starting the trial afresh", stacklevel=2)
        resume_from.unlink(missing_ok=True)
        train(cfg, run_dir, listeners=listeners, evaluate_test=False, quiet=True)
