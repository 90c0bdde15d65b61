"""Every check that can refuse a search, run before Ray starts and before anything is written.

A refused search gets one line naming the problem and the fix (a UserError), exit code 2, and
leaves no file behind. `preflight` runs them in order; the command line then takes the
search's name lock and starts it.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

from data import check_splits, load_arrays
from tuning.run.config import RunConfig, UserError
from tuning.search import storage, warmstart
from tuning.search.settings import SearchSettings
from tuning.search.space import RUN_KEYS, Space
from tuning.search.teachers import plan_teachers
from tuning.search.tracking import check_reachable


def preflight(settings: SearchSettings, *, address: str | None, resume: bool,
              force: bool) -> str | None:
    """The search's input, its devices and resources, every store it will open, the size of
    its networks, then its data: the one check that may download (into --data-root) runs
    last, once everything else is known good. The cluster's address, resolved."""
    address = check_address(address)
    space = settings.space()
    check_devices(space, settings, address)
    check_teacher(space)
    plan_teachers(space, settings.teacher_epochs)  # a range it cannot plan: one line
    check_reachable(settings.tracking_uri)
    check_optuna_storage(settings.optuna_storage)
    for flag, where in (("--storage-path", settings.storage_path),
                        ("--teacher-store", settings.teacher_store)):
        problem = storage.check_writable(where)
        if problem:
            raise UserError(f"{flag} {where} is not writable ({problem}); choose a folder "
                            "(or a bucket) you can write to")
    check_memory(space, settings)
    if settings.proxy_width:  # the replicates train at the space's own width
        target = settings.target_space()
        check_teacher(target)
        plan_teachers(target, settings.teacher_epochs)
        check_memory(target, settings)
    if not resume:
        warmstart.plan(settings, space)  # a search it cannot start from: one line
        check_space_free(space, settings, force)
    check_data(space)
    return address


def check_address(address: str | None) -> str | None:
    """The cluster to join, checked to answer within seconds; one line naming the address
    that does not. `auto` is resolved as Ray resolves it (RAY_ADDRESS, else the cluster
    `ray start --head` last started on this machine)."""
    if not address or "://" in address:
        return address
    if address == "auto":
        from ray._private.services import find_bootstrap_address, find_gcs_addresses

        found = os.environ.get("RAY_ADDRESS") or find_bootstrap_address(None) or next(
            iter(find_gcs_addresses()), None)
        if not found:
            raise UserError("--address auto finds no Ray cluster: RAY_ADDRESS is not set and "
                            "no `ray start --head` runs on this machine; start one, or pass "
                            "its address as HOST:PORT")
        address = found
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except (OSError, ValueError):
        raise UserError(f"no Ray cluster answers at {address} (--address); start one with "
                        "`ray start --head` or fix the address") from None
    return address


def local_cpus() -> int:
    """The CPUs this process may use (its affinity), as a local Ray counts them."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)


def check_devices(space: Space, settings: SearchSettings, address: str | None) -> None:
    """A trial must get what it asks for: GPUs this machine has, a CUDA device only with a
    GPU to run on, and no more CPUs than the machine has; else it would wait for ever, or
    fail in every trial. A cluster's resources are checked once it is joined."""
    devices = {str(d) for d in space.values_of("device")} or {RunConfig.device}
    cuda = sorted(d for d in devices if d.startswith("cuda"))
    if cuda and settings.gpus_per_trial <= 0:
        raise UserError(f"--set device={cuda[0]} asks for a GPU, but a trial gets one only "
                        "with --gpus-per-trial > 0; pass --gpus-per-trial, or drop "
                        f"--set device={cuda[0]}")
    if address:
        return
    import torch

    have = torch.cuda.device_count()
    if settings.gpus_per_trial > 0 and (have == 0 or settings.gpus_per_trial > have):
        raise UserError(f"--gpus-per-trial {settings.gpus_per_trial:g} asks for more GPUs "
                        f"than this machine has ({have}); pass --gpus-per-trial 0 to train on "
                        "the CPU, or join a cluster with GPUs (--address)")
    if settings.cpus_per_trial > local_cpus():
        raise UserError(f"--cpus-per-trial {settings.cpus_per_trial:g} asks for more CPUs "
                        f"than this machine has ({local_cpus()}); lower it, or join a "
                        "cluster (--address)")


def network_parameters(space: Space) -> list[int]:
    """The parameter count of each cell's student, counted on PyTorch's meta device: the
    networks' shapes alone, without their memory."""
    import torch

    from models import resnet
    from tuning.search.space import trial_values

    counts = []
    for cell in space.cells():
        cfg = RunConfig(**trial_values(space, cell.as_dict()))
        classes = 100 if cfg.dataset == "cifar100" else 10
        with torch.device("meta"):
            net = resnet(cfg.depth, shortcut=cfg.shortcut, num_classes=classes,
                         width=cfg.width, stem="imagenet" if cfg.dataset == "imagewoof"
                         else "cifar", block=cfg.block)
        counts.append(sum(p.numel() for p in net.parameters()))
    return counts


def check_memory(space: Space, settings: SearchSettings) -> None:
    """Refuse networks that cannot fit, before any is built: each trial holds its student's
    weights, gradients and momentum and a teacher of about its size (4 copies, float32)."""
    from data.files import available_memory

    largest = max(network_parameters(space))
    need = 4 * 4 * largest
    if settings.gpus_per_trial > 0:
        import torch

        if not torch.cuda.is_available():
            return  # a cluster's GPUs: the trials meet them there
        total = torch.cuda.get_device_properties(0).total_memory
        have = total * min(1.0, settings.gpus_per_trial)
        where = f"{min(1.0, settings.gpus_per_trial):g} of a {total / 2**30:.0f} GB GPU"
    else:
        have = available_memory()
        if have is None:
            return
        running = settings.max_concurrent or max(1, int(local_cpus() //
                                                        settings.cpus_per_trial))
        need *= running
        where = f"the {have / 2**30:.1f} GB this machine has free, for {running} trial(s) at once"
    if need > have:
        widths = space.values_of("width") or (RunConfig.width,)
        raise UserError(f"the networks (width {', '.join(map(str, widths))}) have up to "
                        f"{largest / 1e6:,.0f} M parameters and need about "
                        f"{need / 2**30:.1f} GB for weights, gradients, momentum and teacher "
                        f"alone, more than {where}; lower the width (--set width=...)")


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


def check_data(space: Space) -> None:
    """Every data set the space can ask for must be loadable, and every split of it that a
    trial can use must leave training and validation images of every class, before any trial
    starts."""
    for name in space.values_of("dataset") or (RunConfig.dataset,):
        values = {k: v for k, v in space.fixed.items() if k in RUN_KEYS}
        cfg = RunConfig.from_dict({**values, "dataset": name}, source="the search's settings")
        arrays = load_arrays(name, cfg.data_root, download=cfg.download, **cfg.data_options())
        label = Path(cfg.data_path).stem if cfg.data_options() else name
        for val_fraction in space.values_of("val_fraction") or (cfg.val_fraction,):
            for split_seed in space.values_of("split_seed") or (cfg.split_seed,):
                check_splits(arrays, val_fraction, split_seed, name=label, need_val=True,
                             need_test=True)


def check_teacher(space: Space) -> None:
    """A teacher fixed for every trial must fit every data set the space can ask for."""
    path = space.fixed.get("teacher")
    if not path:
        return
    from tuning.run.trainer import FEATURE_METHODS, load_model

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


def expected_storage(space: Space, settings: SearchSettings) -> tuple[int, str]:
    """Bytes a search leaves on disk, and how they add up.

    Every trial and replicate ends with one checkpoint in Tune's storage (weights and
    momentum) and one model in MLflow's artifacts; each running trial briefly holds one more
    checkpoint in storage and three in its local folder; each teacher, a checkpoint and a
    model.
    """
    sizes = [4 * n for n in network_parameters(space)]
    arms = 2 if settings.baseline != "none" else 1
    per_cell = settings.trials_per_cell + arms * settings.replicates
    ended = sum(3 * size * per_cell for size in sizes)  # a checkpoint (2x) and a model each
    trials = len(sizes) * settings.trials_per_cell
    running = settings.max_concurrent or max(1, (os.cpu_count() or 1))
    largest = max(sizes)
    total = ended + min(running, trials) * 4 * 2 * largest + 2 * len(sizes) * 3 * largest
    return total, (f"{trials} trials and {len(sizes) * arms * settings.replicates} "
                   f"replicates, models of {min(sizes) / 2**20:.1f}-{largest / 2**20:.1f} MB "
                   f"and checkpoints twice that, {running} running at once")


def check_space_free(space: Space, settings: SearchSettings, force: bool) -> None:
    """Print what the search will need; refuse when the storage's disk clearly lacks it."""
    need, how = expected_storage(space, settings)
    print(f"storage: about {need / 2**30:.2f} GB ({how})", flush=True)
    path = settings.storage_path
    if storage.is_uri(path) or force:
        return
    probe = Path(path)
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise UserError(f"the search needs about {need / 2**30:.1f} GB ({how}) but only "
                        f"{free / 2**30:.1f} GB are free under {path}; free some, lower "
                        "--num-samples or the width, or pass --force")


def check_name_free(settings: SearchSettings) -> None:
    """A new search's name must not already name a search in the tracking store or in the
    study storage (another --storage-path may hold it): the two would share their records."""
    name, fix = settings.name, "pass a new --name, or --resume to continue that search"
    url = settings.optuna_storage
    if not url.startswith("sqlite:///") or Path(url.removeprefix("sqlite:///")).is_file():
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            names = [s.study_name for s in optuna.storages.RDBStorage(url).get_all_studies()]
        except Exception:  # noqa: BLE001 - check_optuna_storage names the problem
            names = []
        if any(n.startswith(f"{name}/") for n in names):
            raise UserError(f"the study storage {url} already holds a search named {name!r}; "
                            f"{fix}")
    uri = settings.tracking_uri
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
