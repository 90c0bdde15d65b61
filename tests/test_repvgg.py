"""RepVGG students: the folding against hand-summed kernels, whole networks, training, export."""

import io
import json
import math
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from netutil import randomize as _randomize
from torch import nn

from models import RepConv, fold_batchnorm, fold_repconv, fold_repvgg, resnet
from tuning.measure import export as export_mod
from tuning.run.config import ConfigError, RunConfig
from tuning.run.trainer import (
    CHECKPOINT_NAME,
    MODEL_NAME,
    load_model,
    model_from_checkpoint,
    save_model,
    train,
)

SHAPES = [(8, 8, 1), (8, 8, 2), (4, 8, 1), (8, 16, 2)]  # (cin, cout, stride)


def _max_rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def _trained_repconv(cin: int, cout: int, stride: int, seed: int = 0) -> RepConv:
    """A RepConv whose BatchNorms hold random affine parameters and running statistics that
    train-mode passes over shifted, scaled random data moved away from their defaults."""
    torch.manual_seed(seed)
    m = _randomize(RepConv(cin, cout, stride), seed=seed)
    for bn in [x for x in m.modules() if isinstance(x, nn.BatchNorm2d)]:
        bn.momentum = 0.5
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(16, cin, 9, 9) * 2.0 + 0.5)
    return m.eval()


@pytest.mark.parametrize(("cin", "cout", "stride"), SHAPES)
def test_fold_repconv_equals_the_branches_in_eval_mode(cin, cout, stride):
    m = _trained_repconv(cin, cout, stride)
    assert (m.identity is not None) == (cin == cout and stride == 1)
    folded = fold_repconv(m)
    assert type(folded) is nn.Conv2d and folded.bias is not None
    assert folded.kernel_size == (3, 3) and folded.stride == (stride, stride)
    assert folded.padding == (1, 1) and folded.weight.shape == (cout, cin, 3, 3)
    x = torch.randn(4, cin, 11, 11)
    with torch.no_grad():
        ref, out = m(x), folded(x)
    assert out.shape == ref.shape and _max_rel(out, ref) < 1e-5
    assert m.training is False  # folding reads the running statistics, it trains nothing


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as x * scale + shift, per channel, in float64."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return scale, bn.bias.double() - bn.running_mean.double() * scale


@pytest.mark.parametrize(("cin", "cout", "stride"), SHAPES)
def test_repconv_is_one_conv_with_the_hand_summed_kernel(cin, cout, stride):
    """Computed here, not by fold_repconv: K = s3*W3 + pad(s1*W1) + s_id*I, with I the
    centre-tap identity, and b the three BatchNorm shifts summed."""
    m = _trained_repconv(cin, cout, stride, seed=1).double()
    s3, t3 = _bn_affine(m.dense.bn)
    s1, t1 = _bn_affine(m.pointwise.bn)
    kernel = s3.view(-1, 1, 1, 1) * m.dense.conv.weight.double()
    kernel[:, :, 1, 1] += s1.view(-1, 1) * m.pointwise.conv.weight.double()[:, :, 0, 0]
    bias = t3 + t1
    if m.identity is not None:
        s_id, t_id = _bn_affine(m.identity)
        for c in range(cin):
            kernel[c, c, 1, 1] += s_id[c]
        bias = bias + t_id
    x = torch.randn(3, cin, 10, 10, dtype=torch.float64)
    with torch.no_grad():
        ref = m(x)
        by_hand = F.conv2d(x, kernel, bias, stride=stride, padding=1)
        folded = fold_repconv(m)(x)
    assert _max_rel(by_hand, ref) < 1e-12
    assert _max_rel(folded, by_hand) < 1e-12


def _student(width: int = 8, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _randomize(resnet(18, shortcut="none", block="repvgg", width=width), seed=seed)


def test_a_folded_repvgg_student_equals_the_unfolded_one():
    net = _student().eval()
    assert net.arch["block"] == "repvgg"
    assert sum(isinstance(m, RepConv) for m in net.modules()) == 16
    folded = fold_repvgg(net)
    assert sum(isinstance(m, RepConv) for m in net.modules()) == 16  # the original is kept
    layers = nn.ModuleList([folded.layer1, folded.layer2, folded.layer3, folded.layer4])
    assert not any(isinstance(m, (RepConv, nn.BatchNorm2d)) for m in layers.modules())
    convs = [m for m in layers.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 16
    assert all(c.kernel_size == (3, 3) and c.bias is not None for c in convs)
    assert {type(m) for m in layers.modules()} <= {
        nn.ModuleList, nn.Sequential, type(net.layer1[0]), nn.Conv2d, nn.Identity, nn.ReLU}
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = net(x)
        assert _max_rel(folded(x), ref) < 1e-5
        assert _max_rel(folded.head(folded.stage_outputs(x)[-1]), ref) < 1e-5  # fresh views
    # In float64 the folding is exact up to rounding.
    net64 = net.double()
    with torch.no_grad():
        x64 = x.double()
        assert _max_rel(fold_repvgg(net64)(x64), net64(x64)) < 1e-12
    # fold_batchnorm (the export's) folds the branches first, then the stem's BatchNorm.
    deploy = fold_batchnorm(net.float())
    assert not any(isinstance(m, (RepConv, nn.BatchNorm2d)) for m in deploy.modules())
    assert all(m.kernel_size == (3, 3) for m in deploy.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        assert _max_rel(deploy(x), ref) < 1e-5


@pytest.mark.parametrize("depth", [18, 34])
def test_repvgg_stage_outputs_have_the_resnet_teachers_shapes(depth):
    teacher = resnet(depth, shortcut="all", width=8).eval()
    student = resnet(depth, shortcut="none", block="repvgg", width=8).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        t_outs, s_outs = teacher.stage_outputs(x), student.stage_outputs(x)
        assert [o.shape for o in s_outs] == [o.shape for o in t_outs]
        # JointRD's hybrid path: a student stage output runs on through the teacher.
        assert teacher.head(teacher.stages[3](s_outs[2])).shape == (2, 10)


def test_repvgg_student_trains_saves_and_exports_folded(tmp_path, monkeypatch):
    cfg = RunConfig(method="ce", block="repvgg", shortcut="none", dataset="digits", width=4,
                    epochs=1, batch_size=64, device="cpu", checkpoint_interval_s=0,
                    data_root=str(tmp_path / "data"))
    run = tmp_path / "run"
    final = train(cfg, run, quiet=True, evaluate_test=False)
    assert math.isfinite(final["train_loss"])
    net, meta = load_model(run / MODEL_NAME)
    assert meta["arch"]["block"] == "repvgg" and meta["config"]["block"] == "repvgg"
    assert sum(isinstance(m, RepConv) for m in net.modules()) == 16
    monkeypatch.setattr(export_mod, "to_onnx", _no_onnx)  # ONNX: its own test below
    assert export_mod.main([str(run), "--batch-size", "2"]) == 0
    report = json.loads((run / "export" / "export.json").read_text())
    assert report["arch"]["block"] == "repvgg"
    assert report["layers_before"]["repconv"] == 16
    assert report["layers_after"]["repconv"] == report["layers_after"]["batchnorm"] == 0
    # 16 folded 3x3 convs in the blocks and the stem conv.
    assert report["layers_after"]["conv"] == 17 and report["folded"]["repconv"] == 16
    assert report["check"]["folded_eager"]["ok"] and report["check"]["torchscript"]["ok"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ts = torch.jit.load(io.BytesIO((run / "export" / "model.ts").read_bytes()))
    kinds = {m.original_name for m in ts.modules()}
    assert "RepConv" not in kinds and "BatchNorm2d" not in kinds and "Conv2d" in kinds
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert _max_rel(ts(x), net.eval()(x)) < 1e-4
    # A trial stopped early gets its model file from its checkpoint: the same network.
    assert model_from_checkpoint(run / CHECKPOINT_NAME, tmp_path / "again.pt") == 1
    again, again_meta = load_model(tmp_path / "again.pt")
    assert again_meta["arch"] == meta["arch"]
    with torch.no_grad():
        assert torch.equal(again.eval()(x), net(x))


def _no_onnx(net, x):
    raise ModuleNotFoundError("No module named 'onnxscript'")


def test_repvgg_onnx_export_runs_in_onnxruntime(tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    net = _student(width=4, seed=2).eval()
    data = types.SimpleNamespace(name="digits", num_classes=10, stem="cifar",
                                 classes=[str(i) for i in range(10)], mean=(0.5,) * 3,
                                 std=(0.25,) * 3)
    model = tmp_path / "run" / MODEL_NAME
    save_model(net, model, cfg=RunConfig(block="repvgg"), data=data, metrics={})
    out = tmp_path / "exported"
    assert export_mod.main([str(model), "--out", str(out), "--formats", "onnx"]) == 0
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(4, 3, 32, 32)
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    with torch.no_grad():
        assert _max_rel(got, net(x)) < 1e-4


@pytest.mark.parametrize(("values", "match"), [
    ({"block": "repvgg", "shortcut": "all"}, "block repvgg has no shortcuts but shortcut is all"),
    ({"block": "repvgg", "shortcut": "downsample"}, "pass shortcut none with block repvgg"),
    ({"block": "repvgg", "shortcut": "none", "dirac": True},
     "dirac: true contradicts block: repvgg"),
    ({"block": "dirac", "dirac": False}, "dirac: false contradicts block: dirac"),
    ({"block": "plain", "dirac": True}, "drop dirac and keep block, or make them agree"),
    ({"block": "vgg"}, "block must be one of plain, dirac, repvgg"),
    ({"block": True}, "block must be a string or null"),
])
def test_bad_block_settings_are_one_config_error(values, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_dict(values)


def test_dirac_and_block_resolve_to_one_answer():
    assert (RunConfig().block, RunConfig().dirac) == ("plain", False)
    assert (RunConfig(dirac=True).block, RunConfig(dirac=True).dirac) == ("dirac", True)
    assert RunConfig(block="dirac").dirac is True
    assert RunConfig(block="repvgg", dirac=False).block == "repvgg"
    # A config written before block existed (dirac only) reads as before, and round-trips.
    old = RunConfig.from_dict({"dirac": True, "shortcut": "downsample"})
    assert old.block == "dirac" and RunConfig.from_dict(old.to_dict()) == old


def test_a_model_file_without_block_still_loads(tmp_path):
    """Model files written before `block` existed have only `dirac` in their arch."""
    net = _randomize(resnet(18, shortcut="none", width=4)).eval()
    data = types.SimpleNamespace(name="digits", num_classes=10, stem="cifar",
                                 classes=[str(i) for i in range(10)], mean=(0.5,) * 3,
                                 std=(0.25,) * 3)
    path = tmp_path / MODEL_NAME
    save_model(net, path, cfg=RunConfig(), data=data, metrics={})
    meta = torch.load(path, weights_only=True)
    assert meta["arch"].pop("block") == "plain"
    torch.save(meta, path)
    loaded, got = load_model(path)
    assert "block" not in got["arch"] and loaded.arch["block"] == "plain"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), net(x))


def test_the_teacher_of_a_repvgg_student_is_the_plain_students_teacher():
    from tuning.search.teachers import teacher_recipe

    base = dict(method="jointrd", shortcut="none", dataset="digits", width=4)
    keys = {teacher_recipe(RunConfig(**base, block=b), 1).key for b in ("plain", "repvgg")}
    keys.add(teacher_recipe(RunConfig(**base, dirac=True), 1).key)
    assert len(keys) == 1
    teacher = teacher_recipe(RunConfig(**base, block="repvgg"), 1).config
    assert (teacher.block, teacher.shortcut, teacher.method) == ("plain", "all", "ce")


def test_the_cli_flag_decides_the_block_over_a_config_file(tmp_path, monkeypatch):
    """A saved config.yaml holds both block and dirac; a flag for either one wins."""
    import tuning.run.train as train_mod

    seen = []
    monkeypatch.setattr(train_mod, "train", lambda cfg, *a, **k: seen.append(cfg) or {
        "best_val_acc": 0.5, "last_val_acc": 0.5, "train_time": 0.0, "eval_time": 0.0})
    dirac_file, repvgg_file = tmp_path / "dirac.yaml", tmp_path / "repvgg.yaml"
    dirac_file.write_text(RunConfig(method="ce", block="dirac").to_yaml())
    repvgg_file.write_text(RunConfig(method="ce", block="repvgg").to_yaml())
    cases = [(dirac_file, ["--block", "repvgg"], "repvgg"), (dirac_file, ["--no-dirac"], "plain"),
             (repvgg_file, ["--dirac"], "dirac"), (repvgg_file, ["--no-dirac"], "repvgg"),
             (dirac_file, [], "dirac")]
    for i, (path, flags, expect) in enumerate(cases):
        assert train_mod.main(["--config", str(path), *flags, "--out", str(tmp_path / str(i)),
                               "--quiet"]) == 0
        assert seen[-1].block == expect, (path.name, flags)
        assert seen[-1].dirac == (expect == "dirac")


def test_default_run_dir_names_a_repvgg_student():
    from tuning.run.train import default_run_dir

    assert default_run_dir(RunConfig(method="ce", block="repvgg")).name == \
        "ce-digits-repvgg18-w64-s0"
    assert default_run_dir(RunConfig(method="ce")).name == "ce-digits-plain18-w64-s0"


def test_the_saved_model_records_the_block(tmp_path):
    net = _student(width=4)
    data = types.SimpleNamespace(name="digits", num_classes=10, stem="cifar",
                                 classes=[str(i) for i in range(10)], mean=(0.5,) * 3,
                                 std=(0.25,) * 3)
    path: Path = tmp_path / MODEL_NAME
    save_model(net, path, cfg=RunConfig(block="repvgg"), data=data, metrics={})
    loaded, meta = load_model(path)
    assert meta["arch"] == {"depth": 18, "shortcut": "none", "stem": "cifar", "num_classes": 10,
                            "width": 4, "dirac": False, "block": "repvgg"}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), net.eval()(x))
