"""`python -m tuning.search --space alignkd`: the hyperparameter search on Ray Tune and Optuna."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from data import DataError, load_arrays
from tuning import envvars
from tuning.checkpoint import atomic_write_text
from tuning.config import ConfigError, RunConfig, UserError
from tuning.search import storage
from tuning.search.results import parse_choose
from tuning.search.schedule import search_rungs
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
                  "scheduler", "objective", "gpus_per_trial", "cpus_per_trial", "replicates",
                  "baseline", "choose", "budget_epochs", "sampler_seed", "first_rung")
DEFAULTS = {"num_samples": 20, "scheduler": "asha", "objective": "acc", "cpus_per_trial": 1.0,
            "replicates": 3, "baseline": "default", "choose": "best", "sampler": "tpe",
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
    p.add_argument("--baseline", choices=("default", "none"), default=None,
                   help="default: also train each cell's default configuration (the method's "
                        "defaults, the paper's recipe) under the replicate seeds, for the "
                        "tuning gain (tuned - default); none: do not")
    p.add_argument("--budget-epochs", type=int, default=None, metavar="N",
                   help="per cell, stop starting trials once they have spent (or, running, "
                        "will spend) N epochs; --num-samples still caps the trials. Compares "
                        "early stopping with FIFO at one cost")
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
    p.add_argument("--sampler-seed", type=int, default=None, metavar="N",
                   help="seed the samplers alone (default: --seed), to repeat a search with "
                        "other proposals but the same trial seeds and teachers")
    p.add_argument("--scheduler", choices=("asha", "fifo"), default=None,
                   help="asha (default): successive halving within each cell, first rung at "
                        "the lr peak; fifo: no early stopping")
    p.add_argument("--objective", choices=("acc", "acc-time"), default=None,
                   help="acc (default): the last epoch's val accuracy; acc-time: the Pareto "
                        "front of val accuracy against training time, per cell")
    p.add_argument("--choose", default=None, metavar="RULE",
                   help="which trial a cell chooses: best (default: the highest val accuracy); "
                        "with --objective acc-time also knee (the front's knee) or "
                        "fastest-within:PP (the fastest trial of the front within PP "
                        "percentage points of its best)")
    p.add_argument("--first-rung", type=float, default=None, metavar="FRACTION",
                   help="with asha: the fraction of training at which trials are first "
                        "compared (default: the measured one, see `python -m tuning.rungs`); "
                        "never before the space's lr and eta schedules settle")
    p.add_argument("--sampler", choices=("tpe", "random"), default=None,
                   help="how a sampled space proposes trials: tpe (default) or random")
    p.add_argument("--data-root", default=None,
                   help="where data sets are, and where a missing one is downloaded to, once, "
                        "before the trials (default ./datasets)")
    p.add_argument("--no-download", action="store_true",
                   help="never download: a missing data set is an error (as in tuning.train)")
    p.add_argument("--teacher-store", default=None,
                   help="cache of trained teachers, keyed by recipe (shared fs on a cluster); "
                        "default ./teachers")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                        "sqlite:///mlflow.db here, artifacts in ./mlartifacts)")
    p.add_argument("--optuna-storage", default=None, metavar="URL",
                   help="the Optuna storage holding one study per cell (default: "
                        "sqlite:///optuna.db beside the MLflow SQLite store, else here)")
    p.add_argument("--force", action="store_true",
                   help="start even when the disk seems to lack the storage the search needs")
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
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"--set {pair!r}: {value!r} is not a value; quote text, and write "
                              "lists as [a, b]") from None
        if isinstance(parsed, str) and FLOAT.fullmatch(parsed):
            parsed = float(parsed)  # YAML reads 1e-3 as text
        out[key.strip()] = parsed
    span = out.pop("eta_span", None)
    RunConfig.from_dict(out, source="--set")  # validate keys and values
    if span is not None:
        if isinstance(span, bool) or not isinstance(span, (int, float)) or not 0 <= span <= 1:
            raise ConfigError(f"--set eta_span must be a fraction in [0, 1]; got {span!r}")
        if "eta_epochs" in out:
            raise ConfigError("--set eta_span and --set eta_epochs say the same thing; keep one")
        out["eta_span"] = span
    return out


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def check_name(name: str) -> None:
    """A search's name becomes a folder, an experiment and a study prefix: letters, digits,
    dots, dashes and underscores, no separator, not `.` or `..`."""
    if not NAME.fullmatch(name) or name in (".", ".."):
        raise UserError(f"--name {name!r} is not a valid search name; use letters, digits, '.', "
                        "'-' and '_' (up to 100, starting with a letter or digit), no '/'")


def check_numbers(args: argparse.Namespace) -> None:
    """Every numeric flag in its range, before anything is written."""
    for flag, value, low in (("--epochs", args.epochs, 1), ("--teacher-epochs",
                                                           args.teacher_epochs, 1)):
        if value is not None and value < low:
            raise UserError(f"{flag} must be at least {low}; got {value}")
    if args.cpus_per_trial is not None and not args.cpus_per_trial > 0:
        raise UserError(f"--cpus-per-trial must be more than 0; got {args.cpus_per_trial}")
    if args.gpus_per_trial is not None and args.gpus_per_trial < 0:
        raise UserError(f"--gpus-per-trial must be 0 or more; got {args.gpus_per_trial}")


def check_gpus(settings: dict[str, Any], address: str | None) -> None:
    """A trial that asks for GPUs a local machine does not have would wait for ever."""
    if settings["gpus_per_trial"] <= 0 or address:
        return  # a cluster's GPUs are checked once it is joined (driver.check_resources)
    import torch

    have = torch.cuda.device_count()
    if have == 0 or settings["gpus_per_trial"] > have:
        raise UserError(f"--gpus-per-trial {settings['gpus_per_trial']:g} asks for more GPUs "
                        f"than this machine has ({have}); pass --gpus-per-trial 0 to train on "
                        "the CPU, or join a cluster with GPUs (--address)")


def check_choose(rule: str, objective: str) -> None:
    """--choose names a rule, and one that the objective can apply."""
    try:
        name, _ = parse_choose(rule)
    except ValueError as err:
        raise UserError(str(err)) from None
    if name != "best" and objective != "acc-time":
        raise UserError(f"--choose {rule} picks from a Pareto front of accuracy against time, "
                        "which only --objective acc-time searches; add it, or drop --choose")


def check_epoch_budget(settings: dict[str, Any], space: Space, budget_only: bool) -> None:
    """--budget-epochs buys at least one whole trial; without --num-samples, the trials are
    capped by what the budget could buy if every trial stopped at its first rung."""
    budget, epochs = settings["budget_epochs"], settings["epochs"]
    if budget < epochs:
        raise UserError(f"--budget-epochs {budget} is less than one trial ({epochs} epochs); "
                        f"pass at least {epochs}")
    if space.kind != "sampled":
        raise UserError("--budget-epochs applies to sampled spaces; a grid or fixed space "
                        "runs each of its points once")
    if budget_only:
        rungs = search_rungs(space, settings)
        settings["num_samples"] = math.ceil(budget / (rungs[0] if rungs else epochs))


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


def local_search_dir(where: str, name: str) -> Path:
    """Where the driver's own files (settings, tables, chosen configs) go: beside Tune's on a
    local path; for a URI, in ./searches/NAME, and copied beside Tune's state (publish)."""
    return Path(where) / name if not storage.is_uri(where) else Path("searches").resolve() / name


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
    check_numbers(args)
    if args.name is not None:
        check_name(args.name)
    space_arg = args.space or "alignkd"
    space = load_space(space_arg)
    overrides = parse_overrides(args.set)
    settings = {k: getattr(args, k) for k in KEPT_ON_RESUME}
    if args.smoke:
        overrides = {**SMOKE, **overrides}
        settings.update({k: v for k, v in SMOKE_SETTINGS.items() if settings[k] is None})
    budget_only = settings["budget_epochs"] is not None and settings["num_samples"] is None
    for key in ("num_samples", "scheduler", "objective", "cpus_per_trial", "replicates",
                "baseline", "choose"):
        settings[key] = DEFAULTS[key] if settings[key] is None else settings[key]
    check_choose(settings["choose"], settings["objective"])
    overrides["data_root"] = str(Path(args.data_root or DEFAULTS["data_root"]).resolve())
    if args.no_download:
        overrides["download"] = False
    if settings["seed"] is not None:
        overrides["seed"] = settings["seed"]  # like --set seed=N
    if settings["epochs"] is not None:
        overrides["epochs"] = settings["epochs"]
    fixed = space.with_fixed(overrides).fixed
    settings["seed"] = fixed.get("seed", RunConfig.seed)
    first = settings["first_rung"]
    if first is not None and not (math.isfinite(first) and 0 < first <= 1):
        raise UserError(f"--first-rung must be a fraction of training in (0, 1]; got {first}")
    if settings["sampler_seed"] is not None and settings["sampler_seed"] < 0:
        raise UserError(f"--sampler-seed must be 0 or more; got {settings['sampler_seed']}")
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
    sampler = {"grid": "grid", "fixed": "none"}.get(space.kind, args.sampler or "tpe")
    if sampler == "tpe" and settings["objective"] == "acc-time":
        sampler = "multi-objective tpe"
    searched = space.with_fixed(overrides)
    cells = searched.cells()
    if settings["budget_epochs"] is not None:
        check_epoch_budget(settings, searched, budget_only)
    return {"name": name, "space_name": space.name, "space_source": space.source,
            "sampler": sampler, "tracking_uri": tracking_uri,
            "optuna_storage": args.optuna_storage or default_optuna_storage(tracking_uri),
            "space_text": space.text, "space_digest": space.digest, "overrides": overrides,
            "cells": [c.key for c in cells],
            "trials_per_cell": space.cell_budget(settings["num_samples"]),
            "teacher_store": storage_uri(args.teacher_store or DEFAULTS["teacher_store"]),
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
    from tuning.trainer import FEATURE_METHODS, load_model

    _, meta = load_model(path)
    for name in space.values_of("dataset") or (RunConfig.dataset,):
        if meta.get("dataset") != name:
            raise UserError(f"teacher {path} was trained on {meta.get('dataset')} "
                            f"({meta['num_classes']} classes) but the search runs {name}; "
                            f"pass a teacher trained on {name}, or drop --set teacher")
    # AlignKD compares stage features and JointRD runs them through the teacher's stages:
    # the student's width must be the teacher's.
    methods = space.values_of("method") or (RunConfig.method,)
    widths = space.values_of("width") or (RunConfig.width,)
    teacher_width = meta["arch"]["width"]
    for width in widths:
        if width != teacher_width and set(methods) & set(FEATURE_METHODS):
            raise UserError(f"teacher {path} has width {teacher_width} but the search's "
                            f"students have width {width}; AlignKD and JointRD need them equal: "
                            f"pass --set width={teacher_width} or another teacher")


def expected_storage(space: Space, settings: dict[str, Any]) -> tuple[int, str]:
    """Bytes a search leaves on disk, and how they add up.

    Every trial and replicate ends with one checkpoint in Tune's storage (weights and
    momentum) and one model in MLflow's artifacts; each running trial briefly holds one more
    checkpoint in storage and three in its local folder; each teacher, a checkpoint and a
    model.
    """
    from models import resnet
    from tuning.search.space import trial_values

    sizes = []
    for cell in space.cells():
        cfg = RunConfig(**trial_values(space, cell.as_dict()))
        classes = 100 if cfg.dataset == "cifar100" else 10
        net = resnet(cfg.depth, shortcut=cfg.shortcut, num_classes=classes, width=cfg.width,
                     stem="imagenet" if cfg.dataset == "imagewoof" else "cifar",
                     block=cfg.block)
        sizes.append(4 * sum(p.numel() for p in net.parameters()))
    per_cell = settings["trials_per_cell"] + settings["replicates"]
    ended = sum(3 * size * per_cell for size in sizes)  # a checkpoint (2x) and a model each
    trials = len(sizes) * settings["trials_per_cell"]
    running = settings["max_concurrent"] or max(1, (os.cpu_count() or 1))
    largest = max(sizes)
    total = ended + min(running, trials) * 4 * 2 * largest + 2 * len(sizes) * 3 * largest
    return total, (f"{trials} trials and {len(sizes) * settings['replicates']} replicates, "
                   f"models of {min(sizes) / 2**20:.1f}-{largest / 2**20:.1f} MB and "
                   f"checkpoints twice that, {running} running at once")


def check_space_free(space: Space, settings: dict[str, Any], force: bool) -> None:
    """Print what the search will need; refuse when the storage's disk clearly lacks it."""
    need, how = expected_storage(space, settings)
    print(f"storage: about {need / 2**30:.2f} GB ({how})", flush=True)
    path = settings["storage_path"]
    if "://" in path or force:
        return
    probe = Path(path)
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise UserError(f"the search needs about {need / 2**30:.1f} GB ({how}) but only "
                        f"{free / 2**30:.1f} GB are free under {path}; free some, lower "
                        "--num-samples or the width, or pass --force")


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


SETTINGS_KEYS = {"name", "space_name", "space_source", "space_text", "space_digest",
                 "overrides", "cells", "tracking_uri", "optuna_storage", "storage_path",
                 "teacher_store", "epochs", "teacher_epochs", "num_samples", "seed",
                 "scheduler", "objective", "gpus_per_trial", "cpus_per_trial"}


def read_settings(path: Path) -> dict[str, Any]:
    """A search's search.yaml, or one line saying it is damaged (and how to go on)."""
    fix = "restore it from a backup, or start the search again under a new --name"
    try:
        if path.stat().st_size > 1 << 20:
            raise UserError(f"{path} is larger than any search.yaml this project writes; {fix}")
        settings = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as err:
        raise UserError(f"{path} cannot be read ({type(err).__name__}); {fix}") from None
    missing = SETTINGS_KEYS - set(settings) if isinstance(settings, dict) else SETTINGS_KEYS
    if missing:
        raise UserError(f"{path} is empty, truncated or not a search's settings (it lacks "
                        f"{sorted(missing)[0]}); {fix}")
    return settings


def check_trusted(folder: Path, name: str) -> None:
    """Resuming unpickles Ray Tune's state files: whoever can write them can run code here.
    Refuse a search folder (or state file) that other users could have written."""
    for path in [folder, *folder.glob("*.pkl"), *folder.glob("experiment_state-*.json")]:
        try:
            st = path.stat()
        except OSError:
            continue
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise UserError(f"{path} can be written by another user (owner uid {st.st_uid}, "
                            f"mode {st.st_mode & 0o777:o}); resuming {name!r} would run code "
                            "from it, so make it yours alone (chmod go-w) or start afresh")


LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def loopback_only(address: str | None) -> contextlib.AbstractContextManager:
    """Within, a Ray this process starts for itself (no --address) serves this machine alone:
    its node address is 127.0.0.1, and the GCS, raylet and workers listen on the loopback
    interface only. Ray reads the setting once, when it is first imported, so the commands
    import Ray inside this block. Joining a cluster (--address) is the user's choice, and
    the setting is put back afterwards: a `ray start` this process runs later must not
    inherit it, or it refuses to form a cluster."""
    return envvars.defaults({} if address is not None else {LOOPBACK_ENV: "0"})


_NAME_LOCK = None  # held by this process while its search runs; the kernel drops it at exit


def hold_name(folder: Path, name: str) -> None:
    """Lock the search's name while this driver lives: a second driver with the same --name
    gets one line naming the running one. It is an flock, so a SIGKILLed driver never leaves
    it stuck."""
    import fcntl

    global _NAME_LOCK
    lock_path = folder.parent / f".{name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(lock_path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserError(f"search {name!r} is being run by {holder}; wait for it to end, or "
                        "choose another --name") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"driver pid {os.getpid()} on {socket.gethostname()}, since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    _NAME_LOCK = handle


def release_name() -> None:
    global _NAME_LOCK
    if _NAME_LOCK is not None:
        _NAME_LOCK.close()  # closing the file drops the flock
        _NAME_LOCK = None


def load_resume_settings(args: argparse.Namespace) -> dict[str, Any]:
    if not args.name:
        raise UserError("--resume needs --name: the search to continue (see ray_results/)")
    check_name(args.name)
    where = storage_uri(args.storage_path or DEFAULTS["storage_path"])
    folder = local_search_dir(where, args.name)
    path = folder / SETTINGS_FILE
    if not path.is_file() and storage.is_uri(where):
        # Another machine's driver: the settings are kept beside Tune's state too.
        stored = storage.join(where, args.name, SETTINGS_FILE)
        try:
            if storage.exists(stored):
                storage.download(stored, path)
        except OSError as err:
            raise UserError(f"--storage-path {where} cannot be read ({err}); check the URI and "
                            "the credentials") from None
    if not path.is_file():
        raise UserError(f"no search named {args.name!r} under "
                        f"{args.storage_path or DEFAULTS['storage_path']}; check --name "
                        "and --storage-path, or start it without --resume")
    settings = read_settings(path)
    # A search saved before these settings existed ran as their defaults do.
    for key, value in (("baseline", "default"), ("choose", "best"), ("budget_epochs", None),
                       ("sampler_seed", None), ("first_rung", None)):
        settings.setdefault(key, value)
    check_trusted(path.parent, args.name)
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
    if args.sampler and args.sampler not in settings.get("sampler", "tpe"):
        raise UserError(f"a resumed search keeps its settings ({SETTINGS_FILE}: sampler "
                        f"{settings.get('sampler')}); drop --sampler {args.sampler}, or start "
                        "a new search")
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
        check_gpus(settings, args.address)
        folder = local_search_dir(settings["storage_path"], settings["name"])
        check_data(space)
        check_teacher(space)
        plan_teachers(space, settings["teacher_epochs"])  # a range it cannot plan: one line
        check_reachable(settings["tracking_uri"])
        check_optuna_storage(settings["optuna_storage"])
        # Every check that writes nothing comes before the name's lock, which creates the
        # storage folder: a refused search leaves no folder behind.
        for flag, where in (("--storage-path", settings["storage_path"]),
                            ("--teacher-store", settings["teacher_store"])):
            problem = storage.check_writable(where)
            if problem:
                raise UserError(f"{flag} {where} is not writable ({problem}); choose a folder "
                                "(or a bucket) you can write to")
        if not args.resume:
            check_space_free(space, settings, args.force)
        hold_name(folder, settings["name"])  # from here on, this driver's alone
        exists = (folder / SETTINGS_FILE).exists() or (
            storage.is_uri(settings["storage_path"]) and storage.exists(
                storage.join(settings["storage_path"], settings["name"], SETTINGS_FILE)))
        if not args.resume and exists:
            raise UserError(f"a search named {settings['name']!r} already exists in "
                            f"{settings['storage_path']}; pass --resume to continue it, or "
                            "a new --name")
        if not args.resume:
            check_name_free(settings)
        with loopback_only(args.address):
            # Ray is imported only once the input is known good.
            from tuning.search.driver import run_search

            return run_search(settings, space, address=args.address, resume=args.resume,
                              folder=folder)
    except (UserError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with: python -m tuning.search --resume --name {name}",
              file=sys.stderr)
        return 130
    finally:
        release_name()


def write_settings(folder: Path, settings: dict[str, Any]) -> None:
    """search.yaml in the search's folder, and beside Tune's state when that is a URI."""
    text = yaml.safe_dump(settings, sort_keys=False)
    atomic_write_text(folder / SETTINGS_FILE, text)
    if storage.is_uri(settings["storage_path"]):
        storage.write_bytes(storage.join(settings["storage_path"], settings["name"],
                                         SETTINGS_FILE), text.encode())


if __name__ == "__main__":
    sys.exit(main())
