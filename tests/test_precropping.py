"""PreCropping: SynFlow against a closed form, the density -> ratio solve, cropped tiny ResNet and ViT
(widths, residual coupling, GMACs/params) and the export -> compress.load round trip."""
import compress  # noqa: F401  (first: torchvision guard before timm)

import math

import pytest
import timm
import torch
import torch.nn as nn

from compress import export
from compress.measure import count_gmacs, count_params
from compress.models.build import model_spec
from compress.pruners.base import build_pruner
from compress.pruners.structured import pai_scores
from compress.pruners.structured.precropping import Units, solve_ratios

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
RESNET = ("resnet26", dict(num_classes=10, channels=(16, 32, 64, 128), stem_width=16))  # bottlenecks, 4 stages
VIT = ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=3, num_classes=10))


def make(name, kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


# ---- SynFlow and the solve ------------------------------------------------------------------------------


def test_synflow_matches_the_closed_form_on_an_mlp():
    """For a bias-free MLP with |W|, R = 1^T |W3| |W2| |W1| 1, so dR/dW2[i, j] = (1^T |W3|)_i (|W1| 1)_j."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7, bias=False), nn.ReLU(), nn.Linear(7, 4, bias=False), nn.ReLU(),
                        nn.Linear(4, 3, bias=False))
    w1, w2, w3 = (net[i].weight.detach().double().abs() for i in (0, 2, 4))
    ones = lambda n: torch.ones(n, dtype=torch.float64)  # noqa: E731
    expected = {
        "0": w1 * torch.outer(ones(3) @ w3 @ w2, ones(5)),
        "2": w2 * torch.outer(ones(3) @ w3, w1 @ ones(5)),
        "4": w3 * torch.outer(ones(3), w2 @ w1 @ ones(5)),
    }
    copy_ = pai_scores.score_copy(net, "cpu", torch.float64).eval()
    with torch.no_grad():
        for p in copy_.parameters():
            p.abs_()
    got = pai_scores.synflow_scores(copy_, ["0", "2", "4"], (5,))
    for k in expected:
        assert torch.allclose(got[k], expected[k], rtol=1e-12), k
    # one round at density 0.5 keeps exactly the top half of those scores
    dens = pai_scores.synflow(net, ["0", "2", "4"], 0.5, (5,), iterations=1)
    flat = torch.cat([expected[k].flatten() for k in expected])
    cut = flat.sort(descending=True).values[round(0.5 * flat.numel()) - 1]
    for k in expected:
        assert dens[k] == pytest.approx(float((expected[k] >= cut).double().mean()))
    # more rounds reach the same global density
    dens = pai_scores.synflow(net, ["0", "2", "4"], 0.3, (5,), iterations=10)
    kept = sum(dens[k] * expected[k].numel() for k in expected)
    assert kept == pytest.approx(round(0.3 * flat.numel()))


def test_solve_ratios_chain_and_independent_groups():
    u = Units()
    u.groups = {"a": (64, 8), "b": (64, 8), "c": (64, 8)}
    u.layers = [("l1", 100, None, "a"), ("l2", 100, "a", "b"), ("l3", 100, "b", None),
                ("q", 300, None, "c"), ("p", 100, "c", None)]
    r = solve_ratios(u, {"l1": 0.5, "l2": 0.25, "l3": 0.5, "q": 0.2, "p": 0.8})
    assert r["a"] == pytest.approx(0.5) and r["b"] == pytest.approx(0.5)
    # one group, two layers: the size-weighted geometric mean
    assert r["c"] == pytest.approx(math.exp((math.sqrt(300) ** 2 * math.log(0.2) + 100 * math.log(0.8)) / 400))
    # dense layers cannot push a ratio above 1
    assert solve_ratios(u, {"l1": 1.0, "l2": 1.0, "l3": 1.0, "q": 1.0, "p": 1.0}) == pytest.approx({"a": 1, "b": 1, "c": 1})


# ---- cropped models --------------------------------------------------------------------------------------


def crop(name, kwargs, **params):
    model = make(name, kwargs)
    pruner = build_pruner({"name": "precropping", "iterations": 10, "input_size": 32, **params})
    pruner.attach(model)
    return model.eval(), pruner


def round_trip(tmp_path, name, kwargs, model, pruner):
    edits = pruner.finalize(model)
    export.save(model, tmp_path / "export", model_spec(name, kwargs), [pruner], [edits])
    loaded = export.load(tmp_path / "export")
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))


def test_resnet_is_cropped_with_coupled_channels(tmp_path):
    dense = make(*RESNET)
    model, pruner = crop(*RESNET, density=0.3)
    assert pruner.densities and all(0 < d <= 1 for d in pruner.densities.values())
    for key, width in pruner.widths.items():
        full, _ = pruner.units.groups[key]
        assert width == full or width % 8 == 0, (key, width, full)
    assert model.conv1.out_channels == dense.conv1.out_channels  # first conv kept
    assert model.fc.out_features == 10
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):  # residual adds: one width per stage
        down = stage[0].downsample
        # layer1 has no shortcut conv: its stream is the stem's output, which is kept
        widths = {blk.conv3.out_channels for blk in stage} | {down[0].out_channels if down is not None else dense.conv1.out_channels}
        assert len(widths) == 1
        assert all(blk.conv1.in_channels == stage[0].conv3.out_channels for blk in list(stage)[1:])
    assert model.fc.in_features == model.layer4[0].conv3.out_channels
    assert count_params(model) < 0.8 * count_params(dense)
    assert count_gmacs(model, X) < count_gmacs(dense, X)
    assert model(X).shape == (2, 10)
    round_trip(tmp_path, *RESNET, model, pruner)


def test_vit_is_cropped_per_block(tmp_path):
    dense = make(*VIT)
    model, pruner = crop(*VIT, density=0.4)
    assert all(0 < d <= 1 for d in pruner.densities.values())
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        assert 1 <= attn.num_heads <= 3 and attn.num_heads * attn.head_dim == attn.qkv.out_features // 3
        assert mlp.fc1.out_features % 8 == 0 and mlp.fc1.out_features == mlp.fc2.in_features
        assert attn.qkv.in_features == mlp.fc2.out_features == 192  # the residual stream keeps its width
    assert count_params(model) < 0.7 * count_params(dense)
    assert count_gmacs(model, X) < 0.8 * count_gmacs(dense, X)
    round_trip(tmp_path, *VIT, model, pruner)


@pytest.mark.parametrize("score", ["snip", "grasp"])
def test_data_scores_crop_the_vit(score):
    model, pruner = crop(*VIT, density=0.4, score=score, batch_size=4)
    assert all(0 <= d <= 1 for d in pruner.densities.values())
    assert sum(b.mlp.fc1.out_features for b in model.blocks) < 3 * 768
    assert model(X).shape == (2, 10)


def test_density_one_keeps_the_full_widths():
    dense = make(*VIT)
    model, pruner = crop(*VIT, density=1.0, reinit=False)
    assert pruner.finalize(model) == {}
    with torch.no_grad():
        assert torch.equal(model(X), dense(X))


def test_the_decision_is_deterministic():
    _, a = crop(*VIT, density=0.4)
    _, b = crop(*VIT, density=0.4)
    assert a.widths == b.widths
