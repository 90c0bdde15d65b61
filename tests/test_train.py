"""The single run: config round-trip, exact resume, bad input, and real learning."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tuning.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tuning.config import ConfigError, RunConfig
from tuning.train import main
from tuning.trainer import CHECKPOINT_NAME, load_model, train

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
    from tuning.checkpoint import staged

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
        "missing_cifar": (["--dataset", "cifar100", "--method", "ce"], "--download"),
        "teacher_classes": (["--teacher", tmp_path / "three" / "model.pt"],
                            "trained on npz (3 classes) but this run uses digits (10 classes)"),
        "teacher_truncated": (["--teacher", truncated], "truncated or corrupt"),
        "teacher_missing": (["--teacher", tmp_path / "nope.pt"], "does not exist"),
        "no_teacher": (["--method", "jointrd"], "needs a trained teacher"),
        "resume_missing": (["--resume"], "no checkpoint to resume"),
        "bad_yaml": (["--config", bad_yaml], "not valid YAML at line"),
        "unknown_flag": (["--alpah", 0.3], "unrecognized arguments: --alpah"),
    }[case]
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
                            "num_classes": 10, "width": 4, "dirac": dirac}


def test_teacher_depth_must_match_the_teacher(tmp_path, teacher34):
    cfg = RunConfig(method="alignkd", teacher=str(teacher34), teacher_depth=18, **THIN)
    with pytest.raises(CheckpointError, match="is ResNet-34 but teacher_depth is 18"):
        train(cfg, tmp_path, quiet=True)


def test_momentum_is_what_the_config_says_and_what_is_logged(tmp_path):
    """OneCycle cycles momentum against the lr (momentum -> base_momentum at the peak -> back);
    with cycle_momentum false it stays at momentum. The logged value is the optimizer's."""
    from tuning.checkpoint import load_checkpoint
    from tuning.trainer import train

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

