"""Training throughput of every objective, through the trainer's own input path and step.

Synthetic uint8 images of the real shapes go through a data.DeviceLoader and tuning.run.step's
train step (the trainer's objective, SGD, OneCycle, bf16 autocast and channels_last on CUDA);
each measured cost ratio is set beside METHOD.md's FLOP model (tuning.measure.flops).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from data import DeviceLoader
from data.bundle import AUGMENT_BY_STEM, NORMALIZATION
from losses import OBJECTIVES, OWN_MODULES
from models import freeze, resnet
from tuning.measure.flops import add_model_ratios, cost_model, ratio
from tuning.run.checkpoint import atomic_write_text, check_output_file
from tuning.run.config import METHODS, RunConfig, UserError
from tuning.run.console import Parser, refuse
from tuning.run.step import make_optimizer, make_train_step
from tuning.run.trainer import describe_device, objective_kwargs, resolve_device

RESULTS_DIR = Path(__file__).resolve().parents[1] / "bench" / "results"
NUM_CLASSES = 10  # CIFAR-10 and Imagewoof both have 10
EPOCH_BATCHES = 8  # synthetic epoch length: each pass re-draws order and augmentation
DEFAULTS = {
    "cuda": dict(batch_size=512, batch_size_224=128, width=64, steps=20, warmup=5),
    "cpu": dict(batch_size=32, batch_size_224=8, width=8, steps=3, warmup=1),
}
NOTES = {
    "ms_per_step": "wall time of `steps` training steps (input path included) after `warmup` "
                   "untimed ones, divided by steps; CUDA is synchronized only before and after",
    "peak_mem_bytes": "torch.cuda.max_memory_allocated, reset per configuration; includes the "
                      f"synthetic data set ({EPOCH_BATCHES} batches) held on the device",
    "flop_model_step_F": "conv+linear MACs, F = one teacher forward, backward = 2F: ce 3s, "
                         "kd/alignkd 1 + 3s, jointrd 1 + 3s + 2r (s = student/teacher MACs)",
    "input_share": "input path alone (ms per batch) / ms_per_step at the same size and batch",
}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
QUICK = dict(batch_size=8, batch_size_224=4, width=4, steps=1, warmup=1,
             configs=["18x32", "18x224"])


def stem_of(size: int) -> str:
    """CIFAR stem for small images, the ImageNet stem (7x7/2 + max-pool) otherwise."""
    return "cifar" if size < 64 else "imagenet"


def synthetic_loader(size: int, batch: int, device: torch.device) -> DeviceLoader:
    """A training DeviceLoader over random uint8 images stored as the real data set stores them."""
    stem = stem_of(size)
    # Imagewoof is cached at 256 px and random-resized-cropped to 224 (data.imagewoof).
    stored = size if stem == "cifar" else round(size * 256 / 224)
    n = batch * EPOCH_BATCHES
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, stored, stored, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    mean, std = NORMALIZATION["cifar10" if stem == "cifar" else "imagewoof"]
    return DeviceLoader(images.to(device), labels.to(device), batch_size=batch, train=True,
                        augment=AUGMENT_BY_STEM[stem], mean=mean, std=std, out_size=size)


def batches(loader: DeviceLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches, a fresh epoch (permutation and augmentation draw) each pass."""
    epoch = 0
    while True:
        loader.set_epoch(0, epoch)
        yield from loader
        epoch += 1


def timed(fn: Callable[[], Any], warmup: int, steps: int, device: torch.device) -> tuple:
    """(ms per call, last result) of fn over `steps` calls after `warmup` untimed ones."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda _: None
    for _ in range(warmup):
        fn()
    sync(device)  # the only host waits: at the timing boundaries
    t0 = time.perf_counter()
    for _ in range(steps):
        out = fn()
    sync(device)
    return (time.perf_counter() - t0) * 1000 / steps, out


def time_input(loader: DeviceLoader, args: argparse.Namespace, device: torch.device) -> dict:
    """The input path alone: gather, augment and normalise one batch."""
    it = batches(loader)
    ms, _ = timed(lambda: next(it), args.warmup, args.steps, device)
    return {"size": loader.out_size, "batch_size": loader.batch_size,
            "ms_per_batch": ms, "images_per_s": loader.batch_size * 1000 / ms}


def time_train(method: str, depth: int, loader: DeviceLoader, args: argparse.Namespace,
               device: torch.device, *, feature_loss: str = "mse",
               compile_mode: str | None = None) -> dict[str, Any]:
    """ms per training step (input included) and peak memory of one configuration.

    `compile_mode` times torch.compile(objective, mode=...) instead of the eager objective;
    "reduce-overhead" is inductor with CUDA graphs.
    """
    size, stem = loader.out_size, stem_of(loader.out_size)
    row: dict[str, Any] = {"method": method, "depth": depth, "size": size,
                           "batch_size": loader.batch_size, "feature_loss": feature_loss}
    if compile_mode is not None:
        row["compile_mode"] = compile_mode
    cfg = RunConfig(method=method, depth=depth, width=args.width, feature_loss=feature_loss)
    # torch.compile traces and compiles in its first calls (CUDA graphs record in the next
    # ones): keep those out of the timing.
    warmup = max(args.warmup, 3) if compile_mode else args.warmup
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        student = resnet(depth, shortcut="none", stem=stem, num_classes=NUM_CLASSES,
                         width=args.width).to(device)
        teacher = None
        if method != "ce":  # ce is the no-teacher baseline: a Plain student from scratch
            teacher = freeze(resnet(depth, shortcut="all", stem=stem, num_classes=NUM_CLASSES,
                                    width=args.width).to(device))
        if device.type == "cuda":  # as tuning.run.trainer lays both networks out
            student = student.to(memory_format=torch.channels_last)
            if teacher is not None:
                teacher = teacher.to(memory_format=torch.channels_last)
        # What the objective trains besides the student (jointrd_released's connectors).
        own = OWN_MODULES[method](student, teacher) if method in OWN_MODULES else None
        if own is not None and device.type == "cuda":
            own = own.to(memory_format=torch.channels_last)
        optimizer, scheduler = make_optimizer(student, cfg, warmup + args.steps, device,
                                              connectors=own)
        objective = OBJECTIVES[method]
        if compile_mode is not None:
            torch._dynamo.reset()  # each configuration compiles afresh, within recompile limits
            objective = torch.compile(objective, mode=compile_mode)
        step = make_train_step(objective, student, teacher, optimizer, scheduler, device,
                               connectors=own)
        hp = objective_kwargs(cfg, 0)
        it = batches(loader)
        ms, (total, _, _) = timed(lambda: step(*next(it), hp), warmup, args.steps, device)
    except torch.cuda.OutOfMemoryError:
        # A too-large batch for this GPU is a result, not a crash of the whole sweep.
        return {**row, "error": "out of memory", "ms_per_step": None, "images_per_s": None,
                "peak_mem_bytes": None}
    except Exception as err:  # noqa: BLE001 - a compiler failure is a finding, not a crash
        if compile_mode is None:
            raise
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        return {**row, "error": reason[:300], "ms_per_step": None, "images_per_s": None,
                "peak_mem_bytes": None}
    if not math.isfinite(total.item()):
        raise RuntimeError(f"{method} depth {depth} {size}px: the loss is not finite")
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {**row, "ms_per_step": ms, "images_per_s": loader.batch_size * 1000 / ms,
            "peak_mem_bytes": peak}


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_tables(report: dict) -> str:
    """The human-readable summary of a report."""
    lines = [f"{report['device']['name']} ({report['device']['type']}), torch {report['torch']}, "
             f"width {report['settings']['width']}, {report['settings']['steps']} timed steps",
             f"{'method':8} {'depth':>5} {'px':>4} {'batch':>5} {'img/s':>9} {'ms/step':>9} "
             f"{'peak MiB':>8} {'model F':>7} {'/jointrd meas|model':>19} {'/ce meas|model':>14} "
             f"{'input':>6}"]
    for r in report["results"]:
        mib = None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2**20
        vj, vc = r["ratio_vs_jointrd"], r["ratio_vs_ce"]
        lines.append(
            f"{r['method']:8} {r['depth']:>5} {r['size']:>4} {r['batch_size']:>5} "
            f"{_fmt(r['images_per_s'], ',.0f'):>9} {_fmt(r['ms_per_step'], '.1f'):>9} "
            f"{_fmt(mib, '.0f'):>8} {r['flop_model_step_F']:>7.2f} "
            f"{_fmt(vj['measured'], '.2f'):>10}|{_fmt(vj['model'], '.2f'):<8} "
            f"{_fmt(vc['measured'], '.2f'):>7}|{_fmt(vc['model'], '.2f'):<6} "
            f"{_fmt(r['input_share'], '.1%'):>6}")
    lines.append("input path alone:")
    lines += [f"  {i['size']:>4} px batch {i['batch_size']:>4}: {i['ms_per_batch']:.2f} ms/batch, "
              f"{i['images_per_s']:,.0f} img/s" for i in report["input"]]
    if report["feature_losses"]:
        lines.append("alignkd feature loss (ms/step, vs mse):")
        lines += [f"  depth {f['depth']} {f['size']:>4} px {f['feature_loss']:4}: "
                  f"{_fmt(f['ms_per_step'], '.1f')} ms ({_fmt(f['ratio_vs_mse'], '.2f')}x)"
                  for f in report["feature_losses"]]
    for c in report["compiled"]:
        result = (f"failed ({c['error']})" if c.get("error") else
                  f"{_fmt(c['ms_per_step'], '.1f')} ms ({_fmt(c['speedup'], '.2f')}x eager)")
        lines.append(f"compiled ({c['compile_mode']}) {c['method']} depth {c['depth']} "
                     f"{c['size']} px: {result}")
    lines.append("FLOP model (F = one teacher forward; backward = 2F):")
    lines += [f"  {k}: teacher {m['gmac_teacher']:.3f} / student {m['gmac_student']:.3f} GMAC "
              f"per image, r {m['r']:.3f}, step F " + ", ".join(
                  f"{meth} {v:.2f}" for meth, v in m["step_F"].items())
              for k, m in report["flop_model"].items()]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Flags; unset sizes fall back to --quick's, then to the device type's defaults."""
    p = Parser(prog="tuning.bench", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--batch-size", type=int, help="batch at 32 px (default 512 cuda, 32 cpu)")
    p.add_argument("--batch-size-224", type=int,
                   help="batch at ImageNet-stem sizes (default 128 cuda, 8 cpu)")
    p.add_argument("--width", type=int, help="base channel width (default 64 cuda, 8 cpu)")
    p.add_argument("--depths", type=int, nargs="+", default=[18, 34], choices=(18, 34))
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    p.add_argument("--configs", nargs="+", metavar="DEPTHxSIZE",
                   help="explicit (depth, size) pairs, e.g. 18x32 34x32 18x224; "
                        "replaces --depths x --sizes")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--feature-losses", nargs="*", default=["at", "nst"], choices=("at", "nst"),
                   help="alignkd feature-loss variants timed beside mse")
    p.add_argument("--steps", type=int, help="timed steps (default 20 cuda, 3 cpu)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 5 cuda, 1 cpu)")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile(objective) in each --compile-modes mode")
    p.add_argument("--compile-modes", nargs="+", choices=COMPILE_MODES,
                   help="default: 'default' on the CPU; 'default' and 'reduce-overhead' (CUDA "
                        "graphs) on CUDA")
    p.add_argument("--out", type=Path,
                   help="JSON path (default bench/results/train-<cpu|cuda>[-quick].json)")
    p.add_argument("--threads", type=int, help="CPU threads (default: all, as the trainer)")
    p.add_argument("--quick", action="store_true", help="a tiny CPU-friendly smoke run: seconds")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else {}).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.configs = [tuple(int(v) for v in c.lower().split("x")) for c in args.configs] \
            if args.configs else [(d, s) for d in args.depths for s in args.sizes]
    except ValueError:
        p.error(f"--configs takes DEPTHxSIZE pairs such as 18x32, got {args.configs}")
    if any(len(c) != 2 or c[0] not in (18, 34) or c[1] < 16 for c in args.configs):
        p.error("configs need depth 18 or 34 and size >= 16, as DEPTHxSIZE (e.g. 34x32)")
    for flag in ("batch_size", "batch_size_224", "width", "steps", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1; got {value}")
    if args.warmup is not None and args.warmup < 0:
        p.error(f"--warmup must be 0 or more; got {args.warmup}")
    return args


def run(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Every measurement of one invocation, as the JSON report."""
    for key, value in DEFAULTS[device.type].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.compile_modes is None:
        args.compile_modes = ["default", "reduce-overhead"] if device.type == "cuda" \
            else ["default"]
    if min(args.batch_size, args.batch_size_224, args.width, args.steps) < 1 or args.warmup < 0:
        raise UserError("batch sizes, width and steps must be >= 1 and warmup >= 0")
    rows, inputs, variants, compiled, models = [], {}, [], [], {}
    load_start = list(os.getloadavg())
    for depth, size in args.configs:
        batch = args.batch_size if stem_of(size) == "cifar" else args.batch_size_224
        models[f"{depth}x{size}"] = cost_model(depth, size, args.width, NUM_CLASSES).to_dict()
        loader = synthetic_loader(size, batch, device)
        if (size, batch) not in inputs:
            inputs[(size, batch)] = time_input(loader, args, device)
        group = {}
        for method in args.methods:
            print(f"timing {method} depth {depth} {size} px batch {batch}", file=sys.stderr)
            group[method] = time_train(method, depth, loader, args, device)
            for mode in args.compile_modes if args.compile else ():
                print(f"  compiled ({mode})", file=sys.stderr)
                c = time_train(method, depth, loader, args, device, compile_mode=mode)
                c["speedup"] = ratio(group[method]["ms_per_step"], c["ms_per_step"])
                compiled.append(c)
        rows += group.values()
        if "alignkd" in group:
            mse = group["alignkd"]
            variants.append({**mse, "ratio_vs_mse": 1.0})
            for kind in args.feature_losses:
                v = time_train("alignkd", depth, loader, args, device, feature_loss=kind)
                variants.append({**v, "ratio_vs_mse": ratio(v["ms_per_step"], mse["ms_per_step"])})
        del loader
    add_model_ratios(rows, models)
    for row in rows:
        row["input_share"] = ratio(inputs[(row["size"], row["batch_size"])]["ms_per_batch"],
                                   row["ms_per_step"])
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "configs")}
    settings["configs"] = [f"{d}x{s}" for d, s in args.configs]
    return {
        "format": "plainkd-train-bench/1",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # The load average says how much other work shared the CPU while this ran.
        "device": {"type": device.type, "name": describe_device(device),
                   "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                   "load_avg_start": load_start, "load_avg_end": list(os.getloadavg())},
        "torch": torch.__version__, "python": platform.python_version(),
        "settings": settings, "notes": NOTES, "flop_model": models, "results": rows,
        "input": list(inputs.values()), "feature_losses": variants, "compiled": compiled,
    }


OUT_FIX = "pass --out a .json path in a folder that can be created and written"


def _given_out(argv: list[str]) -> str | None:
    """The value of --out in argv (as --out PATH or --out=PATH), if given."""
    for i, arg in enumerate(argv):
        if arg.startswith("--out="):
            return arg.split("=", 1)[1]
        if arg == "--out" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def main(argv: list[str] | None = None) -> int:
    """Dispatch --inference / --search-overhead, else benchmark training; 2 on a user error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    handed_over = "--inference" in argv or "--search-overhead" in argv
    if handed_over and _given_out(argv) is not None:
        # Those benchmarks write --out only at their end: check it before they start.
        try:
            check_output_file(_given_out(argv), what="results file (--out)", fix=OUT_FIX)
        except UserError as err:
            return refuse(err)
    if "--inference" in argv:
        from tuning.measure.inference import main as inference_main

        return inference_main([a for a in argv if a != "--inference"])
    if "--search-overhead" in argv:
        from tuning.measure.overhead import main as overhead_main

        return overhead_main([a for a in argv if a != "--search-overhead"])
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
        name = f"train-{device.type}{'-quick' if args.quick else ''}.json"
        out = args.out or RESULTS_DIR / name
        # Before the benchmark: results that cannot be written must not cost a whole run.
        check_output_file(out, what="results file (--out)", fix=OUT_FIX)
        if device.type == "cpu":
            torch.set_num_threads(args.threads or max(1, len(os.sched_getaffinity(0))))
        report = run(args, device)
    except UserError as err:
        return refuse(err)
    atomic_write_text(out, json.dumps(report, indent=2, allow_nan=False) + "\n")
    print(format_tables(report))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
