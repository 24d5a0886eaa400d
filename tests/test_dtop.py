"""DToP: the exit rule on hand-made probabilities, physically fewer tokens, ragged batches, export round trip."""
import compress  # noqa: F401

import pytest
import torch

from compress.errors import CompressError
from compress.export import load, save
from compress.measure import count_gmacs
from compress.models import model_spec
from compress.models.build import build_from_spec
from compress.pruners.base import build_pruner
from compress.pruners.token.dtop import exit_mask, gather_kept, scatter_tokens

KW = dict(backbone="deit_tiny_patch16_224", num_classes=5, img_size=64, aux_blocks=[0, 1],
          backbone_kwargs={"depth": 4}, drop_path_rate=0.0)


def probs(rows):
    """One image: rows of (top class, top probability); the rest spread over the other classes."""
    C = 3
    p = torch.zeros(1, len(rows), C)
    for i, (c, q) in enumerate(rows):
        p[0, i] = (1 - q) / (C - 1)
        p[0, i, c] = q
    return p


def ones(n):
    return torch.ones(1, n, dtype=torch.bool)


# ---- the exit rule -------------------------------------------------------------------------


def test_nothing_exits_below_or_at_the_threshold():
    p = probs([(0, 0.5), (1, 0.9), (2, 0.89)])
    assert not exit_mask(p, ones(3), 0.9, 0).any()  # 0.9 is not above 0.9


def test_everything_exits_with_k_zero():
    p = probs([(0, 0.95), (1, 0.99), (0, 0.91)])
    assert exit_mask(p, ones(3), 0.9, 0).all()


def test_top_k_per_class_keep_computing():
    # class 0: four candidates (0.99, 0.97, 0.95, 0.93), class 1: one (0.96); k = 2
    p = probs([(0, 0.93), (0, 0.99), (1, 0.96), (0, 0.95), (0, 0.97), (2, 0.5)])
    out = exit_mask(p, ones(6), 0.9, 2)
    # class 0 keeps its two best (positions 1 and 4); class 1 has fewer than k candidates and keeps them all
    assert out.tolist() == [[True, False, False, True, False, False]]


def test_ties_keep_the_lower_position():
    p = probs([(1, 0.95), (1, 0.95), (1, 0.95)])
    assert exit_mask(p, ones(3), 0.9, 1).tolist() == [[False, True, True]]
    assert exit_mask(p, ones(3), 0.9, 2).tolist() == [[False, False, True]]


def test_inactive_tokens_never_exit_and_images_are_independent():
    p = torch.cat([probs([(0, 0.99), (0, 0.98), (0, 0.97)]), probs([(0, 0.99), (0, 0.98), (0, 0.97)])])
    active = torch.tensor([[True, True, True], [False, True, True]])
    out = exit_mask(p, active, 0.9, 1)
    # image 0 keeps its best (position 0); image 1's position 0 is inactive, so its best active one (1) stays
    assert out.tolist() == [[False, True, True], [False, False, True]]


def test_gather_and_scatter_keep_positions():
    x = torch.arange(2 * 5 * 1, dtype=torch.float).view(2, 5, 1)  # 1 prefix + 4 patch tokens
    index = torch.arange(5).expand(2, 5)
    keep = torch.tensor([[True, False, True, False], [False, False, False, True]])
    y, idx, valid = gather_kept(x, index, keep, 1)
    assert y.shape == (2, 3, 1) and idx.tolist() == [[0, 1, 3], [0, 4, -1]]
    assert valid.tolist() == [[True, True], [True, False]]
    canvas = scatter_tokens(None, idx[:, 1:] - 1, y[:, 1:], valid, 4)
    assert canvas[..., 0].tolist() == [[1, 0, 3, 0], [0, 0, 0, 9]]


# ---- on a segmenter ----------------------------------------------------------------------------


def segmenter(**kw):
    torch.manual_seed(0)
    return build_from_spec({"name": "segmenter", "kwargs": {**KW, **kw}}).eval()


def with_dtop(model, **params):
    pruner = build_pruner({"name": "dtop", **params})
    pruner.attach(model)
    return pruner


def test_threshold_one_is_the_dense_model():
    dense = segmenter()
    pruned = segmenter()
    with_dtop(pruned, threshold=1.0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(pruned(x), dense(x), atol=1e-5)


def test_exits_run_later_blocks_on_fewer_tokens_and_cost_less():
    dense = segmenter()
    pruned = segmenter()
    pruner = with_dtop(pruned, threshold=0.2, top_k=1)  # a random 5-class head: many tokens above 0.2
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        pruned(x)
    counts = pruned.backbone._compress_tokens.state.counts
    assert counts[0] == 17 and counts[1] < 17 and counts[3] <= counts[2] <= counts[1], counts  # heads after blocks 0, 1
    exited = pruner.last["exit_fraction"]
    assert exited.shape == (1, 2) and 0 < float(exited.sum()) <= 1
    stage = pruner.last["exit_stage"]  # where each of the 4 x 4 tokens exited (-1: computed to the end)
    assert stage.shape == (1, 4, 4)
    assert [int((stage == m).sum()) for m in (0, 1)] == [round(float(f) * 16) for f in exited[0]]
    assert int((stage == -1).sum()) == counts[-1] - 1  # the tokens still active at the last block, less CLS
    assert count_gmacs(pruned, x) < count_gmacs(dense, x)


@pytest.mark.parametrize("head", ["linear", "mask"])
def test_everything_exiting_at_the_first_head_leaves_the_prefix_alone_and_its_map_final(head):
    model = segmenter(head=head)
    pruner = with_dtop(model, threshold=1e-6, top_k=0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = model.forward_maps(x)
    assert model.backbone._compress_tokens.state.counts == [17, 1, 1, 1]  # CLS only after block 0
    assert pruner.last["exit_fraction"].tolist() == [[1.0, 0.0], [1.0, 0.0]]
    assert torch.equal(maps[-1], maps[0])


@pytest.mark.parametrize("ragged", ["pad", "loop"])
def test_a_ragged_batch_gives_each_image_its_own_result(ragged):
    model = segmenter()
    pruner = with_dtop(model, threshold=0.25, top_k=1, ragged=ragged)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        batch = model(x)
        exits = pruner.last["exit_fraction"]
        single = torch.cat([model(x[i:i + 1]) for i in range(3)])
    assert len(set(exits.sum(1).tolist())) > 1, "the images should exit different numbers of tokens"
    assert torch.allclose(batch, single, atol=1e-4)


def test_mask_transformer_head_runs_on_the_active_tokens_of_a_ragged_batch():
    model = segmenter(head="mask")
    pruner = with_dtop(model, threshold=0.25, top_k=1)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        batch = model(x)
        exits = pruner.last["exit_fraction"].sum(1)
        single = torch.cat([model(x[i:i + 1]) for i in range(3)])
    assert len(set(exits.tolist())) > 1
    assert torch.allclose(batch, single, atol=1e-4)


def test_training_through_exits_reaches_every_head():
    model = segmenter().train()
    with_dtop(model, threshold=0.25, top_k=1)
    maps = model.forward_maps(torch.randn(2, 3, 64, 64))
    assert len(maps) == 3
    sum(m.square().mean() for m in maps).backward()
    for head in (*model.aux_heads, model.decode_head):  # linear heads
        assert head.proj.weight.grad is not None and head.proj.weight.grad.abs().sum() > 0


def test_export_round_trip_gives_the_same_masks(tmp_path):
    model = segmenter()
    pruner = with_dtop(model, threshold=[0.25, 0.3], top_k=2)
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        masks = model(x).argmax(1)
    exits = pruner.last["exit_fraction"]
    save(model, tmp_path / "export", model_spec("segmenter", KW), [pruner])
    loaded = load(tmp_path / "export")
    with torch.no_grad():
        assert torch.equal(loaded(x).argmax(1), masks)
    assert torch.equal(loaded._compress_pruners[0].last["exit_fraction"], exits)
    dense = load(tmp_path / "export", with_pruners=False)
    assert dense.token_pruner() is None


def test_bad_attachments_fail_clearly():
    import timm

    with pytest.raises(CompressError, match="dtop needs a segmenter with auxiliary heads"):
        with_dtop(timm.create_model("deit_tiny_patch16_224", img_size=32, depth=2))
    with pytest.raises(CompressError, match="threshold: 3 values for 2 auxiliary heads"):
        with_dtop(segmenter(), threshold=[0.9, 0.9, 0.9])
    with pytest.raises(CompressError, match="threshold"):
        build_pruner({"name": "dtop", "threshold": 1.5})
