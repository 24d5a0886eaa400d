"""Measuring: executed GMACs (fused SDPA included), parameter counts, timing helpers."""
import copy
import os
import sys
import time

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


def test_profile_rounds_interleave_and_last_their_time(tiny_vit):
    """Every model runs in every round for at least ``round_seconds``; the per-round speeds are what the
    reported speed-up (their median ratio) and its spread come from."""
    import time as _time

    other = copy.deepcopy(tiny_vit)
    t0 = _time.perf_counter()
    prof = measure.profile({"a": tiny_vit, "b": other}, (3, 32, 32), batch_sizes=(1, 2), warmup=1, repeats=1,
                           rounds=3, round_seconds=0.05)
    assert _time.perf_counter() - t0 >= 2 * 3 * 2 * 0.05
    for name in ("a", "b"):
        for bs in ("1", "2"):
            speed = prof[name]["speed"][bs]
            assert len(speed["rounds_images_per_s"]) == 3 and speed["dropped_rounds"] >= 0
    ratios = measure.round_ratios(prof["b"], prof["a"])
    assert set(ratios) == {"1", "2"} and all(len(v) == 3 and all(r > 0 for r in v) for v in ratios.values())


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs /proc/stat (Linux)")
def test_cpu_watch_sees_another_process_working():
    """A neighbour that keeps a core busy during a round is seen (such rounds are retaken), while this
    process's own work is not counted as a neighbour's."""
    import subprocess
    import sys as _sys

    watch = measure.CpuWatch()
    subprocess.run([_sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 0.6: pass"], check=True)
    assert watch.others() > 0.5
    background = measure.busy_cores_elsewhere(0.3)
    watch = measure.CpuWatch()
    x = torch.randn(256, 256)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.3:
        x = (x @ x).tanh()
    assert watch.others() < background + 0.5  # the machine's background, not this loop's core


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_applies_on_glibc():
    assert measure.keep_freed_memory() is True
    assert measure.keep_freed_memory() is True  # idempotent
