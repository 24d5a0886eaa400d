"""STViT / STViT-R: a hand-written reference forward, token counts and prefix tokens across timm ViT
families, executed GMACs vs the plan, gradients in train mode, export round trip, detach, and a tiny
``compress fit`` with a distill stage."""
import compress  # noqa: F401  (first: torchvision guard before timm)

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from compress import export
from compress.errors import CompressError
from compress.measure import count_gmacs
from compress.models.build import build_from_spec, model_spec
from compress.pruners.base import build_pruner
from compress.registry import PRUNERS
from vit_zoo import DIST, LS, VIT, assert_unpatched, export_round_trip, images, make

from conftest import RECIPES, only_run

SMALL = dict(img_size=64, patch_size=8, depth=4, num_classes=10)
ZOO = {  # timm families, small random configs: 8x8 patches + prefix tokens
    "deit": ("deit_tiny_patch16_224", SMALL),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", SMALL),
    "vit_augreg": ("vit_tiny_patch16_224.augreg_in21k", SMALL),
    "deit3": ("deit3_small_patch16_224", dict(SMALL, embed_dim=96, num_heads=3)),
    "gap_registers": ("vit_tiny_patch16_224", dict(SMALL, class_token=False, global_pool="avg", reg_tokens=2)),
}


def attach(model, **params):
    pruner = build_pruner({"name": "stvit", **params})
    pruner.attach(model)
    return pruner


def randomise_added(model, seed=3):
    """Move STViT's new parameters away from their init, so a load that missed them would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.stvit.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


# ---- a reference written from the spec ------------------------------------------------------


def ref_layer(blk, queries, context):
    """Explicit softmax attention (queries attend to context) + MLP, pre-norm, LayerScale."""
    a = blk.attn
    B, Nq, C = queries.shape
    W, b = a.qkv.weight, a.qkv.bias
    q = F.linear(blk.norm1(queries), W, b).reshape(B, Nq, 3, a.num_heads, a.head_dim)[:, :, 0].transpose(1, 2)
    kv = F.linear(blk.norm1(context), W, b).reshape(B, context.shape[1], 3, a.num_heads, a.head_dim)
    k, v = kv[:, :, 1].transpose(1, 2), kv[:, :, 2].transpose(1, 2)
    probs = ((q @ k.transpose(-2, -1)) * a.head_dim ** -0.5).softmax(-1)
    y = queries + blk.ls1(a.proj((probs @ v).transpose(1, 2).reshape(B, Nq, C)))
    return y + blk.ls2(blk.mlp(blk.norm2(y)))


def reference_forward(model, x, b, k, recover_at=None, recovery=None, g=None):
    t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    P, side = model.num_prefix_tokens, math.isqrt(k)
    B, n0, C = t.shape
    hw = int(math.isqrt(n0 - P))
    for i, blk in enumerate(model.blocks):
        if i == recover_at:
            t = torch.cat([t[:, :P], ref_layer(recovery, image, t)], 1)
        if i == b:
            image = t[:, P:]
            fmap = image.transpose(1, 2).reshape(B, C, hw, hw)
            # max over each region of the adaptive pooling grid, written out
            edges = [(math.floor(j * hw / side), math.ceil((j + 1) * hw / side)) for j in range(side)]
            cents = [fmap[:, :, r0:r1, c0:c1].amax((-1, -2)) for r0, r1 in edges for c0, c1 in edges]
            t = ref_layer(blk, torch.cat([t[:, :P], torch.stack(cents, 1)], 1), t)
        elif i == b + 1:
            q = t if g is None else torch.cat([t[:, :P], t[:, P:] + g], 1)
            t = ref_layer(blk, q, torch.cat([t, image], 1))
        else:
            t = ref_layer(blk, t, t)
    return model.forward_head(model.norm(t))


@pytest.mark.parametrize("cfg", [VIT, LS, DIST], ids=["vit", "layerscale", "distilled"])
@pytest.mark.parametrize("params", [{"stgm_block": 1, "num_semantic": 16},
                                    {"stgm_block": 0, "num_semantic": 9, "recover_at": 2}], ids=["stvit", "stvit_r"])
def test_patched_model_matches_a_reference_forward(cfg, params):
    model, x = make(cfg), images()
    pruner = attach(model, **params)
    randomise_added(model)
    with torch.no_grad():
        out = model(x)
        ref = reference_forward(model, x, pruner.stgm_block, params["num_semantic"], params.get("recover_at"),
                                getattr(model.stvit, "recovery", None), model.stvit.global_centres)
    assert torch.allclose(out, ref, atol=1e-4), (out - ref).abs().max()


# ---- token counts, prefix tokens, index map ---------------------------------------------------


@pytest.mark.parametrize("family", list(ZOO))
def test_counts_follow_the_plan_and_prefix_tokens_are_kept(family):
    name, kw = ZOO[family]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kw).eval()
    P, x = model.num_prefix_tokens, images(3)
    s, n0 = P + 16, P + 64
    for recover_at, expected in ((None, [n0, s, s, s]), (3, [n0, s, s, n0])):
        pruner = attach(model, stgm_block=0, num_semantic=16, recover_at=recover_at)
        with torch.no_grad():
            out = model(x)
        state = model._compress_tokens.state
        assert state.counts == expected == pruner.expected_tokens()
        assert out.shape == (3, 10) and torch.isfinite(out).all()
        assert torch.equal(state.index[:, :P], torch.arange(P).expand(3, P))  # prefix tokens kept, in front
        if recover_at is None:  # semantic tokens stand for no single original position
            assert state.index.shape == (3, s) and (state.index[:, P:] == -1).all()
        else:  # STViT-R: the full map is back, in its original order
            assert torch.equal(state.index, torch.arange(n0).expand(3, n0))
            assert "stvit_image" not in state.extras
        pruner.detach(model)


def test_default_plan_scales_to_the_model():
    model = make(VIT)  # 4 blocks, 64 patches: STGM at 4 // 3 = 1, 16 semantic tokens
    pruner = attach(model)
    assert (pruner.stgm_block, pruner.num_semantic) == (1, 16)
    small = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=64, depth=3)  # 16 patches -> 2x2
    assert attach(small).num_semantic == 4


# ---- executed GMACs ----------------------------------------------------------------------------


@pytest.mark.parametrize("params", [{"stgm_block": 1}, {"stgm_block": 0, "recover_at": 3},
                                    {"stgm_block": 2, "num_semantic": 4, "global_centres": False}])
def test_executed_gmacs_match_the_plan(params):
    model, x = make(VIT), images(1)
    dense = count_gmacs(model, x)
    pruner = attach(model, **params)
    measured = count_gmacs(model, x) / dense
    assert measured < 0.85
    assert abs(measured - pruner.expected_macs_ratio()) <= 0.02, (measured, pruner.expected_macs_ratio())


def test_target_gmacs_ratio_picks_the_stgm_position():
    model, x = make(VIT), images(1)
    dense = count_gmacs(model, x)
    options = {}
    for b in range(3):
        p = attach(model, stgm_block=b)
        options[b] = p.expected_macs_ratio()
        p.detach(model)
    assert options[0] < options[1] < options[2]
    target = options[1] + 0.02
    pruner = attach(model, target_gmacs_ratio=target)
    assert pruner.stgm_block == 1
    assert abs(count_gmacs(model, x) / dense - target) <= 0.04


# ---- training ----------------------------------------------------------------------------------


def test_gradients_reach_the_new_and_the_reused_weights_in_train_mode():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, drop_path_rate=0.2, proj_drop_rate=0.1,
                              attn_drop_rate=0.1, **dict(SMALL, embed_dim=96, num_heads=3))
    pruner = attach(model, stgm_block=1, recover_at=3)
    model.train()
    x, y = images(4), torch.tensor([0, 1, 2, 3])
    F.cross_entropy(model(x), y).backward()
    b = pruner.stgm_block
    watched = {
        "G": model.stvit.global_centres,
        "recovery qkv": model.stvit.recovery.attn.qkv.weight,
        "recovery mlp": model.stvit.recovery.mlp.fc2.weight,
        "STGM-1 qkv": model.blocks[b].attn.qkv.weight,
        "STGM-1 mlp": model.blocks[b].mlp.fc1.weight,
        "STGM-2 qkv": model.blocks[b + 1].attn.qkv.weight,
        "STGM-2 proj": model.blocks[b + 1].attn.proj.weight,
        "before": model.blocks[0].attn.qkv.weight,
        "after recovery": model.blocks[3].mlp.fc1.weight,
    }
    for what, p in watched.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, what
    # dropout and drop-path act in train mode and nowhere else
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))
        model.eval()
        assert torch.equal(model(x), model(x))


def test_new_parameters_are_registered_and_trained_by_an_optimizer():
    model = make(VIT)
    before = dict(model.named_parameters())
    attach(model, stgm_block=1, recover_at=3)
    names = {n for n, _ in model.named_parameters()} - set(before)
    assert "stvit.global_centres" in names and "stvit.recovery.attn.qkv.weight" in names
    assert set(model.state_dict()) - set(before) == names  # nothing but the new parameters
    assert model.stvit.global_centres.shape == (1, 16, 192)
    assert torch.equal(model.stvit.recovery.attn.qkv.weight, model.blocks[3].attn.qkv.weight)  # copy of its block
    g0 = model.stvit.global_centres.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()(images(2)).sum().backward()
    opt.step()
    assert not torch.equal(model.stvit.global_centres, g0)


# ---- export, detach ----------------------------------------------------------------------------


@pytest.mark.parametrize("params", [{}, {"recover_at": 3, "stgm_block": 0}], ids=["stvit", "stvit_r"])
def test_export_round_trip(tmp_path, params):
    model, x = make(VIT), images()
    pruner = attach(model, **params)
    randomise_added(model)
    loaded = export_round_trip(model, pruner, VIT, x, tmp_path / "exp")
    assert any(k.startswith("stvit.") for k in load_file(str(tmp_path / "exp" / "model.safetensors")))
    assert loaded._compress_tokens.state.counts == pruner.expected_tokens()
    # without the pruner: the same backbone weights, all tokens, none of STViT's parameters
    plain = export.load(tmp_path / "exp", with_pruners=False)
    assert not any(k.startswith("stvit.") for k in plain.state_dict())
    assert torch.equal(plain.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    with torch.no_grad():
        assert plain(x).shape == loaded(x).shape


def test_detach_restores_the_unpatched_model():
    model, x = make(LS), images()
    keys = set(model.state_dict())
    with torch.no_grad():
        ref = model(x)
    pruner = attach(model, stgm_block=0, recover_at=2)
    with torch.no_grad():
        assert not torch.allclose(model(x), ref, atol=1e-3)
    pruner.detach(model)
    assert_unpatched(model)
    assert set(model.state_dict()) == keys and not hasattr(model, "stvit")
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    attach(model)  # can attach again after detach


def test_config_errors():
    assert "stvit" in PRUNERS and PRUNERS.get("stvit").replay_on_load
    for bad in ({"stgm_block": 1, "target_gmacs_ratio": 0.5}, {"num_semantic": 12}, {"stgm_block": -1},
                {"recover_at": 0}, {"target_gmacs_ratio": 1.5}, {"semantic": 16}):
        with pytest.raises(CompressError):
            build_pruner({"name": "stvit", **bad})
    model = make(VIT)
    for params, msg in (({"stgm_block": 3}, "must end before block 4"), ({"stgm_block": 1, "recover_at": 2}, "before recover_at 2"),
                        ({"recover_at": 4}, "past the last block"), ({"num_semantic": 100}, "10x10 pooling of a 8x8")):
        with pytest.raises(ValueError, match=msg):
            attach(model, **params)
        assert_unpatched(model)
    attach(model)
    with pytest.raises(CompressError, match="already has a token pruner"):
        attach(model)


# ---- a tiny compress fit -------------------------------------------------------------------------


def test_tiny_fit_trains_the_semantic_tokens_and_exports(tmp_path):
    from compress.data.quickstart import render_shapes
    from compress.run import fit

    overrides = ["data.params.num_train=64", "data.params.num_val=16", "data.batch_size=32", "stages.0.epochs=1",
                 "model.kwargs.depth=4", "stages.1.pruner.stgm_block=1", "stages.1.evaluate=false", "stages.2.epochs=0",
                 "stages.2.max_steps=3", "evaluate.bench=false", "trainer.log_every_n_steps=1"]
    metrics = fit(RECIPES / "quickstart_stvit.yaml", overrides, out=tmp_path)
    run_dir = only_run(tmp_path)
    assert set(metrics) >= {"dense", "pruned", "export"}
    pruned = load_file(str(run_dir / "stages" / "1-prune" / "model.safetensors"))["stvit.global_centres"]
    distilled = load_file(str(run_dir / "stages" / "2-distill" / "model.safetensors"))["stvit.global_centres"]
    assert not torch.equal(pruned, distilled)  # the distill stage trained G
    model = compress.load(run_dir / "export")
    assert torch.equal(model.stvit.global_centres, distilled)
    images, _ = render_shapes(4, 32, seed=1)
    with torch.no_grad():
        a, b = model((images - 0.5) / 0.5), compress.load(run_dir / "export")((images - 0.5) / 0.5)
    assert torch.equal(a, b)
    assert model._compress_tokens.state.counts == [65, 65, 17, 17]
    dense = build_from_spec(model_spec("quickstart_vit", {"depth": 4}))
    assert count_gmacs(model, images[:1]) / count_gmacs(dense, images[:1]) < 0.7
