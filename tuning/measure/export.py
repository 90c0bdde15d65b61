"""Export a trained network as BN-folded TorchScript and ONNX, checked against the trained one.

    python -m tuning.export RUN_OR_MODEL [--out DIR] [--formats torchscript onnx]

BatchNorm, Dirac convs and RepVGG branches are folded first, so the exported network is
plain convs (with biases), ReLUs, pooling and the fc layer.

Exit codes: 0 exported, 1 an export's outputs differ from the trained network's, 2 bad input.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import re
import shutil
import sys
import tempfile
import urllib.parse
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models import DiracConv2d, RepConv, fold_batchnorm
from tuning.run.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    atomic_write_text,
    check_output_dir,
)
from tuning.run.config import UserError
from tuning.run.console import Parser, refuse
from tuning.run.trainer import MODEL_NAME, load_model

FORMATS = {"torchscript": "model.ts", "onnx": "model.onnx"}
EXPORT_JSON = "export.json"
RTOL = 1e-4  # max |exported - trained| must stay within RTOL * max |trained|
SOURCE_FIX = ("pass a model.pt written by `python -m tuning.train`, or the run directory "
              "that holds it")
ONNX_MISSING = "pip install onnx onnxscript"


def _path_source(arg: str) -> Path | None:
    """A model file, or a run directory holding model.pt; None if `arg` is no path."""
    path = Path(arg).expanduser()
    if path.is_dir():
        if not (path / MODEL_NAME).is_file():
            raise CheckpointError(f"run directory {path} has no {MODEL_NAME} (has the run "
                                  f"finished?); {SOURCE_FIX}")
        return path / MODEL_NAME
    return path if path.exists() else None


def _local_store(uri: str) -> Path | None:
    """The file or folder of a local tracking store (sqlite:/// or file:), else None."""
    if uri.startswith("sqlite:///"):
        # sqlite:///rel.db is relative to the working folder, sqlite:////abs.db absolute.
        return Path(uri.removeprefix("sqlite:///"))
    if uri.startswith("file:"):
        return Path(urllib.parse.urlparse(uri).path)
    if "://" not in uri:
        return Path(uri)
    return None


def _mlflow_source(arg: str) -> Path | None:
    """An MLflow run id (or runs:/<id>): its model.pt artifact, fetched into exports/<id>/.

    The tracking store is $MLFLOW_TRACKING_URI, else the local sqlite:///mlflow.db. Nothing
    is created (no tracking store, no exports/ folder) unless the run and its model.pt exist.
    """
    run_id = arg.removeprefix("runs:/").strip("/")
    if not re.fullmatch(r"[0-9a-f]{32}", run_id):
        return None
    from tuning.search.tracking import check_reachable, client, default_tracking_uri

    uri = default_tracking_uri()
    store = _local_store(uri)
    fix = "pick a finished trial's run, or set MLFLOW_TRACKING_URI to the store that holds it"
    if store is not None:
        # Opening a missing local store would create an empty one (mlflow.db, mlruns/).
        if not store.exists():
            raise CheckpointError(f"{arg} is no file or run directory, and there is no MLflow "
                                  f"tracking store at {uri} ({store} does not exist) to look "
                                  f"the run up in; {SOURCE_FIX}, or set MLFLOW_TRACKING_URI")
    else:
        check_reachable(uri)
    c = client(uri)
    try:
        c.get_run(run_id)
    except Exception as err:  # noqa: BLE001 - any MLflow failure is "no such run"
        raise CheckpointError(f"there is no MLflow run {run_id} in {uri} "
                              f"({' '.join(str(err).split())[:120]}); {fix}") from None
    try:
        artifacts = {a.path for a in c.list_artifacts(run_id)}
    except Exception as err:  # noqa: BLE001
        artifacts, reason = set(), f" ({' '.join(str(err).split())[:120]})"
    else:
        reason = ""
    if MODEL_NAME not in artifacts:
        raise CheckpointError(f"MLflow run {run_id} in {uri} has no {MODEL_NAME} artifact"
                              f"{reason}; {fix}")
    dest = Path("exports") / run_id
    check_output_dir(dest, what="download folder", fix="run the export from a writable folder")
    with tempfile.TemporaryDirectory(prefix=".export-") as tmp:
        try:
            local = Path(c.download_artifacts(run_id, MODEL_NAME, tmp))
        except Exception as err:  # noqa: BLE001 - any MLflow failure is "no such model"
            raise CheckpointError(f"MLflow run {run_id} in {uri}: its {MODEL_NAME} could not be "
                                  f"downloaded ({' '.join(str(err).split())[:120]}); {fix}") \
                from None
        dest.mkdir(parents=True, exist_ok=True)
        target = dest / MODEL_NAME
        shutil.move(str(local), target)
    return target


# Tried in order; the first that returns a path wins.
RESOLVERS: list[Callable[[str], Path | None]] = [_path_source, _mlflow_source]


def resolve_source(arg: str) -> Path:
    """The local model.pt that `arg` (a model file or a run directory) names."""
    for resolver in RESOLVERS:
        path = resolver(arg)
        if path is not None:
            return path.resolve()
    raise CheckpointError(f"{arg} does not exist; {SOURCE_FIX}")


def load_source(path: Path) -> tuple[nn.Module, dict]:
    """load_model, with a malformed metadata dict also reported as a CheckpointError."""
    try:
        net, meta = load_model(path)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"model file {path} has unusable metadata ({err!r}); "
                              f"{SOURCE_FIX}") from None
    return net.eval(), meta


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    """Max abs diff, and that diff relative to the reference's largest magnitude."""
    diff = (out.float() - ref.float()).abs().max().item()
    scale = max(ref.abs().max().item(), 1e-12)
    return {"max_abs_diff": diff, "max_rel_diff": diff / scale, "rtol": RTOL,
            "ok": math.isfinite(diff) and diff <= RTOL * scale}


def count_layers(net: nn.Module) -> dict[str, int]:
    """How many BatchNorms, Dirac convs, RepVGG convs (each of 2-3 branches) and convs the
    network has."""
    mods = list(net.modules())
    return {"batchnorm": sum(isinstance(m, nn.BatchNorm2d) for m in mods),
            "dirac": sum(isinstance(m, DiracConv2d) for m in mods),
            "repconv": sum(isinstance(m, RepConv) for m in mods),
            "conv": sum(isinstance(m, nn.Conv2d) for m in mods)}


def to_torchscript(net: nn.Module, x: torch.Tensor) -> tuple[bytes, Any]:
    """Traced TorchScript as bytes, and the module loaded back from those bytes."""
    with warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.export, but still the format that
        # loads anywhere with just libtorch; the warnings would only be noise here.
        warnings.simplefilter("ignore", FutureWarning)
        # check_trace re-traces to compare; export() checks outputs on another batch anyway.
        traced = torch.jit.trace(net, x, check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
        data = buf.getvalue()
        return data, torch.jit.load(io.BytesIO(data))


def to_onnx(net: nn.Module, x: torch.Tensor) -> bytes:
    """ONNX (torch.export-based exporter) with a dynamic batch axis; ImportError if missing."""
    program = torch.onnx.export(
        net, (x,), dynamo=True, verbose=False, input_names=["images"],
        output_names=["logits"], dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    return program.model_proto.SerializeToString()


def run_onnx(data: bytes, x: torch.Tensor) -> torch.Tensor | None:
    """The ONNX model's output under onnxruntime, or None if onnxruntime is not installed."""
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def _finite(value: Any) -> Any:
    """JSON-safe metrics: NaN and infinities become null."""
    return value if not isinstance(value, float) or math.isfinite(value) else None


def check_check_size(batch_size: int, size: int, arch: dict[str, Any]) -> None:
    """UserError when the output check's batch cannot fit in memory, before it is made. Its
    peak is about three feature maps of the first stage per image, for each of the networks
    it runs (the trained one, the folded one, and a runtime's), plus the input."""
    from data.files import available_memory

    side = size if arch.get("stem", "cifar") == "cifar" else max(1, size // 2)
    per_image = 4 * (3 * size * size + 3 * 3 * arch.get("width", 64) * side * side)
    need = (2 * batch_size + 1) * per_image
    have = available_memory()
    if have is not None and need > have:
        fits = max(1, int(have // (2 * per_image)) - 1)
        raise UserError(f"--batch-size {batch_size} at {size} px needs about "
                        f"{need / 2**30:,.1f} GB for the output check, more than the "
                        f"{have / 2**30:.1f} GB this machine has free; pass --batch-size "
                        f"{min(fits, 1024)} or less")


def export(arg: str, out: Path | None, formats: list[str], batch_size: int,
           image_size: int | None) -> int:
    """Export, check and write; returns the exit code. Raises UserError on bad input."""
    out_fix = "pass --out a folder that can be created and written"
    if out is not None:  # before anything is read, fetched or written
        check_output_dir(out, what="export folder (--out)", fix=out_fix)
    source = resolve_source(arg)
    net, meta = load_source(source)
    out_dir = Path(out) if out is not None else source.parent / "export"
    check_output_dir(out_dir, what="export folder", fix=out_fix)
    arch = dict(meta["arch"])
    size = image_size or (32 if arch["stem"] == "cifar" else 224)
    check_check_size(batch_size, size, arch)
    before = count_layers(net)
    folded = fold_batchnorm(net).eval()
    after = count_layers(folded)
    # fold_batchnorm folds the RepVGG branches and the Dirac convs too: none may be left.
    if after["batchnorm"] or after["dirac"] or after["repconv"]:
        raise RuntimeError(f"folding left {after} in the network")
    torch.manual_seed(0)
    x = torch.randn(batch_size, 3, size, size)
    x_more = torch.randn(batch_size + 1, 3, size, size)  # checks the batch axis is dynamic
    with torch.no_grad():
        ref, ref_more = net(x), net(x_more)
        checks: dict[str, Any] = {"folded_eager": compare(folded(x), ref)}
        files: dict[str, bytes] = {}
        if "torchscript" in formats:
            files["torchscript"], loaded = to_torchscript(folded, x)
            checks["torchscript"] = compare(loaded(x_more), ref_more)
        if "onnx" in formats:
            try:
                files["onnx"] = to_onnx(folded, x)
            except ImportError as err:
                checks["onnx"] = {"skipped": f"exporter dependency missing ({err}); "
                                             f"{ONNX_MISSING}"}
                print(f"ONNX skipped: the exporter needs the onnx and onnxscript packages "
                      f"({ONNX_MISSING}); writing the other formats", file=sys.stderr)
            else:
                got = run_onnx(files["onnx"], x_more)
                checks["onnx"] = (compare(got, ref_more) if got is not None else
                                  {"skipped": "onnxruntime not installed; pip install "
                                              "onnxruntime to check the ONNX model"})
    failed = [k for k, c in checks.items() if c.get("ok") is False]
    for name, c in checks.items():
        figures = (f"max abs diff {c['max_abs_diff']:.2e}, rel {c['max_rel_diff']:.2e}"
                   if "ok" in c else c["skipped"])
        print(f"{name}: {figures}{' FAILED' if name in failed else ''}", file=sys.stderr)
    if failed:
        print(f"error: {', '.join(failed)} output differs from the trained network beyond "
              f"rtol {RTOL}; nothing was written", file=sys.stderr)
        return 1
    for name, data in files.items():
        atomic_write_bytes(out_dir / FORMATS[name], lambda f, d=data: f.write(d))
    report = {
        "format": "plainkd-export/1",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": str(source), "source_arg": arg, "arch": arch,
        "dataset": meta.get("dataset"), "classes": meta.get("classes"),
        "metrics": {k: _finite(v) for k, v in (meta.get("metrics") or {}).items()
                    if k in ("test_acc", "best_val_acc", "last_val_acc", "epoch")},
        "input": {"name": "images", "shape": ["batch", 3, size, size], "dtype": "float32",
                  "note": "normalized with the training set's per-channel mean and std, "
                          "as the trainer's loaders feed it"},
        "output": {"name": "logits", "shape": ["batch", arch["num_classes"]]},
        "files": {name: FORMATS[name] for name in files},
        "layers_before": before, "layers_after": after,
        "folded": {"batchnorm": before["batchnorm"], "dirac": before["dirac"],
                   "repconv": before["repconv"]},
        "check": {"batch_sizes": [batch_size, batch_size + 1], "seed": 0, **checks},
        "torch": torch.__version__,
    }
    atomic_write_text(out_dir / EXPORT_JSON, json.dumps(report, indent=2) + "\n")
    print(f"wrote {', '.join(sorted(FORMATS[n] for n in files) + [EXPORT_JSON])} to {out_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit code."""
    p = Parser(prog="tuning.export", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a model.pt, the run directory that holds it, or an MLflow "
                                  "run id (a finished trial's run)")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default: <run dir>/export/)")
    p.add_argument("--formats", nargs="+", choices=sorted(FORMATS),
                   default=["torchscript", "onnx"])
    p.add_argument("--batch-size", type=int, default=1, help="batch of the output check")
    p.add_argument("--image-size", type=int, default=None,
                   help="check input side (default: 32 for the CIFAR stem, 224 for ImageNet)")
    args = p.parse_args(argv)
    if args.batch_size < 1 or (args.image_size is not None and args.image_size < 1):
        p.error("--batch-size and --image-size must be positive")
    try:
        return export(args.source, args.out, args.formats, args.batch_size, args.image_size)
    except UserError as err:
        return refuse(err)


if __name__ == "__main__":
    sys.exit(main())
