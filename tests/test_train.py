"""The single run: config round-trip, exact resume, bad input, and real learning."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tuning.run.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tuning.run.config import ConfigError, RunConfig
from tuning.run.train import main
from tuning.run.trainer import CHECKPOINT_NAME, load_model, train

SHARED_NPZ = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-train-subset.npz"
# Every epoch checkpoints, as the resume tests need; test_checkpoint_cadence tests the interval.
THIN = dict(dataset="digits", width=4, epochs=2, batch_size=64, device="cpu",
            checkpoint_interval_s=0)


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    train(RunConfig(method="ce", shortcut="all", **THIN), out, quiet=True)
    return out / "model.pt"


def test_config_round_trips_through_yaml(tmp_path):
    cfg = RunConfig(method="jointrd", lam=0.01, eta_kind="linear", depth=34, teacher="t.pt")
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert RunConfig.from_yaml(path) == cfg


@pytest.mark.parametrize(("values", "match"), [
    ({"alpha": 1.5}, "alpha must be a number >= 0.0 and <= 1.0"),
    ({"method": "dino"}, "method must be one of ce, kd, alignkd, jointrd"),
    ({"depth": 50}, "depth must be one of 18, 34"),
    ({"lam": -1.0}, "lam must be"),
    ({"epochs": 0}, "epochs must be an integer >= 1"),
    ({"learning_rate": 0.1}, "unknown key 'learning_rate'"),
    ({"dataset": "npz"}, "needs data_path"),
])
def test_bad_config_values_name_the_key(values, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_dict(values)


def test_every_epoch_reports_the_named_metrics(tmp_path, teacher_path):
    seen = []
    final = train(RunConfig(method="alignkd", teacher=str(teacher_path), **THIN), tmp_path,
                  listeners=[lambda m, ckpt: seen.append((m, ckpt is not None and ckpt.exists()))],
                  quiet=True)
    assert [m["epoch"] for m, _ in seen] == [1, 2] and all(ok for _, ok in seen)
    keys = {"val_acc", "train_loss", "loss_kl", "loss_ce", "loss_feat_1", "loss_feat_4", "lr",
            "eta", "epoch_time", "images_per_s", "train_time", "best_val_acc"}
    assert keys <= set(seen[0][0])
    assert seen[0][0]["eta"] == pytest.approx(1.0) and seen[0][0]["images_per_s"] > 0
    assert {"best_val_acc", "last_val_acc", "test_acc", "train_time", "eval_time"} <= set(final)
    net, meta = load_model(tmp_path / "model.pt")
    assert meta["arch"]["shortcut"] == "none" and meta["dataset"] == "digits"


class Stop(Exception):
    pass


@pytest.mark.parametrize("method", ["ce", "jointrd"])
def test_resume_gives_exactly_the_uninterrupted_result(tmp_path, teacher_path, method):
    cfg = RunConfig(method=method, teacher=str(teacher_path), **{**THIN, "epochs": 3})
    full = train(cfg, tmp_path / "full", quiet=True, evaluate_test=False)

    def stop_after_two(metrics, _):
        if metrics["epoch"] == 2:
            raise Stop

    with pytest.raises(Stop):
        train(cfg, tmp_path / "cut", listeners=[stop_after_two], quiet=True)
    resumed = train(cfg, tmp_path / "cut", quiet=True, evaluate_test=False,
                    resume_from=tmp_path / "cut" / CHECKPOINT_NAME)
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["val_acc"] == full["val_acc"] and resumed["train_loss"] == full["train_loss"]


def test_checkpoint_cadence_follows_the_interval_and_the_last_epoch_always_saves(tmp_path):
    """With an interval longer than the run, only the last epoch writes a checkpoint; the
    listeners hear of every epoch, and of the checkpoint only where one was written."""
    heard = []

    def listener(metrics, saved):
        on_disk = (tmp_path / "sparse" / CHECKPOINT_NAME).exists()
        heard.append((metrics["epoch"], saved, on_disk))

    cfg = RunConfig(method="ce", **{**THIN, "epochs": 3, "checkpoint_interval_s": 1e6})
    train(cfg, tmp_path / "sparse", listeners=[listener], quiet=True, evaluate_test=False)
    path = tmp_path / "sparse" / CHECKPOINT_NAME
    assert heard == [(1, None, False), (2, None, False), (3, path, True)]
    assert not path.with_name(CHECKPOINT_NAME + ".prev").exists()  # the only one written
    state = load_checkpoint(path)
    assert state["epoch"] == 3 and [h["epoch"] for h in state["history"]] == [1, 2, 3]

    heard.clear()
    cfg = RunConfig(method="ce", **{**THIN, "epochs": 3})  # interval 0: every epoch
    every = tmp_path / "every" / CHECKPOINT_NAME
    train(cfg, tmp_path / "every", quiet=True, evaluate_test=False,
          listeners=[lambda m, saved: heard.append((m["epoch"], saved))])
    assert heard == [(1, every), (2, every), (3, every)]


def test_resume_retrains_only_the_epochs_after_the_last_checkpoint(tmp_path):
    """A run stopped between checkpoints resumes from the last one; the epochs after it are
    trained again, to exactly the result of the uninterrupted run."""
    cfg = RunConfig(method="ce", **{**THIN, "epochs": 4})
    full = train(cfg, tmp_path / "full", quiet=True, evaluate_test=False)
    cut, ckpt = tmp_path / "cut", tmp_path / "cut" / CHECKPOINT_NAME

    def stop_after(epoch):
        def listener(metrics, _):
            if metrics["epoch"] == epoch:
                raise Stop
        return listener

    with pytest.raises(Stop):  # epochs 1 and 2, each checkpointed
        train(cfg, cut, quiet=True, listeners=[stop_after(2)])
    sparse = RunConfig(method="ce", **{**THIN, "epochs": 4, "checkpoint_interval_s": 1e6})
    heard = []
    with pytest.raises(Stop):  # epoch 3 trains, but writes no checkpoint
        train(sparse, cut, quiet=True, resume_from=ckpt,
              listeners=[lambda m, saved: heard.append((m["epoch"], saved)), stop_after(3)])
    assert heard == [(3, None)] and load_checkpoint(ckpt)["epoch"] == 2
    resumed = train(sparse, cut, quiet=True, evaluate_test=False, resume_from=ckpt,
                    listeners=[lambda m, saved: heard.append((m["epoch"], saved))])
    assert heard[1:] == [(3, None), (4, ckpt)]  # epoch 3 again, then the last one
    assert resumed["val_acc"] == full["val_acc"] and resumed["train_loss"] == full["train_loss"]
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(cut / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_staged_checkpoint_is_a_link_that_a_later_save_does_not_change(tmp_path):
    from tuning.run.checkpoint import staged

    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint({"epoch": 1}, path)
    with staged(path) as folder:
        held = folder / CHECKPOINT_NAME
        assert held.stat().st_ino == path.stat().st_ino  # linked, not copied
        save_checkpoint({"epoch": 2}, path)  # the trainer's next save, while Tune reads
        assert load_checkpoint(held)["epoch"] == 1 and load_checkpoint(path)["epoch"] == 2
    assert not folder.exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        CHECKPOINT_NAME, CHECKPOINT_NAME + ".prev"]


def test_checkpoint_falls_back_to_previous_when_damaged(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"epoch": 1}, path)
    save_checkpoint({"epoch": 2}, path)
    path.write_bytes(path.read_bytes()[:50])  # a truncated newest checkpoint
    with pytest.warns(UserWarning, match="falling back"):
        assert load_checkpoint(path)["epoch"] == 1
    path.with_name("checkpoint.pt.prev").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def run_cli(args, capsys) -> tuple[int, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def test_cli_trains_then_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    code, _ = run_cli(["--method", "ce", "--shortcut", "all", "--width", 4, "--epochs", 1,
                       "--batch-size", 64, "--out", out, "--quiet"], capsys)
    assert code == 0 and (out / "model.pt").exists() and (out / "config.yaml").exists()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    code, err = run_cli(["--method", "ce", "--epochs", 1, "--out", out], capsys)
    assert code == 2 and "already holds a run" in err and "--resume" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_cli_resume_extends_nothing_when_done_and_config_file_works(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: ce\nshortcut: all\nwidth: 4\nepochs: 1\nbatch_size: 64\n")
    code, _ = run_cli(["--config", cfg, "--out", tmp_path / "r", "--quiet", "--seed", 3], capsys)
    assert code == 0
    saved = RunConfig.from_yaml(tmp_path / "r" / "config.yaml")
    assert saved.seed == 3 and saved.width == 4  # flags override the file
    code, _ = run_cli(["--resume", "--out", tmp_path / "r", "--quiet"], capsys)
    assert code == 0


def _bad_npz(tmp_path) -> Path:
    path = tmp_path / "three.npz"
    rng = np.random.default_rng(0)
    np.savez(path, images=rng.integers(0, 255, (60, 32, 32, 3), dtype=np.uint8),
             labels=np.arange(60) % 3)
    return path


@pytest.mark.parametrize("case", [
    "unknown_dataset", "unknown_method", "bad_depth", "missing_cifar", "teacher_classes",
    "teacher_truncated", "teacher_missing", "no_teacher", "resume_missing", "bad_yaml",
    "unknown_flag",
])
def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys,
                                                             teacher_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    base = ["--width", 4, "--epochs", 1, "--out", out, "--quiet"]
    if case == "teacher_classes":
        three = tmp_path / "three"
        cfg = {**THIN, "dataset": "npz", "data_path": str(_bad_npz(tmp_path)), "epochs": 1}
        train(RunConfig(method="ce", shortcut="all", **cfg), three, quiet=True)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(teacher_path.read_bytes()[:1000])
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("method: [alignkd\n")
    args, expect = {
        "unknown_dataset": (["--dataset", "mnist"], "dataset must be one of"),
        "unknown_method": (["--method", "dino"], "method must be one of"),
        "bad_depth": (["--depth", 50], "depth must be one of 18, 34"),
        # Downloads are on by default: --no-download keeps this test off the network.
        "missing_cifar": (["--dataset", "cifar100", "--method", "ce", "--no-download"],
                          "drop --no-download"),
        "teacher_classes": (["--teacher", tmp_path / "three" / "model.pt"],
                            "trained on npz (3 classes) but this run uses digits (10 classes)"),
        "teacher_truncated": (["--teacher", truncated], "truncated or corrupt"),
        "teacher_missing": (["--teacher", tmp_path / "nope.pt"], "does not exist"),
        "no_teacher": (["--method", "jointrd"], "needs a trained teacher"),
        "resume_missing": (["--resume"], "no checkpoint to resume"),
        "bad_yaml": (["--config", bad_yaml], "not valid YAML at line"),
        "unknown_flag": (["--alpah", 0.3], "unrecognized arguments: --alpah"),
    }[case]
    if case == "resume_missing":  # --resume takes no other flags (see the test below)
        base = ["--out", out, "--quiet"]
    code, err = run_cli(base + args, capsys)
    assert code == 2, err
    assert expect in err
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.skipif(not SHARED_NPZ.exists(), reason="the shared CIFAR-10 subset is not present")
def test_resnet_teacher_learns_real_cifar10_well_above_chance(tmp_path):
    cfg = RunConfig(method="ce", shortcut="all", dataset="npz", data_path=str(SHARED_NPZ),
                    width=8, epochs=4, batch_size=64, device="cpu", lr=0.02)
    final = train(cfg, tmp_path, quiet=True)
    assert final["best_val_acc"] > 0.3, final  # chance is 0.1
    assert final["test_acc"] > 0.3, final


@pytest.fixture(scope="module")
def teacher34(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher34")
    train(RunConfig(method="ce", shortcut="all", depth=34, **{**THIN, "epochs": 1}), out,
          quiet=True)
    return out / "model.pt"


@pytest.mark.parametrize(("method", "shortcut", "dirac"), [
    ("alignkd", "none", False), ("jointrd", "downsample", True)])
def test_resnet34_teacher_distils_into_a_plain18_student(tmp_path, teacher34, method, shortcut,
                                                         dirac):
    cfg = RunConfig(method=method, teacher=str(teacher34), teacher_depth=34, depth=18,
                    shortcut=shortcut, dirac=dirac, **{**THIN, "epochs": 1})
    final = train(cfg, tmp_path, quiet=True)
    assert math.isfinite(final["train_loss"])
    _, meta = load_model(tmp_path / "model.pt")
    assert meta["arch"] == {"depth": 18, "shortcut": shortcut, "stem": "cifar",
                            "num_classes": 10, "width": 4, "dirac": dirac,
                            "block": "dirac" if dirac else "plain"}


def test_teacher_depth_must_match_the_teacher(tmp_path, teacher34):
    cfg = RunConfig(method="alignkd", teacher=str(teacher34), teacher_depth=18, **THIN)
    with pytest.raises(CheckpointError, match="is ResNet-34 but teacher_depth is 18"):
        train(cfg, tmp_path, quiet=True)


def test_momentum_is_what_the_config_says_and_what_is_logged(tmp_path):
    """OneCycle cycles momentum against the lr (momentum -> base_momentum at the peak -> back);
    with cycle_momentum false it stays at momentum. The logged value is the optimizer's."""
    from tuning.run.checkpoint import load_checkpoint
    from tuning.run.trainer import train

    base = dict(method="ce", shortcut="all", width=4, epochs=4, batch_size=256, device="cpu",
                checkpoint_interval_s=1e9, data_root=str(tmp_path / "data"))
    logged = {}
    for name, extra in (("cycled", {}), ("flat", {"cycle_momentum": False, "momentum": 0.9})):
        train(RunConfig(**base, **extra), tmp_path / name, quiet=True, evaluate_test=False)
        history = load_checkpoint(tmp_path / name / "checkpoint.pt")["history"]
        logged[name] = [h["momentum"] for h in history]
    assert all(0.85 - 1e-9 <= m <= 0.95 + 1e-9 for m in logged["cycled"])
    assert logged["cycled"][0] < logged["cycled"][-1] == pytest.approx(0.95, abs=5e-3)
    assert logged["flat"] == [0.9] * 4



# ---- bad input found by a hostile tester: each through the CLI, one line, exit 2, nothing
# ---- written.

def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None for folders): what a failed run must keep."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


def _refused(code: int, err: str, expect: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert expect in lines[0], err


def _no_training(monkeypatch):
    """Makes any training fail the test: the checks must come before the work."""
    import tuning.run.train as train_mod

    def trained(*args, **kwargs):
        raise AssertionError("training started before the bad input was refused")

    monkeypatch.setattr(train_mod, "train", trained)


def _model_file(path: Path, *, shortcut: str = "all", width: int = 4, **changes) -> Path:
    """A digits model.pt as the trainer writes it (random weights), with `changes` applied to
    its metadata (None deletes a key)."""
    import types

    from models import resnet
    from tuning.run.trainer import save_model

    data = types.SimpleNamespace(name="digits", num_classes=10, stem="cifar",
                                 classes=[str(i) for i in range(10)], mean=(0.5,) * 3,
                                 std=(0.25,) * 3)
    save_model(resnet(18, shortcut=shortcut, width=width), path, cfg=RunConfig(), data=data,
               metrics={})
    if changes:
        meta = torch.load(path, weights_only=True)
        for key, value in changes.items():
            if value is None:
                meta.pop(key)
            else:
                meta[key] = value
        torch.save(meta, path)
    return path


@pytest.mark.parametrize("where", ["proc", "file", "under_file"])
def test_cli_refuses_an_unwritable_out_before_training(where, tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    monkeypatch.chdir(tmp_path)
    afile = tmp_path / "taken"
    afile.write_text("mine")
    out = {"proc": "/proc/plainkd-run", "file": afile, "under_file": afile / "run"}[where]
    expect = {"proc": "cannot be written", "file": "is a file, not a folder",
              "under_file": "is a file, not a folder"}[where]
    before = _tree(tmp_path)
    code, err = run_cli(["--method", "ce", "--width", 4, "--epochs", 1, "--out", out,
                         "--quiet"], capsys)
    _refused(code, err, expect)
    assert "--out" in err and _tree(tmp_path) == before and afile.read_text() == "mine"
    assert not Path("/proc/plainkd-run").exists()


@pytest.mark.parametrize("flags", [
    ["--seed", 3], ["--epochs=5"], ["--lr", "0.1"], ["--no-compile"], ["--config", "c.yaml"],
    ["--method", "kd", "--teacher", "t.pt"],
])
def test_cli_resume_refuses_every_other_flag(flags, tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    monkeypatch.chdir(tmp_path)
    Path("c.yaml").write_text("method: ce\n")
    before = _tree(tmp_path)
    code, err = run_cli(["--resume", "--out", tmp_path / "run", "--quiet", *flags], capsys)
    _refused(code, err, "--resume continues the run with its saved config")
    assert flags[0].split("=")[0] in err and "--out, --quiet, --no-test" in err
    assert _tree(tmp_path) == before


@pytest.mark.parametrize(("change", "expect"), [
    ({"arch": None}, "has none as its 'arch'"),
    ({"arch": "resnet18"}, "has a str as its 'arch'"),
    ({"arch": {"depth": 18}}, "unusable 'arch'"),
    ({"arch": {"depth": 50, "shortcut": "all", "stem": "cifar", "num_classes": 10, "width": 4,
               "dirac": False}}, "unusable 'arch'"),
    ({"arch": {"depth": 18, "shortcut": "all", "stem": "cifar", "num_classes": 10,
               "width": "4", "dirac": False}}, "unusable 'arch' (bad or missing width)"),
    ({"state_dict": None}, "holds no weights"),
    ({"format": "plainkd-checkpoint/1"}, "not a trained model"),
])
def test_cli_refuses_a_teacher_with_a_bad_arch(change, expect, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    teacher = _model_file(tmp_path / "teacher.pt", **change)
    out = tmp_path / "out"
    code, err = run_cli(["--method", "alignkd", "--teacher", teacher, "--width", 4,
                         "--epochs", 1, "--out", out, "--quiet"], capsys)
    _refused(code, err, expect)
    assert str(teacher) in err and not out.exists()


def test_cli_resume_refuses_a_model_file_as_checkpoint(tmp_path, capsys, teacher_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(RunConfig(method="ce", shortcut="all", **THIN).to_yaml())
    (run / CHECKPOINT_NAME).write_bytes(teacher_path.read_bytes())  # a model.pt in its place
    before = _tree(run)
    code, err = run_cli(["--resume", "--out", run, "--quiet"], capsys)
    _refused(code, err, "is not a checkpoint")
    assert "plainkd-model/1" in err and _tree(run) == before


@pytest.mark.parametrize("method", ["alignkd", "jointrd"])
def test_cli_refuses_a_teacher_of_another_width(method, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    teacher = _model_file(tmp_path / "wide.pt", width=8)
    out = tmp_path / "out"
    code, err = run_cli(["--method", method, "--teacher", teacher, "--width", 4, "--epochs", 1,
                         "--batch-size", 64, "--out", out, "--quiet"], capsys)
    _refused(code, err, "has width 8 but the student's width is 4")
    assert "--width 8" in err and not out.exists()


def test_cli_warns_once_of_a_plain_teacher_and_trains(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    teacher = _model_file(tmp_path / "plain.pt", shortcut="none")
    out = tmp_path / "out"
    code, err = run_cli(["--method", "kd", "--teacher", teacher, "--width", 4, "--epochs", 1,
                         "--batch-size", 64, "--device", "cpu", "--out", out, "--quiet"],
                        capsys)
    assert code == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning:") and "Plain-CNN" in lines[0], err
    assert (out / "model.pt").is_file()


def _npz(path: Path, labels, test_labels=None, n_test: int | None = None) -> Path:
    rng = np.random.default_rng(0)
    labels = np.asarray(labels)
    arrays = {"images": rng.integers(0, 255, (len(labels), 32, 32, 3), dtype=np.uint8),
              "labels": labels}
    if test_labels is not None:
        arrays["test_labels"] = np.asarray(test_labels, dtype=np.int64)
        arrays["test_images"] = rng.integers(0, 255, (len(test_labels), 32, 32, 3),
                                             dtype=np.uint8)
    np.savez(path, **arrays)
    return path


def _bad_crc(path: Path) -> Path:
    """An npz whose 'labels' member fails its CRC: one byte of its data flipped."""
    _npz(path, np.arange(60) % 3)
    raw = bytearray(path.read_bytes())
    # The member's local header comes first (its central directory entry last): 200 bytes on
    # lie past its extra field and .npy header, inside the labels themselves.
    at = raw.find(b"labels.npy") + len(b"labels.npy") + 200
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize(("case", "expect"), [
    ("bad_crc", "has a damaged array"),
    ("sparse", "without a training image"),
    ("negative", "negative labels"),
    ("unseen_test", "classes never seen in training (3)"),
    ("empty", "has no training images"),
])
def test_cli_refuses_bad_npz_labels_and_damage(case, expect, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "set.npz"
    if case == "bad_crc":
        _bad_crc(path)
    elif case == "sparse":
        _npz(path, np.array([0, 1000, 2000] * 20))
    elif case == "negative":
        _npz(path, np.arange(60) % 3 - 1)
    elif case == "unseen_test":
        _npz(path, np.arange(60) % 3, test_labels=[0, 1, 3])
    else:
        _npz(path, np.zeros(0, np.int64))
    out = tmp_path / "out"
    code, err = run_cli(["--method", "ce", "--dataset", "npz", "--data-path", path, "--width", 4,
                         "--epochs", 1, "--out", out, "--quiet"], capsys)
    _refused(code, err, expect)
    assert not out.exists()


def test_cli_warns_once_of_a_one_class_training_set(tmp_path):
    """A real process: the warning reaches stderr as one line, and the run still trains."""
    import subprocess
    import sys

    path = _npz(tmp_path / "one.npz", np.zeros(40, np.int64))
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "tuning.train", "--method", "ce", "--dataset", "npz",
         "--data-path", str(path), "--width", "4", "--epochs", "1", "--device", "cpu",
         "--out", str(tmp_path / "out"), "--quiet"],
        cwd=repo, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning:") and "single class" in lines[0], \
        proc.stderr
    assert (tmp_path / "out" / "model.pt").is_file()


def test_cli_reports_empty_val_and_test_splits_as_none(tmp_path, capsys):
    path = _npz(tmp_path / "no-test.npz", np.arange(40) % 2, test_labels=[])
    out = tmp_path / "out"
    code = main(["--method", "ce", "--dataset", "npz", "--data-path", str(path), "--width", "4",
                 "--epochs", "1", "--val-fraction", "0", "--device", "cpu", "--out", str(out),
                 "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "best val_acc none (last none), test_acc none" in printed, printed
    _, meta = load_model(out / "model.pt")
    assert math.isnan(meta["metrics"]["test_acc"]) and math.isnan(meta["metrics"]["val_acc"])


def test_a_damaged_checkpoint_is_set_aside_not_rotated_over_the_good_one(tmp_path, capsys):
    """Truncate checkpoint.pt and resume: the run falls back to .prev, keeps the damaged file
    as checkpoint.pt.damaged, and .prev stays a loadable checkpoint throughout."""
    out = tmp_path / "run"
    args = ["--method", "ce", "--shortcut", "all", "--width", "4", "--epochs", "3",
            "--batch-size", "256", "--checkpoint-interval-s", "0", "--device", "cpu",
            "--data-root", str(tmp_path / "data"), "--out", str(out), "--quiet", "--no-test"]
    assert main(args) == 0
    ckpt = out / CHECKPOINT_NAME
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # damaged: a truncated zip
    assert main(["--resume", "--out", str(out), "--quiet", "--no-test"]) == 0
    assert "falling back" in capsys.readouterr().err
    assert (out / "checkpoint.pt.damaged").stat().st_size == 1000
    assert load_checkpoint(out / "checkpoint.pt.prev")["epoch"] == 2  # the good fallback
    assert load_checkpoint(ckpt)["epoch"] == 3
