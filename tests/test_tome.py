"""ToMe: the merge against a naive loop, a hand-written reference forward (LayerScale included),
schedules, prefix tokens, sizes, detach, export round trip and the GMACs budget."""
import compress  # noqa: F401  (first: torchvision guard before timm)

import pytest
import torch
import torch.nn.functional as F

from compress.errors import CompressError
from compress.measure import count_gmacs
from compress.pruners.base import build_pruner
from compress.pruners.token.tome import bipartite_merge, merged_counts
from compress.registry import PRUNERS
from vit_zoo import DIST, LS, VIT, assert_unpatched, export_round_trip, images, make



def attach(model, **params):
    pruner = build_pruner({"name": "tome", **params})
    pruner.attach(model)
    return pruner


# ---- the merge itself ------------------------------------------------------------------------


def naive_merge(x, metric, size, index, r, P):
    """Per image, with Python loops: the spec's steps one by one."""
    outs = []
    for b in range(x.shape[0]):
        N = x.shape[1]
        A = [i for i in range(P, N) if i % 2 == 0]
        Bs = [i for i in range(P, N) if i % 2 == 1]
        m = F.normalize(metric[b].double(), dim=-1)
        best = {a: max(Bs, key=lambda j: float(m[a] @ m[j])) for a in A}
        score = {a: float(m[a] @ m[best[a]]) for a in A}
        merged = sorted(A, key=lambda a: -score[a])[:r]
        unmerged = [a for a in A if a not in merged]
        xs, ss = {j: x[b, j].double() * size[b, j] for j in Bs}, {j: float(size[b, j]) for j in Bs}
        for a in merged:
            xs[best[a]] = xs[best[a]] + x[b, a].double() * size[b, a]
            ss[best[a]] += float(size[b, a])
        rows = [x[b, i].double() for i in range(P)] + [x[b, a].double() for a in unmerged] + [xs[j] / ss[j] for j in Bs]
        sizes = [float(size[b, i]) for i in range(P)] + [float(size[b, a]) for a in unmerged] + [ss[j] for j in Bs]
        idx = [int(index[b, i]) for i in range(P)] + [int(index[b, a]) for a in unmerged] + [int(index[b, j]) for j in Bs]
        outs.append((torch.stack(rows), torch.tensor(sizes, dtype=torch.float64), torch.tensor(idx)))
    return outs


@pytest.mark.parametrize("P,N,r", [(1, 17, 5), (2, 18, 4), (1, 9, 4)])
def test_merge_matches_a_naive_loop(P, N, r):
    g = torch.Generator().manual_seed(N)
    x = torch.randn(3, N, 6, generator=g, dtype=torch.float64)
    metric = torch.randn(3, N, 4, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (3, N), generator=g).double()
    index = torch.randperm(N, generator=g).unsqueeze(0).expand(3, N)
    xo, so, io = bipartite_merge(x, metric, size, index, r, P)
    assert xo.shape == (3, N - r, 6)
    for b, (xr, sr, ir) in enumerate(naive_merge(x, metric, size, index, r, P)):
        assert torch.allclose(xo[b], xr, atol=1e-10)
        assert torch.allclose(so[b], sr)
        assert torch.equal(io[b], ir)
        # the size-weighted mean conserves mass: sum(s * x) and sum(s) are unchanged
        assert torch.allclose((so[b, :, None] * xo[b]).sum(0), (size[b, :, None] * x[b]).sum(0), atol=1e-9)
        assert torch.isclose(so[b].sum(), size[b].sum())


def test_r_is_capped_so_both_sides_survive():
    x = torch.randn(1, 7, 3)
    xo, so, io = bipartite_merge(x, x, torch.ones(1, 7), torch.arange(7)[None], 100, 1)
    assert xo.shape[1] == 7 - 3 and so.sum() == 7
    assert merged_counts(7, 1, [100]) == [(7, 4)]
    assert merged_counts(197, 1, [12] * 2) == [(197, 185), (185, 173)]


# ---- in a model --------------------------------------------------------------------------------


def reference_forward(model, x, rs):
    """Hand-written ToMe ViT forward: explicit attention with +log(size), LayerScale, merges."""
    t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    P = model.num_prefix_tokens
    size = torch.ones(t.shape[:2])
    index = torch.arange(t.shape[1]).expand(t.shape[0], -1)
    for blk, r in zip(model.blocks, rs):
        a = blk.attn
        B, N, C = t.shape
        q, k, v = a.qkv(blk.norm1(t)).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-2, -1)) * a.scale + size.log()[:, None, None, :]
        y = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
        t = t + blk.ls1(a.proj(y))
        t, size, index = bipartite_merge(t, k.mean(1), size, index, r, P)
        t = t + blk.ls2(blk.mlp(blk.norm2(t)))
    return model.forward_head(model.norm(t)), size, index


@pytest.mark.parametrize("cfg", [VIT, LS, DIST], ids=["vit", "layerscale", "distilled"])
def test_patched_model_matches_a_reference_forward(cfg):
    model, x = make(cfg), images()
    ref, size, index = reference_forward(model, x, [6, 5, 4, 3])
    attach(model, r_schedule=[6, 5, 4, 3][: len(model.blocks)])
    with torch.no_grad():
        out = model(x)
    state = model._compress_tokens.state
    assert torch.allclose(out, ref, atol=1e-4), (out - ref).abs().max()
    assert torch.allclose(state.size, size) and torch.equal(state.index, index)


@pytest.mark.parametrize("cfg", [VIT, LS, DIST], ids=["vit", "layerscale", "distilled"])
def test_r0_equals_the_unpatched_model(cfg):
    model, x = make(cfg), images()
    with torch.no_grad():
        ref = model(x)
        attach(model, r=0)
        out = model(x)
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("cfg", [VIT, DIST], ids=["vit", "distilled"])
@pytest.mark.parametrize("params", [{"r": 7}, {"r_schedule": [10, 0, 3, 5]}])
def test_counts_prefix_sizes_and_index(cfg, params):
    model, x = make(cfg), images(3)
    depth = len(model.blocks)
    params = {k: (v[:depth] if isinstance(v, list) else v) for k, v in params.items()}
    pruner = attach(model, **params)
    rs = params.get("r_schedule", [params.get("r")] * depth)
    with torch.no_grad():
        model(x)
    state = model._compress_tokens.state
    P = model.num_prefix_tokens
    n0 = 64 + P
    expected = [n0 - sum(rs[:i]) for i in range(depth)]
    assert state.counts == expected
    assert [a for a, _ in pruner.expected_tokens()] == expected
    assert state.index.shape[1] == n0 - sum(rs)
    assert torch.equal(state.index[:, :P], torch.arange(P).expand(3, P))  # prefix untouched, in front
    assert torch.all(state.size[:, :P] == 1)
    assert torch.allclose(state.size.sum(1), torch.full((3,), float(n0)))  # sizes sum to N
    for row in state.index:  # every surviving token stands for a distinct original token
        assert len(set(row.tolist())) == row.numel() and row.min() >= 0 and row.max() < n0


def test_keys_only_attention_stays_fused():
    model = make(VIT)
    pruner = attach(model, r=4)
    assert [pruner.needs(i) for i in range(4)] == ["keys"] * 4
    assert pruner.prop_attn is True
    assert build_pruner({"name": "tome", "r": 4, "prop_attn": False}).prop_attn is False


def test_detach_restores_the_original_classes():
    model, x = make(VIT), images()
    with torch.no_grad():
        ref = model(x)
    pruner = attach(model, r=5)
    pruner.detach(model)
    assert_unpatched(model)
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_export_round_trip(tmp_path):
    model, x = make(VIT), images()
    pruner = attach(model, r=6)
    loaded = export_round_trip(model, pruner, VIT, x, tmp_path / "exp")
    assert loaded._compress_tokens.state.counts == [65, 59, 53, 47]


def test_target_gmacs_ratio_lands_on_the_measured_ratio():
    model, x = make(VIT), images(1)
    dense = count_gmacs(model, x)
    pruner = attach(model, target_gmacs_ratio=0.65)
    assert len(set(pruner.rs)) == 1 and pruner.rs[0] > 0
    assert abs(pruner.expected_macs_ratio() - 0.65) < 0.03
    assert abs(count_gmacs(model, x) / dense - 0.65) <= 0.05


def test_config_errors():
    assert "tome" in PRUNERS
    for bad in ({"r": 4, "r_schedule": [1, 1, 1, 1]}, {"r": 4, "target_gmacs_ratio": 0.5}, {"r": -1},
                {"r_schedule": [1, -1, 0, 0]}, {"schedule": 3}):
        with pytest.raises(CompressError):
            build_pruner({"name": "tome", **bad})
    with pytest.raises(ValueError, match="r_schedule has 2 entries"):
        attach(make(VIT), r_schedule=[1, 2])
