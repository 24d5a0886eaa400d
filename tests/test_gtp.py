"""GTP-ViT: graphs, selection, propagation and sparsity against independent computations, a
hand-written reference forward (LayerScale included), schedules, prefix tokens, token sizes,
detach, export round trip and the GMACs budget."""
import compress  # noqa: F401  (first: torchvision guard before timm)

import pytest
import torch

from compress.errors import CompressError
from compress.measure import count_gmacs
from compress.pruners.base import build_pruner
from compress.pruners.token.gtp import (
    GRAPH_KEY,
    normalise_graph,
    graph_weights,
    propagate,
    propagation_counts,
    selection_scores,
    semantic_graph,
    sparsify_attention,
    spatial_graph,
)
from compress.registry import PRUNERS
from vit_zoo import DIST, LS, VIT, assert_unpatched, export_round_trip, images, make



def attach(model, **params):
    pruner = build_pruner({"name": "gtp", **params})
    pruner.attach(model)
    return pruner


# ---- the method's pieces -----------------------------------------------------------------------


def test_spatial_graph_is_the_8_neighbourhood():
    g = spatial_graph((3, 4))
    assert torch.equal(g, g.T) and g.diagonal().sum() == 0
    deg = g.sum(1).view(3, 4)
    assert deg[0, 0] == 3 and deg[0, 1] == 5 and deg[1, 1] == 8 and deg[2, 3] == 3
    # neighbours of (1, 1) = index 5: rows 0..2, cols 0..2 without itself
    assert set(g[5].nonzero().flatten().tolist()) == {0, 1, 2, 4, 6, 8, 9, 10}
    a = normalise_graph(g)
    d = g.sum(1)
    assert torch.allclose(a, g / (d[:, None] * d[None, :]).sqrt())
    assert torch.allclose(a, a.T)


def test_semantic_graph_links_the_k_most_similar_tokens():
    x = torch.randn(2, 10, 5, generator=torch.Generator().manual_seed(0))
    g = semantic_graph(x, 3)
    assert torch.all(g.sum(-1) == 3) and torch.all(g.diagonal(dim1=1, dim2=2) == 0)
    z = torch.nn.functional.normalize(x, dim=-1)
    sim = z @ z.transpose(1, 2) - 10 * torch.eye(10)
    for b in range(2):
        for i in range(10):
            assert set(g[b, i].nonzero().flatten().tolist()) == set(sim[b, i].topk(3).indices.tolist())


def test_mixed_graph_is_the_union():
    model = make(VIT)
    pruner = attach(model, num_prop=2, graph="mixed", num_neighbours=4)
    x = torch.randn(2, 64, 8)
    a = pruner._graph(x)
    union = torch.maximum(spatial_graph((8, 8)).expand(2, -1, -1), semantic_graph(x, 4))
    assert torch.allclose(a, normalise_graph(union))


def test_selection_score_is_max_diag_times_max_column_sum():
    g = torch.Generator().manual_seed(0)
    A = torch.rand(2, 3, 7, 7, generator=g).softmax(-1)
    s = selection_scores(A, 1)
    for b in range(2):
        for i in range(1, 7):
            diag = max(A[b, h, i, i] for h in range(3))
            col = max(A[b, h, :, i].sum() for h in range(3))  # all rows, prefix row included
            assert torch.isclose(s[b, i - 1], diag * col)


def test_propagation_adds_alpha_times_the_graph_weighted_tokens():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 4, generator=g, dtype=torch.float64)
    spatial = normalise_graph(spatial_graph((3, 3))).double()
    size = 1 + torch.rand(2, 9, generator=g, dtype=torch.float64)
    keep = torch.tensor([[0, 2, 3, 5, 6, 8], [1, 2, 3, 4, 5, 7]])
    prop = torch.tensor([[1, 4, 7], [0, 6, 8]])
    for graph in (spatial, spatial.expand(2, -1, -1) + torch.rand(2, 9, 9, generator=g, dtype=torch.float64)):
        per_image = graph.expand(2, -1, -1)
        w = graph_weights(graph, keep, prop)
        for b in range(2):
            assert torch.equal(w[b], per_image[b][keep[b]][:, prop[b]])  # Â[kept, prop] of the original graph
        xk, sk = propagate(x, w, keep, prop, 0.3, size)
        for b in range(2):
            for r, i in enumerate(keep[b].tolist()):
                want = x[b, i] + 0.3 * sum(per_image[b, i, j] * x[b, j] for j in prop[b].tolist())
                assert torch.allclose(xk[b, r], want)
                assert torch.isclose(sk[b, r], size[b, i] + 0.3 * sum(per_image[b, i, j] * size[b, j] for j in prop[b].tolist()))
            # the size invariant that holds: the kept sizes gain alpha * (column sums of Â[kept, prop]) . s_prop
            gain = 0.3 * (per_image[b][keep[b]][:, prop[b]].sum(0) * size[b, prop[b]]).sum()
            assert torch.isclose(sk[b].sum(), size[b, keep[b]].sum() + gain)


def test_prefix_rows_receive_nothing():
    x = torch.randn(1, 5, 3, dtype=torch.float64)
    keep, prop = torch.tensor([[0, 1, 3]]), torch.tensor([[2, 4]])  # row 0 is a prefix token
    w = torch.rand(1, 2, 2, dtype=torch.float64)  # for the kept patch rows 1 and 3
    out, _ = propagate(x, w, keep, prop, 0.5)
    assert torch.equal(out[0, 0], x[0, 0])
    assert torch.allclose(out[0, 1:], x[0, [1, 3]] + 0.5 * w[0] @ x[0, [2, 4]])


def test_original_graph_addressing_matches_shrinking_the_graph_each_block():
    """Two blocks of propagation: weights read from the original graph at original positions equal those of a
    graph shrunk to Â[kept, kept] after the first block."""
    graph = normalise_graph(spatial_graph((4, 4)))
    keep1, prop1 = torch.tensor([[0, 1, 2, 4, 5, 7, 8, 9, 10, 11, 13, 14, 15]]), torch.tensor([[3, 6, 12]])
    shrunk = graph[keep1[0]][:, keep1[0]]
    keep2, prop2 = torch.tensor([[0, 2, 3, 5, 6, 8, 9, 10, 12]]), torch.tensor([[1, 4, 7, 11]])  # among survivors
    want = shrunk[keep2[0]][:, prop2[0]]
    got = graph_weights(graph, keep1.gather(1, keep2), keep1.gather(1, prop2))
    assert torch.equal(got[0], want)


def test_sparsity_zeroes_the_smallest_entries_without_renormalising():
    A = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(0)).softmax(-1)
    assert sparsify_attention(A, 1.0) is A
    S = sparsify_attention(A, 0.75)  # k = 9 of 36: the 8 below the 9th smallest go
    assert torch.all((S == 0).flatten(2).sum(-1) == 8)
    kept = S != 0
    assert torch.equal(S[kept], A[kept])
    assert torch.all(A[~kept].view(2, 3, 8).amax(-1) <= A.masked_fill(~kept, 2).flatten(2).amin(-1))


# ---- in a model --------------------------------------------------------------------------------


def reference_forward(model, x, props, alpha, token_scale):
    """Hand-written GTP forward: explicit attention (+log size), LayerScale, spatial graph, loops."""
    t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    P = model.num_prefix_tokens
    B = t.shape[0]
    graph = normalise_graph(spatial_graph((8, 8))).expand(B, -1, -1)
    size = torch.ones(t.shape[:2])
    for blk, p in zip(model.blocks, props):
        a = blk.attn
        N, C = t.shape[1:]
        q, k, v = a.qkv(blk.norm1(t)).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-2, -1)) * a.scale
        if token_scale:
            logits = logits + size.log()[:, None, None, :]
        probs = logits.softmax(-1)
        t = t + blk.ls1(a.proj((probs @ v).transpose(1, 2).reshape(B, N, C)))
        if p:
            score = probs.diagonal(dim1=-2, dim2=-1)[..., P:].amax(1) * probs[..., P:].sum(-2).amax(1)
            rows, sizes, graphs = [], [], []
            for b in range(B):
                low = set(score[b].argsort()[:p].tolist())
                keep = [i for i in range(N - P) if i not in low]
                new = [t[b, i] for i in range(P)] + [
                    t[b, P + i] + alpha * sum(graph[b, i, j] * t[b, P + j] for j in low) for i in keep
                ]
                rows.append(torch.stack(new))
                sizes.append(torch.cat([size[b, :P], torch.stack(
                    [size[b, P + i] + alpha * sum(graph[b, i, j] * size[b, P + j] for j in low) for i in keep])]))
                graphs.append(graph[b][keep][:, keep])
            t, size, graph = torch.stack(rows), torch.stack(sizes), torch.stack(graphs)
        t = t + blk.ls2(blk.mlp(blk.norm2(t)))
    return model.forward_head(model.norm(t)), size


@pytest.mark.parametrize("cfg", [VIT, LS, DIST], ids=["vit", "layerscale", "distilled"])
@pytest.mark.parametrize("token_scale", [False, True])
def test_patched_model_matches_a_reference_forward(cfg, token_scale):
    model, x = make(cfg), images()
    props = [5, 0, 7, 3][: len(model.blocks)]
    with torch.no_grad():
        ref, size = reference_forward(model, x, props, 0.2, token_scale)
        attach(model, num_prop=props, alpha=0.2, token_scale=token_scale)
        out = model(x)
    assert torch.allclose(out, ref, atol=1e-4), (out - ref).abs().max()
    if token_scale:
        assert torch.allclose(model._compress_tokens.state.size, size, atol=1e-5)


@pytest.mark.parametrize("cfg", [VIT, LS, DIST], ids=["vit", "layerscale", "distilled"])
def test_no_propagation_equals_the_unpatched_model(cfg):
    model, x = make(cfg), images()
    with torch.no_grad():
        ref = model(x)
        attach(model, num_prop=0, token_scale=True)
        out = model(x)
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("cfg", [VIT, DIST], ids=["vit", "distilled"])
@pytest.mark.parametrize("params", [{"num_prop": 6}, {"num_prop": [9, 0, 4, 12], "graph": "mixed"},
                                    {"num_prop": 5, "graph": "semantic", "theta": 0.8}])
def test_counts_prefix_and_token_sizes(cfg, params):
    model, x = make(cfg), images(3)
    depth = len(model.blocks)
    params = {k: (v[:depth] if isinstance(v, list) else v) for k, v in params.items()}
    pruner = attach(model, token_scale=True, **params)
    props = params["num_prop"] if isinstance(params["num_prop"], list) else [params["num_prop"]] * depth
    with torch.no_grad():
        model(x)
    state = model._compress_tokens.state
    P = model.num_prefix_tokens
    n0 = 64 + P
    expected = [n0 - sum(props[:i]) for i in range(depth)]
    assert state.counts == expected
    assert [a for a, _ in pruner.expected_tokens()] == expected
    n_end = n0 - sum(props)
    assert state.index.shape[1] == n_end and state.extras[GRAPH_KEY].shape[-2:] == (64, 64)  # over the original patches
    assert torch.equal(state.index[:, :P], torch.arange(P).expand(3, P))  # prefix untouched, in front
    for row in state.index:
        assert len(set(row.tolist())) == row.numel() and row.min() >= 0 and row.max() < n0
    # token sizes: prefix 1, patch tokens only gain; alpha * sqrt(max degree) <= 1 bounds the total by N
    assert torch.all(state.size[:, :P] == 1) and torch.all(state.size >= 1)
    assert torch.all(state.size.sum(1) <= n0) and torch.all(state.size.sum(1) > n_end)


def test_only_pruning_layers_materialise_attention():
    pruner = attach(make(VIT), num_prop=[3, 0, 3, 0])
    assert [pruner.needs(i) for i in range(4)] == ["probs", None, "probs", None]
    pruner = attach(make(VIT), num_prop=0, theta=0.9)
    assert [pruner.needs(i) for i in range(4)] == ["probs"] * 4


def test_theta_sparsifies_every_layer():
    model, x = make(VIT), images()
    with torch.no_grad():
        ref = model(x)
        attach(model, num_prop=0, theta=0.5)
        out = model(x)
    assert not torch.allclose(out, ref, atol=1e-3)


def test_alpha_zero_is_plain_removal():
    model, x = make(VIT), images()
    attach(model, num_prop=6, alpha=0.0)
    with torch.no_grad():
        model(x)
    assert GRAPH_KEY not in model._compress_tokens.state.extras
    assert model._compress_tokens.state.counts == [65, 59, 53, 47]


def test_detach_restores_the_original_classes():
    model, x = make(VIT), images()
    with torch.no_grad():
        ref = model(x)
    pruner = attach(model, num_prop=5, theta=0.9)
    with torch.no_grad():
        model(x)
    pruner.detach(model)
    assert_unpatched(model)
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_export_round_trip(tmp_path):
    model, x = make(VIT), images()
    pruner = attach(model, num_prop=[4, 4, 8, 8], graph="mixed", token_scale=True)
    loaded = export_round_trip(model, pruner, VIT, x, tmp_path / "exp")
    assert loaded._compress_tokens.state.counts == [65, 61, 57, 49]


def test_target_gmacs_ratio_lands_on_the_measured_ratio():
    model, x = make(VIT), images(1)
    dense = count_gmacs(model, x)
    pruner = attach(model, target_gmacs_ratio=0.65)
    assert len(set(pruner.props)) == 1 and pruner.props[0] > 0
    assert abs(pruner.expected_macs_ratio() - 0.65) < 0.03
    assert abs(count_gmacs(model, x) / dense - 0.65) <= 0.05


def test_counts_keep_one_patch_token():
    assert propagation_counts(197, 1, [11] * 2) == [(197, 186), (186, 175)]
    assert propagation_counts(10, 1, [5, 5, 5]) == [(10, 5), (5, 2), (2, 2)]


def test_config_errors():
    assert "gtp" in PRUNERS
    for bad in ({"num_prop": 4, "target_gmacs_ratio": 0.5}, {"num_prop": -1}, {"num_prop": [1, -1]},
                {"graph": "knn"}, {"theta": 0}, {"theta": 1.5}, {"r": 3}):
        with pytest.raises(CompressError):
            build_pruner({"name": "gtp", **bad})
    with pytest.raises(ValueError, match="num_prop has 2 entries"):
        attach(make(VIT), num_prop=[1, 2])
