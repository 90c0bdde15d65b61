"""`python -m tuning.bench --search-overhead`: what Ray Tune plus MLflow add to a trial.

The same AlignKD run is trained twice: bare, through the trainer alone, and as the single
trial of a real search (Tune reporting and checkpoint upload every epoch, MLflow logging).
Overhead is (trial time - bare time) / bare time, both measured from inside the process
that trains, so Ray's start-up is not counted against either.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from tuning.checkpoint import atomic_write_text
from tuning.config import RunConfig
from tuning.trainer import describe_device, resolve_device, train


def trial_seconds(experiment: Path) -> tuple[float, int]:
    """The trial's own wall time (Tune's time_total_s) and its epochs, from result.json."""
    results = list(experiment.glob("run_trial_*/result.json"))
    if len(results) != 1:
        raise RuntimeError(f"expected one trial under {experiment}, found {len(results)}")
    last = json.loads(results[0].read_text().strip().splitlines()[-1])
    return float(last["time_total_s"]), int(last["epoch"])


def measure(epochs: int, width: int, dataset: str, device: str, root: Path) -> dict:
    from tuning.search import main as search_main

    teacher_dir = root / "teacher"
    common = dict(dataset=dataset, width=width, device=device, data_root=str(root / "data"))
    train(RunConfig(method="ce", shortcut="all", epochs=1, **common), teacher_dir, quiet=True)
    cfg = RunConfig(method="alignkd", teacher=str(teacher_dir / "model.pt"), epochs=epochs,
                    **common)
    # The trial runs with Ray's OMP_NUM_THREADS = its CPUs (1); the bare run must match.
    os.environ["OMP_NUM_THREADS"] = "1"

    def bare_run(folder: str) -> tuple[float, dict]:
        t0 = time.perf_counter()
        final = train(cfg, root / folder, quiet=True, evaluate_test=False)
        return time.perf_counter() - t0, final

    before = bare_run("bare1")

    space = root / "one.yaml"
    space.write_text(f"fixed: {{method: alignkd, teacher: {cfg.teacher}}}\n"
                     f"grid:\n  lr: [{cfg.lr}]\n")
    code = search_main(["--space", str(space), "--name", "overhead", "--epochs", str(epochs),
                        "--scheduler", "fifo", "--set", f"dataset={dataset}",
                        "--set", f"width={width}", "--set", f"device={device}",
                        "--storage-path", str(root / "ray"), "--data-root", str(root / "data"),
                        "--teacher-store", str(root / "teachers"),
                        "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}"])
    if code != 0:
        raise RuntimeError(f"the search exited {code}")
    tune_s, tune_epochs = trial_seconds(root / "ray" / "overhead")
    # Bare runs before and after the trial; the faster one, as the machine may be noisy.
    bare_s, bare = min(before, bare_run("bare2"), key=lambda r: r[0])
    return {"epochs": epochs, "width": width, "dataset": dataset,
            "bare_s": bare_s, "bare_train_time_s": bare["train_time"], "trial_s": tune_s,
            "trial_epochs": tune_epochs, "overhead_fraction": tune_s / bare_s - 1.0,
            "overhead_s_per_epoch": (tune_s - bare_s) / epochs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tuning.bench --search-overhead", description=__doc__)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--width", type=int, default=None, help="default 64 on CUDA, 16 on CPU")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="default bench/results/overhead-<device>.json")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    width = args.width or (64 if device.type == "cuda" else 16)
    with tempfile.TemporaryDirectory() as tmp:
        figures = measure(args.epochs, width, args.dataset, device.type, Path(tmp))
    report = {"created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "device": {"type": device.type, "name": describe_device(device)},
              "torch": torch.__version__, **figures}
    out = Path(args.out or f"bench/results/overhead-{device.type}.json")
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    print(f"bare {figures['bare_s']:.2f}s, under Tune+MLflow {figures['trial_s']:.2f}s for "
          f"{args.epochs} epochs: overhead {100 * figures['overhead_fraction']:.1f}% "
          f"({figures['overhead_s_per_epoch'] * 1000:.0f} ms per epoch) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
