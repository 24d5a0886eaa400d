"""Measuring: executed GMACs (fused SDPA included), parameter counts, timing helpers."""
import pytest
import timm
import torch

from compress import measure


@pytest.fixture(scope="module")
def deit_tiny():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()


def analytic_vit_macs(model, image: int) -> float:
    """Patch embedding + blocks (qkv, attention, proj, MLP) + head, in MACs."""
    dim, depth = model.embed_dim, len(model.blocks)
    hidden = model.blocks[0].mlp.fc1.out_features
    patch = model.patch_embed.patch_size[0]
    p = (image // patch) ** 2
    n = p + model.num_prefix_tokens
    embed = p * 3 * patch * patch * dim
    block = n * 4 * dim * dim + 2 * n * n * dim + 2 * n * dim * hidden
    return embed + depth * block + dim * model.num_classes


def test_deit_tiny_gmacs_fused_matches_unfused(deit_tiny):
    assert all(blk.attn.fused_attn for blk in deit_tiny.blocks)  # timm's default: SDPA
    x = torch.randn(1, 3, 224, 224)
    fused = measure.count_gmacs(deit_tiny, x)
    assert fused == pytest.approx(1.254, rel=0.01)
    assert fused * 1e9 == pytest.approx(analytic_vit_macs(deit_tiny, 224), rel=0.005)
    for blk in deit_tiny.blocks:
        blk.attn.fused_attn = False
    try:
        unfused = measure.count_gmacs(deit_tiny, x)
    finally:
        for blk in deit_tiny.blocks:
            blk.attn.fused_attn = True
    assert fused == pytest.approx(unfused, rel=0.005)


def test_gmacs_are_per_image_and_keep_the_mode(tiny_vit):
    tiny_vit.train()
    one = measure.count_gmacs(tiny_vit, torch.randn(1, 3, 32, 32))
    assert tiny_vit.training  # restored
    three = measure.count_gmacs(tiny_vit, torch.randn(3, 3, 32, 32))
    assert one == pytest.approx(three, rel=1e-9)
    assert one * 1e9 == pytest.approx(analytic_vit_macs(tiny_vit, 32), rel=0.01)


def test_dropped_tokens_count(tiny_vit):
    """Executed GMACs: a model whose tokens were pruned costs less than the same weights dense."""
    from compress.pruners.base import build_pruner

    x = torch.randn(1, 3, 32, 32)
    dense = measure.count_gmacs(tiny_vit, x)
    pruner = build_pruner({"name": "zero_tprune", "schedule": [{"block": 0, "s_ratio": 0.25, "i_ratio": 0.25}]})
    pruner.attach(tiny_vit)
    pruned = measure.count_gmacs(tiny_vit, x)
    assert tiny_vit._compress_tokens.state.counts == [17, 9, 9]
    assert pruned < dense
    pruner.detach(tiny_vit)
    assert measure.count_gmacs(tiny_vit, x) == pytest.approx(dense, rel=1e-9)


def test_count_params(deit_tiny, tiny_vit):
    for model in (deit_tiny, tiny_vit):
        assert measure.count_params(model) == sum(p.numel() for p in model.parameters())
    assert measure.count_params(deit_tiny) == pytest.approx(5.72e6, rel=0.01)  # DeiT-Tiny: 5.7 M
    before = measure.count_nonzero_params(tiny_vit)
    head_nonzero = int((tiny_vit.head.weight != 0).sum())
    assert head_nonzero > 0
    with torch.no_grad():
        tiny_vit.head.weight.zero_()
    assert measure.count_nonzero_params(tiny_vit) == before - head_nonzero
    assert measure.count_params(tiny_vit) == sum(p.numel() for p in tiny_vit.parameters())  # unchanged


def test_throughput_and_profile(tiny_vit):
    x = torch.randn(4, 3, 32, 32)
    times = measure.time_forward(tiny_vit, x, warmup=1, repeats=3)
    assert len(times) == 3 and all(t > 0 for t in times)
    t = measure.throughput(tiny_vit, x, warmup=1, repeats=3)
    assert t["images_per_s"] == pytest.approx(4 / (t["latency_ms"] / 1e3))
    prof = measure.profile({"a": tiny_vit}, (3, 32, 32), batch_sizes=(2,), warmup=1, repeats=3)
    assert set(prof["a"]["speed"]) == {"2"}
    assert prof["a"]["speed"]["2"]["peak_memory_mb"] is None  # CPU
    assert prof["a"]["params"] == measure.count_params(tiny_vit)
