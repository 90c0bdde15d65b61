"""The teacher store: every teacher a search can ask for, trained once, cached by recipe."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tuning.run.checkpoint import CheckpointError
from tuning.run.config import RunConfig
from tuning.run.trainer import CHECKPOINT_NAME, MODEL_NAME, load_model, train
from tuning.search import storage
from tuning.search.settings import SearchSettings
from tuning.search.space import Space, SpaceError, trial_values

# Fields of a trial's config that a teacher's recipe inherits; the rest is the recipe's own.
INHERITED = ("dataset", "data_root", "data_path", "val_fraction", "split_seed", "width",
             "batch_size", "seed", "download", "checkpoint_interval_s")
VOLATILE = ("device", "extra", "checkpoint_interval_s", "download")  # not what it learns
RECIPE_FIELDS = set(INHERITED) | {"depth", "teacher_depth", "method", "teacher"}
KEY_LATER = ("block", "dis_weight")  # a teacher's block is always plain (dirac: false)
KEY_AS_BEFORE = {"alpha": 0.5, "temperature": 1.0}  # CE reads neither


@dataclass(frozen=True)
class TeacherRecipe:
    """What determines a teacher: its run config. Its key is a hash of that config."""

    values: tuple[tuple[str, Any], ...]

    @property
    def config(self) -> RunConfig:
        return RunConfig(**dict(self.values))

    @property
    def key(self) -> str:
        cfg = self.config.to_dict()
        for volatile in VOLATILE:
            cfg.pop(volatile)
        # Fields that a CE-trained ResNet never reads, added after teacher keys were first
        # written: leaving them out (and writing alpha and temperature as they were before
        # they became per-method) keeps every stored teacher's key, so none is retrained.
        for later in KEY_LATER:
            cfg.pop(later)
        cfg.update(KEY_AS_BEFORE)
        digest = hashlib.sha256(yaml.safe_dump(cfg, sort_keys=True).encode()).hexdigest()[:10]
        c = self.config
        return f"{c.dataset}-resnet{c.depth}-w{c.width}-s{c.seed}-{digest}"


def teacher_recipe(trial: RunConfig, teacher_epochs: int) -> TeacherRecipe:
    """The teacher a trial learns from: a ResNet of the teacher depth trained with plain CE."""
    values = {k: getattr(trial, k) for k in INHERITED}
    if not trial.data_options():
        values["data_path"] = None  # a path this data set never reads is no part of its teacher
    values.update(method="ce", shortcut="all", block="plain", dirac=False,
                  depth=trial.teacher_depth or trial.depth, epochs=teacher_epochs,
                  device=trial.device)
    return TeacherRecipe(tuple(sorted(values.items())))


def plan_teachers(space: Space, teacher_epochs: int) -> list[TeacherRecipe]:
    """Every teacher a trial of the space can ask for, from each trial's full merged config.

    A trial's teacher depends on its cell, on the space's fixed values (with --set) and on the
    choices it samples; every combination of choices is planned. A field of the teacher's
    recipe searched as a range could ask for any number of teachers, so it is refused.
    """
    for p in space.params:
        if p.type != "choice" and p.name in RECIPE_FIELDS:
            raise SpaceError(f"{space.source}: params.{p.name}: each trial's teacher is trained "
                             f"with its {p.name}, so it must be fixed or a choice, not a range")
    recipes: dict[str, TeacherRecipe] = {}
    for cell in space.cells():
        for choices in _choice_combinations(space, cell.as_dict()):
            cfg = RunConfig(**trial_values(space, {**cell.as_dict(), **choices}))
            if cfg.method == "ce" or cfg.teacher:
                continue  # no teacher, or one the trial names itself
            recipe = teacher_recipe(cfg, teacher_epochs)
            recipes[recipe.key] = recipe
    return list(recipes.values())


def _choice_combinations(space: Space, cell: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination of the grid's values and the active choices, in the space's order."""
    combos: list[dict[str, Any]] = [{}]
    for key, values in space.grid.items():
        combos = [{**c, key: v} for c in combos for v in values]
    for p in (p for p in space.params if p.type == "choice"):
        grown = []
        for c in combos:
            if p.active({**space.fixed, **cell, **c}):
                grown += [{**c, p.name: v} for v in p.values]
            else:
                grown.append(c)
        combos = grown
    return combos


def teacher_path(store: str | Path, recipe: TeacherRecipe) -> str:
    """Where a teacher's model lives in the store: a local path, or a URI (s3://...)."""
    return storage.join(store, recipe.key, MODEL_NAME)


TEACHER_FILES = (MODEL_NAME, CHECKPOINT_NAME, "config.yaml")


def local_teacher_dir(path: str) -> Path:
    """The folder of a stored teacher's files on this node: the store's own for a local store;
    for a URI, a node-local copy, fetched once under a lock (teachers never change)."""
    if not storage.is_uri(path):
        return Path(path).parent
    from filelock import FileLock

    folder = path.rsplit("/", 1)[0]
    local = Path(tempfile.gettempdir()) / "plainkd-teachers" / \
        hashlib.sha256(folder.encode()).hexdigest()[:16]
    local.mkdir(parents=True, exist_ok=True)
    with FileLock(str(local) + ".lock"):
        for name in TEACHER_FILES:
            if not (local / name).is_file():
                storage.download(storage.join(folder, name), local / name)
    return local


def check_stored_teacher(path: str) -> None:
    """A teacher in the store loads as the network it says it is; else one line naming its
    folder, which deleting makes the search train it again. Every trial would fail on it."""
    try:
        load_model(local_teacher_dir(path) / MODEL_NAME)
    except CheckpointError as err:
        problem = str(err).rsplit("; ", 1)[0]
        folder = path.rsplit("/", 1)[0]
        raise CheckpointError(f"the stored teacher {problem}; delete its folder {folder} and "
                              "the search trains it again") from None


def train_teacher(recipe: TeacherRecipe, store: str | Path) -> dict[str, Any]:
    """Train one teacher into the store, resuming a partial one; a no-op when it exists.

    It trains in `<key>.partial/` and renames that to `<key>/` when done, so the store only
    ever holds finished teachers, and a killed search resumes the teacher from its checkpoint.
    With a URI store the partial folder is on the node that trains it, and the finished
    teacher's files are uploaded (model last, so that a model in the store means a finished
    teacher).
    """
    target = teacher_path(store, recipe)
    if storage.exists(target):
        return {"key": recipe.key, "path": target, "trained": False}
    if storage.is_uri(store):
        partial = Path(tempfile.gettempdir()) / "plainkd-teachers" / f"{recipe.key}.partial"
    else:
        partial = Path(store) / f"{recipe.key}.partial"
    partial.mkdir(parents=True, exist_ok=True)
    ckpt = partial / CHECKPOINT_NAME
    has_ckpt = ckpt.exists() or ckpt.with_name(CHECKPOINT_NAME + ".prev").exists()
    metrics = train(recipe.config, partial, quiet=True, resume_from=ckpt if has_ckpt else None)
    (partial / "config.yaml").write_text(recipe.config.to_yaml())
    for torn in partial.glob(".*.tmp"):  # half-written files of a killed earlier attempt
        torn.unlink(missing_ok=True)
    if storage.is_uri(store):
        for name in reversed(TEACHER_FILES):
            storage.upload(partial / name, storage.join(store, recipe.key, name))
        shutil.rmtree(partial, ignore_errors=True)
        return {"key": recipe.key, "path": target, "trained": True, "metrics": metrics}
    final = Path(store) / recipe.key
    if final.exists():  # another search finished the same teacher first
        shutil.rmtree(partial, ignore_errors=True)
    else:
        os.replace(partial, final)
    return {"key": recipe.key, "path": target, "trained": True, "metrics": metrics}


def train_teachers(space: Space, settings: SearchSettings) -> list[str]:
    """Train every missing teacher the space can ask for, as parallel Ray tasks."""
    store = settings.teacher_store
    recipes = plan_teachers(space, settings.teacher_epochs)
    missing = [r for r in recipes if not storage.exists(teacher_path(store, r))]
    print(f"teachers: {len(recipes)} needed, {len(recipes) - len(missing)} in the store "
          f"{store}", flush=True)
    paths = [teacher_path(store, r) for r in recipes]
    for recipe in recipes:
        if recipe not in missing:
            check_stored_teacher(teacher_path(store, recipe))
    if not missing:
        return paths
    import ray

    task = ray.remote(num_cpus=settings.cpus_per_trial, num_gpus=settings.gpus_per_trial,
                      max_retries=1)(train_teacher)
    refs = {task.remote(r, store): r for r in missing}
    for ref in refs:
        done = ray.get(ref)
        acc = done.get("metrics", {}).get("best_val_acc", math.nan)
        print(f"teacher {done['key']}: val_acc {acc:.4f}", flush=True)
    return paths
