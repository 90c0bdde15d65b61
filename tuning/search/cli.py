"""`python -m tuning.search --space alignkd`: the hyperparameter search on Ray Tune and Optuna."""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from data import DataError, load_arrays
from tuning.checkpoint import atomic_write_text
from tuning.config import ConfigError, RunConfig, UserError
from tuning.search.space import Space, load_space, parse_space
from tuning.search.tracking import check_reachable, default_tracking_uri

SMOKE = {"dataset": "digits", "depth": 18, "width": 8, "batch_size": 64}
SMOKE_SETTINGS = {"epochs": 4, "teacher_epochs": 4, "num_samples": 4, "max_concurrent": 2}
SETTINGS_FILE = "search.yaml"


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"error: {message}; see `python -m tuning.search --help`\n")


def build_parser() -> Parser:
    p = Parser(prog="tuning.search", description=__doc__)
    p.add_argument("--space", default=None,
                   help="a bundled space (alignkd, jointrd, compare, paper) or a YAML file")
    p.add_argument("--name", help="the search's name (default: <space>-<date>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the search named --name")
    p.add_argument("--smoke", action="store_true",
                   help="digits, thin networks, 4 epochs, 4 trials: the whole search in minutes")
    p.add_argument("--num-samples", type=int, help="trials (default 20; a grid's size)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="trials at once (default: as many as resources allow)")
    p.add_argument("--epochs", type=int, help="epochs per trial (default: the space's, or 200)")
    p.add_argument("--teacher-epochs", type=int, help="epochs per teacher (default: --epochs)")
    p.add_argument("--gpus-per-trial", type=float, default=None,
                   help="GPUs per trial, fractions allowed (default 1 if CUDA, else 0)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--storage-path", default="ray_results",
                   help="where Tune keeps the search: a local dir, shared fs or URI (s3://...)")
    p.add_argument("--address", help="join an existing Ray cluster (host:port or auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scheduler", choices=("asha", "fifo"), default="asha")
    p.add_argument("--objective", choices=("acc", "acc-time"), default="acc",
                   help="acc-time: the Pareto front of val accuracy against training time")
    p.add_argument("--data-root", default="datasets", help="where data sets are (or go)")
    p.add_argument("--teacher-store", default="teachers",
                   help="cache of trained teachers, keyed by recipe (shared fs on a cluster)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                        "sqlite:///mlflow.db here, artifacts in ./mlartifacts)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="fix a run-config value for every trial (removes it from the search)")
    return p


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set {pair!r} must look like KEY=VALUE, "
                              "e.g. --set dataset=cifar10")
        out[key.strip()] = yaml.safe_load(value)
    RunConfig.from_dict({k: v for k, v in out.items()}, source="--set")  # validate keys/values
    return out


def check_address(address: str | None) -> None:
    """Fail fast, in one line, when --address names nothing that answers."""
    if not address or address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except (OSError, ValueError):
        raise UserError(f"no Ray cluster answers at --address {address}; start one with "
                        "`ray start --head` or fix the address") from None


def storage_uri(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().resolve())


def local_search_dir(storage: str, name: str) -> Path:
    """Where the driver's own files (settings, table, best config) go, beside Tune's."""
    return Path(storage) / name if "://" not in storage else Path("searches").resolve() / name


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the search runs with; saved beside it so --resume runs the same search."""
    space_arg = args.space or "alignkd"
    space = load_space(space_arg)
    overrides = parse_overrides(args.set)
    settings = {k: getattr(args, k) for k in ("num_samples", "max_concurrent", "epochs",
                                               "teacher_epochs", "seed", "scheduler", "objective",
                                               "gpus_per_trial", "cpus_per_trial")}
    if args.smoke:
        overrides = {**SMOKE, **overrides}
        if space.grid and settings["num_samples"] is None:
            settings["num_samples"] = space.grid_size
        settings.update({k: v for k, v in SMOKE_SETTINGS.items() if settings[k] is None})
    overrides["data_root"] = str(Path(args.data_root).resolve())
    overrides["seed"] = args.seed
    if settings["epochs"] is not None:
        overrides["epochs"] = settings["epochs"]
    epochs = overrides.get("epochs", space.fixed.get("epochs", RunConfig.epochs))
    settings["epochs"] = epochs
    settings["teacher_epochs"] = settings["teacher_epochs"] or epochs
    if space.grid:
        # Each grid point once: more samples would make the grid sampler repeat points.
        settings["num_samples"] = min(settings["num_samples"] or space.grid_size, space.grid_size)
    if settings["num_samples"] is None:
        settings["num_samples"] = 20
    if settings["num_samples"] < 1:
        raise UserError(f"--num-samples must be at least 1; got {settings['num_samples']}")
    settings["max_concurrent"] = settings["max_concurrent"] or 0  # 0: no limit
    if settings["max_concurrent"] < 0:
        raise UserError("--max-concurrent must be 0 (no limit) or more")
    if settings["gpus_per_trial"] is None:
        import torch

        settings["gpus_per_trial"] = 1.0 if torch.cuda.is_available() else 0.0
    name = args.name or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    sampler = "grid" if space.grid else ("nsga2" if settings["objective"] == "acc-time" else "tpe")
    return {"name": name, "space_name": space.name, "space_source": space.source,
            "sampler": sampler, "tracking_uri": default_tracking_uri(args.tracking_uri),
            "space_text": space.text, "space_digest": space.digest, "overrides": overrides,
            "teacher_store": str(Path(args.teacher_store).resolve()),
            "storage_path": storage_uri(args.storage_path), **settings}


def settings_space(settings: dict[str, Any]) -> Space:
    space = parse_space(settings["space_text"], source=settings["space_source"],
                        name=settings["space_name"])
    return space.without(set(settings["overrides"]))


def check_data(space: Space, overrides: dict[str, Any]) -> None:
    """Every data set the space can ask for must be loadable before any trial starts."""
    datasets = space.values_of("dataset", overrides) or (RunConfig.dataset,)
    for name in datasets:
        kw = {"path": overrides["data_path"]} if overrides.get("data_path") else {}
        load_arrays(name, overrides["data_root"], download=overrides.get("download", False), **kw)


def check_teacher(space: Space, overrides: dict[str, Any]) -> None:
    """A teacher fixed for every trial must fit every data set the space can ask for."""
    path = overrides.get("teacher") or space.fixed.get("teacher")
    if not path:
        return
    from tuning.trainer import load_model

    _, meta = load_model(path)
    for name in space.values_of("dataset", overrides) or (RunConfig.dataset,):
        if meta.get("dataset") != name:
            raise UserError(f"teacher {path} was trained on {meta.get('dataset')} "
                            f"({meta['num_classes']} classes) but the search runs {name}; "
                            f"pass a teacher trained on {name}, or drop --set teacher")


def load_resume_settings(args: argparse.Namespace) -> dict[str, Any]:
    if not args.name:
        raise UserError("--resume needs --name: the search to continue (see ray_results/)")
    folder = local_search_dir(storage_uri(args.storage_path), args.name)
    path = folder / SETTINGS_FILE
    if not path.is_file():
        raise UserError(f"no search named {args.name!r} under {args.storage_path}; check --name "
                        "and --storage-path, or start it without --resume")
    settings = yaml.safe_load(path.read_text())
    if args.tracking_uri:
        settings["tracking_uri"] = args.tracking_uri
    if args.space:
        space = load_space(args.space)
        if space.digest != settings["space_digest"]:
            raise UserError(f"search {args.name!r} was started with space "
                            f"{settings['space_name']} ({settings['space_source']}), not "
                            f"{args.space}; resume without --space, or start a new search")
    return settings


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_resume_settings(args) if args.resume else resolve_settings(args)
        check_address(args.address)
        space = settings_space(settings)
        folder = local_search_dir(settings["storage_path"], settings["name"])
        if not args.resume and (folder / SETTINGS_FILE).exists():
            raise UserError(f"a search named {settings['name']!r} already exists in "
                            f"{settings['storage_path']}; pass --resume to continue it, or "
                            "a new --name")
        check_data(space, settings["overrides"])
        check_teacher(space, settings["overrides"])
        check_reachable(settings["tracking_uri"])
        storage = settings["storage_path"]
        if "://" not in storage:
            probe = Path(storage)
            try:
                probe.mkdir(parents=True, exist_ok=True)
                (probe / ".write-test").touch()
                (probe / ".write-test").unlink()
            except OSError:
                raise UserError(f"--storage-path {storage} is not writable; choose a folder you "
                                "can write to") from None
        from tuning.search.driver import run_search  # imports Ray only once the input is known good

        return run_search(settings, space, address=args.address, resume=args.resume,
                          folder=folder)
    except (UserError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def write_settings(folder: Path, settings: dict[str, Any]) -> None:
    atomic_write_text(folder / SETTINGS_FILE, yaml.safe_dump(settings, sort_keys=False))




if __name__ == "__main__":
    sys.exit(main())
