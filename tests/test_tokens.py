"""The token-pruning mechanism on the timm ViT families we support."""
import compress  # noqa: F401  (torchvision guard before timm)

import pytest
import timm
import torch
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block

from compress import tokens

SMALL = dict(img_size=32, patch_size=8, depth=3, pretrained=False)
FAMILIES = {
    "deit": ("deit_tiny_patch16_224", {}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "vit_augreg": ("vit_tiny_patch16_224.augreg_in21k_ft_in1k", {}),
    "deit3_layerscale": ("deit3_small_patch16_224", {"embed_dim": 96, "num_heads": 3}),
    "vit_qknorm_reg": ("vit_small_patch16_224", {"embed_dim": 96, "num_heads": 3, "qk_norm": True, "reg_tokens": 2,
                                                 "no_embed_class": True}),
}


def make(family):
    name, extra = FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **SMALL, **extra).eval()
    for p in model.parameters():  # LayerScale init is ~1e-5: make the residual branches matter
        if p.ndim == 1 and p.shape[0] == model.embed_dim:
            p.data.normal_(1.0, 0.1)
    return model


class Request(tokens.TokenPolicy):
    """Asks every block for something but prunes nothing."""

    def __init__(self, what):
        self.what = what

    def needs(self, layer):
        return self.what


class DropLowest(tokens.TokenPolicy):
    """Keeps the ``keep`` patch tokens with the largest first feature after block ``layer``."""

    def __init__(self, layer, keep):
        self.layer, self.keep = layer, keep

    def after_block(self, layer, x, info, state):
        if layer != self.layer:
            return x
        scores = x[:, state.num_prefix:, 0]
        return tokens.keep_tokens(x, state, scores.topk(self.keep, dim=1).indices)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("what", [None, "keys", "probs"])
def test_patched_model_matches_timm_when_nothing_is_pruned(family, what):
    model = make(family)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        tokens.patch(model, Request(what))
        out = model(x)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    if what is None:
        assert torch.equal(out, ref)  # the fused path is timm's own forward


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tokens_are_dropped_physically_and_prefix_is_kept(family):
    model = make(family)
    P = model.num_prefix_tokens
    n = model.patch_embed.num_patches
    rt = tokens.patch(model, DropLowest(layer=0, keep=5))
    with torch.no_grad():
        out = model(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 10)
    assert rt.state.counts == [P + n, P + 5, P + 5]
    assert torch.equal(rt.state.index[:, :P], torch.arange(P).expand(3, P))
    kept = rt.state.index[:, P:]
    assert kept.min() >= P and kept.max() < P + n
    assert torch.all(kept[:, 1:] > kept[:, :-1])  # original order, no duplicates


def test_index_map_points_at_the_original_tokens():
    model = make("deit")
    rt = tokens.patch(model, DropLowest(layer=0, keep=6))
    captured = {}
    model.blocks[1].register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    model.blocks[0].register_forward_hook(lambda m, a, out: None)
    with torch.no_grad():
        full = {}
        h = model.blocks[0].register_forward_pre_hook(lambda m, a: full.setdefault("x", a[0]))
        model(torch.randn(2, 3, 32, 32))
        h.remove()
    # the tokens entering block 1 are block 0's outputs at the kept positions; re-run block 0 dense
    tokens.remove_patch(model)
    with torch.no_grad():
        dense_out = model.blocks[0](full["x"])
    idx = rt.state.index
    expected = dense_out.gather(1, idx.unsqueeze(-1).expand(-1, -1, dense_out.shape[-1]))
    assert torch.allclose(captured["x"], expected, atol=1e-5)


def test_remove_patch_restores_classes_and_output():
    model = make("deit3_layerscale")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    tokens.patch(model, DropLowest(layer=0, keep=3))
    with torch.no_grad():
        assert not torch.allclose(model(x), ref)
    tokens.remove_patch(model)
    assert all(type(b) is Block and type(b.attn) is Attention for b in model.blocks)
    assert not hasattr(model, "_compress_tokens")
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_patching_twice_is_an_error():
    model = make("deit")
    tokens.patch(model, Request(None))
    with pytest.raises(compress.CompressError, match="already has a token pruner"):
        tokens.patch(model, Request(None))


def test_gradients_flow_through_pruned_model():
    model = make("deit").train()
    tokens.patch(model, DropLowest(layer=1, keep=4))
    loss = model(torch.randn(2, 3, 32, 32)).sum()
    loss.backward()
    assert model.blocks[2].mlp.fc1.weight.grad is not None
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_analytic_macs_model_matches_flop_counter():
    from compress.measure import count_gmacs

    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    geo = tokens.vit_geometry(model)
    dense = count_gmacs(model, torch.randn(1, 3, 224, 224))
    tokens.patch(model, DropLowest(layer=3, keep=98))
    pruned = count_gmacs(model, torch.randn(1, 3, 224, 224))
    analytic = tokens.schedule_macs_ratio(geo, [197] * 4 + [99] * 8)
    # blocks are ~99 % of a ViT's MACs: the analytic ratio is within 2 points of the measured one
    assert abs(pruned / dense - analytic) < 0.02


class CountingAttention(Attention):
    """A user's subclass of timm's Attention with its own (dense) forward."""

    calls = 0

    def forward(self, x, attn_mask=None, is_causal=False):
        CountingAttention.calls += 1
        return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)


class TaggedBlock(Block):
    tag = "mine"


def test_subclasses_of_timm_blocks_are_patched_and_restored_exactly():
    model = make("deit")
    for b in model.blocks:
        b.__class__ = TaggedBlock
        b.attn.__class__ = CountingAttention
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    tokens.patch(model, DropLowest(layer=0, keep=3))
    blk = model.blocks[1]
    assert isinstance(blk, TaggedBlock) and blk.tag == "mine" and isinstance(blk.attn, CountingAttention)
    before = CountingAttention.calls
    with torch.no_grad():
        out = model(x)
    assert CountingAttention.calls == before + len(model.blocks)  # the dense path is the subclass's own forward
    assert model._compress_tokens.state.counts == [17, 4, 4] and not torch.allclose(out, ref)  # tokens really dropped
    tokens.remove_patch(model)
    assert all(type(b) is TaggedBlock and type(b.attn) is CountingAttention for b in model.blocks)
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_a_module_that_is_not_a_timm_block_is_refused():
    model = make("deit")
    model.blocks[1] = torch.nn.Identity()
    with pytest.raises(compress.CompressError, match="timm Block modules"):
        tokens.patch(model, Request(None))
