"""The network definition against the paper's counts and torchvision's own ResNets."""

import pytest
import torch
import torchvision
from netutil import randomize as _randomize
from torch import nn

from models import DiracConv2d, fold_batchnorm, fold_dirac, freeze, param_groups, resnet


@pytest.mark.parametrize(
    ("depth", "shortcut", "count"),
    [(18, "all", 11_173_962), (18, "none", 11_000_138),
     (34, "all", 21_282_122), (34, "none", 21_108_298)],
)
def test_parameter_counts_match_the_paper(depth, shortcut, count):
    net = resnet(depth, shortcut=shortcut)
    assert sum(p.numel() for p in net.parameters()) == count


def test_imagenet_stem_matches_torchvision_parameter_count():
    net = resnet(18, stem="imagenet", num_classes=1000)
    assert sum(p.numel() for p in net.parameters()) == 11_689_512


@pytest.mark.parametrize("depth", [18, 34])
def test_logits_equal_torchvision_with_shared_random_weights(depth):
    tv = getattr(torchvision.models, f"resnet{depth}")()
    _randomize(tv, seed=depth)
    net = resnet(depth, stem="imagenet", num_classes=1000)
    ours, theirs = net.state_dict(), tv.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    net.load_state_dict(theirs, strict=True)
    x = torch.randn(2, 3, 96, 96)
    net.eval(), tv.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), tv(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
@pytest.mark.parametrize("shortcut", ["all", "none", "downsample"])
def test_stages_and_head_compose_to_forward(stem, shortcut):
    net = _randomize(resnet(18, shortcut=shortcut, stem=stem, width=8)).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        feat = x
        for stage in net.stages:
            feat = stage(feat)
        torch.testing.assert_close(net.head(feat), net(x))


def test_stage_shapes_for_cifar_stem():
    net = resnet(34, width=8)
    outs = net.stage_outputs(torch.randn(2, 3, 32, 32))
    assert [tuple(o.shape) for o in outs] == [
        (2, 8, 32, 32), (2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4)]


def test_stage_views_are_the_registered_modules_and_not_in_state_dict():
    net = resnet(18, width=8)
    assert net.stages[1] is net.layer2 and net.stages[0][0] is net.conv1
    assert not any(k.startswith(("_stages", "_head", "stages", "head")) for k in net.state_dict())


def test_shortcut_variants():
    full = resnet(18, shortcut="all", width=8)
    plain = resnet(18, shortcut="none", width=8)
    down = resnet(18, shortcut="downsample", width=8)
    blocks = [b for i in range(1, 5) for b in getattr(down, f"layer{i}")]
    assert [b.add_shortcut for b in blocks] == [False, False, True, False, True, False, True, False]
    assert all(b.add_shortcut for i in range(1, 5) for b in getattr(full, f"layer{i}"))
    assert not any(b.add_shortcut or b.downsample is not None
                   for i in range(1, 5) for b in getattr(plain, f"layer{i}"))
    # A plain block's output is exactly relu(bn2(conv2(relu(bn1(conv1(x)))))).
    block = plain.layer1[0].eval()
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        expect = torch.relu(block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x))))))
        torch.testing.assert_close(block(x), expect)
        full_block = full.layer1[0].eval()
        full_expect = torch.relu(
            full_block.bn2(full_block.conv2(torch.relu(full_block.bn1(full_block.conv1(x))))) + x)
        torch.testing.assert_close(full_block(x), full_expect)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="depth"):
        resnet(50)
    with pytest.raises(ValueError, match="shortcut"):
        resnet(18, shortcut="some")
    with pytest.raises(ValueError, match="stem"):
        resnet(18, stem="tiny")
    with pytest.raises(ValueError, match="block must be one of"):
        resnet(18, block="vgg")
    with pytest.raises(ValueError, match="pass shortcut='none' with block='repvgg'"):
        resnet(18, shortcut="downsample", block="repvgg")
    with pytest.raises(ValueError, match="dirac=True contradicts block='repvgg'"):
        resnet(18, shortcut="none", block="repvgg", dirac=True)


def test_dirac_true_is_block_dirac():
    old, new = resnet(18, width=8, dirac=True), resnet(18, width=8, block="dirac")
    assert old.arch == new.arch and old.arch["block"] == "dirac" and old.arch["dirac"]
    assert list(old.state_dict()) == list(new.state_dict())


def test_dirac_conv_starts_as_identity_plus_scaled_weight():
    net = resnet(18, shortcut="none", width=8, dirac=True)
    convs = [m for m in net.modules() if isinstance(m, DiracConv2d)]
    assert len(convs) == 16  # every 3x3 conv in the blocks; the stem conv stays plain
    conv = convs[1]
    assert torch.all(conv.dirac_a == 1) and torch.allclose(conv.dirac_b, torch.full_like(
        conv.dirac_b, 0.1))
    w = conv.effective_weight()
    expect = 0.1 * conv.weight.clone()
    expect[torch.arange(8), torch.arange(8), 1, 1] += 1.0
    torch.testing.assert_close(w, expect)


def test_dirac_scales_are_excluded_from_weight_decay():
    net = resnet(18, shortcut="none", width=8, dirac=True)
    groups = param_groups(net, 5e-4)
    assert groups[0]["weight_decay"] == 5e-4 and groups[1]["weight_decay"] == 0.0
    assert len(groups[1]["params"]) == 2 * 16
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    assert len(param_groups(resnet(18, width=8), 5e-4)) == 1


@pytest.mark.parametrize("train_mode", [False, True])
def test_dirac_folding_preserves_outputs(train_mode):
    net = _randomize(resnet(18, shortcut="none", width=8, dirac=True), seed=3)
    net.train(train_mode)
    folded = fold_dirac(net).train(train_mode)
    assert not any(isinstance(m, DiracConv2d) for m in folded.modules())
    assert any(isinstance(m, DiracConv2d) for m in net.modules())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-4, atol=1e-5)
        # the stage views follow the swapped modules
        torch.testing.assert_close(folded.head(folded.stage_outputs(x)[-1]), net(x),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_dirac_students_are_laid_out_as_released(stem):
    """A plain stem conv; Dirac 3x3 convs in the blocks; 1x1 projections Dirac with the
    ImageNet stem only (the released ImageNet students), plain with the CIFAR stem."""
    net = resnet(18, shortcut="downsample", stem=stem, width=8, block="dirac")
    assert type(net.conv1) is nn.Conv2d
    blocks = [b for i in range(1, 5) for b in getattr(net, f"layer{i}")]
    assert all(isinstance(c, DiracConv2d) for b in blocks for c in (b.conv1, b.conv2))
    projections = [b.downsample[0] for b in blocks if b.downsample is not None]
    assert len(projections) == 3
    assert all(isinstance(p, DiracConv2d) == (stem == "imagenet") for p in projections)
    if stem == "imagenet":
        # A 1x1 Dirac conv with cout = 2 cin: its delta passes channel i to output i for the
        # first cin outputs and gives the other cin outputs nothing.
        p = projections[0]
        assert p.delta.shape == (16, 8, 1, 1)
        expect = torch.zeros(16, 8, 1, 1)
        expect[torch.arange(8), torch.arange(8)] = 1.0
        assert torch.equal(p.delta, expect)
        x = torch.randn(2, 8, 6, 6)
        with torch.no_grad():
            p.dirac_a.fill_(1.0), p.dirac_b.zero_()
            out = p(x)
        assert torch.equal(out[:, :8], x[:, :, ::2, ::2]) and not out[:, 8:].any()
    _randomize(net, seed=5).eval()
    folded = fold_dirac(net)
    assert not any(isinstance(m, DiracConv2d) for m in folded.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_dirac_students_of_the_earlier_layout_still_load(stem):
    """Saved when the CIFAR stem conv was a Dirac conv and the projections plain: loading
    folds the stem's a*delta + b*W into its weight and gives the projections a=0, b=1."""
    net = _randomize(resnet(18, shortcut="downsample", stem=stem, width=8, block="dirac"),
                     seed=7).eval()
    old = {k: v.clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    if stem == "cifar":
        w = old["conv1.weight"]
        a, b = torch.rand(8, generator=g) + 0.5, torch.rand(8, generator=g)
        old["conv1.dirac_a"], old["conv1.dirac_b"] = a, b
        # The stem's effective weight, by hand: delta passes input channel i to output i < 3.
        plain = b.view(-1, 1, 1, 1) * w
        plain[torch.arange(3), torch.arange(3), 1, 1] += a[:3]
        with torch.no_grad():
            net.conv1.weight.copy_(plain)
    else:
        for key in [k for k in old if ".downsample.0.dirac_" in k]:
            del old[key]
        with torch.no_grad():
            for block in (net.layer2[0], net.layer3[0], net.layer4[0]):
                block.downsample[0].dirac_a.zero_(), block.downsample[0].dirac_b.fill_(1.0)
    loaded = resnet(18, shortcut="downsample", stem=stem, width=8, block="dirac").eval()
    loaded.load_state_dict(old, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), rtol=1e-5, atol=1e-6)
    # A state_dict of the current layout is not rewritten.
    again = resnet(18, shortcut="downsample", stem=stem, width=8, block="dirac").eval()
    again.load_state_dict(net.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(again(x), net(x))


@pytest.mark.parametrize("shortcut", ["all", "none"])
def test_batchnorm_folding_preserves_eval_outputs(shortcut):
    net = _randomize(resnet(18, shortcut=shortcut, width=8, dirac=shortcut == "none")).eval()
    folded = fold_batchnorm(net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-4, atol=1e-4)


def test_freeze_makes_a_teacher():
    net = freeze(resnet(18, width=8))
    assert not net.training and not any(p.requires_grad for p in net.parameters())
