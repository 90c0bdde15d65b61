"""`python -m tuning.search --space alignkd`: the hyperparameter search on Ray Tune and Optuna."""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from data import DataError, load_arrays
from tuning.checkpoint import atomic_write_text
from tuning.config import ConfigError, RunConfig, UserError
from tuning.search.space import RUN_KEYS, Space, load_space, parse_space
from tuning.search.teachers import plan_teachers
from tuning.search.tracking import check_reachable, default_tracking_uri

# The smoke search: digits and thin networks, but still two cells (depth 18 and 34).
SMOKE = {"dataset": "digits", "width": 8, "batch_size": 64}
SMOKE_SETTINGS = {"epochs": 4, "teacher_epochs": 4, "num_samples": 3, "max_concurrent": 2,
                  "replicates": 2}
SETTINGS_FILE = "search.yaml"
# Settings a resumed search keeps from its search.yaml; giving another value is refused.
KEPT_ON_RESUME = ("num_samples", "max_concurrent", "epochs", "teacher_epochs", "seed",
                  "scheduler", "objective", "gpus_per_trial", "cpus_per_trial", "replicates")
DEFAULTS = {"num_samples": 20, "scheduler": "asha", "objective": "acc", "cpus_per_trial": 1.0,
            "replicates": 3,
            "storage_path": "ray_results", "data_root": "datasets", "teacher_store": "teachers"}


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"error: {message}; see `python -m tuning.search --help`\n")


def build_parser() -> Parser:
    p = Parser(prog="tuning.search", description=__doc__,
               epilog="A search runs across cells (a space's `across` dimensions, e.g. data set "
                      "x depth x method); each cell is its own Optuna study with its own budget, "
                      "early stopping, chosen trial and test accuracy.")
    p.add_argument("--space", default=None,
                   help="a bundled space (alignkd, jointrd, compare, paper) or a YAML file")
    p.add_argument("--name", help="the search's name (default: <space>-<date>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the search named --name")
    p.add_argument("--smoke", action="store_true",
                   help="digits, thin networks, 4 epochs, 3 trials per cell: minutes in all")
    p.add_argument("--num-samples", type=int,
                   help="trials PER CELL (default 20; a grid space runs its grid in each cell, "
                        "a space of fixed settings one trial per cell)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="trials at once, over all cells (default: as many as resources allow)")
    p.add_argument("--replicates", type=int, default=None, metavar="N",
                   help="after the search, train each cell's chosen trial N more times with new "
                        "seeds, for the spread of its test accuracy (default 3, --smoke 2; "
                        "0: none)")
    p.add_argument("--epochs", type=int, help="epochs per trial (default: the space's, or 200)")
    p.add_argument("--teacher-epochs", type=int, help="epochs per teacher (default: --epochs)")
    p.add_argument("--gpus-per-trial", type=float, default=None,
                   help="GPUs per trial, fractions allowed (default 1 if CUDA, else 0)")
    p.add_argument("--cpus-per-trial", type=float, default=None, help="default 1")
    p.add_argument("--storage-path", default=None,
                   help="where Tune keeps the search: a local dir, shared fs or URI (s3://...); "
                        "default ./ray_results")
    p.add_argument("--address", help="join an existing Ray cluster (host:port or auto)")
    p.add_argument("--seed", type=int, default=None,
                   help="every trial's seed, like --set seed=N (default: the space's, or 0); "
                        "it also seeds the samplers")
    p.add_argument("--scheduler", choices=("asha", "fifo"), default=None,
                   help="asha (default): successive halving within each cell, first rung at "
                        "the lr peak; fifo: no early stopping")
    p.add_argument("--objective", choices=("acc", "acc-time"), default=None,
                   help="acc (default): the last epoch's val accuracy; acc-time: the Pareto "
                        "front of val accuracy against training time, per cell")
    p.add_argument("--data-root", default=None, help="where data sets are (default ./datasets)")
    p.add_argument("--teacher-store", default=None,
                   help="cache of trained teachers, keyed by recipe (shared fs on a cluster); "
                        "default ./teachers")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                        "sqlite:///mlflow.db here, artifacts in ./mlartifacts)")
    p.add_argument("--optuna-storage", default=None, metavar="URL",
                   help="the Optuna storage holding one study per cell (default: "
                        "sqlite:///optuna.db beside the MLflow SQLite store, else here)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="fix a run-config value for every trial; it leaves the search, and an "
                        "across-dimension leaves the cells (e.g. --set dataset=cifar10)")
    return p


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set {pair!r} must look like KEY=VALUE, "
                              "e.g. --set dataset=cifar10")
        out[key.strip()] = yaml.safe_load(value)
    span = out.pop("eta_span", None)
    RunConfig.from_dict(out, source="--set")  # validate keys and values
    if span is not None:
        if isinstance(span, bool) or not isinstance(span, (int, float)) or not 0 <= span <= 1:
            raise ConfigError(f"--set eta_span must be a fraction in [0, 1]; got {span!r}")
        if "eta_epochs" in out:
            raise ConfigError("--set eta_span and --set eta_epochs say the same thing; keep one")
        out["eta_span"] = span
    return out


def check_count(n: int | None) -> None:
    if n is not None and n < 0:
        raise UserError(f"--replicates must be 0 (none) or more; got {n}")


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


def default_optuna_storage(tracking_uri: str) -> str:
    """Beside the MLflow SQLite store; with a tracking server, in the working folder."""
    if tracking_uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(tracking_uri.removeprefix('sqlite:///')).parent / 'optuna.db'}"
    return f"sqlite:///{Path('optuna.db').resolve()}"


def check_optuna_storage(url: str) -> None:
    """One line when the study storage cannot be opened; a SQLite file is not created here."""
    if url.startswith("sqlite:///"):
        folder = Path(url.removeprefix("sqlite:///")).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise UserError(f"--optuna-storage {url} cannot be created: {folder} is not a "
                            "writable folder; fix the path or pass another URL")
        return
    try:
        import sqlalchemy

        sqlalchemy.create_engine(url).connect().close()
    except Exception as err:  # noqa: BLE001 - any failure here means "unusable storage"
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise UserError(f"--optuna-storage {url} cannot be opened ({reason}); pass a "
                        "database URL such as sqlite:///optuna.db") from None


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the search runs with; saved beside it so --resume runs the same search."""
    space_arg = args.space or "alignkd"
    space = load_space(space_arg)
    overrides = parse_overrides(args.set)
    settings = {k: getattr(args, k) for k in KEPT_ON_RESUME}
    if args.smoke:
        overrides = {**SMOKE, **overrides}
        settings.update({k: v for k, v in SMOKE_SETTINGS.items() if settings[k] is None})
    for key in ("num_samples", "scheduler", "objective", "cpus_per_trial", "replicates"):
        settings[key] = DEFAULTS[key] if settings[key] is None else settings[key]
    overrides["data_root"] = str(Path(args.data_root or DEFAULTS["data_root"]).resolve())
    if settings["seed"] is not None:
        overrides["seed"] = settings["seed"]  # like --set seed=N
    if settings["epochs"] is not None:
        overrides["epochs"] = settings["epochs"]
    fixed = space.with_fixed(overrides).fixed
    settings["seed"] = fixed.get("seed", RunConfig.seed)
    epochs = fixed.get("epochs", RunConfig.epochs)
    settings["epochs"] = epochs
    settings["teacher_epochs"] = settings["teacher_epochs"] or epochs
    check_count(settings["replicates"])
    if settings["num_samples"] < 1:
        raise UserError(f"--num-samples must be at least 1; got {settings['num_samples']}")
    settings["max_concurrent"] = settings["max_concurrent"] or 0  # 0: no limit
    if settings["max_concurrent"] < 0:
        raise UserError("--max-concurrent must be 0 (no limit) or more")
    if settings["gpus_per_trial"] is None:
        import torch

        settings["gpus_per_trial"] = 1.0 if torch.cuda.is_available() else 0.0
    name = args.name or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    tracking_uri = default_tracking_uri(args.tracking_uri)
    sampler = {"grid": "grid", "fixed": "none"}.get(space.kind, "tpe")
    if sampler == "tpe" and settings["objective"] == "acc-time":
        sampler = "multi-objective tpe"
    cells = space.with_fixed(overrides).cells()
    return {"name": name, "space_name": space.name, "space_source": space.source,
            "sampler": sampler, "tracking_uri": tracking_uri,
            "optuna_storage": args.optuna_storage or default_optuna_storage(tracking_uri),
            "space_text": space.text, "space_digest": space.digest, "overrides": overrides,
            "cells": [c.key for c in cells],
            "trials_per_cell": space.cell_budget(settings["num_samples"]),
            "teacher_store": str(Path(args.teacher_store or DEFAULTS["teacher_store"]).resolve()),
            "storage_path": storage_uri(args.storage_path or DEFAULTS["storage_path"]),
            **settings}


def settings_space(settings: dict[str, Any]) -> Space:
    space = parse_space(settings["space_text"], source=settings["space_source"],
                        name=settings["space_name"])
    return space.with_fixed(settings["overrides"])


def check_data(space: Space) -> None:
    """Every data set the space can ask for must be loadable before any trial starts."""
    for name in space.values_of("dataset") or (RunConfig.dataset,):
        values = {k: v for k, v in space.fixed.items() if k in RUN_KEYS}
        cfg = RunConfig.from_dict({**values, "dataset": name}, source="the search's settings")
        load_arrays(name, cfg.data_root, download=cfg.download, **cfg.data_options())


def check_teacher(space: Space) -> None:
    """A teacher fixed for every trial must fit every data set the space can ask for."""
    path = space.fixed.get("teacher")
    if not path:
        return
    from tuning.trainer import load_model

    _, meta = load_model(path)
    for name in space.values_of("dataset") or (RunConfig.dataset,):
        if meta.get("dataset") != name:
            raise UserError(f"teacher {path} was trained on {meta.get('dataset')} "
                            f"({meta['num_classes']} classes) but the search runs {name}; "
                            f"pass a teacher trained on {name}, or drop --set teacher")


def check_name_free(settings: dict[str, Any]) -> None:
    """A new search's name must not already name a search in the tracking store or in the
    study storage (another --storage-path may hold it): the two would share their records."""
    name, fix = settings["name"], "pass a new --name, or --resume to continue that search"
    url = settings["optuna_storage"]
    local = url.startswith("sqlite:///")
    if not local or Path(url.removeprefix("sqlite:///")).is_file():
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            names = [s.study_name for s in optuna.storages.RDBStorage(url).get_all_studies()]
        except Exception:  # noqa: BLE001 - check_optuna_storage names the problem
            names = []
        if any(n.startswith(f"{name}/") for n in names):
            raise UserError(f"the study storage {url} already holds a search named {name!r}; "
                            f"{fix}")
    uri = settings["tracking_uri"]
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return
    from tuning.search.tracking import client

    try:
        exp = client(uri).get_experiment_by_name(name)
        parents = client(uri).search_runs([exp.experiment_id], "tags.role = 'search'",
                                          max_results=1) if exp else []
    except Exception:  # noqa: BLE001 - check_reachable names the problem
        return
    if parents:
        raise UserError(f"the tracking store {uri} already has a search named {name!r}; {fix}")


def load_resume_settings(args: argparse.Namespace) -> dict[str, Any]:
    if not args.name:
        raise UserError("--resume needs --name: the search to continue (see ray_results/)")
    folder = local_search_dir(storage_uri(args.storage_path or DEFAULTS["storage_path"]),
                              args.name)
    path = folder / SETTINGS_FILE
    if not path.is_file():
        raise UserError(f"no search named {args.name!r} under "
                        f"{args.storage_path or DEFAULTS['storage_path']}; check --name "
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
    if args.set:
        changed = {**settings["overrides"], **parse_overrides(args.set)}
        space = parse_space(settings["space_text"], source=settings["space_source"],
                            name=settings["space_name"]).with_fixed(changed)
        cells = [c.key for c in space.cells()]
        if cells != settings["cells"]:
            raise UserError(f"search {args.name!r} runs the cells {', '.join(settings['cells'])}"
                            f"; with {' '.join('--set ' + s for s in args.set)} it would run "
                            f"{', '.join(cells)}. Resume without --set, or start a new search")
        if changed != settings["overrides"]:
            raise UserError(f"a resumed search keeps its settings ({SETTINGS_FILE}); drop "
                            f"--set, or start a new search with them")
    for key in KEPT_ON_RESUME:
        given = getattr(args, key)
        if given is not None and given != settings.get(key):
            flag = "--" + key.replace("_", "-")
            raise UserError(f"a resumed search keeps its settings ({SETTINGS_FILE}: {key} "
                            f"{settings.get(key)}); drop {flag} {given}, or start a new search")
    if args.optuna_storage and args.optuna_storage != settings["optuna_storage"]:
        raise UserError(f"search {args.name!r} keeps its studies in "
                        f"{settings['optuna_storage']}; drop --optuna-storage")
    return settings


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name = args.name or "<name>"
    try:
        settings = load_resume_settings(args) if args.resume else resolve_settings(args)
        name = settings["name"]
        check_address(args.address)
        space = settings_space(settings)
        folder = local_search_dir(settings["storage_path"], settings["name"])
        if not args.resume and (folder / SETTINGS_FILE).exists():
            raise UserError(f"a search named {settings['name']!r} already exists in "
                            f"{settings['storage_path']}; pass --resume to continue it, or "
                            "a new --name")
        check_data(space)
        check_teacher(space)
        plan_teachers(space, settings["teacher_epochs"])  # a range it cannot plan: one line
        check_reachable(settings["tracking_uri"])
        check_optuna_storage(settings["optuna_storage"])
        if not args.resume:
            check_name_free(settings)
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
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with: python -m tuning.search --resume --name {name}",
              file=sys.stderr)
        return 130


def write_settings(folder: Path, settings: dict[str, Any]) -> None:
    atomic_write_text(folder / SETTINGS_FILE, yaml.safe_dump(settings, sort_keys=False))


if __name__ == "__main__":
    sys.exit(main())
