"""One training run: the loop every trial runs, reporting each epoch to its listeners.

Imports no Ray, MLflow or Optuna: the CLI, the Ray trainable and MLflow are listeners.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data import DataBundle, build_data
from losses import OBJECTIVES, OWN_MODULES
from models import freeze, resnet
from tuning.run.checkpoint import (
    CHECKPOINT_FORMAT,
    MODEL_FORMAT,
    CheckpointError,
    atomic_torch_save,
    load_checkpoint,
    safe_load,
    save_checkpoint,
)
from tuning.run.config import RunConfig, UserError
from tuning.run.step import autocast as _autocast
from tuning.run.step import make_optimizer, make_train_step

# A listener hears of every epoch: its metrics, and the checkpoint written after it, or None
# for an epoch that wrote none (see RunConfig.checkpoint_interval_s).
Listener = Callable[[dict[str, Any], Path | None], None]
CHECKPOINT_NAME = "checkpoint.pt"
MODEL_NAME = "model.pt"


class DivergedError(RuntimeError):
    """The training loss stopped being finite."""


class OutOfMemory(RuntimeError):
    """The run does not fit in the device memory it was given."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name} was asked for but CUDA is not available; "
                        "pass --device cpu (or auto)")
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name, for result files and run tags."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


# What a model file's "arch" holds: resnet()'s arguments, each of this type. Files written
# before block existed have no "block" (their dirac says it).
ARCH_TYPES = {"depth": int, "shortcut": str, "stem": str, "num_classes": int, "width": int,
              "dirac": bool, "block": str}
ARCH_OPTIONAL = {"block"}


def _check_arch(arch: Any, path: Path, fix: str) -> dict[str, Any]:
    """A model file's arch as resnet() arguments; CheckpointError if missing or malformed."""
    if not isinstance(arch, dict):
        got = "none" if arch is None else f"a {type(arch).__name__}"
        raise CheckpointError(f"model file {path} has {got} as its 'arch' (the network's "
                              f"depth, shortcut, stem, num_classes, width, dirac, block); {fix}")
    bad = sorted((set(arch) ^ set(ARCH_TYPES)) - (ARCH_OPTIONAL - set(arch)), key=str)
    bad += [k for k, kind in ARCH_TYPES.items() if k in arch and (
        not isinstance(arch[k], kind) or (kind is int and isinstance(arch[k], bool)))]
    if bad:
        raise CheckpointError(f"model file {path} has an unusable 'arch' (bad or missing "
                              f"{', '.join(map(str, bad[:3]))}); {fix}")
    return dict(arch)


def load_model(path: str | Path, *, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """A saved model.pt as (network, metadata), loaded with weights_only=True.

    Anything wrong with the file (damage, another format, a malformed arch or weights that
    do not fit it) is one CheckpointError naming the file and the fix.
    """
    fix = "train one with `python -m tuning.train --method ce --shortcut all` and pass its model.pt"
    path = Path(path)
    meta = safe_load(path, what="model file", fix=fix)
    if meta.get("format") != MODEL_FORMAT:
        kind = " (a training checkpoint)" if meta.get("format") == CHECKPOINT_FORMAT else ""
        raise CheckpointError(f"{path} is a {meta.get('format')} file{kind}, not a trained "
                              f"model; {fix}")
    arch = _check_arch(meta.get("arch"), path, fix)
    try:
        net = resnet(**arch)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"model file {path} has an unusable 'arch' ({err}); {fix}") \
            from None
    state = meta.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"model file {path} holds no weights ('state_dict'); {fix}")
    try:
        net.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"model file {path} does not match its architecture "
                              f"({str(err).splitlines()[0][:200]}); {fix}") from None
    return net.to(device), meta


def data_meta(data: DataBundle) -> dict[str, Any]:
    """What a model file records of its data: enough to load and feed it without the data."""
    return {"dataset": data.name, "num_classes": data.num_classes,
            "classes": list(data.classes), "stem": data.stem, "mean": list(data.mean),
            "std": list(data.std)}


def save_model(net: nn.Module, path: Path, *, cfg: RunConfig, data: DataBundle,
               metrics: dict[str, Any]) -> None:
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    atomic_torch_save({
        "format": MODEL_FORMAT, "arch": dict(net.arch), **data_meta(data),
        "config": cfg.to_dict(), "metrics": metrics, "state_dict": state,
    }, path)


def model_from_checkpoint(checkpoint: Path, path: Path) -> int:
    """Write the model of a training checkpoint as a model file (a trial stopped early has no
    other); returns the checkpoint's epoch."""
    state = load_checkpoint(Path(checkpoint))
    cfg = RunConfig.from_dict(state["config"], source=str(checkpoint))
    meta = state.get("data")
    if meta is None:
        raise CheckpointError(f"checkpoint {checkpoint} predates the data it needs to be a "
                              "model file; nothing was written")
    arch = {"depth": cfg.depth, "shortcut": cfg.shortcut, "stem": meta["stem"],
            "num_classes": meta["num_classes"], "width": cfg.width, "block": cfg.block}
    net = resnet(**arch)
    net.load_state_dict(state["model"])
    atomic_torch_save({
        "format": MODEL_FORMAT, "arch": dict(net.arch), **meta, "config": cfg.to_dict(),
        "metrics": dict(state["history"][-1]) if state.get("history") else {},
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
    }, Path(path))
    return int(state["epoch"])


# The methods that compare or mix stage features, so teacher and student widths must agree.
FEATURE_METHODS = ("alignkd", "jointrd", "jointrd_released")


def load_teacher(cfg: RunConfig, data: DataBundle, device: torch.device) -> nn.Module:
    """The frozen teacher, checked against this run's data set, classes, depth and width."""
    if not cfg.teacher:
        raise UserError(f"--method {cfg.method} needs a trained teacher: pass --teacher PATH "
                        "(a model.pt from `python -m tuning.train --method ce --shortcut all`)")
    net, meta = load_model(cfg.teacher, device=device)
    arch = net.arch  # checked by load_model
    if meta.get("dataset") != data.name or arch["num_classes"] != data.num_classes:
        raise CheckpointError(
            f"teacher {cfg.teacher} was trained on {meta.get('dataset')} "
            f"({arch['num_classes']} classes) but this run uses {data.name} "
            f"({data.num_classes} classes); pass a teacher trained on {data.name}")
    if arch["stem"] != data.stem:
        raise CheckpointError(f"teacher {cfg.teacher} has the {arch['stem']} stem but "
                              f"{data.name} needs the {data.stem} stem; retrain the teacher")
    if cfg.teacher_depth is not None and arch["depth"] != cfg.teacher_depth:
        raise CheckpointError(f"teacher {cfg.teacher} is ResNet-{arch['depth']} but "
                              f"teacher_depth is {cfg.teacher_depth}; pass a matching teacher")
    if cfg.method in FEATURE_METHODS and arch["width"] != cfg.width:
        # AlignKD compares stage features; JointRD runs student features through teacher
        # stages: both need the same channel counts.
        raise CheckpointError(
            f"teacher {cfg.teacher} has width {arch['width']} but the student's width is "
            f"{cfg.width}; {cfg.method} needs equal widths: pass --width {arch['width']}, or a "
            f"teacher trained with --width {cfg.width}")
    if arch["shortcut"] != "all":
        warnings.warn(f"teacher {cfg.teacher} is a Plain-CNN (shortcut {arch['shortcut']}), "
                      "not a ResNet; allowed, but the methods expect a ResNet teacher "
                      "(--method ce --shortcut all)", UserWarning, stacklevel=2)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    return freeze(net)


def objective_kwargs(cfg: RunConfig, epoch: int) -> dict[str, Any]:
    """The hyperparameters each objective takes, at this epoch (alpha and temperature as
    resolved for the method: RunConfig.resolved). jointrd_released's connectors are not
    hyperparameters: the train step passes them (tuning.run.step.make_train_step)."""
    eta = cfg.eta_schedule(epoch)
    alpha, temperature = cfg.resolved("alpha"), cfg.resolved("temperature")
    return {
        "ce": {},
        "kd": {"alpha": alpha, "temperature": temperature},
        "alignkd": {"alpha": alpha, "eta": eta, "temperature": temperature,
                    "feature_loss_kind": cfg.feature_loss, "beta": cfg.beta},
        "jointrd": {"eta": eta, "lam": cfg.lam},
        "jointrd_released": {"eta": eta, "dis_weight": cfg.dis_weight},
    }[cfg.method]


def evaluate(net: nn.Module, loader: Iterable, device: torch.device) -> float:
    """Top-1 accuracy (NaN for an empty split); counts stay on the device until the one read
    at the end."""
    was_training = net.training
    net.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    with torch.no_grad(), _autocast(device):
        for x, y in loader:
            correct += (net(x).argmax(1) == y).sum()
            seen += len(y)
    net.train(was_training)
    return correct.item() / seen if seen else float("nan")  # an empty split has no accuracy


class Progress:
    """A per-epoch progress bar on a terminal; silent otherwise."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label = total, label
        self.on = sys.stderr.isatty()
        self.every = max(1, total // 40)

    def update(self, done: int) -> None:
        if self.on and (done % self.every == 0 or done == self.total):
            bar = "#" * (30 * done // self.total)
            sys.stderr.write(f"\r{self.label} [{bar:<30}] {done}/{self.total}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.on:
            sys.stderr.write("\r" + " " * (len(self.label) + 45) + "\r")


def train(cfg: RunConfig, run_dir: str | Path, *, listeners: Iterable[Listener] = (),
          checkpoint_epochs: Collection[int] = (),
          resume_from: str | Path | None = None, evaluate_test: bool = True,
          checkpoint_extra: dict[str, Any] | None = None, quiet: bool = False) -> dict[str, Any]:
    """Train one run; each epoch may write a checkpoint atomically, then calls each listener.

    A checkpoint is written when `cfg.checkpoint_interval_s` of training have passed since the
    last one (0: every epoch), after each of `checkpoint_epochs` (a search's rungs, where a
    trial may be stopped), and always after the last epoch.

    Returns the final metrics. `checkpoint_extra` is stored in every checkpoint (a
    listener's state, such as a tracking run id) and returned by `resume_from`'s load.
    """
    run_dir = Path(run_dir).resolve()
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        # Ray sets OMP_NUM_THREADS to a trial's CPUs; alone, use every core we may run on.
        threads = os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0))
        torch.set_num_threads(max(1, int(threads)))
    torch.manual_seed(cfg.seed)
    data = build_data(cfg.dataset, cfg.data_root, batch_size=cfg.batch_size,
                      val_fraction=cfg.val_fraction, split_seed=cfg.split_seed, device=device,
                      download=cfg.download, **cfg.data_options())
    teacher = load_teacher(cfg, data, device) if cfg.method != "ce" else None
    student = resnet(cfg.depth, shortcut=cfg.shortcut, stem=data.stem,
                     num_classes=data.num_classes, width=cfg.width, block=cfg.block).to(device)
    if device.type == "cuda":
        student = student.to(memory_format=torch.channels_last)
    # The modules an objective trains besides the student (jointrd_released's connectors):
    # made once per run, after the student (whose initialization they leave unchanged),
    # optimized and checkpointed with it, and never part of model.pt.
    own = OWN_MODULES[cfg.method](student, teacher) if cfg.method in OWN_MODULES else None
    if own is not None and device.type == "cuda":
        own = own.to(memory_format=torch.channels_last)
    steps = len(data.train)
    optimizer, scheduler = make_optimizer(student, cfg, cfg.epochs * steps, device,
                                          connectors=own)
    objective = OBJECTIVES[cfg.method]
    if cfg.compile:
        objective = torch.compile(objective)

    start_epoch, history, train_time, eval_time = 0, [], 0.0, 0.0
    extra = dict(checkpoint_extra or {})
    if resume_from is not None:
        state = load_checkpoint(Path(resume_from))
        try:
            student.load_state_dict(state["model"])
            if own is not None:
                own.load_state_dict(state["connectors"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng_cpu"])
            if device.type == "cuda" and state.get("rng_cuda") is not None:
                torch.cuda.set_rng_state(state["rng_cuda"])
            start_epoch, history = int(state["epoch"]), list(state["history"])
            train_time, eval_time = float(state["train_time"]), float(state["eval_time"])
            extra = {**state.get("extra", {}), **extra}
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
            reason = " ".join(str(err).split())[:160] or type(err).__name__
            raise CheckpointError(f"checkpoint {resume_from} does not fit this run ({reason}); "
                                  "delete it to start the run afresh") from None

    train_step = make_train_step(objective, student, teacher, optimizer, scheduler, device,
                                 connectors=own)
    ckpt_path = run_dir / CHECKPOINT_NAME
    best_val = max((h["val_acc"] for h in history), default=0.0)
    last_save = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        hp = objective_kwargs(cfg, epoch)
        student.train()
        if own is not None:
            own.train()
        data.train.set_epoch(cfg.seed, epoch)
        sums: dict[str, torch.Tensor] = {}
        correct = torch.zeros((), dtype=torch.long, device=device)
        seen = 0
        progress = Progress(steps, f"epoch {epoch + 1}/{cfg.epochs}")
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(data.train):
            try:
                total, terms, logits = train_step(x, y, hp)
            except torch.OutOfMemoryError:
                raise OutOfMemory(
                    f"out of GPU memory in epoch {epoch + 1} at batch {cfg.batch_size} "
                    f"({cfg.method}, depth {cfg.depth}, width {cfg.width}); give each trial "
                    "more of the GPU (a larger --gpus-per-trial) or lower batch_size") from None
            n = len(y)
            for name, value in (("loss", total.detach()), *terms.items()):
                value = value.float() * n
                sums[name] = sums[name] + value if name in sums else value
            correct += (logits.detach().argmax(1) == y).sum()
            seen += n
            if not quiet:
                progress.update(i + 1)
        # The one host read of the epoch; it also waits for the device to finish.
        names = list(sums)
        values = torch.stack([sums[k] for k in names] + [correct.float()]).tolist()
        epoch_time = time.perf_counter() - t0
        progress.close()
        train_time += epoch_time
        means = {k: v / max(seen, 1) for k, v in zip(names, values[:-1], strict=True)}
        if not math.isfinite(means["loss"]):
            raise DivergedError(f"training loss became {means['loss']} in epoch {epoch + 1}; "
                                f"lower lr (now {cfg.lr}) or the loss weights")
        t1 = time.perf_counter()
        val_acc = evaluate(student, data.val, device) if data.val.num_samples else float("nan")
        eval_time += time.perf_counter() - t1
        best_val = max(best_val, val_acc) if math.isfinite(val_acc) else best_val
        metrics = {
            "epoch": epoch + 1, "val_acc": val_acc, "best_val_acc": best_val,
            "train_loss": means.pop("loss"), "train_acc": values[-1] / max(seen, 1),
            **{f"loss_{k}": v for k, v in means.items()},
            # The optimizer's own values at the epoch's end: OneCycle's, not the config's.
            "lr": optimizer.param_groups[0]["lr"],
            "momentum": optimizer.param_groups[0]["momentum"],
            "eta": hp.get("eta", float("nan")),
            "epoch_time": epoch_time, "images_per_s": seen / epoch_time,
            "train_time": train_time, "eval_time": eval_time,
        }
        history.append(metrics)
        if epoch + 1 == cfg.epochs:
            # Finish before the listeners hear of the last epoch: a scheduler may stop the
            # trial inside its last report, and the final metrics belong in that report.
            metrics.update(_finish(student, data, cfg, run_dir, metrics, device, evaluate_test))
        saved, t2 = None, time.perf_counter()
        if epoch + 1 == cfg.epochs or epoch + 1 in checkpoint_epochs or \
                t2 - last_save >= cfg.checkpoint_interval_s:
            save_checkpoint({
                "model": student.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "history": history,
                "train_time": train_time, "eval_time": eval_time, "config": cfg.to_dict(),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None,
                "extra": extra, "data": data_meta(data),
                **({"connectors": own.state_dict()} if own is not None else {}),
            }, ckpt_path)
            saved, last_save = ckpt_path, time.perf_counter()
        metrics["checkpoint_time"] = last_save - t2 if saved else 0.0
        t3 = time.perf_counter()
        for listener in listeners:
            listener(metrics, saved)
        # What the listeners (Tune's report, MLflow's logging) cost. Known only after them, it
        # reaches later checkpoints' history and the returned metrics, not the listeners.
        metrics["listener_time"] = time.perf_counter() - t3

    return dict(history[-1])  # the last epoch's metrics carry the final ones


def _finish(student: nn.Module, data: DataBundle, cfg: RunConfig, run_dir: Path,
            metrics: dict[str, Any], device: torch.device, evaluate_test: bool) -> dict:
    """The final metrics; test accuracy (when asked) and model.pt, written atomically."""
    final = {"last_val_acc": metrics["val_acc"]}
    if evaluate_test:
        t1 = time.perf_counter()
        final["test_acc"] = evaluate(student, data.test, device)  # NaN: no test images
        final["eval_time"] = metrics["eval_time"] + time.perf_counter() - t1
    save_model(student, run_dir / MODEL_NAME, cfg=cfg, data=data, metrics={**metrics, **final})
    return final
