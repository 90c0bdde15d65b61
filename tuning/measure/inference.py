"""Inference latency and activation memory of the exported ResNet against its Plain-CNNs.

`python -m tuning.bench --inference` (or `python -m tuning.bench --inference`) builds, for ResNet-18
and ResNet-34, four deployable networks, every one BN-folded: the ResNet, its Plain-CNN, the
Dirac Plain-CNN (Dirac folded too) and the RepVGG Plain-CNN (branches folded into one 3x3
conv). Each runs under ONNX Runtime, TorchScript (traced and frozen) and eager PyTorch at
batch 1 and 64 on a 32 px CIFAR stem (`--sizes 32 224` adds the 224 px ImageNet stem), with
the thread count pinned. It writes one JSON file, prints a markdown table, and with
`--markdown PATH` writes that table to a file as well.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import io
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from models import DiracConv2d, RepConv, fold_batchnorm, resnet
from tuning.run.checkpoint import atomic_write_text, check_output_file
from tuning.run.config import UserError
from tuning.run.console import Parser, refuse
from tuning.run.trainer import describe_device

RESULTS_DIR = Path(__file__).resolve().parents[1] / "bench" / "results"
NETWORKS = ("resnet", "plain", "plain-dirac", "plain-repvgg")
LABELS = {"resnet": "ResNet-{}", "plain": "Plain-{}", "plain-dirac": "Plain-{} Dirac",
          "plain-repvgg": "Plain-{} RepVGG"}
RUNTIMES = ("onnxruntime", "torchscript", "eager")
RUNTIME_TITLES = {"onnxruntime": "ONNX Runtime", "torchscript": "TorchScript",
                  "eager": "eager"}
# An exported network's output may differ from eager PyTorch's by rounding only: max |diff|
# within RTOL * max |eager|. CUDA convs use TF32 by default, which keeps 10 mantissa bits.
RTOL = {"cpu": 1e-4, "cuda": 5e-3}
ORT_MISSING = "pip install onnx onnxscript onnxruntime"
METHOD = {
    "networks": "resnet: shortcut='all' (projection shortcuts where the shape changes); "
                "plain: shortcut='none'; plain-dirac: shortcut='none' with Dirac convs "
                "(a*delta + b*W); plain-repvgg: shortcut='none' with RepVGG blocks (3x3, 1x1 "
                "and identity branches, each with its BN). Before folding, every BatchNorm "
                "gets random running statistics and affine terms and every Dirac conv random "
                "a, b, so that folding has something to fold; then fold_batchnorm, which folds "
                "the Dirac convs and the RepVGG branches (fold_repvgg) as well. fold_check: "
                "the folded network's output against the unfolded one's, eval mode",
    "runtimes": "onnxruntime: torch.onnx.export (the torch.export-based exporter, a dynamic "
                "batch axis, as tuning.export writes it), one InferenceSession per network "
                "with all graph optimizations, intra_op_num_threads = threads, "
                "inter_op_num_threads = 1, sequential execution; numpy in and out. "
                "torchscript: torch.jit.trace at the configuration's batch, then "
                "torch.jit.freeze. eager: the folded nn.Module. Torch paths run under "
                "torch.inference_mode with torch.set_num_threads(threads)",
    "latency": "wall time of one forward (CUDA synchronized before and after each). Within "
               "one runtime and configuration, every network gets `warmup` untimed forwards, "
               "then `runs` rounds each time every network once, the order rotating by one "
               "every round, so that background load hits all networks alike. median_ms, "
               "p25_ms, p75_ms (iqr_ms = p75 - p25), p90_ms and min_ms over those forwards",
    "ratio": "the ResNet's median_ms / this network's median_ms, same runtime, configuration "
             "and run (above 1: faster than the ResNet); ratio_p25 / ratio_p75: quartiles of "
             "the per-round ratios (each round times both networks back to back)",
    "check": "this runtime's output on the timed input against eager PyTorch's output of the "
             "same folded network: max_abs_diff, max_rel_diff = max_abs_diff / max |eager|, "
             "ok when max_rel_diff <= rtol",
    "peak_activation_bytes": "liveness analysis of the forward's aten ops (a TorchDispatchMode "
               "hook, run on the meta device): a buffer lives from the op that writes it to "
               "the last op that reads it or any view or in-place alias of it, as a memory "
               "planner that frees dead values (TorchScript, ONNX Runtime) would keep it. The "
               "peak is the largest sum of live buffers at any op, its inputs and outputs both "
               "counted; the network input counts, weights do not. A shortcut keeps the block "
               "input alive until the addition; the Plain-CNN frees it after the first conv",
    "feature_bytes_written": "sum of the bytes every op writes (new buffers and in-place "
               "updates; views write nothing)",
    "part_peak_bytes": "the same peak within the stem (ops before layer1), each layerN, and "
               "the head; at 224 px the stem's 112 px map is the whole network's peak",
    "memory_ratio": "the ResNet's peak_activation_bytes / this network's",
    "params": "parameters of the deployed (folded) network; train_params: before folding "
              "(BatchNorms, Dirac scales, RepVGG branches)",
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


def _timed(run: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    run()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def _measured_peak(net: nn.Module, x: torch.Tensor, device: torch.device) -> int:
    """CUDA: peak bytes allocated during one eager forward beyond the weights."""
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    net(x)
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - before + x.numel() * x.element_size()


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """p25, median, p75 (linear interpolation between order statistics)."""
    p25, median, p75 = statistics.quantiles(values, n=4, method="inclusive")
    return p25, median, p75


def _summary(times: Sequence[float]) -> dict[str, Any]:
    p25, median, p75 = _quartiles(times)
    return {"median_ms": median, "p25_ms": p25, "p75_ms": p75, "iqr_ms": p75 - p25,
            "p90_ms": statistics.quantiles(times, n=10, method="inclusive")[8],
            "min_ms": min(times), "runs": len(times)}


# --- the networks ---------------------------------------------------------------------------

def build_network(name: str, depth: int, stem: str, num_classes: int, width: int) -> nn.Module:
    """One of NETWORKS as trained, before any folding."""
    if name not in NETWORKS:
        raise ValueError(f"network must be one of {NETWORKS}, got {name!r}")
    shortcut = "all" if name == "resnet" else "none"
    block = "plain" if name == "resnet" else name.removeprefix("plain-")
    return resnet(depth, shortcut=shortcut, block=block, stem=stem, num_classes=num_classes,
                  width=width)


def randomize_statistics(net: nn.Module, seed: int) -> nn.Module:
    """Random BN running statistics and affine terms, random Dirac scales; eval mode.

    A fresh network's BatchNorms are identities and its Dirac scales constants, which
    would let a wrong fold go unnoticed.
    """
    gen = torch.Generator().manual_seed(seed)

    def uniform(like: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        return torch.empty(like.shape).uniform_(lo, hi, generator=gen).to(like)

    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(uniform(m.running_mean, -0.2, 0.2))
                m.running_var.copy_(uniform(m.running_var, 0.5, 1.5))
                m.weight.copy_(uniform(m.weight, 0.5, 1.5))
                m.bias.copy_(uniform(m.bias, -0.2, 0.2))
            elif isinstance(m, DiracConv2d):
                m.dirac_a.copy_(uniform(m.dirac_a, 0.8, 1.2))
                m.dirac_b.copy_(uniform(m.dirac_b, 0.05, 0.2))
    return net.eval()


def unfolded_layers(net: nn.Module) -> int:
    """BatchNorms, Dirac convs and RepVGG convs left in a network (0 once deployed)."""
    return sum(isinstance(m, (nn.BatchNorm2d, DiracConv2d, RepConv)) for m in net.modules())


def _params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# --- the runtimes ---------------------------------------------------------------------------

def onnxruntime_setup(device: torch.device, threads: int) -> dict[str, Any]:
    """What ONNX Runtime will run with, or {"skipped": why}."""
    try:
        import onnxruntime as ort
    except ImportError:
        return {"skipped": f"onnxruntime is not installed; {ORT_MISSING}"}
    provider = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
    available = ort.get_available_providers()
    if provider not in available:
        return {"skipped": f"onnxruntime {ort.__version__} has no {provider} (it has "
                           f"{', '.join(available)}); on CUDA it needs the onnxruntime-gpu "
                           "package"}
    setup = {"version": ort.__version__, "provider": provider,
             "session_options": {"intra_op_num_threads": threads, "inter_op_num_threads": 1,
                                 "execution_mode": "ORT_SEQUENTIAL",
                                 "graph_optimization_level": "ORT_ENABLE_ALL"}}
    if device.type == "cuda":
        setup["note"] = ("numpy input and output: every timed run includes the copies "
                         "between host and GPU")
    return setup


def to_onnx(net: nn.Module, size: int) -> bytes:
    """The network as ONNX with a dynamic batch axis (exported on the CPU)."""
    x = torch.randn(2, 3, size, size)  # batch 2: a batch of 1 would be specialized away
    # The exporter reports its steps on stdout, which carries the table.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            net.cpu().eval(), (x,), dynamo=True, verbose=False, input_names=["images"],
            output_names=["logits"], dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    return program.model_proto.SerializeToString()


def onnx_session(data: bytes, setup: dict[str, Any]) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = setup["session_options"]["intra_op_num_threads"]
    opts.inter_op_num_threads = setup["session_options"]["inter_op_num_threads"]
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(data, sess_options=opts, providers=[setup["provider"]])


def to_torchscript(net: nn.Module, x: torch.Tensor) -> torch.jit.ScriptModule:
    """Traced at x's shape, then frozen (weights inlined as constants, graph optimized)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices
        return torch.jit.freeze(torch.jit.trace(net.eval(), x, check_trace=False).eval())


def _compare(out: Any, ref: torch.Tensor, rtol: float) -> dict[str, Any]:
    out, ref = torch.as_tensor(out).float().cpu(), ref.float().cpu()
    diff = (out - ref).abs().max().item() if out.shape == ref.shape else math.inf
    scale = max(ref.abs().max().item(), 1e-12)
    return {"max_abs_diff": diff if math.isfinite(diff) else None,
            "max_rel_diff": diff / scale if math.isfinite(diff) else None, "rtol": rtol,
            "ok": math.isfinite(diff) and diff <= rtol * scale}


# --- the benchmark --------------------------------------------------------------------------

def _time_networks(runners: dict[str, Callable[[], Any]], args: argparse.Namespace,
                   device: torch.device) -> dict[str, list[float]]:
    """Warm up, then `runs` rounds timing every network once, the order rotating."""
    names = list(runners)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.warmup):
        for n in names:
            runners[n]()
    start = time.perf_counter()
    for i in range(args.runs):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            times[n].append(_timed(runners[n], device))
        if args.budget_s is not None and i + 1 >= 3 and time.perf_counter() - start > args.budget_s:
            break
    return times


def _runner(runtime: str, prepared: Any, x: torch.Tensor) -> Callable[[], Any]:
    if runtime == "onnxruntime":
        feed = {"images": x.detach().cpu().contiguous().numpy()}
        return lambda: prepared.run(None, feed)[0]
    return lambda: prepared(x)


def bench_size(depth: int, size: int, args: argparse.Namespace, device: torch.device,
               ort_setup: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """Every network x runtime x batch at one depth and image size: (rows, networks)."""
    stem, classes = ("cifar", 10) if size <= 64 else ("imagenet", 1000)
    rtol = RTOL[device.type]
    base = {"depth": depth, "image_size": size, "stem": stem, "num_classes": classes,
            "width": args.width}
    folded, networks, onnx = {}, [], {}
    x_check = torch.randn(2, 3, size, size)
    for i, name in enumerate(NETWORKS):
        torch.manual_seed(i)
        trained = randomize_statistics(build_network(name, depth, stem, classes, args.width), i)
        net = fold_batchnorm(trained)  # folds Dirac convs and RepVGG branches too
        with torch.no_grad():
            fold_check = _compare(net(x_check), trained(x_check), RTOL["cpu"])
        networks.append({**base, "network": name, "label": LABELS[name].format(depth),
                         "params": _params(net), "train_params": _params(trained),
                         "unfolded_layers": unfolded_layers(net), "fold_check": fold_check})
        if "onnxruntime" in args.runtimes and "skipped" not in ort_setup:
            try:
                onnx[name] = to_onnx(net, size)
            except Exception as err:  # recorded in the rows: one failure keeps the rest
                onnx[name] = err
        fmt = torch.channels_last if args.channels_last and device.type == "cuda" else None
        folded[name] = net.to(device, memory_format=fmt) if fmt else net.to(device)
    info = {n["network"]: n for n in networks}
    rows = []
    for batch in args.batch_sizes:
        shape = (batch, 3, size, size)
        x = torch.randn(shape, device=device)
        if args.channels_last and device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        memory = {name: activation_memory(net, shape) for name, net in folded.items()}
        with torch.inference_mode():
            refs = {name: net(x) for name, net in folded.items()}
            if device.type == "cuda":
                for name, net in folded.items():
                    memory[name]["measured_peak_activation_bytes"] = _measured_peak(net, x,
                                                                                   device)
        for name in NETWORKS:
            info[name].setdefault("memory", []).append({"batch_size": batch, **memory[name]})
        for runtime in args.runtimes:
            if runtime == "onnxruntime" and "skipped" in ort_setup:
                continue
            runners, checks, errors = {}, {}, {}
            with torch.inference_mode():
                for name, net in folded.items():
                    try:
                        if runtime == "onnxruntime":
                            if isinstance(onnx[name], Exception):
                                raise onnx[name]
                            prepared = onnx_session(onnx[name], ort_setup)
                        elif runtime == "torchscript":
                            prepared = to_torchscript(net, x)
                        else:
                            prepared = net
                        runners[name] = _runner(runtime, prepared, x)
                        checks[name] = _compare(runners[name](), refs[name], rtol)
                    except Exception as err:  # one failure keeps the rest of the report
                        errors[name] = f"{type(err).__name__}: {str(err)[:500]}"
                        runners.pop(name, None)
                times = _time_networks(runners, args, device)
            ref_times = times.get("resnet")
            for name in NETWORKS:
                row = {**base, "batch_size": batch, "network": name,
                       "label": LABELS[name].format(depth), "runtime": runtime,
                       "params": info[name]["params"],
                       "peak_activation_bytes": memory[name]["peak_activation_bytes"],
                       "memory_ratio": (memory["resnet"]["peak_activation_bytes"]
                                        / memory[name]["peak_activation_bytes"])}
                if name in errors:
                    rows.append({**row, "error": errors[name], "median_ms": None})
                    continue
                row.update(_summary(times[name]), check=checks[name])
                if ref_times:
                    per_round = [r / t for r, t in zip(ref_times, times[name], strict=True)]
                    p25, _, p75 = _quartiles(per_round)
                    row.update(ratio=statistics.median(ref_times) / row["median_ms"],
                               ratio_p25=p25, ratio_p75=p75)
                else:
                    row.update(ratio=None, ratio_p25=None, ratio_p75=None)
                rows.append(row)
            done = {r["network"]: r for r in rows[-len(NETWORKS):]}
            print(f"ResNet-{depth} {size}px batch {batch} {runtime}: " + ", ".join(
                f"{n} {r['median_ms']:.2f} ms" if r["median_ms"] is not None else f"{n} failed"
                for n, r in done.items()), file=sys.stderr)
    return rows, networks


def _ms(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def format_markdown(report: dict[str, Any]) -> str:
    """The results as one markdown table: a row per network and batch, a column per runtime."""
    rows = report["results"]
    runtimes = [rt for rt in RUNTIMES if any(r["runtime"] == rt for r in rows)]
    dev, settings = report["device"], report["settings"]
    caption = (f"{dev['name']}, threads: {dev['threads']}, width {settings['width']}; "
               f"median (p25-p75) ms of {settings['runs']} runs and the ResNet's median / "
               f"this network's (same runtime, same run); peak activation memory by liveness "
               f"analysis, and the ResNet's / this network's")
    skipped = [f"{RUNTIME_TITLES[rt]} skipped: {v['skipped']}"
               for rt, v in report["runtimes"].items()
               if "skipped" in v and rt in settings["runtimes"]]
    head = ["network", "px", "batch", "params (M)", "peak act. (MiB)",
            *(RUNTIME_TITLES[rt] for rt in runtimes)]
    lines = [caption + "".join(f"; {s}" for s in skipped), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cells: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        key = (r["depth"], r["image_size"], r["batch_size"], NETWORKS.index(r["network"]))
        cells.setdefault(key, {})[r["runtime"]] = r
    for key in sorted(cells):
        by_rt = cells[key]
        r = next(iter(by_rt.values()))
        line = [r["label"], str(r["image_size"]), str(r["batch_size"]),
                f"{r['params'] / 1e6:.3f}",
                f"{r['peak_activation_bytes'] / 2**20:.2f} ({r['memory_ratio']:.2f}x)"]
        for rt in runtimes:
            c = by_rt.get(rt)
            if c is None or c["median_ms"] is None:
                line.append("failed" if c else "-")
                continue
            ratio = "" if c["ratio"] is None else f" {c['ratio']:.2f}x"
            line.append(f"{_ms(c['median_ms'])} ({_ms(c['p25_ms'])}-{_ms(c['p75_ms'])})"
                        f"{ratio}")
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog="tuning.bench --inference", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--depths", type=int, nargs="+", default=[18, 34], choices=[18, 34])
    p.add_argument("--sizes", type=int, nargs="+", default=[32],
                   help="image sides; <= 64 px uses the CIFAR stem, larger the ImageNet stem "
                        "(224 adds the ImageNet rows, minutes more per batch-64 row on a CPU)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    p.add_argument("--runs", type=int, default=30, help="timed forwards per network, >= 3")
    p.add_argument("--warmup", type=int, default=5, help="untimed forwards per network first")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop timing a runtime's networks after this many seconds (at least 3 "
                        "rounds); default: no limit, every run is timed")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--channels-last", action="store_true", help="channels_last on CUDA")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for PyTorch and ONNX Runtime (default: the cores this "
                        "process may use)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default bench/results/inference-<cpu|cuda>[-quick].json)")
    p.add_argument("--markdown", type=Path, default=None,
                   help="also write the markdown table to this file")
    p.add_argument("--quick", action="store_true", help="a tiny run for tests: seconds")
    args = p.parse_args(argv)
    if args.quick:
        args.depths, args.sizes, args.batch_sizes = [18], [32], [1, 2]
        args.runs, args.warmup, args.width = 3, 1, 8
    if min(args.sizes + args.batch_sizes) < 1 or args.runs < 3 or args.warmup < 0 or \
            args.width < 1 or (args.budget_s is not None and not args.budget_s > 0):
        p.error("sizes, batch sizes and width must be positive, runs at least 3, warmup "
                "non-negative and --budget-s more than 0")
    if args.threads is None:
        args.threads = max(1, len(os.sched_getaffinity(0)))
    elif args.threads < 1:
        p.error("--threads must be positive")
    args.runtimes = [rt for rt in RUNTIMES if rt in args.runtimes]
    return args


def _pin_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)  # only possible before any inter-op work started
    except RuntimeError:
        pass


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON; 2 on a user error."""
    args = parse_args(argv)
    from tuning.run.trainer import resolve_device  # here: the trainer imports the data stack

    try:
        device = resolve_device(args.device)
        out = args.out or RESULTS_DIR / (f"inference-{device.type}"
                                         f"{'-quick' if args.quick else ''}.json")
        # Written last: a place they cannot go must fail before the benchmark, not after.
        check_output_file(out, what="results file (--out)",
                          fix="pass --out a .json path in a writable folder")
        if args.markdown is not None:
            check_output_file(args.markdown, what="markdown file (--markdown)",
                              fix="pass --markdown a file path in a writable folder")
    except UserError as err:
        return refuse(err)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # pick the fastest conv kernels, as deployed
    threads_before = torch.get_num_threads()
    _pin_threads(args.threads)
    try:
        ort_setup = (onnxruntime_setup(device, args.threads) if "onnxruntime" in args.runtimes
                     else {"skipped": "not asked for (--runtimes)"})
        if "skipped" in ort_setup:
            print(f"ONNX Runtime skipped: {ort_setup['skipped']}", file=sys.stderr)
        rows, networks, load_before = [], [], os.getloadavg()
        for depth in args.depths:
            for size in args.sizes:
                got_rows, got_networks = bench_size(depth, size, args, device, ort_setup)
                rows += got_rows
                networks += got_networks
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads_before)
    report = {
        "format": "plainkd-inference/2",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": {"type": device.type, "name": describe_device(device),
                   "processor": describe_device(torch.device("cpu")), "threads": threads,
                   "interop_threads": torch.get_num_interop_threads(),
                   "cpu_count": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0))},
        # A busy shared CPU makes timings noisy: 1, 5 and 15 min load averages.
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "torch": torch.__version__, "python": platform.python_version(),
        "runtimes": {
            "onnxruntime": ort_setup,
            "torchscript": ({"torch": torch.__version__, "threads": threads}
                            if "torchscript" in args.runtimes else {"skipped": "not asked for"}),
            "eager": ({"torch": torch.__version__, "threads": threads}
                      if "eager" in args.runtimes else {"skipped": "not asked for"}),
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "method": METHOD, "networks": networks, "results": rows,
    }
    table = format_markdown(report)
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    if args.markdown is not None:
        atomic_write_text(args.markdown, table)
    print(table, end="")
    print(f"wrote {out}" + (f" and {args.markdown}" if args.markdown else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
