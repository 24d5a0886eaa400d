"""Small random-weight timm ViT configs shared by the token-pruner tests (64 px, 8 px patches)."""
import compress  # noqa: F401  (torchvision guard before timm)

import timm
import torch
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block

from compress import export
from compress.models.build import model_spec
from compress.pruners.base import build_pruner
from compress.registry import PRUNERS

VIT = ("vit_tiny_patch16_224", dict(img_size=64, patch_size=8, depth=4, num_classes=10))  # 64 patches + CLS
LS = ("vit_tiny_patch16_224", dict(img_size=64, patch_size=8, depth=4, num_classes=10, init_values=1e-5))
DIST = ("deit_tiny_distilled_patch16_224", dict(img_size=64, patch_size=8, depth=3, num_classes=10))  # 64 + 2


def make(cfg, seed=0):
    name, kw = cfg
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kw).eval()
    if kw.get("init_values"):
        for blk in model.blocks:  # LayerScale far from identity, so ignoring it would show
            blk.ls1.gamma.data.uniform_(0.5, 1.5)
            blk.ls2.gamma.data.uniform_(0.5, 1.5)
    return model


def images(n=2, seed=1):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def assert_unpatched(model):
    """No trace of the token-pruning patch is left on ``model``."""
    assert all(type(b) is Block and type(b.attn) is Attention for b in model.blocks)
    assert not hasattr(model, "_compress_tokens")
    assert not any(k.startswith("_compress") for b in model.blocks for k in list(vars(b)) + list(vars(b.attn)))


def export_round_trip(model, pruner, cfg, x, folder):
    """Export ``model`` (built from ``cfg``) with ``pruner``, reload it, check the reloaded logits are identical;
    returns the reloaded model."""
    with torch.no_grad():
        out = model(x)
    export.save(model, folder, base=model_spec(*cfg), pruners=[pruner])
    loaded = export.load(folder)
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
    return loaded


# ---- one 32 px ViT per pruning case, exported (tests of deployment and compilation) ----------------------

VIT32 = dict(img_size=32, patch_size=4, depth=4, num_classes=10)  # 64 patch tokens, so every pruner has room
TOKEN_PRUNERS = [n for n, cls in PRUNERS.items() if cls.kind == "token" and cls.targets == "vit"]
PARAMS = {**{n: {"target_gmacs_ratio": 0.7} for n in TOKEN_PRUNERS}, "zero_tprune_merge": {"target_gmacs_ratio": 0.7, "merge": True},
          "heads": {"head_pruning_ratio": 0.5, "mlp_pruning_ratio": 0.25}, "magnitude": {"sparsity": 0.5}}
CASES = ["dense", *TOKEN_PRUNERS, "zero_tprune_merge", "heads", "magnitude"]


def pruned_vit_export(tmp_path, case):
    """The 32 px ViT pruned as ``case`` says (a token pruner's name, zero_tprune_merge, heads, magnitude or dense),
    exported to ``tmp_path / "export"``."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT32).eval()
    pruners, edits = [], []
    if case != "dense":
        pruner = build_pruner({"name": case.replace("_merge", ""), **PARAMS[case]})
        pruner.attach(model)
        edits.append(pruner.finalize(model))
        pruners.append(pruner)
    return export.save(model, tmp_path / "export", model_spec("vit_tiny_patch16_224", VIT32), pruners, edits,
                       input_size=(3, 32, 32))


def images32(n, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def pruned_vim_export(tmp_path, depth):
    """A 32 px Vim with ToP-ViM (keep 0.6 after block 1), exported to ``tmp_path / "export"``."""
    from compress.registry import MODELS

    kw = dict(img_size=32, patch_size=4, embed_dim=32, depth=depth, d_state=4, num_classes=6)
    torch.manual_seed(0)
    model = MODELS.get("vim_custom")(**kw).eval()
    pruner = build_pruner({"name": "top_vim", "keep_ratio": 0.6, "prune_layers": [1]})
    pruner.attach(model)
    return export.save(model, tmp_path / "export", model_spec("vim_custom", kw), [pruner], input_size=(3, 32, 32))
