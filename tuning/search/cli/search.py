"""`python -m tuning.search --space alignkd`: the hyperparameter search on Ray Tune and Optuna.

This module reads the command line into the search's settings (`SearchSettings`), or reads a
resumed search's back from its `search.yaml`; runs every check that can refuse it
(`preflight`); takes the search's name; and hands it to the driver.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from data import DataError
from tuning.run.config import ConfigError, RunConfig, UserError
from tuning.run.console import Parser, mask_credentials, refuse
from tuning.search import storage
from tuning.search.preflight import check_name_free, check_trusted, preflight
from tuning.search.raytune import loopback_only
from tuning.search.results import parse_choose
from tuning.search.schedule import search_rungs
from tuning.search.settings import DEFAULTS, SETTINGS_FILE, SearchSettings, check_name
from tuning.search.space import Space, load_space, parse_space
from tuning.search.tracking import default_tracking_uri

# The smoke search: digits and thin networks, but still two cells (depth 18 and 34).
SMOKE = {"dataset": "digits", "width": 8, "batch_size": 64}
SMOKE_SETTINGS = {"epochs": 4, "teacher_epochs": 4, "num_samples": 3, "max_concurrent": 2,
                  "replicates": 2}
# Settings a resumed search keeps from its search.yaml; giving another value is refused.
KEPT_ON_RESUME = ("num_samples", "max_concurrent", "epochs", "teacher_epochs", "seed",
                  "scheduler", "objective", "gpus_per_trial", "cpus_per_trial", "replicates",
                  "baseline", "choose", "budget_epochs", "sampler_seed", "first_rung",
                  "warm_start", "warm_start_top", "proxy_width")
FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def build_parser() -> Parser:
    p = Parser(prog="tuning.search", description=__doc__,
               epilog="A search runs across cells (a space's `across` dimensions, e.g. data set "
                      "x depth x method); each cell is its own Optuna study with its own budget, "
                      "early stopping, chosen trial and test accuracy.")
    p.add_argument("--space", default=None,
                   help="a bundled space (alignkd, jointrd, compare, methods, paper) or a "
                        "YAML file")
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
    p.add_argument("--warm-start", default=None, metavar="SEARCH",
                   help="start each cell from the best configurations of a finished search's "
                        "matching cell (the same method, the nearest data set and depth)")
    p.add_argument("--warm-start-top", type=int, default=None, metavar="K",
                   help="how many configurations of each matching cell (default 3)")
    p.add_argument("--proxy-width", type=int, default=None, metavar="W",
                   help="search at width W, then train each cell's chosen configuration at "
                        "the space's own width as its replicates (width as a fidelity)")
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


def check_count(n: int | None) -> None:
    if n is not None and n < 0:
        raise UserError(f"--replicates must be 0 (none) or more; got {n}")


def check_choose(rule: str, objective: str) -> None:
    """--choose names a rule, and one that the objective can apply."""
    try:
        name, _ = parse_choose(rule)
    except ValueError as err:
        raise UserError(str(err)) from None
    if name != "best" and objective != "acc-time":
        raise UserError(f"--choose {rule} picks from a Pareto front of accuracy against time, "
                        "which only --objective acc-time searches; add it, or drop --choose")


# Settings a flag and a --set can both give: flag -> (its value in args, the --set key).
SAME_SETTING = {"--epochs": ("epochs", "epochs"), "--seed": ("seed", "seed"),
                "--data-root": ("data_root", "data_root"),
                "--no-download": ("no_download", "download")}


def merge_same_settings(args: argparse.Namespace, overrides: dict[str, Any],
                        given: dict[str, Any]) -> None:
    """One setting said twice (a flag and its --set) must be said alike: else refused."""
    for flag, (attr, key) in SAME_SETTING.items():
        value = getattr(args, attr)
        if attr == "no_download":
            value = False if value else None  # --no-download means download: false
        if value is None or key not in overrides:
            continue
        if overrides[key] != value and not (key == "data_root" and Path(overrides[key])
                                            .resolve() == Path(value).resolve()):
            shown = "--no-download" if attr == "no_download" else f"{flag} {value}"
            raise UserError(f"{shown} and --set {key}={overrides[key]} say different things; "
                            "keep one")
    for attr, key in SAME_SETTING.values():
        if key in ("epochs", "seed") and key in overrides:
            given[key] = overrides[key]  # --set epochs=N is --epochs N
        elif attr == "data_root" and args.data_root is not None:
            overrides["data_root"] = args.data_root
        elif attr == "no_download" and args.no_download:
            overrides["download"] = False


def apply_smoke(overrides: dict[str, Any], given: dict[str, Any], space: Space) -> None:
    """The smoke search's defaults where nothing else gives a value; where something does
    (--set, a flag, or the space searching it), it wins, and the console says so. Its data
    set and width replace the space's own: the smoke search runs offline, in minutes."""
    searched = {p.name for p in space.params} | set(space.grid)
    for key, value in SMOKE.items():
        if key in searched and key not in overrides:
            print(f"smoke: {key} searched as the space {space.name} defines it, not fixed at "
                  f"the smoke search's {value}", flush=True)
            continue
        if key in overrides and overrides[key] != value:
            print(f"smoke: {key} {overrides[key]} (from --set), not the smoke search's {value}",
                  flush=True)
        overrides.setdefault(key, value)
    for key, value in SMOKE_SETTINGS.items():
        if given[key] is not None and given[key] != value:
            print(f"smoke: {key} {given[key]} (given), not the smoke search's {value}",
                  flush=True)
        elif given[key] is None:
            given[key] = value


def default_optuna_storage(tracking_uri: str) -> str:
    """Beside the MLflow SQLite store; with a tracking server, in the working folder."""
    if tracking_uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(tracking_uri.removeprefix('sqlite:///')).parent / 'optuna.db'}"
    return f"sqlite:///{Path('optuna.db').resolve()}"


def resolve_settings(args: argparse.Namespace) -> SearchSettings:
    """Everything a new search runs with, from the command line; saved beside it so that
    --resume runs the same search."""
    check_numbers(args)
    if args.name is not None:
        check_name(args.name)
    space = load_space(args.space or "alignkd")
    overrides = parse_overrides(args.set)
    given = {k: getattr(args, k) for k in KEPT_ON_RESUME}
    merge_same_settings(args, overrides, given)
    if args.smoke:
        apply_smoke(overrides, given, space)
    budget_only = given["budget_epochs"] is not None and given["num_samples"] is None
    for key in ("num_samples", "scheduler", "objective", "cpus_per_trial", "replicates",
                "baseline", "choose"):
        given[key] = DEFAULTS[key] if given[key] is None else given[key]
    check_choose(given["choose"], given["objective"])
    overrides["data_root"] = str(Path(overrides.get("data_root") or DEFAULTS["data_root"])
                                 .resolve())
    if given["seed"] is not None:
        overrides["seed"] = given["seed"]  # like --set seed=N
    if given["epochs"] is not None:
        overrides["epochs"] = given["epochs"]
    fixed = space.with_fixed(overrides).fixed
    first = given["first_rung"]
    if first is not None and not (math.isfinite(first) and 0 < first <= 1):
        raise UserError(f"--first-rung must be a fraction of training in (0, 1]; got {first}")
    if given["sampler_seed"] is not None and given["sampler_seed"] < 0:
        raise UserError(f"--sampler-seed must be 0 or more; got {given['sampler_seed']}")
    epochs = fixed.get("epochs", RunConfig.epochs)
    check_count(given["replicates"])
    if given["num_samples"] < 1:
        raise UserError(f"--num-samples must be at least 1; got {given['num_samples']}")
    if (given["max_concurrent"] or 0) < 0:
        raise UserError("--max-concurrent must be 0 (no limit) or more")
    if given["gpus_per_trial"] is None:
        import torch

        given["gpus_per_trial"] = 1.0 if torch.cuda.is_available() else 0.0
    if given["warm_start_top"] is not None and given["warm_start"] is None:
        raise UserError("--warm-start-top says how many configurations --warm-start takes; "
                        "pass --warm-start SEARCH, or drop it")
    if given["warm_start_top"] is not None and given["warm_start_top"] < 1:
        raise UserError(f"--warm-start-top must be at least 1; got {given['warm_start_top']}")
    if given["proxy_width"] is not None:
        target = fixed.get("width", RunConfig.width)
        if given["proxy_width"] < 1 or given["proxy_width"] == target:
            raise UserError(f"--proxy-width must be a width of at least 1 other than the "
                            f"space's own ({target}); got {given['proxy_width']}")
    if given["budget_epochs"] is not None and given["budget_epochs"] < epochs:
        raise UserError(f"--budget-epochs {given['budget_epochs']} is less than one trial "
                        f"({epochs} epochs); pass at least {epochs}")
    searched = space.with_fixed(overrides)
    if given["budget_epochs"] is not None and searched.kind != "sampled":
        raise UserError("--budget-epochs applies to sampled spaces; a grid or fixed space "
                        "runs each of its points once")
    sampler = {"grid": "grid", "fixed": "none"}.get(space.kind, args.sampler or "tpe")
    if sampler == "tpe" and given["objective"] == "acc-time":
        sampler = "multi-objective tpe"
    tracking_uri = default_tracking_uri(args.tracking_uri)
    settings = SearchSettings(
        name=args.name or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}",
        space_name=space.name, space_source=space.source, space_text=space.text,
        space_digest=space.digest, overrides=overrides,
        cells=[c.key for c in searched.cells()], tracking_uri=tracking_uri,
        optuna_storage=args.optuna_storage or default_optuna_storage(tracking_uri),
        storage_path=storage.storage_uri(args.storage_path or DEFAULTS["storage_path"]),
        teacher_store=storage.storage_uri(args.teacher_store or DEFAULTS["teacher_store"]),
        epochs=epochs, teacher_epochs=given["teacher_epochs"] or epochs,
        num_samples=given["num_samples"], trials_per_cell=1,
        seed=fixed.get("seed", RunConfig.seed), scheduler=given["scheduler"],
        objective=given["objective"], sampler=sampler, gpus_per_trial=given["gpus_per_trial"],
        cpus_per_trial=given["cpus_per_trial"], max_concurrent=given["max_concurrent"] or 0,
        replicates=given["replicates"], baseline=given["baseline"], choose=given["choose"],
        budget_epochs=given["budget_epochs"], sampler_seed=given["sampler_seed"],
        first_rung=given["first_rung"], warm_start=given["warm_start"],
        warm_start_top=3 if given["warm_start_top"] is None else given["warm_start_top"],
        proxy_width=given["proxy_width"], smoke=bool(args.smoke))
    if budget_only:
        # The trials an epoch budget can buy if every trial stopped at its first rung.
        rungs = search_rungs(searched, settings)
        settings.num_samples = math.ceil(settings.budget_epochs / (rungs[0] if rungs
                                                                    else epochs))
    settings.trials_per_cell = searched.cell_budget(settings.num_samples)
    settings.validate()
    return settings


def check_resume_flags(args: argparse.Namespace, settings: SearchSettings) -> None:
    """A flag a resumed search cannot honour is refused, never ignored: a resume keeps the
    settings in its search.yaml (--tracking-uri and --address may change, and say so)."""
    keep = f"a resumed search keeps its settings ({SETTINGS_FILE})"
    if args.smoke and not settings.smoke:  # the same command again, with --resume: fine
        raise UserError(f"--smoke starts a new search; {settings.name} was not one, and {keep}: "
                        "drop --smoke")
    if args.force:
        raise UserError(f"--force applies to a new search's disk check; {keep}: drop --force")
    if args.data_root is not None and str(Path(args.data_root).resolve()) != \
            settings.overrides.get("data_root"):
        raise UserError(f"{keep}: its data root is {settings.overrides.get('data_root')}; "
                        f"drop --data-root {args.data_root}, or start a new search")
    if args.no_download and settings.overrides.get("download", True):
        raise UserError(f"{keep}, which download missing data; drop --no-download, or start "
                        "a new search")
    if args.teacher_store is not None and \
            storage.storage_uri(args.teacher_store) != settings.teacher_store:
        raise UserError(f"{keep}: its teachers are in {settings.teacher_store}; drop "
                        f"--teacher-store {args.teacher_store}, or start a new search")


def load_resume_settings(args: argparse.Namespace) -> SearchSettings:
    """A resumed search's settings, from its search.yaml; a flag that would change them is
    refused."""
    if not args.name:
        raise UserError("--resume needs --name: the search to continue (see ray_results/)")
    check_name(args.name)
    where = storage.storage_uri(args.storage_path or DEFAULTS["storage_path"])
    folder = storage.local_search_dir(where, args.name)
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
    settings = SearchSettings.read(path)
    check_trusted(path.parent, args.name)
    check_resume_flags(args, settings)
    if args.tracking_uri and args.tracking_uri != settings.tracking_uri:
        print(f"tracking: the search's records go to {mask_credentials(args.tracking_uri)} "
              f"(--tracking-uri), not {mask_credentials(settings.tracking_uri)}", flush=True)
        settings.tracking_uri = args.tracking_uri
    if args.space:
        space = load_space(args.space)
        if space.digest != settings.space_digest:
            raise UserError(f"search {args.name!r} was started with space "
                            f"{settings.space_name} ({settings.space_source}), not "
                            f"{args.space}; resume without --space, or start a new search")
    if args.set:
        changed = {**settings.overrides, **parse_overrides(args.set)}
        space = parse_space(settings.space_text, source=settings.space_source,
                            name=settings.space_name, started=True).with_fixed(changed)
        cells = [c.key for c in space.cells()]
        if cells != settings.cells:
            raise UserError(f"search {args.name!r} runs the cells {', '.join(settings.cells)}"
                            f"; with {' '.join('--set ' + s for s in args.set)} it would run "
                            f"{', '.join(cells)}. Resume without --set, or start a new search")
        if changed != settings.overrides:
            raise UserError(f"a resumed search keeps its settings ({SETTINGS_FILE}); drop "
                            f"--set, or start a new search with them")
    for key in KEPT_ON_RESUME:
        given = getattr(args, key)
        if given is not None and given != getattr(settings, key):
            flag = "--" + key.replace("_", "-")
            raise UserError(f"a resumed search keeps its settings ({SETTINGS_FILE}: {key} "
                            f"{getattr(settings, key)}); drop {flag} {given}, or start a new "
                            "search")
    if args.sampler and args.sampler not in settings.sampler:
        raise UserError(f"a resumed search keeps its settings ({SETTINGS_FILE}: sampler "
                        f"{settings.sampler}); drop --sampler {args.sampler}, or start a new "
                        "search")
    if args.optuna_storage and args.optuna_storage != settings.optuna_storage:
        raise UserError(f"search {args.name!r} keeps its studies in "
                        f"{settings.optuna_storage}; drop --optuna-storage")
    return settings


def check_new_name(settings: SearchSettings) -> None:
    """A new search's name must be free in its storage, its tracking store and its studies."""
    exists = (settings.folder / SETTINGS_FILE).exists() or (
        storage.is_uri(settings.storage_path) and storage.exists(
            storage.join(settings.storage_path, settings.name, SETTINGS_FILE)))
    if exists:
        raise UserError(f"a search named {settings.name!r} already exists in "
                        f"{settings.storage_path}; pass --resume to continue it, or a new "
                        "--name")
    check_name_free(settings)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name = args.name or "<name>"
    lock = storage.NameLock()

    def claim() -> None:
        """The name, once Ray runs and a trial fits on it: from here on, this driver's alone
        (the lock creates the storage folder, so a refused search leaves none behind)."""
        lock.hold(settings.folder, settings.name)
        if not args.resume:
            check_new_name(settings)  # again: another driver may have taken it meanwhile

    try:
        settings = load_resume_settings(args) if args.resume else resolve_settings(args)
        name = settings.name
        # Every check runs before Ray starts and before anything is written.
        address = preflight(settings, address=args.address, resume=args.resume,
                            force=args.force)
        if not args.resume:
            check_new_name(settings)
        with loopback_only(address):
            # Ray is imported only once the input is known good.
            from tuning.search.driver import run_search

            return run_search(settings, address=address, resume=args.resume, claim=claim)
    except (UserError, DataError) as err:
        return refuse(err)
    except KeyboardInterrupt:
        from tuning.search.raytune import interrupt_code

        print(f"\ninterrupted; continue with: python -m tuning.search --resume --name {name}",
              file=sys.stderr)
        return interrupt_code()
    finally:
        lock.release()
