"""Hostile input, second round, through the real commands in real processes.

Every case gets one line naming the problem and the fix, exit code 2, no traceback, and
writes nothing: the folder it ran in holds afterwards exactly what it held before. The cases
are instances of the classes the project refuses (see docs/reliability-and-security.md); the
SIGTERM and interruption cases are in test_hostile.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from faultutil import REPO

pytestmark = pytest.mark.slow


def command(module: str, *args: str, cwd: Path, env: dict | None = None,
            timeout: float = 240) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=timeout)


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def settings_file(folder: Path, text: str) -> None:
    folder.mkdir(parents=True)
    (folder / "search.yaml").write_text(text)


def npz(path: Path, labels, classes=None) -> Path:
    rng = np.random.default_rng(0)
    extra = {} if classes is None else {"classes": classes}
    np.savez(path, images=rng.integers(0, 255, (len(labels), 32, 32, 3), dtype=np.uint8),
             labels=np.asarray(labels), **extra)
    return path


SEARCH = ["--smoke", "--name", "h", "--replicates", "0"]
LONG = "x" * 300


def case_setup(case: str, root: Path) -> tuple[str, list[str], str, dict]:
    """(module, arguments, expected part of the one line, extra environment)."""
    space = root / "space.yaml"
    bodies = {"space_dataset": "params:\n  dataset: {type: choice, values: [cifar10, digits]}",
                "space_teacher_depth": "params:\n  teacher_depth: {type: choice, "
                                       "values: [18, 34]}",
                "space_split_seed": "grid:\n  split_seed: [0, 1]",
                "space_width": "params:\n  width: {type: int, low: 4, high: 8}"}
    if case in bodies:
        space.write_text(f"fixed: {{method: alignkd}}\n{bodies[case]}\n")
    if case.startswith("resume_") or case in ("replicate_bad_yaml", "report_repair_bad_yaml"):
        text = "name: [unclosed\n" if "bad_yaml" in case else (
            (REPO / "tests" / "data" / "search-v1.yaml").read_text())
        settings_file(root / "ray_results" / "h", text)
    if case == "fifo_space":
        os.mkfifo(root / "fifo.yaml")
    if case in ("report_out_is_a_file",):
        (root / "taken").write_text("mine")
    if case == "label_too_large":
        npz(root / "big.npz", [0] * 19 + [10**12])
    if case == "empty_validation":
        npz(root / "tiny.npz", [0, 1] * 10)
    return {
        # 1. a rule of the product, bypassed
        "space_dataset": ("tuning.search", [*SEARCH, "--space", str(space)],
                          "params.dataset: dataset defines what the search compares", {}),
        "space_teacher_depth": ("tuning.search", [*SEARCH, "--space", str(space)],
                                "params.teacher_depth: teacher_depth defines what", {}),
        "space_split_seed": ("tuning.search", [*SEARCH, "--space", str(space)],
                             "grid.split_seed: split_seed defines what", {}),
        "space_width": ("tuning.search", [*SEARCH, "--space", str(space)],
                        "params.width: width defines what", {}),
        "set_method_outside_across": ("tuning.search", [*SEARCH, "--space", "compare", "--set",
                                                        "method=kd"],
                                      "--set method=kd: space compare searches its parameters "
                                      "for method alignkd, jointrd only", {}),
        "set_method_over_fixed": ("tuning.search", [*SEARCH, "--set", "method=jointrd"],
                                  "--set method=jointrd: space alignkd searches its "
                                  "parameters for method alignkd only", {}),
        "replicate_escaping_name": ("tuning.replicate", ["../escape"],
                                    "NAME '../escape' is not a valid search name", {}),
        "rungs_escaping_name": ("tuning.rungs", ["a/../../b"],
                                "NAME 'a/../../b' is not a valid search name", {}),
        "report_escaping_name": ("tuning.report", ["../x", "--repair"],
                                 "NAME '../x' is not a valid search name", {}),
        "secret_optuna_url": ("tuning.search", [*SEARCH, "--optuna-storage",
                                                "postgresql://u:secretpw@127.0.0.1:9/db"],
                              "postgresql://u:***@127.0.0.1:9/db", {}),
        "secret_tracking_url": ("tuning.search", [*SEARCH, "--tracking-uri",
                                                  "http://u:secretpw@127.0.0.1:9"],
                                "http://u:***@127.0.0.1:9", {}),
        # 2. settings that would fail every trial
        "empty_validation": ("tuning.search", [*SEARCH, "--set", "dataset=npz", "--set",
                                               f"data_path={root / 'tiny.npz'}", "--set",
                                               "val_fraction=0.01"],
                             "leaves no validation image", {}),
        "no_validation": ("tuning.search", [*SEARCH, "--set", "val_fraction=0"],
                          "val_fraction 0 of the", {}),
        "label_too_large": ("tuning.search", [*SEARCH, "--set", "dataset=npz", "--set",
                                              f"data_path={root / 'big.npz'}"],
                            "holds the label 1000000000000", {}),
        # 3. input that would be ignored
        "resume_other_teacher_store": ("tuning.search", ["--resume", "--name", "h",
                                                         "--teacher-store", "elsewhere"],
                                       "drop --teacher-store elsewhere", {}),
        "resume_other_data_root": ("tuning.search", ["--resume", "--name", "h", "--data-root",
                                                     "elsewhere"], "drop --data-root", {}),
        "resume_no_download": ("tuning.search", ["--resume", "--name", "h", "--no-download"],
                               "drop --no-download", {}),
        "resume_smoke": ("tuning.search", ["--resume", "--name", "h", "--smoke"],
                         "--smoke starts a new search", {}),
        "epochs_twice": ("tuning.search", [*SEARCH, "--set", "epochs=50", "--epochs", "7"],
                         "--epochs 7 and --set epochs=50 say different things", {}),
        "seed_twice": ("tuning.search", [*SEARCH, "--set", "seed=3", "--seed", "4"],
                       "--seed 4 and --set seed=3 say different things", {}),
        "download_twice": ("tuning.search", [*SEARCH, "--set", "download=true",
                                             "--no-download"],
                           "--no-download and --set download=True say different things", {}),
        # 4. hangs and unbounded reads
        "address_auto_nothing": ("tuning.search", [*SEARCH, "--address", "auto"],
                                 "no Ray cluster answers at 127.0.0.1:9",
                                 {"RAY_ADDRESS": "127.0.0.1:9"}),
        "config_dev_zero": ("tuning.train", ["--config", "/dev/zero"],
                            "config file /dev/zero is a character device, not a file", {}),
        "space_dev_zero": ("tuning.search", [*SEARCH, "--space", "/dev/zero"],
                           "space file /dev/zero is a character device, not a file", {}),
        "fifo_space": ("tuning.search", [*SEARCH, "--space", str(root / "fifo.yaml")],
                       "is a FIFO (named pipe), not a file", {}),
        "data_path_dev_zero": ("tuning.search", [*SEARCH, "--set", "dataset=npz", "--set",
                                                 "data_path=/dev/zero"],
                               "/dev/zero is a character device, not a file", {}),
        "width_2000": ("tuning.search", [*SEARCH, "--set", "width=2000"],
                       "lower the width", {}),
        "width_train": ("tuning.search", [*SEARCH, "--set", "width=100000"],
                        "lower the width", {}),
        # 5. found too late before: before Ray starts, nothing written
        "device_cuda_without_gpu": ("tuning.search", [*SEARCH, "--set", "device=cuda"],
                                    "a trial gets one only with --gpus-per-trial", {}),
        "too_many_cpus": ("tuning.search", [*SEARCH, "--cpus-per-trial", "64"],
                          "--cpus-per-trial 64 asks for more CPUs than this machine has", {}),
        "storage_under_proc": ("tuning.search", [*SEARCH, "--storage-path", "/proc/x"],
                               "nothing can be created in /proc", {}),
        # 7. the other commands
        "report_out_unwritable": ("tuning.report", ["h", "--out", "/proc/x/y"],
                                  "report folder (--out) /proc/x/y cannot be", {}),
        "report_out_is_a_file": ("tuning.report", ["h", "--out", str(root / "taken")],
                                 "is a file, not a folder", {}),
        "report_out_too_long": ("tuning.report", ["h", "--out", str(root / LONG)],
                                "File name too long", {}),
        "rungs_out_too_long": ("tuning.rungs", ["h", "--out", str(root / LONG)],
                               "no search named 'h'", {}),
        "train_out_too_long": ("tuning.train", ["--out", str(root / LONG)],
                               "File name too long", {}),
        "replicate_bad_yaml": ("tuning.replicate", ["h"], "is not valid YAML", {}),
        "report_repair_bad_yaml": ("tuning.report", ["h", "--repair"], "is not valid YAML", {}),
        "replicate_fraction": ("tuning.replicate", ["h", "--replicates", "1.5"],
                               "argument --replicates: invalid int value: '1.5'", {}),
        "bench_threads": ("tuning.bench", ["--threads", "-1", "--quick"],
                          "--threads must be at least 1", {}),
        "bench_overhead_dataset": ("tuning.bench", ["--search-overhead", "--dataset", "bogus"],
                                   "--dataset must be one of", {}),
        "bench_inference_width": ("tuning.bench", ["--inference", "--width", "0"],
                                  "width must be positive", {}),
        "export_huge_batch": ("tuning.export", [str(root / "teacher" / "model.pt"),
                                                "--batch-size", "100000000"],
                              "--batch-size 100000000 at 32 px needs about", {}),
    }[case]


CASES = ["space_dataset", "space_teacher_depth", "space_split_seed", "space_width",
         "set_method_outside_across", "set_method_over_fixed",
         "replicate_escaping_name", "rungs_escaping_name", "report_escaping_name",
         "secret_optuna_url", "secret_tracking_url", "empty_validation", "no_validation",
         "label_too_large", "resume_other_teacher_store", "resume_other_data_root",
         "resume_no_download", "resume_smoke", "epochs_twice", "seed_twice", "download_twice",
         "address_auto_nothing", "config_dev_zero", "space_dev_zero", "fifo_space",
         "data_path_dev_zero", "width_2000", "width_train", "device_cuda_without_gpu",
         "too_many_cpus", "storage_under_proc", "report_out_unwritable",
         "report_out_is_a_file", "report_out_too_long", "rungs_out_too_long",
         "train_out_too_long", "replicate_bad_yaml", "report_repair_bad_yaml",
         "replicate_fraction", "bench_threads", "bench_overhead_dataset",
         "bench_inference_width", "export_huge_batch"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny trained model for the export case."""
    root = tmp_path_factory.mktemp("teacher")
    done = command("tuning.train", "--method", "ce", "--shortcut", "all", "--width", "4",
                   "--epochs", "1", "--out", str(root / "teacher"), "--quiet", cwd=root)
    assert done.returncode == 0, done.stderr
    return root / "teacher"


@pytest.mark.parametrize("case", CASES)
def test_hostile_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, teacher):
    if case == "export_huge_batch":
        import shutil

        shutil.copytree(teacher, tmp_path / "teacher")
    module, args, expect, env = case_setup(case, tmp_path)
    before = tree(tmp_path)
    done = command(module, *args, cwd=tmp_path, env=env)
    err = done.stderr.strip()
    assert done.returncode == 2, (done.returncode, done.stdout[-2000:], err[-3000:])
    assert "Traceback" not in done.stdout + err, err[-3000:]
    lines = err.splitlines()
    assert len(lines) == 1 and expect in lines[0], lines
    assert "secretpw" not in done.stdout + err
    assert tree(tmp_path) == before  # nothing written, nothing downloaded, no lock file


def test_the_smoke_search_says_which_of_its_defaults_lost(tmp_path):
    """An explicit value beats a smoke default, and the console says so; here the search is
    then refused (an unreachable tracking server), so the case costs no training."""
    done = command("tuning.search", "--smoke", "--name", "h", "--epochs", "2", "--set",
                   "width=4", "--tracking-uri", "http://127.0.0.1:9", cwd=tmp_path)
    assert done.returncode == 2
    assert "smoke: width 4 (from --set), not the smoke search's 8" in done.stdout
    assert "smoke: epochs 2 (given), not the smoke search's 4" in done.stdout


def test_a_search_that_fails_before_its_first_trial_leaves_its_name_free(tmp_path):
    """A damaged teacher in the store fails the teacher phase, after Ray started and the
    search's records were opened: the same command then fails the same way, not with "the
    name exists", and nothing of the search is left but the store."""
    first = command("tuning.search", "--smoke", "--name", "free", "--replicates", "0",
                    "--set", "depth=18", "--teacher-epochs", "1", cwd=tmp_path, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    model = next((tmp_path / "teachers").glob("*/model.pt"))
    model.write_bytes(b"PK\x03\x04 damaged")
    for name in ("broken", "broken"):
        again = command("tuning.search", "--smoke", "--name", name, "--replicates", "0",
                        "--set", "depth=18", "--teacher-epochs", "1", "--optuna-storage",
                        f"sqlite:///{tmp_path / 'optuna.db'}", cwd=tmp_path, timeout=600)
        assert again.returncode == 2, again.stdout[-2000:] + again.stderr[-2000:]
        assert "truncated or corrupt" in again.stderr and "already" not in again.stderr
        assert "its name is free again" in again.stdout
        assert not (tmp_path / "ray_results" / "broken").exists()
        assert not (tmp_path / "ray_results" / ".broken.lock").exists()


def test_ctrl_c_during_a_benchmark_is_one_line(tmp_path):
    """A command that writes its results at its end (here the training-step benchmark):
    Ctrl-C, sent to the whole group as a terminal does, mid-run gives one line, exit 130, no
    traceback, and no results file."""
    import signal

    from faultutil import kill_group, spawn, wait_for

    def cpu_seconds(pid: int) -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    log = tmp_path / "bench.log"
    out = tmp_path / "train.json"
    proc = spawn(["-m", "tuning.bench", "--device", "cpu", "--configs", "18x32", "--methods",
                  "ce", "--width", "4", "--batch-size", "8", "--steps", "1000000", "--out",
                  str(out)], log, cwd=tmp_path)  # a benchmark that would run for hours
    try:
        # Well into the benchmark: its imports take about 2 s of CPU, the rest is timing.
        wait_for(lambda: cpu_seconds(proc.pid) > 8, 180, proc, log)
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        kill_group(proc)
    text = log.read_text()
    assert code == 130, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert text.strip().splitlines()[-1] == "interrupted before the command finished: run it again"
    assert not out.exists()
