"""Inference latency and activation memory of a ResNet against its Plain-CNN, both BN-folded.

`python -m tuning.inference` (or `python -m tuning.bench --inference`) times batch 1 and 64
at 32 px (CIFAR stem) and 224 px (ImageNet stem, 1000 classes) and writes one JSON file.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from models import fold_batchnorm, resnet
from tuning.checkpoint import atomic_write_text
from tuning.config import UserError
from tuning.trainer import describe_device

RESULTS_DIR = Path(__file__).resolve().parents[1] / "bench" / "results"
METHOD = {
    "latency": "wall time of one forward under torch.inference_mode, eval mode, BN folded into "
               "the convs; CUDA is synchronized before and after each timed forward; ResNet and "
               "Plain-CNN forwards alternate so that background load hits both alike; median "
               "and p90 over `runs` forwards after `warmup` untimed ones",
    "peak_activation_bytes": "liveness analysis of the forward's aten ops (a TorchDispatchMode "
               "hook, run on the meta device): a buffer lives from the op that writes it to "
               "the last op that reads it or any view or in-place alias of it, as a memory "
               "planner that frees dead values (TorchScript, ONNX Runtime) would keep it. The "
               "peak is the largest sum of live buffers at any op, its inputs and outputs both "
               "counted; the network input counts, weights do not. A shortcut keeps the block "
               "input alive until the addition; the Plain-CNN frees it after the first conv",
    "measured_peak_activation_bytes": "CUDA only: torch.cuda.max_memory_allocated during an "
               "eager forward minus what was allocated before it (weights), plus the input; "
               "includes cuDNN workspaces, and Python frames keep each block's input alive "
               "until the block returns, so it is eager PyTorch's peak, not a planner's",
    "feature_bytes_written": "sum of the bytes every op writes (new buffers and in-place "
               "updates; views write nothing)",
    "part_peak_bytes": "the same peak within the stem (ops before layer1), each layerN, and "
               "the head; at 224 px the stem's 112 px map is the whole network's peak",
    "speedup": "resnet median_ms / plain median_ms (speedup_min: the same with min_ms, less "
               "sensitive to other processes' load on a shared CPU)",
    "memory_ratio": "resnet peak_activation_bytes / plain peak_activation_bytes",
    "stages_memory_ratio": "the same with the stem left out: the largest layerN peak of each",
}


class LivenessTracker(TorchDispatchMode):
    """Records every aten op's buffers: size, the op that wrote it, the last op that read it."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer_of: dict[int, int] = {}  # id(tensor) -> buffer index
        self.keep: list[torch.Tensor] = []  # holds every tensor so that no id is reused
        self.size: list[int] = []
        self.born: list[int] = []
        self.last: list[int] = []
        self.ops: list[str] = []
        self.written = 0

    def add_input(self, t: torch.Tensor) -> None:
        """Count a tensor that exists before the first op (the network input)."""
        self._new_buffer(t, 0)

    def _new_buffer(self, t: torch.Tensor, op: int) -> None:
        self.keep.append(t)
        self.buffer_of[id(t)] = len(self.size)
        self.size.append(t.numel() * t.element_size())
        self.born.append(op)
        self.last.append(op)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        op = len(self.ops)
        self.ops.append(str(func))
        reads = [self.buffer_of[id(t)] for t in tree_leaves((args, kwargs))
                 if isinstance(t, torch.Tensor) and id(t) in self.buffer_of]
        if not reads:  # computed from weights alone (a Dirac conv's a*delta + b*W)
            return out
        for buf in reads:
            self.last[buf] = op
        schema = func._schema
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for ret, t in zip(schema.returns, outs, strict=False):
            if not isinstance(t, torch.Tensor):
                continue
            source = _aliased_argument(schema, ret, args, kwargs)
            if source is None:
                self._new_buffer(t, op)
                self.written += self.size[-1]
            elif id(source) in self.buffer_of:  # a view or in-place result of an activation
                buf = self.buffer_of[id(source)]
                if id(t) not in self.buffer_of:
                    self.keep.append(t)
                    self.buffer_of[id(t)] = buf
                self.last[buf] = op
                if ret.alias_info.is_write:
                    self.written += t.numel() * t.element_size()
        return out

    def live_bytes(self) -> list[int]:
        """Live activation bytes at each op."""
        delta = [0] * (len(self.ops) + 1)
        for size, born, last in zip(self.size, self.born, self.last, strict=True):
            delta[born] += size
            delta[last + 1] -= size
        live, total = [], 0
        for d in delta[:-1]:
            total += d
            live.append(total)
        return live


def _aliased_argument(schema, ret, args: tuple, kwargs: dict) -> Any:
    """The argument an output aliases, by the schema's alias sets (a!, a), or None."""
    if ret.alias_info is None:
        return None
    sets = set(ret.alias_info.before_set)
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is not None and sets & set(arg.alias_info.before_set):
            return args[i] if i < len(args) else kwargs.get(arg.name)
    return None


def activation_memory(net: nn.Module, shape: Sequence[int]) -> dict[str, Any]:
    """Peak live activation bytes and feature bytes written by one forward, on the meta device.

    Also the peak within each part: "stem" (before layer1), layer1..4, "head" (after layer4),
    found by forward hooks on the layerN children that mark where each one starts and ends.
    """
    meta_net = copy.deepcopy(net).to("meta").eval()
    x = torch.empty(*shape, device="meta")
    tracker = LivenessTracker()
    tracker.add_input(x)
    marks: list[tuple[str, int]] = []
    for name, child in meta_net.named_children():
        if name.startswith("layer"):
            child.register_forward_pre_hook(lambda *_, n=name: marks.append((n, len(tracker.ops))))
            child.register_forward_hook(lambda *_: marks.append(("head", len(tracker.ops))))
    with torch.inference_mode(), tracker:
        meta_net(x)
    live = tracker.live_bytes()
    at = max(range(len(live)), key=live.__getitem__)
    bounds = [("stem", 0)] + [m for i, m in enumerate(marks)
                              if m[0] != "head" or i == len(marks) - 1] + [("", len(live))]
    parts = {name: max(live[lo:hi], default=0)
             for (name, lo), (_, hi) in zip(bounds, bounds[1:], strict=False) if hi > lo}
    return {"peak_activation_bytes": live[at], "peak_at_op": f"{at}:{tracker.ops[at]}",
            "feature_bytes_written": tracker.written, "ops": len(tracker.ops),
            "part_peak_bytes": parts if marks else {}}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(net: nn.Module, x: torch.Tensor, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    net(x)
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def _measured_peak(net: nn.Module, x: torch.Tensor, device: torch.device) -> int:
    """CUDA: peak bytes allocated during one forward beyond the weights."""
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    net(x)
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - before + x.numel() * x.element_size()


def _summary(times: list[float]) -> dict[str, Any]:
    ordered = sorted(times)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return {"median_ms": statistics.median(ordered), "p90_ms": p90,
            "min_ms": ordered[0], "runs": len(ordered)}


def bench_config(depth: int, size: int, batch: int, args: argparse.Namespace,
                 device: torch.device) -> dict[str, Any]:
    """Time and account one (depth, image size, batch) for the ResNet and its Plain-CNN."""
    stem, classes = ("cifar", 10) if size <= 64 else ("imagenet", 1000)
    nets, row = {}, {"depth": depth, "image_size": size, "stem": stem, "num_classes": classes,
                     "batch_size": batch, "width": args.width}
    shape = (batch, 3, size, size)
    fmt = torch.channels_last if args.channels_last and device.type == "cuda" else None
    for kind, shortcut in (("resnet", "all"), ("plain", "none")):
        torch.manual_seed(0)
        net = fold_batchnorm(resnet(depth, shortcut=shortcut, stem=stem, num_classes=classes,
                                    width=args.width)).eval()
        row[kind] = {"params": sum(p.numel() for p in net.parameters()),
                     **activation_memory(net, shape)}
        nets[kind] = net.to(device, memory_format=fmt) if fmt else net.to(device)
    x = torch.randn(shape, device=device)
    if fmt:
        x = x.contiguous(memory_format=fmt)
    times: dict[str, list[float]] = {"resnet": [], "plain": []}
    with torch.inference_mode():
        for _ in range(args.warmup):
            for net in nets.values():
                _timed(net, x, device)
        # Alternate the two nets; stop early once the time budget is spent (at least 3 runs).
        start = time.perf_counter()
        for i in range(args.runs):
            for kind, net in nets.items():
                times[kind].append(_timed(net, x, device))
            if i + 1 >= 3 and time.perf_counter() - start > args.budget_s:
                break
        if device.type == "cuda":
            for kind, net in nets.items():
                row[kind]["measured_peak_activation_bytes"] = _measured_peak(net, x, device)
    for kind in nets:
        row[kind].update(_summary(times[kind]))
    row["speedup"] = row["resnet"]["median_ms"] / row["plain"]["median_ms"]
    row["speedup_min"] = row["resnet"]["min_ms"] / row["plain"]["min_ms"]
    row["memory_ratio"] = (row["resnet"]["peak_activation_bytes"]
                           / row["plain"]["peak_activation_bytes"])
    # Without the stem, whose 112 px map is the whole net's peak at 224 px.
    body = [{k: v for k, v in row[kind]["part_peak_bytes"].items() if k.startswith("layer")}
            for kind in ("resnet", "plain")]
    row["stages_memory_ratio"] = max(body[0].values()) / max(body[1].values())
    if device.type == "cuda":
        row["measured_memory_ratio"] = (row["resnet"]["measured_peak_activation_bytes"]
                                        / row["plain"]["measured_peak_activation_bytes"])
    return row


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of every configuration."""
    head = (f"{'net':>4} {'px':>4} {'batch':>5} | {'resnet ms':>10} {'plain ms':>9} "
            f"{'speedup':>7} {'(min)':>6} | {'resnet MiB':>10} {'plain MiB':>9} "
            f"{'mem ratio':>9} {'stages':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        rs, pl = r["resnet"], r["plain"]
        lines.append(
            f"{r['depth']:>4} {r['image_size']:>4} {r['batch_size']:>5} | "
            f"{rs['median_ms']:>10.2f} {pl['median_ms']:>9.2f} {r['speedup']:>6.2f}x "
            f"{r['speedup_min']:>5.2f}x | {rs['peak_activation_bytes'] / 2**20:>10.2f} "
            f"{pl['peak_activation_bytes'] / 2**20:>9.2f} {r['memory_ratio']:>8.2f}x "
            f"{r['stages_memory_ratio']:>5.2f}x")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tuning.inference", description=__doc__)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--depths", type=int, nargs="+", default=[18, 34], choices=[18, 34])
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 224],
                   help="image sides; <= 64 px uses the CIFAR stem, larger the ImageNet stem")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--runs", type=int, default=50, help="timed forwards per net (at most)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=20.0,
                   help="stop timing a configuration after this many seconds (>= 3 runs)")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--channels-last", action="store_true", help="channels_last on CUDA")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default bench/results/inference-<cpu|cuda>[-quick].json)")
    p.add_argument("--quick", action="store_true", help="a tiny run for tests: seconds")
    args = p.parse_args(argv)
    if args.quick:
        args.depths, args.sizes, args.batch_sizes = [18], [32], [1, 2]
        args.runs, args.warmup, args.width = 3, 1, 8
    if min(args.sizes + args.batch_sizes) < 1 or args.runs < 1 or args.warmup < 0:
        p.error("sizes, batch sizes and runs must be positive, warmup non-negative")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON; 2 on a user error."""
    args = parse_args(argv)
    from tuning.trainer import resolve_device  # here: the trainer imports the data stack

    try:
        device = resolve_device(args.device)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # pick the fastest conv kernels, as deployed
    else:
        torch.set_num_threads(args.threads or max(1, len(os.sched_getaffinity(0))))
    rows, load_before = [], os.getloadavg()[0]  # a busy shared CPU makes timings noisy
    for depth in args.depths:
        for size in args.sizes:
            for batch in args.batch_sizes:
                rows.append(bench_config(depth, size, batch, args, device))
                r = rows[-1]
                print(f"depth {depth} {size}px batch {batch}: speedup {r['speedup']:.2f}x, "
                      f"memory {r['memory_ratio']:.2f}x", file=sys.stderr)
    report = {
        "format": "plainkd-inference/1",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": {"type": device.type, "name": describe_device(device),
                   "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()},
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "torch": torch.__version__, "python": platform.python_version(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "method": METHOD, "results": rows,
    }
    out = args.out or RESULTS_DIR / f"inference-{device.type}{'-quick' if args.quick else ''}.json"
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    print(format_table(rows))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
