"""Head / MLP-width pruning: the GMACs plan, physical shapes, importance, the optimizer after a prune,
export -> compress.load round trip, and a short real ``compress fit`` (prune steps + distill)."""
import compress  # noqa: F401  (first: torchvision guard before timm)

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from compress import export
from compress.errors import CompressError
from compress.measure import count_gmacs, count_params
from compress.models.build import model_spec
from compress.pruners.base import build_pruner
from conftest import only_run

BASE = dict(img_size=32, patch_size=8, depth=3, num_classes=10)
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **BASE).eval()


def pruned(**params):
    model = vit()
    pruner = build_pruner({"name": "heads", **params})
    pruner.attach(model)
    pruner.complete()
    return model.eval(), pruner


def test_gmacs_target_is_met_and_shapes_stay_consistent():
    dense = vit()
    model, pruner = pruned(target_gmacs_ratio=0.6, steps=3)
    ratio = count_gmacs(model, X) / count_gmacs(dense, X)
    assert 0.5 < ratio <= 0.6 + 0.01, ratio
    assert count_params(model) < 0.7 * count_params(dense)
    for block, (heads, hidden) in zip(model.blocks, pruner.final_widths):
        attn = block.attn
        assert attn.num_heads == heads < 3 and attn.head_dim == 64
        assert attn.num_heads * attn.head_dim == attn.attn_dim == attn.qkv.out_features // 3 == attn.proj.in_features
        assert block.mlp.fc1.out_features == block.mlp.fc2.in_features == hidden and hidden % 8 == 0
    assert model(X).shape == (2, 10)
    with torch.no_grad():
        attn = model.blocks[0].attn
        attn.fused_attn = False
        slow = model(X)
        attn.fused_attn = True
        assert torch.allclose(slow, model(X), atol=1e-5)  # the fused and explicit paths agree after pruning


def test_explicit_ratios():
    model, _ = pruned(head_pruning_ratio=0.34, mlp_pruning_ratio=0.5)
    assert [b.attn.num_heads for b in model.blocks] == [2, 2, 2]
    assert [b.mlp.fc1.out_features for b in model.blocks] == [384, 384, 384]


@pytest.mark.parametrize("params", [{"target_gmacs_ratio": 1.0}, {"head_pruning_ratio": 0.0, "mlp_pruning_ratio": 0.0}])
def test_zero_target_is_the_dense_model(params):
    dense = vit()
    model, pruner = pruned(**params)
    with torch.no_grad():
        assert torch.equal(model(X), dense(X))
    assert pruner.finalize(model) == {}


def test_magnitude_keeps_the_largest_heads_and_units():
    model = vit()
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    hd, dim = attn.head_dim, attn.attn_dim
    with torch.no_grad():
        for h in (0, 2):  # heads 0 and 2 get 10x larger weights; head 1 must go
            for s in range(3):
                attn.qkv.weight[s * dim + h * hd: s * dim + (h + 1) * hd] *= 10
            attn.proj.weight[:, h * hd:(h + 1) * hd] *= 10
        big = torch.arange(0, 768, 2)[:384]  # every even hidden unit is large
        mlp.fc1.weight[big] *= 10
    rows = attn.qkv.weight.detach().clone()
    pruner = build_pruner({"name": "heads", "head_pruning_ratio": 0.34, "mlp_pruning_ratio": 0.5, "steps": 1})
    pruner.attach(model)
    pruner.complete()
    assert attn.num_heads == 2
    keep = torch.cat([torch.arange(s * dim + h * hd, s * dim + (h + 1) * hd) for s in range(3) for h in (0, 2)])
    assert torch.equal(attn.qkv.weight, rows[keep])
    assert mlp.fc1.out_features == 384


def test_bad_budget_is_a_clear_error():
    with pytest.raises(CompressError, match="either target_gmacs_ratio"):
        build_pruner({"name": "heads", "target_gmacs_ratio": 0.5, "head_pruning_ratio": 0.2})
    with pytest.raises(CompressError, match="target_gmacs_ratio"):
        build_pruner({"name": "heads", "target_gmacs_ratio": 0.01, "round_to": 64}).attach(vit())
    with pytest.raises(CompressError, match="not a timm VisionTransformer"):
        build_pruner({"name": "heads"}).attach(timm.create_model("resnet10t", pretrained=False))


def test_optimizer_follows_the_shrunk_model_and_training_continues():
    model = vit().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pruner = build_pruner({"name": "heads", "target_gmacs_ratio": 0.6, "steps": 2})
    pruner.attach(model)
    y = torch.tensor([1, 2])
    F.cross_entropy(model(X), y).backward()
    opt.step()
    opt.zero_grad()
    pruner.prune_event(physical=True, optimizers=[opt])
    assert model.blocks[0].mlp.fc1.out_features < 768
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters()}
    for _ in range(2):
        loss = F.cross_entropy(model(X), y)
        assert math.isfinite(float(loss.detach()))
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_masked_pruning_then_shrink_gives_the_same_logits():
    """The multi-process path: mask first, shrink at the stage end; the logits do not change."""
    model = vit()
    pruner = build_pruner({"name": "heads", "target_gmacs_ratio": 0.6, "steps": 2})
    pruner.attach(model)
    pruner.prune_event(physical=False)
    pruner.prune_event(physical=False)
    assert model.blocks[0].attn.num_heads == 3  # still dense, masked
    with torch.no_grad():
        masked = model(X)
        pruner.shrink()
        assert model.blocks[0].attn.num_heads < 3
        assert torch.allclose(model(X), masked, atol=1e-5)


def test_export_and_load_rebuild_the_pruned_model(tmp_path):
    model, pruner = pruned(target_gmacs_ratio=0.6, importance="magnitude")
    edits = pruner.finalize(model)
    assert set(edits) == {"modules", "attrs"}
    export.save(model, tmp_path / "export", model_spec("vit_tiny_patch16_224", BASE), [pruner], [edits])
    loaded = export.load(tmp_path / "export")
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))
    assert count_params(loaded) == count_params(model) < count_params(vit())


# ---- a real run ------------------------------------------------------------------------------------------


def test_fit_prunes_while_training_then_distills_and_exports(tmp_path):
    from compress.run import fit

    recipe = {
        "name": "heads_tiny",
        "model": {"name": "quickstart_vit", "kwargs": {"depth": 2}},
        "data": {"kind": "quickstart", "batch_size": 16, "num_workers": 0, "params": {"num_train": 96, "num_val": 32}},
        "stages": [
            {"kind": "prune", "max_steps": 5, "optimizer": {"lr": 1e-3},
             "pruner": {"name": "heads", "target_gmacs_ratio": 0.6, "importance": "taylor", "steps": 2, "prune_every": 2}},
            {"kind": "distill", "max_steps": 2, "distill": {"teacher": "dense"}},
        ],
        "trainer": {"accelerator": "cpu", "devices": 1, "log_every_n_steps": 1},
        "evaluate": {"bench": False, "batch_size": 4},
    }
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    metrics = fit(path, out=tmp_path / "runs")
    run_dir = only_run(tmp_path / "runs")
    # the loss stayed finite through the prune events (steps 2 and 4) and the distill stage
    import csv

    for stage in ("0-prune", "1-distill"):
        rows = list(csv.DictReader(open(run_dir / "stages" / stage / "logs" / "metrics.csv")))
        losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
        assert losses and all(math.isfinite(v) for v in losses), stage
    loaded = compress.load(run_dir / "export")
    from timm.models.vision_transformer import VisionTransformer

    from compress.models.quickstart_vit import quickstart_vit

    assert isinstance(loaded, VisionTransformer) and not loaded.training

    assert count_params(loaded) < 0.75 * count_params(quickstart_vit(depth=2))
    assert all(b.attn.num_heads == 2 for b in loaded.blocks)  # 3 -> 2 heads per block at 60 % GMACs
    from safetensors.torch import load_file

    last = load_file(str(run_dir / "stages" / "1-distill" / "model.safetensors"))
    state = loaded.state_dict()
    assert set(last) == set(state) and all(torch.equal(last[k], state[k]) for k in last)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.isfinite(loaded(x)).all()
    assert metrics["pruned"]["images"] == 32


def test_a_prune_stage_without_training_is_measured_as_exported(tmp_path):
    """The run's own accuracy and GMACs describe the exported (finalized, narrower) model, not the model
    as it stood before the pending prunes."""
    import yaml

    from compress.run import fit

    recipe = {
        "name": "heads_zero_shot",
        "model": {"name": "quickstart_vit", "kwargs": {"depth": 2}},
        "data": {"kind": "quickstart", "batch_size": 16, "num_workers": 0, "params": {"num_train": 32, "num_val": 32}},
        "stages": [{"kind": "prune", "pruner": {"name": "heads", "target_gmacs_ratio": 0.6}}],
        "trainer": {"accelerator": "cpu", "devices": 1},
        "evaluate": {"batch_size": 4},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    metrics = fit(path, out=tmp_path / "runs")
    run_dir = only_run(tmp_path / "runs")
    loaded = compress.load(run_dir / "export")
    assert metrics["bench"]["pruned"]["params"] == count_params(loaded)
    assert metrics["bench"]["ratios"]["gmacs"] < 0.65
