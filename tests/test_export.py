"""Export (TorchScript, ONNX) of saved models, and the inference benchmark's accounting."""

import io
import json
import types
import warnings
from pathlib import Path

import pytest
import torch
from netutil import randomize as _randomize
from torch import nn

from models import resnet
from tuning.measure import export as export_mod
from tuning.measure import inference
from tuning.run.config import RunConfig
from tuning.run.trainer import MODEL_NAME, save_model


def _saved(tmp_path: Path, shortcut: str, dirac: bool) -> tuple[nn.Module, Path]:
    """A thin random network written by the trainer's own save_model, in a run directory."""
    net = _randomize(resnet(18, shortcut=shortcut, width=4, dirac=dirac)).eval()
    data = types.SimpleNamespace(name="digits", num_classes=10, stem="cifar",
                                 classes=[str(i) for i in range(10)], mean=(0.5,) * 3,
                                 std=(0.25,) * 3)
    run = tmp_path / "run"
    save_model(net, run / MODEL_NAME, cfg=RunConfig(), data=data,
               metrics={"test_acc": 0.5, "val_acc": float("nan")})
    return net, run


def _load_ts(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(io.BytesIO(path.read_bytes()))


@pytest.mark.parametrize(("shortcut", "dirac"), [("none", True), ("all", False)])
def test_torchscript_export_equals_the_trained_network(tmp_path, monkeypatch, shortcut, dirac):
    # ONNX is exported (and checked) in its own test; here it must not depend on onnx.
    monkeypatch.setattr(export_mod, "to_onnx", _no_onnx)
    net, run = _saved(tmp_path, shortcut, dirac)
    assert export_mod.main([str(run), "--batch-size", "2"]) == 0
    out = run / "export"
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.ts"]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(_load_ts(out / "model.ts")(x), net(x), rtol=1e-4, atol=1e-5)
    report = json.loads((out / "export.json").read_text())
    assert report["arch"]["shortcut"] == shortcut and report["source"] == str(run / MODEL_NAME)
    # A Dirac student's 16 block convs are Dirac; its stem conv is plain.
    assert report["folded"] == {"batchnorm": 17 + (3 if shortcut == "all" else 0),
                                "dirac": 16 if dirac else 0, "repconv": 0}
    assert report["layers_after"]["batchnorm"] == report["layers_after"]["dirac"] == 0
    assert report["check"]["torchscript"]["ok"] and report["check"]["folded_eager"]["ok"]
    assert "pip install onnx onnxscript" in report["check"]["onnx"]["skipped"]
    assert report["metrics"] == {"test_acc": 0.5}


def _no_onnx(net, x):
    raise ModuleNotFoundError("No module named 'onnxscript'")


@pytest.mark.parametrize(("shortcut", "dirac"), [("none", True), ("all", False)])
def test_onnx_export_runs_in_onnxruntime_with_any_batch(tmp_path, shortcut, dirac):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    net, run = _saved(tmp_path, shortcut, dirac)
    out = tmp_path / "exported"
    assert export_mod.main([str(run / MODEL_NAME), "--out", str(out)]) == 0
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32)
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        with torch.no_grad():
            torch.testing.assert_close(got, net(x), rtol=1e-4, atol=1e-5)
    assert json.loads((out / "export.json").read_text())["check"]["onnx"]["ok"]


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage", "empty_run_dir"])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, damage):
    _, run = _saved(tmp_path, "none", False)
    model = run / MODEL_NAME
    if damage == "missing":
        model.unlink()
        source = model
    elif damage == "truncated":
        model.write_bytes(model.read_bytes()[:500])
        source = model
    elif damage == "garbage":
        model.write_bytes(b"not a model at all" * 10)
        source = run
    else:
        model.unlink()
        source = run
    out = tmp_path / "out"
    capsys.readouterr()
    assert export_mod.main([str(source), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "model.pt" in err[0]
    assert not out.exists() and not (run / "export").exists()


def test_outputs_that_differ_exit_1_and_write_nothing(tmp_path, monkeypatch):
    _, run = _saved(tmp_path, "all", False)
    real_fold = export_mod.fold_batchnorm

    def broken_fold(net):
        folded = real_fold(net)
        with torch.no_grad():
            folded.fc.bias.add_(1.0)
        return folded

    monkeypatch.setattr(export_mod, "fold_batchnorm", broken_fold)
    monkeypatch.setattr(export_mod, "to_onnx", _no_onnx)
    assert export_mod.main([str(run)]) == 1
    assert not (run / "export").exists()


class _Toy(nn.Module):
    """Two blocks of conv-relu-conv(+x)-relu with C=4 channels, 8x8 maps."""

    def __init__(self, skip: bool) -> None:
        super().__init__()
        self.skip = skip
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(4))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in range(2):
            out = self.convs[2 * b + 1](self.relu(self.convs[2 * b](x)))
            x = self.relu(out + x if self.skip else out)
        return x


def test_activation_memory_of_a_toy_by_hand():
    # One map is B = 2*4*8*8 floats = 2048 bytes. Plain: a conv's input and output are the
    # only live maps, so the peak is 2B. Skip: during the second conv of a block the block
    # input, the first conv's output and the second's are live: 3B. Each block writes
    # conv, relu_, conv, relu_ (4B), plus the addition with the skip (5B).
    b = 2 * 4 * 8 * 8 * 4
    plain = inference.activation_memory(_Toy(False), (2, 4, 8, 8))
    skip = inference.activation_memory(_Toy(True), (2, 4, 8, 8))
    assert plain["peak_activation_bytes"] == 2 * b
    assert skip["peak_activation_bytes"] == 3 * b
    assert plain["feature_bytes_written"] == 8 * b
    assert skip["feature_bytes_written"] == 10 * b


def test_plain_net_peaks_lower_than_its_resnet():
    # CIFAR stem, width 8: layer1's maps are 8x32x32; the ResNet holds three, the plain two.
    b = 2 * 8 * 32 * 32 * 4
    res = inference.activation_memory(resnet(18, shortcut="all", width=8).eval(), (2, 3, 32, 32))
    plain = inference.activation_memory(resnet(18, shortcut="none", width=8).eval(),
                                        (2, 3, 32, 32))
    assert plain["peak_activation_bytes"] == 2 * b < res["peak_activation_bytes"] == 3 * b
    assert plain["feature_bytes_written"] < res["feature_bytes_written"]
    assert res["part_peak_bytes"]["layer1"] == 3 * b and plain["part_peak_bytes"]["layer1"] == 2 * b


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


def _one_line_2(argv: list[str], capsys, expect: str) -> str:
    capsys.readouterr()
    assert export_mod.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and expect in err[0], err
    return err[0]


RUN_ID = "0123456789abcdef0123456789abcdef"


def test_unknown_run_id_without_a_tracking_store_creates_nothing(tmp_path, capsys,
                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for arg in (RUN_ID, f"runs:/{RUN_ID}"):
        line = _one_line_2([arg], capsys, "there is no MLflow tracking store at sqlite:///")
        assert "mlflow.db does not exist" in line
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(tmp_path / "mlruns"))  # a file store
    _one_line_2([RUN_ID], capsys, "there is no MLflow tracking store")
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no mlruns/, no exports/


def test_unknown_run_id_in_an_existing_store_creates_no_exports_folder(tmp_path, capsys,
                                                                       monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    run = c.create_run(c.create_experiment("e", artifact_location=(tmp_path / "art").as_uri()))
    before = _tree(tmp_path)
    _one_line_2([RUN_ID], capsys, f"there is no MLflow run {RUN_ID}")
    # A run that exists but holds no model.pt is refused as well, and creates nothing.
    _one_line_2([run.info.run_id], capsys, "has no model.pt artifact")
    assert _tree(tmp_path) == before and not (tmp_path / "exports").exists()


@pytest.mark.parametrize("where", ["file", "proc", "under_file"])
def test_an_unwritable_out_is_refused_before_exporting(tmp_path, capsys, monkeypatch, where):
    _, run = _saved(tmp_path, "none", False)

    def exported(*args, **kwargs):
        raise AssertionError("exported before the bad --out was refused")

    monkeypatch.setattr(export_mod, "fold_batchnorm", exported)
    taken = tmp_path / "taken"
    taken.write_text("mine")
    out = {"file": taken, "proc": Path("/proc/plainkd-export"), "under_file": taken / "x"}[where]
    before = _tree(tmp_path)
    line = _one_line_2([str(run), "--out", str(out)], capsys, "export folder (--out)")
    assert ("is a file" in line) if where != "proc" else ("cannot be written" in line)
    assert _tree(tmp_path) == before


@pytest.mark.parametrize(("change", "expect"), [
    ({"arch": None}, "has none as its 'arch'"),
    ({"arch": {"depth": 18}}, "unusable 'arch'"),
])
def test_a_model_file_with_a_bad_arch_is_one_line(tmp_path, capsys, change, expect):
    _, run = _saved(tmp_path, "none", False)
    meta = torch.load(run / MODEL_NAME, weights_only=True)
    meta.update(change)
    torch.save(meta, run / MODEL_NAME)
    _one_line_2([str(run)], capsys, expect)
    assert not (run / "export").exists()


def test_a_bad_flag_is_one_line(capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        export_mod.main(["x", "--formats", "gif"])
    assert exit_.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
