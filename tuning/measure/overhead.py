"""`python -m tuning.bench --search-overhead`: what Ray Tune plus MLflow add to a trial.

Three measurements:

1. End to end: the same AlignKD run is trained bare, through the trainer alone, and as the
   single trial of a real search (Tune reporting, checkpoint upload, MLflow logging). The
   overhead is (trial time - bare time) / bare time, both from inside the process that
   trains, so Ray's start-up counts against neither.
2. Per epoch, inside that trial: what the trainer's listeners (Tune's report and MLflow's
   logging) took, for epochs with and without a checkpoint, from the trial's own record
   (`listener_time` and `checkpoint_time` in its history).
3. One checkpoint at full width (default 64): the trainer's atomic write, then what a
   trial's report adds (the hard link and Tune's copy into its storage).

From these it projects the share of a paper-length trial at a given GPU pace (default:
200 CIFAR-10 epochs of 45,000 images at 35,000 images/s) under the checkpoint interval.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from data import DATASETS
from models import resnet
from tuning.run.checkpoint import atomic_write_text, safe_load, save_checkpoint, staged
from tuning.run.config import RunConfig, UserError
from tuning.run.console import Parser, refuse
from tuning.run.step import make_optimizer
from tuning.run.trainer import CHECKPOINT_NAME, describe_device, resolve_device, train


def trial_records(experiment: Path, trials: int) -> list[tuple[float, int, list[dict]]]:
    """Each trial's own wall time (Tune's time_total_s), its epochs, and the per-epoch history
    of its newest stored checkpoint, in the order the trials started."""
    found = sorted(experiment.glob("run_trial_*"), key=lambda p: int(p.name.split("_")[3]))
    if len(found) != trials:
        raise RuntimeError(f"expected {trials} trials under {experiment}, found {len(found)}")
    out = []
    for trial in found:
        last = json.loads((trial / "result.json").read_text().strip().splitlines()[-1])
        stored = sorted(trial.glob(f"checkpoint_*/{CHECKPOINT_NAME}"),
                        key=lambda p: p.parent.name)
        history = safe_load(stored[-1], what="checkpoint", fix="rerun the benchmark")["history"]
        out.append((float(last["time_total_s"]), int(last["epoch"]), history))
    return out


def synthetic_npz(path: Path, images: int) -> Path:
    """Random 32-px images of 10 classes: the benchmark times, it does not learn."""
    rng = np.random.default_rng(0)
    np.savez(path, images=rng.integers(0, 256, (images, 32, 32, 3), dtype=np.uint8),
             labels=np.arange(images) % 10)
    return path


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def end_to_end(epochs: int, width: int, data: dict, device: str, interval: float,
               root: Path, trials: int) -> dict:
    teacher_dir = root / "teacher"
    common = dict(width=width, device=device, data_root=str(root / "data"),
                  checkpoint_interval_s=interval, **data)
    train(RunConfig(method="ce", shortcut="all", epochs=1, **common), teacher_dir, quiet=True)
    cfg = RunConfig(method="alignkd", teacher=str(teacher_dir / "model.pt"), epochs=epochs,
                    **common)
    # The trial runs with Ray's OMP_NUM_THREADS = its CPUs (1); the bare run must match.
    os.environ["OMP_NUM_THREADS"] = "1"

    def bare_run(folder: str) -> float:
        t0 = time.perf_counter()
        train(cfg, root / folder, quiet=True, evaluate_test=False)
        return time.perf_counter() - t0

    before = bare_run("bare1")
    space = root / "one.yaml"
    # Trials that differ only in their seed (a cell each: a seed is never searched): the
    # same work, one after another, so that the later ones run in the worker process the
    # first one started.
    space.write_text(f"fixed: {{method: alignkd, teacher: {cfg.teacher}, lr: {cfg.lr}}}\n"
                     f"across:\n  seed: {list(range(trials))}\n")
    sets = [f"{k}={v}" for k, v in common.items() if k != "data_root"]
    # The real command, as a user runs it (its driver's start-up is not timed: the trials'
    # own times are read from their records).
    log = root / "search.log"
    with open(log, "w") as out:
        code = subprocess.run(
            [sys.executable, "-m", "tuning.search", "--space", str(space), "--name", "overhead",
             "--epochs", str(epochs), "--scheduler", "fifo", "--num-samples", str(trials),
             "--max-concurrent", "1", "--replicates", "0", "--baseline", "none",
             *(a for s in sets for a in ("--set", s)),
             "--storage-path", str(root / "ray"), "--data-root", str(root / "data"),
             "--teacher-store", str(root / "teachers"),
             "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}"],
            stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    if code != 0:
        raise RuntimeError(f"the search exited {code}: {log.read_text()[-2000:]}")
    records = trial_records(root / "ray" / "overhead", trials)
    trial_s, trial_epochs, history = records[0]
    # Bare runs before and after the trials; the faster one, as the machine may be noisy.
    bare_s = min(before, bare_run("bare2"))
    later = [r[0] for r in records[1:]]
    # listener_time is known after an epoch's listeners, so the newest checkpoint holds it
    # for every epoch but its own.
    timed = [h for h in history if "listener_time" in h]
    with_ckpt = [h["listener_time"] for h in timed if h["checkpoint_time"] > 0]
    without = [h["listener_time"] for h in timed if h["checkpoint_time"] == 0]
    return {"epochs": epochs, "width": width, "dataset": data["dataset"],
            "checkpoint_interval_s": interval, "bare_s": bare_s, "trial_s": trial_s,
            "trial_epochs": trial_epochs, "overhead_fraction": trial_s / bare_s - 1.0,
            "overhead_s_per_epoch": (trial_s - bare_s) / epochs,
            # Trials after the first run in a reused worker process.
            "trials": trials, "later_trial_s": later,
            "later_overhead_fraction": (statistics.median(later) / bare_s - 1.0) if later
            else None,
            "epoch_s": _mean([h["epoch_time"] for h in history]),
            "report_s_without_checkpoint": _mean(without),
            "report_s_with_checkpoint": _mean(with_ckpt),
            "epochs_measured": {"without_checkpoint": len(without), "with_checkpoint":
                                len(with_ckpt)}}


def checkpoint_cost(width: int, depth: int, root: Path, repeats: int = 5) -> dict:
    """One full-width Plain student checkpoint with SGD momentum: the trainer's write, and the
    hard link plus the copy into storage that a trial's report adds. Medians of `repeats`."""
    net = resnet(depth, shortcut="none", stem="cifar", num_classes=10, width=width)
    opt, sched = make_optimizer(net, RunConfig(width=width), 10, torch.device("cpu"))
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()  # momentum buffers exist, as in every checkpoint after the first step
    state = {"model": net.state_dict(), "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(), "epoch": 1}
    run, storage = root / "run", root / "storage"
    run.mkdir(parents=True)
    saves, reports = [], []
    for i in range(repeats):
        t0 = time.perf_counter()
        save_checkpoint(state, run / CHECKPOINT_NAME)
        t1 = time.perf_counter()
        with staged(run / CHECKPOINT_NAME) as folder:  # what report_to_tune hands Tune
            shutil.copytree(folder, storage / f"checkpoint_{i:06d}")  # and Tune's upload
        t2 = time.perf_counter()
        saves.append(t1 - t0)
        reports.append(t2 - t1)
    return {"width": width, "depth": depth, "repeats": repeats,
            "size_mb": (run / CHECKPOINT_NAME).stat().st_size / 1e6,
            "write_s": statistics.median(saves), "report_s": statistics.median(reports)}


def projection(e2e: dict, ckpt: dict, interval: float, epochs: int, epoch_s: float, *,
               reused: bool = False) -> dict:
    """The overhead share of a trial of `epochs` epochs of `epoch_s` each.

    Fixed: what the end-to-end overhead leaves after its per-epoch reports (of the first
    trial, or with `reused` of the later ones, in a reused worker). Per epoch: a report
    without a checkpoint. Per checkpoint (every `interval` s, and the last epoch): the
    full-width write and its report."""
    train_s = epochs * epoch_s
    per_epoch = e2e["report_s_without_checkpoint"] or 0.0
    trial_s = statistics.median(e2e["later_trial_s"]) if reused else e2e["trial_s"]
    fixed = max(0.0, trial_s - e2e["bare_s"] - e2e["epochs"] * per_epoch)
    every = max(1, int(interval // epoch_s) + 1) if interval > 0 else 1
    checkpoints = -(-epochs // every)
    cost = ckpt["write_s"] + ckpt["report_s"]
    total = fixed + epochs * per_epoch + checkpoints * cost
    return {"epochs": epochs, "epoch_s": epoch_s, "checkpoint_interval_s": interval,
            "checkpoint_every_epochs": every, "checkpoints": checkpoints,
            "fixed_s": fixed, "reports_s": epochs * per_epoch, "checkpoints_s": checkpoints * cost,
            "share": total / train_s}


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="tuning.bench --search-overhead", description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--width", type=int, default=None,
                   help="of the end-to-end run (default 64 on CUDA, 16 on the CPU)")
    p.add_argument("--checkpoint-width", type=int, default=64,
                   help="of the one-checkpoint measurement (default 64, the paper's)")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--images", type=int, default=None,
                   help="instead of --dataset: this many random 32-px images (short epochs)")
    p.add_argument("--trials", type=int, default=3,
                   help="trials in the search, one at a time (>= 2 measures reused workers)")
    p.add_argument("--interval", type=float, default=RunConfig.checkpoint_interval_s,
                   help="checkpoint_interval_s of the runs and of the projection")
    p.add_argument("--project-epochs", type=int, default=200)
    p.add_argument("--project-epoch-s", type=float, default=45_000 / 35_000,
                   help="epoch time to project onto (default: 45,000 images at 35,000/s)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="default bench/results/overhead-<device>.json")
    args = p.parse_args(argv)
    for flag, value, low in (("--epochs", args.epochs, 1), ("--width", args.width, 1),
                             ("--checkpoint-width", args.checkpoint_width, 1),
                             ("--images", args.images, 1), ("--trials", args.trials, 1),
                             ("--interval", args.interval, 0),
                             ("--project-epochs", args.project_epochs, 1)):
        if value is not None and not value >= low:
            p.error(f"{flag} must be at least {low}; got {value}")
    if not args.project_epoch_s > 0:
        p.error(f"--project-epoch-s must be more than 0; got {args.project_epoch_s}")
    if args.dataset not in DATASETS or args.dataset == "npz":
        p.error(f"--dataset must be one of {', '.join(d for d in DATASETS if d != 'npz')} "
                f"(or --images N for random images); got {args.dataset!r}")
    try:
        device = resolve_device(args.device)
    except UserError as err:
        return refuse(err)
    width = args.width or (64 if device.type == "cuda" else 16)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = {"dataset": args.dataset}
        if args.images:
            data = {"dataset": "npz",
                    "data_path": str(synthetic_npz(root / "synthetic.npz", args.images))}
        e2e = end_to_end(args.epochs, width, data, device.type, args.interval, root / "e2e",
                         args.trials)
        ckpt = checkpoint_cost(args.checkpoint_width, 18, root / "ckpt")
    projected = {
        "at_interval": projection(e2e, ckpt, args.interval, args.project_epochs,
                                  args.project_epoch_s),
        "every_epoch": projection(e2e, ckpt, 0.0, args.project_epochs, args.project_epoch_s),
    }
    if e2e["later_trial_s"]:
        projected["at_interval_reused_worker"] = projection(
            e2e, ckpt, args.interval, args.project_epochs, args.project_epoch_s, reused=True)
    report = {"format": "plainkd-overhead-bench/2",
              "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "device": {"type": device.type, "name": describe_device(device)},
              "torch": torch.__version__, "end_to_end": e2e, "checkpoint": ckpt,
              "projected": projected}
    out = Path(args.out or f"bench/results/overhead-{device.type}.json")
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    ms = lambda v: "-" if v is None else f"{v * 1000:.0f} ms"  # noqa: E731
    print(f"end to end ({e2e['dataset']}, width {width}, {args.epochs} epochs, checkpoint "
          f"interval {args.interval:g} s): bare {e2e['bare_s']:.2f} s, as a trial "
          f"{e2e['trial_s']:.2f} s, overhead {100 * e2e['overhead_fraction']:.1f}%")
    if e2e["later_trial_s"]:
        print(f"later trials, in the reused worker: "
              f"{', '.join(f'{s:.2f} s' for s in e2e['later_trial_s'])}, overhead "
              f"{100 * e2e['later_overhead_fraction']:.1f}% (median)")
    print(f"per epoch in the trial: report {ms(e2e['report_s_without_checkpoint'])} without "
          f"a checkpoint, {ms(e2e['report_s_with_checkpoint'])} with one")
    print(f"one checkpoint at width {ckpt['width']} ({ckpt['size_mb']:.0f} MB): write "
          f"{ms(ckpt['write_s'])}, link + copy to storage {ms(ckpt['report_s'])}")
    for name, pr in projected.items():
        print(f"projected ({name.replace('_', ' ')}): {pr['epochs']} epochs of "
              f"{pr['epoch_s']:.2f} s, a checkpoint every {pr['checkpoint_every_epochs']} "
              f"epochs: fixed {pr['fixed_s']:.1f} s + reports {pr['reports_s']:.1f} s + "
              f"checkpoints {pr['checkpoints_s']:.1f} s = {100 * pr['share']:.1f}% of training")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
