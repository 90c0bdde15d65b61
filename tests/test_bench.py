"""The training benchmark: its FLOP model, its step against a naive one, and an end-to-end run."""

import copy
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from losses import OBJECTIVES, OWN_MODULES, hybrid_logits_naive
from models import freeze, resnet
from tuning.measure import bench
from tuning.measure.flops import _module_macs, add_model_ratios, cost_model, hybrid_r, network_macs
from tuning.run.config import METHODS, RunConfig
from tuning.run.step import make_optimizer, make_train_step
from tuning.run.trainer import objective_kwargs


@pytest.fixture(autouse=True)
def one_thread():
    """Thin nets on a shared CPU: extra OpenMP threads only spin against other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("depth", "size", "gmac"), [
    (18, 32, 0.556), (34, 32, 1.16), (18, 224, 1.82), (34, 224, 3.66),
])
def test_flop_counter_gives_the_method_md_figures(depth, size, gmac):
    # METHOD.md's figures are the ResNets': CIFAR with 10 classes, 224 px with torchvision's
    # 1000 (the fc is 0.03% of the total, so the class count cannot move them past 1%).
    assert sum(network_macs(depth, size)) / 1e9 == pytest.approx(gmac, rel=0.01)


def test_hybrid_cost_and_step_model_match_method_md():
    parts = network_macs(18, 32)
    shares = [p / sum(parts) for p in parts[:4]]
    assert shares == pytest.approx([0.27, 0.24, 0.24, 0.24], abs=0.01)
    assert hybrid_r(parts) == pytest.approx(1.45, abs=0.05)
    model = cost_model(18, 32, width=64)
    assert model.step_F["jointrd"] == pytest.approx(6.9, abs=0.1)
    assert model.step_F["alignkd"] / model.step_F["jointrd"] == pytest.approx(0.58, abs=0.01)
    assert model.step_F["kd"] == model.step_F["alignkd"] > model.step_F["ce"]


def _nets(method: str, device: str, channels_last: bool = False):
    torch.manual_seed(0)
    student = resnet(18, shortcut="none", width=4).to(device)
    teacher = None if method == "ce" else freeze(resnet(18, shortcut="all", width=4).to(device))
    if channels_last:
        student = student.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher = teacher.to(memory_format=torch.channels_last)
    return student, teacher


def _own(method, student, teacher):
    """The modules the objective trains besides the student (jointrd_released's connectors),
    made from a fixed seed, so that both paths start from the same ones."""
    if method not in OWN_MODULES:
        return None
    torch.manual_seed(2)
    return OWN_MODULES[method](student, teacher)


def _reference_losses(method, student, teacher, batches, cfg, total_steps):
    """The plain path: fp32, no autocast, per-parameter SGD loop (foreach=False)."""
    hp = objective_kwargs(cfg, 0)
    own = _own(method, student, teacher)
    if own is not None:
        hp = {**hp, "connectors": own}
    params = list(student.parameters()) + ([] if own is None else list(own.parameters()))
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                          nesterov=cfg.nesterov, weight_decay=cfg.weight_decay, foreach=False)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr * cfg.max_lr_factor,
                                                total_steps=total_steps,
                                                div_factor=cfg.max_lr_factor)
    losses = []
    for x, y in batches:
        total, _, _ = OBJECTIVES[method](student, teacher, x, y, **hp)
        opt.zero_grad()
        total.backward()
        opt.step()
        sched.step()
        losses.append(total.item())
    return losses


def _fast_losses(method, student, teacher, batches, cfg, total_steps, device):
    own = _own(method, student, teacher)
    opt, sched = make_optimizer(student, cfg, total_steps, torch.device(device), connectors=own)
    step = make_train_step(OBJECTIVES[method], student, teacher, opt, sched, torch.device(device),
                           connectors=own)
    hp = objective_kwargs(cfg, 0)
    return [step(x, y, hp)[0].item() for x, y in batches]


def _batches(device: str, n: int = 2):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 32, 32, generator=g).to(device),
             torch.randint(0, 10, (8,), generator=g).to(device)) for _ in range(n)]


@pytest.mark.parametrize("method", METHODS)
def test_train_step_equals_the_plain_path_on_cpu(method):
    cfg, batches = RunConfig(method=method), _batches("cpu")
    student, teacher = _nets(method, "cpu")
    ref_student = copy.deepcopy(student)
    fast = _fast_losses(method, student, teacher, batches, cfg, 3, "cpu")
    ref = _reference_losses(method, ref_student, teacher, batches, cfg, 3)
    # On CPU the fast path is fp32 with foreach SGD: the same ops, so the same bits.
    assert fast == ref
    for p, q in zip(student.parameters(), ref_student.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", METHODS)
def test_bf16_channels_last_step_matches_fp32_on_cuda(method):
    cfg, batches = RunConfig(method=method), _batches("cuda")
    student, teacher = _nets(method, "cuda", channels_last=True)
    ref_student, ref_teacher = _nets(method, "cuda")
    fast = _fast_losses(method, student, teacher,
                        [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches],
                        cfg, 3, "cuda")
    ref = _reference_losses(method, ref_student, ref_teacher, batches, cfg, 3)
    assert fast == pytest.approx(ref, rel=3e-2, abs=3e-2)  # bf16 keeps ~3 significant digits


def test_quick_benchmark_writes_every_figure(tmp_path, capsys):
    out = tmp_path / "train.json"
    assert bench.main(["--quick", "--device", "cpu", "--warmup", "0", "--batch-size-224", "2",
                       "--threads", "1", "--out", str(out)]) == 0
    assert "jointrd" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["format"] == "plainkd-train-bench/1"
    assert report["device"]["type"] == "cpu" and report["device"]["name"]
    assert report["device"]["threads"] == 1 and len(report["device"]["load_avg_end"]) == 3
    assert report["torch"] == torch.__version__ and report["created"]
    settings = report["settings"]
    assert (settings["batch_size"], settings["width"], settings["steps"]) == (8, 4, 1)
    assert settings["configs"] == ["18x32", "18x224"] and settings["warmup"] == 0
    rows = report["results"]
    assert {(r["method"], r["depth"], r["size"]) for r in rows} == {
        (m, 18, s) for m in METHODS for s in (32, 224)}
    for r in rows:
        assert r["peak_mem_bytes"] is None  # CPU: no allocator statistics
        for key in ("images_per_s", "ms_per_step", "flop_model_step_F", "input_share"):
            assert math.isfinite(r[key]) and r[key] > 0, key
        assert r["images_per_s"] == pytest.approx(r["batch_size"] * 1000 / r["ms_per_step"])
        same = {q["method"]: q for q in rows if (q["depth"], q["size"]) == (r["depth"], r["size"])}
        for base in ("jointrd", "ce"):
            ratio = r[f"ratio_vs_{base}"]
            assert ratio["measured"] == pytest.approx(r["ms_per_step"] / same[base]["ms_per_step"])
            model = r["flop_model_step_F"] / same[base]["flop_model_step_F"]
            assert ratio["model"] == pytest.approx(model)
    inputs = {(i["size"], i["batch_size"]): i for i in report["input"]}
    assert set(inputs) == {(32, 8), (224, 2)}
    for r in rows:
        inp = inputs[(r["size"], r["batch_size"])]
        assert inp["ms_per_batch"] > 0 and inp["images_per_s"] > 0
        assert r["input_share"] == pytest.approx(inp["ms_per_batch"] / r["ms_per_step"])
    kinds = {(f["size"], f["feature_loss"]): f for f in report["feature_losses"]}
    assert set(kinds) == {(s, k) for s in (32, 224) for k in ("mse", "at", "nst")}
    for f in kinds.values():
        mse = kinds[(f["size"], "mse")]["ms_per_step"]
        assert f["ratio_vs_mse"] == pytest.approx(f["ms_per_step"] / mse)
    model = report["flop_model"]["18x32"]
    assert model["width"] == 4 and model["r"] > 0 and model["gmac_teacher"] > 0
    assert model["step_F"]["jointrd"] == pytest.approx(
        model["step_F"]["alignkd"] + 2 * model["r"])


TORCH_ONLY = """
import runpy, sys
for name in ("ray", "mlflow", "optuna", "yaml"):  # as on a machine with PyTorch alone
    sys.modules[name] = None
from tuning.run.config import RunConfig
from tuning.run.trainer import train
final = train(RunConfig(method="ce", shortcut="all", width=4, epochs=1, batch_size=64,
                        device="cpu"), sys.argv[1], quiet=True)
print("trained", final["epoch"])
sys.argv = ["tuning.bench", *sys.argv[2:]]
runpy.run_module("tuning.bench", run_name="__main__")
"""


def test_the_trainer_and_benchmark_run_where_only_pytorch_is_installed(tmp_path):
    """A GPU machine may have PyTorch but not Ray, MLflow, Optuna or PyYAML."""
    out = tmp_path / "train.json"
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", TORCH_ONLY, str(tmp_path / "run"), "--quick", "--device", "cpu",
         "--configs", "18x32", "--methods", "alignkd", "jointrd", "--feature-losses",
         "--warmup", "0", "--threads", "1", "--compile", "--out", str(out)],
        cwd=repo, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(repo)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained 1" in proc.stdout and (tmp_path / "run" / "model.pt").is_file()
    report = json.loads(out.read_text())
    assert {r["method"] for r in report["results"]} == {"alignkd", "jointrd"}
    # torch.compile of each objective, timed or its failure recorded: never a crash.
    assert [(c["method"], c["compile_mode"]) for c in report["compiled"]] == [
        ("alignkd", "default"), ("jointrd", "default")]
    for c in report["compiled"]:
        assert c["ms_per_step"] is not None or c["error"], c


def test_a_configuration_that_ran_out_of_memory_keeps_the_rest_of_the_report():
    models = {"18x32": cost_model(18, 32, width=4).to_dict()}
    rows = [{"method": "alignkd", "depth": 18, "size": 32, "ms_per_step": 10.0},
            {"method": "jointrd", "depth": 18, "size": 32, "ms_per_step": None}]
    add_model_ratios(rows, models)
    assert rows[0]["ratio_vs_jointrd"]["measured"] is None
    assert rows[0]["ratio_vs_jointrd"]["model"] == pytest.approx(
        models["18x32"]["step_F"]["alignkd"] / models["18x32"]["step_F"]["jointrd"])
    assert rows[1]["ratio_vs_ce"] == {"measured": None, "model": pytest.approx(
        models["18x32"]["step_F"]["jointrd"] / models["18x32"]["step_F"]["ce"])}
    for r in rows:
        r.update(size=32, batch_size=8, input_share=None, peak_mem_bytes=None,
                 images_per_s=r["ms_per_step"] and 800.0)
    report = {"device": {"name": "x", "type": "cuda"}, "torch": "t", "results": rows,
              "settings": {"width": 4, "steps": 1}, "input": [], "feature_losses": [],
              "compiled": [], "flop_model": models}
    assert "jointrd" in bench.format_tables(report)


def test_inference_flag_hands_over(monkeypatch):
    seen = []
    fake = types.SimpleNamespace(main=lambda argv: seen.append(argv) or 0)
    monkeypatch.setitem(sys.modules, "tuning.measure.inference", fake)
    assert bench.main(["--inference", "--quick"]) == 0 and seen == [["--quick"]]


def _inference(argv: list[str], tmp_path: Path) -> dict:
    out = tmp_path / "inference.json"
    assert bench.main(["--inference", "--quick", "--threads", "1", "--out", str(out),
                       *argv]) == 0
    return json.loads(out.read_text())


def test_quick_inference_benchmark_times_every_network_runtime_and_batch(tmp_path, capsys):
    from tuning.measure.inference import NETWORKS, RUNTIMES

    table = tmp_path / "inference.md"
    report = _inference(["--device", "cpu", "--markdown", str(table)], tmp_path)
    assert report["format"] == "plainkd-inference/2" and report["created"]
    device = report["device"]
    assert device["type"] == "cpu" and device["name"] == device["processor"] != ""
    assert device["threads"] == 1 and report["settings"]["threads"] == 1
    assert report["runtimes"]["onnxruntime"]["session_options"] == {
        "intra_op_num_threads": 1, "inter_op_num_threads": 1, "execution_mode": "ORT_SEQUENTIAL",
        "graph_optimization_level": "ORT_ENABLE_ALL"}
    rows = report["results"]
    cells = {(r["network"], r["runtime"], r["batch_size"]): r for r in rows}
    assert len(rows) == len(cells) == len(NETWORKS) * len(RUNTIMES) * 2
    assert set(cells) == {(n, rt, b) for n in NETWORKS for rt in RUNTIMES for b in (1, 2)}
    for (network, runtime, batch), r in cells.items():
        assert (r["depth"], r["image_size"], r["width"]) == (18, 32, 8)
        assert r["runs"] == 3 and 0 < r["min_ms"] <= r["p25_ms"] <= r["median_ms"]
        assert r["median_ms"] <= r["p75_ms"] <= r["p90_ms"]
        assert r["iqr_ms"] == pytest.approx(r["p75_ms"] - r["p25_ms"])
        resnet_ms = cells[("resnet", runtime, batch)]["median_ms"]
        assert r["ratio"] == pytest.approx(resnet_ms / r["median_ms"])
        assert 0 < r["ratio_p25"] <= r["ratio_p75"]
        # ONNX Runtime's and TorchScript's outputs are eager PyTorch's, to rounding.
        assert r["check"]["ok"] and r["check"]["max_rel_diff"] <= 1e-4, (network, runtime, r)
        # Liveness: a ResNet block keeps 3 maps alive, a plain one 2.
        assert r["memory_ratio"] == pytest.approx(1.0 if network == "resnet" else 1.5)
    params = {n: {r["params"] for r in rows if r["network"] == n} for n in NETWORKS}
    assert all(len(p) == 1 for p in params.values())
    params = {n: p.pop() for n, p in params.items()}
    # Folded, every Plain-CNN is the same stack of biased 3x3 convs; the ResNet adds its three
    # projection shortcuts (a biased 1x1 conv from c to 2c channels each).
    assert params["plain"] == params["plain-dirac"] == params["plain-repvgg"]
    assert params["resnet"] - params["plain"] == sum(c * 2 * c + 2 * c for c in (8, 16, 32))
    nets = {n["network"]: n for n in report["networks"]}
    assert set(nets) == set(NETWORKS)
    for name, n in nets.items():
        # Folding leaves no BatchNorm, Dirac or RepVGG branch, and changes no output.
        assert n["unfolded_layers"] == 0 and n["fold_check"]["ok"], n
        assert n["params"] == params[name] < n["train_params"]
        assert [m["batch_size"] for m in n["memory"]] == [1, 2]
        assert all(set(m["part_peak_bytes"]) == {"stem", "layer1", "layer2", "layer3", "layer4",
                                                 "head"} for m in n["memory"])
    assert nets["plain-repvgg"]["train_params"] > nets["plain"]["train_params"]
    printed = capsys.readouterr().out
    md = table.read_text()
    assert md in printed
    lines = md.splitlines()
    assert lines[2] == ("| network | px | batch | params (M) | peak act. (MiB) | ONNX Runtime "
                        "| TorchScript | eager |")
    body = [line for line in lines[4:] if line.startswith("| ")]
    assert len(body) == len(NETWORKS) * 2 and body[1].startswith("| Plain-18 | 32 | 1 |")
    assert all(line.count(" | ") == 7 and line.count("x") >= 4 for line in body)


def test_inference_benchmark_without_onnxruntime_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as where it is not installed
    report = _inference(["--device", "cpu", "--runtimes", "onnxruntime", "eager"], tmp_path)
    assert "not installed" in report["runtimes"]["onnxruntime"]["skipped"]
    assert {r["runtime"] for r in report["results"]} == {"eager"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quick_inference_benchmark_on_cuda(tmp_path):
    report = _inference(["--device", "cuda"], tmp_path)
    ort = report["runtimes"]["onnxruntime"]
    runtimes = {r["runtime"] for r in report["results"]}
    assert runtimes == ({"torchscript", "eager"} | ({"onnxruntime"} if "provider" in ort else
                                                   set()))
    assert "provider" in ort or "CUDAExecutionProvider" in ort["skipped"]
    for r in report["results"]:
        assert r["check"]["ok"] and r["median_ms"] > 0 and r["ratio"] > 0, r
    for n in report["networks"]:
        assert all(m["measured_peak_activation_bytes"] > 0 for m in n["memory"])


def test_r_counts_the_hybrid_paths_that_jointrd_runs():
    # r from the stage split, against the MACs of the naive hybrid forward actually run.
    teacher = freeze(resnet(18, shortcut="all", width=8))
    macs = []
    for m in teacher.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.register_forward_hook(lambda mod, _i, out: macs.append(_module_macs(mod, out)))
    s = [torch.zeros(1, c, h, h) for c, h in ((8, 32), (16, 16), (32, 8), (64, 4))]
    with torch.no_grad():
        hybrid_logits_naive(s, teacher)
    parts = network_macs(18, 32, width=8)
    assert sum(macs) / sum(parts) == pytest.approx(hybrid_r(parts))


@pytest.mark.slow
def test_search_overhead_runs_bare_and_under_tune(tmp_path, monkeypatch):
    from tuning.measure import overhead

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "overhead.json"
    # 3 epochs with a checkpoint only at the last: two epochs report without one.
    assert overhead.main(["--epochs", "3", "--width", "4", "--checkpoint-width", "8",
                          "--images", "64", "--interval", "1000", "--trials", "2",
                          "--device", "cpu",
                          "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    e2e, ckpt = report["end_to_end"], report["checkpoint"]
    assert e2e["trial_epochs"] == 3 and e2e["bare_s"] > 0 and e2e["trial_s"] > 0
    assert e2e["dataset"] == "npz" and e2e["checkpoint_interval_s"] == 1000
    assert e2e["overhead_fraction"] == pytest.approx(e2e["trial_s"] / e2e["bare_s"] - 1)
    assert e2e["epochs_measured"] == {"without_checkpoint": 2, "with_checkpoint": 0}
    assert e2e["trials"] == 2 and len(e2e["later_trial_s"]) == 1  # in the reused worker
    assert e2e["later_overhead_fraction"] == pytest.approx(
        e2e["later_trial_s"][0] / e2e["bare_s"] - 1)
    assert 0 < e2e["report_s_without_checkpoint"] < e2e["trial_s"]
    assert ckpt["width"] == 8 and ckpt["write_s"] > 0 and ckpt["report_s"] > 0
    # A width-8 ResNet-18 with momentum: 2 x 4 bytes x ~176k parameters.
    assert 1.0 < ckpt["size_mb"] < 2.0
    every, sparse = report["projected"]["every_epoch"], report["projected"]["at_interval"]
    assert every["checkpoint_every_epochs"] == 1 and every["checkpoints"] == 200
    assert sparse["checkpoints"] == 1  # 1000 s covers the whole 200 x 1.29 s projected run
    reused = report["projected"]["at_interval_reused_worker"]
    assert reused["checkpoints"] == sparse["checkpoints"]
    for p in (every, sparse, reused):
        assert p["share"] == pytest.approx(
            (p["fixed_s"] + p["reports_s"] + p["checkpoints_s"]) / (200 * 45_000 / 35_000))
    assert every["checkpoints_s"] == pytest.approx(200 * (ckpt["write_s"] + ckpt["report_s"]))


@pytest.mark.parametrize("method", ["alignkd", "jointrd"])
def test_compiled_objective_matches_eager_and_does_not_recompile_as_eta_changes(method):
    """eta changes every epoch; the compiled objective must take it as an input, not compile
    again for each value (past torch's recompile limit it would silently run eager)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    student, teacher = _nets(method, "cpu")
    compiled = torch.compile(OBJECTIVES[method])
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    cfg = RunConfig(method=method)
    for epoch in (0, 10, 20, 30, 40):
        hp = objective_kwargs(cfg, epoch)
        eager, eager_terms, _ = OBJECTIVES[method](student, teacher, x, y, **hp)
        total, terms, _ = compiled(student, teacher, x, y, **hp)
        assert total.item() == pytest.approx(eager.item(), rel=1e-4)
        assert {k: v.item() for k, v in terms.items()} == pytest.approx(
            {k: v.item() for k, v in eager_terms.items()}, rel=1e-4, abs=1e-6)
    assert len({objective_kwargs(cfg, e)["eta"] for e in (0, 10, 20, 30, 40)}) == 5
    # The first graph specializes on eta; the second takes it as an input, for good.
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    torch._dynamo.reset()


@pytest.mark.parametrize("where", ["proc", "folder", "under_file"])
@pytest.mark.parametrize("mode", [[], ["--inference"], ["--search-overhead"]])
def test_an_unwritable_out_is_refused_before_benchmarking(tmp_path, capsys, monkeypatch,
                                                          where, mode):
    """The results are written last: a place they cannot go must fail first, not after the
    whole benchmark."""
    def ran(*args, **kwargs):
        raise AssertionError("benchmarked before the bad --out was refused")

    monkeypatch.setattr(bench, "run", ran)
    for name in ("tuning.measure.inference", "tuning.measure.overhead"):
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(main=ran))
    taken = tmp_path / "taken"
    taken.write_text("mine")
    out = {"proc": "/proc/bench.json", "folder": str(tmp_path),
           "under_file": str(taken / "bench.json")}[where]
    expect = {"proc": "cannot be written", "folder": "is a folder, not a file",
              "under_file": "is a file, not a folder"}[where]
    before = sorted(tmp_path.iterdir())
    code = bench.main([*mode, "--quick", "--device", "cpu", "--out", out])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "results file (--out)" in err[0], err
    assert expect in err[0], err
    assert sorted(tmp_path.iterdir()) == before and taken.read_text() == "mine"


def test_a_bad_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--configs", "18x7"])
    assert exit_.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
