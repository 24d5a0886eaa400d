"""Magnitude pruning: Zhu & Gupta's cubic schedule, global vs per-layer selection, one-shot masks that survive
optimizer steps, config errors, and a real gradual ``compress fit`` that exports compactly."""
import compress  # noqa: F401  (first: torchvision guard before timm)

import math

import pytest
import torch
import torch.nn as nn

from compress.pruners.base import build_pruner
from compress.pruners.weight import masks as M
from compress.pruners.weight.magnitude import cubic_sparsity
from test_issp import fit_and_check_export, tiny_model, train_steps


def test_cubic_schedule_values():
    s = [cubic_sparsity(t, 10, 50, 0.1, 0.9) for t in range(0, 61)]
    assert s[0] == s[10] == 0.1 and s[50] == s[60] == 0.9
    assert s[30] == pytest.approx(0.9 + (0.1 - 0.9) * 0.5**3)  # halfway: 1/8 of the gap remains
    assert s[20] == pytest.approx(0.9 - 0.8 * 0.75**3)
    assert all(a <= b for a, b in zip(s, s[1:]))  # monotone, fastest at the start
    assert s[20] - s[10] > s[50] - s[40]


def test_cubic_pruner_updates_every_frequency_steps():
    model = tiny_model()
    pruner = build_pruner({"name": "magnitude", "schedule": "cubic", "sparsity": 0.8, "start_step": 2,
                           "end_step": 6, "frequency": 2})
    pruner.attach(model)
    assert pruner.current == 0 and all(v == 0 for v in M.layer_sparsity(pruner.layers).values())
    seen = []
    for _ in range(7):
        train_steps(model, pruner, 1)
        seen.append(pruner.current)
    # updates at steps 2, 4, 6 (start, start + frequency, end); held in between
    assert seen == pytest.approx([0, 0, 0, cubic_sparsity(4, 2, 6, 0, 0.8), cubic_sparsity(4, 2, 6, 0, 0.8), 0.8, 0.8])
    for name, layer in pruner.layers.items():
        assert int((layer.weight == 0).sum()) == M.prune_count(layer.weight.numel(), 0.8), name
    assert pruner.state_dict() == {"step": 7, "sparsity": 0.8}


def two_layers():
    big, small = nn.Linear(50, 40), nn.Linear(30, 20)
    g = torch.Generator().manual_seed(0)
    big.weight.data = torch.randn(40, 50, generator=g) * 10
    small.weight.data = torch.randn(20, 30, generator=g) * 0.1
    return {"big": big, "small": small}


def test_global_vs_per_layer():
    layers = two_layers()
    per_layer = M.layer_masks(layers, 0.5)
    assert {n: int(m.sum()) for n, m in per_layer.items()} == {"big": 1000, "small": 300}
    glob = M.global_masks(layers, 0.5, cap=1.0)
    assert sum(int(m.sum()) for m in glob.values()) == math.ceil(0.5 * 2600)
    assert int(glob["small"].sum()) == 600  # every small weight goes first
    # the threshold is global: every pruned |w| is below every kept |w|
    scores = torch.cat([layers[n].weight.abs().reshape(-1) for n in layers])
    pruned = torch.cat([glob[n].reshape(-1) for n in layers])
    assert scores[pruned].max() < scores[~pruned].min()
    capped = M.global_masks(layers, 0.5, cap=0.995)
    assert int(capped["small"].sum()) == M.prune_count(600, 1.0, 0.995) == 597


def test_global_scope_in_a_model_and_config_errors():
    model = tiny_model()
    pruner = build_pruner({"name": "magnitude", "scope": "global", "sparsity": 0.7})
    pruner.attach(model)
    total = sum(m.weight.numel() for m in pruner.layers.values())
    zeros = sum(int((m.weight == 0).sum()) for m in pruner.layers.values())
    assert zeros == math.ceil(0.7 * total)
    assert len(set(round(v, 3) for v in M.layer_sparsity(pruner.layers).values())) > 1  # layers differ
    with pytest.raises(compress.CompressError, match="end_step: required"):
        build_pruner({"name": "magnitude", "schedule": "cubic"})
    with pytest.raises(compress.CompressError, match="n_m"):
        build_pruner({"name": "magnitude", "scope": "global", "n_m": [2, 4]})
    with pytest.raises(compress.CompressError, match="sparsity"):
        build_pruner({"name": "magnitude", "sparsity": 1.0})


def test_one_shot_mask_survives_optimizer_steps():
    model = tiny_model()
    pruner = build_pruner({"name": "magnitude", "sparsity": 0.6})
    pruner.attach(model)
    zeros = {n: m.weight == 0 for n, m in pruner.layers.items()}
    assert all(int(z.sum()) == M.prune_count(z.numel(), 0.6) for z in zeros.values())
    train_steps(model, pruner, 2)
    assert all(torch.equal(pruner.layers[n].weight == 0, z) for n, z in zeros.items())


def test_fit_gradual_cubic_exports_compactly(tmp_path):
    pruner = {"name": "magnitude", "schedule": "cubic", "sparsity": 0.9, "start_step": 1, "end_step": 3, "frequency": 1}
    fit_and_check_export(tmp_path, pruner, prune_steps=4, sparsity=0.9)
