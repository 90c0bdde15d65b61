"""RunConfig's checks of every field's type, through the CLI's --config and a run's saved
config.yaml: one line, exit 2, nothing written."""

from pathlib import Path

import pytest

import tuning.run.train as train_mod
from tuning.run.config import ConfigError, RunConfig
from tuning.run.train import main


@pytest.fixture(autouse=True)
def no_training(monkeypatch):
    """Every case here is refused before any training (the one good case trains nothing)."""
    calls = []
    monkeypatch.setattr(train_mod, "train", lambda cfg, *a, **k: calls.append(cfg) or {
        "best_val_acc": 0.5, "last_val_acc": 0.5, "train_time": 0.0, "eval_time": 0.0})
    return calls


def run_cli(args, capsys) -> tuple[int, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


BAD_FILES = {
    "seed_text": ("seed: abc\n", "seed must be an integer; got 'abc'"),
    "seed_bool": ("seed: true\n", "seed must be an integer; got True"),
    "split_seed_float": ("split_seed: 1.5\n", "split_seed must be an integer"),
    "seed_negative": ("seed: -1\n", "seed must be an integer >= 0"),
    "device_number": ("device: 3\n", "device must be a string; got 3"),
    "data_root_list": ("data_root: [1, 2]\n", "data_root must be a string; got [1, 2]"),
    "teacher_number": ("teacher: 5\n", "teacher must be a string or null; got 5"),
    "data_path_map": ("data_path: {a: 1}\n", "data_path must be a string or null"),
    "depth_float": ("depth: 18.0\n", "depth must be an integer; got 18.0"),
    "teacher_depth_text": ("teacher_depth: big\n", "teacher_depth must be an integer or null"),
    "compile_maybe": ("compile: maybe\n", "compile must be true or false; got 'maybe'"),
    "download_number": ("download: 1\n", "download must be true or false; got 1"),
    "lr_text": ("lr: fast\n", "lr must be a number; got 'fast'"),
    "lr_null": ("lr:\n", "lr must be a number; got None"),
    "alpha_bool": ("alpha: true\n", "alpha must be a number or null; got True"),
    "beta_list": ("beta: [1]\n", "beta must be a number or null"),
    "extra_list": ("extra: [1]\n", "extra must be a mapping"),
    "block_number": ("block: 3\n", "block must be a string or null; got 3"),
    "block_unknown": ("block: vgg\n", "block must be one of plain, dirac, repvgg"),
    "block_repvgg_shortcut": ("block: repvgg\nshortcut: all\n",
                              "pass shortcut none with block repvgg"),
    "dirac_contradicts_block": ("dirac: true\nblock: repvgg\n",
                                "dirac: true contradicts block: repvgg"),
    "unknown_key": ("learning_rate: 0.1\n", "unknown key 'learning_rate'"),
    "number_key": ("1: 2\nmethod: ce\n", "unknown key 1"),
    "not_mapping": ("- method\n", "must hold a mapping"),
    "empty": ("", "is empty"),
    "comments_only": ("# nothing yet\n", "is empty"),
    "truncated": ("method: ce\nlr: 0.0\nteacher: 'runs/t", "not valid YAML"),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "is not UTF-8 text"),
    "python_tag": ("method: !!python/object:os.system ls\n", "not valid YAML"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_config_file_is_one_line_exit_2(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    content, expect = BAD_FILES[case]
    path = tmp_path / "c.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = _tree(tmp_path)
    code, err = run_cli(["--config", path, "--out", tmp_path / "out", "--quiet"], capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], err
    assert _tree(tmp_path) == before


def test_a_folder_or_missing_file_as_config_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    for path, expect in ((tmp_path / "folder", "is a folder, not a file"),
                         (tmp_path / "nope.yaml", "does not exist")):
        code, err = run_cli(["--config", path, "--out", tmp_path / "out"], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and expect in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


@pytest.mark.parametrize(("content", "expect"), [
    ("method: ce\nseed: abc\n", "seed must be an integer"),
    ("", "is empty"),
    (b"\xff\xfe\x00", "is not UTF-8 text"),
])
def test_a_runs_damaged_config_yaml_is_one_line_on_resume(content, expect, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"whatever")  # never read: the config is refused first
    (run / "config.yaml").write_bytes(content if isinstance(content, bytes) else
                                      content.encode())
    before = _tree(run)
    code, err = run_cli(["--resume", "--out", run, "--quiet"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and expect in err, err
    assert "config.yaml" in err and _tree(run) == before


def test_numbers_written_as_text_are_floats_in_float_fields_only(tmp_path, capsys,
                                                                 no_training):
    """YAML reads 1e-3 as a string; a float field takes it as the number it spells."""
    path = tmp_path / "c.yaml"
    path.write_text("method: ce\nlr: 1e-3\nweight_decay: 5E-4\nbeta: '2.5e+1'\nalpha: '.5'\n")
    code, err = run_cli(["--config", path, "--out", tmp_path / "out", "--quiet"], capsys)
    assert code == 0, err
    cfg = no_training[0]
    assert (cfg.lr, cfg.weight_decay, cfg.beta, cfg.alpha) == (1e-3, 5e-4, 25.0, 0.5)
    assert isinstance(cfg.lr, float)
    # An int field takes no text, nor a float field text that is not a number.
    for values, expect in (({"seed": "1e3"}, "seed must be an integer"),
                           ({"epochs": "10"}, "epochs must be an integer"),
                           ({"lr": "1e-3x"}, "lr must be a number"),
                           ({"lr": "nan"}, "lr must be a number"),
                           ({"method": "1e-3"}, "method must be one of")):
        with pytest.raises(ConfigError, match=expect):
            RunConfig.from_dict(values)


def test_negative_text_numbers_are_still_range_checked():
    with pytest.raises(ConfigError, match="lr must be a number > 0.0"):
        RunConfig.from_dict({"lr": "-1e-3"})
    assert RunConfig.from_dict({"checkpoint_interval_s": "1e3"}).checkpoint_interval_s == 1000.0
