"""Two CPU processes (gloo): every structured-pruning decision is rank 0's, even when the ranks'
weights were made different on purpose before deciding."""
import compress  # noqa: F401  (first: torchvision guard before timm)

import torch
from ranks import run_on_ranks

VIT = dict(img_size=32, patch_size=8, depth=3, num_classes=10)


def _worker(rank: int, world: int) -> dict:
    import timm

    from compress.pruners.base import build_pruner
    from compress.pruners.structured.heads import top_k
    from compress.pruners.structured.widths import read_widths

    torch.manual_seed(100 + rank)  # deliberately different weights on every rank
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT).eval()
    heads = build_pruner({"name": "heads", "head_pruning_ratio": 0.34, "mlp_pruning_ratio": 0.5, "steps": 1})
    heads.attach(model)
    widths = heads._plan.at_event(heads.final_widths, 1, 1, heads.config)
    local = [{"heads": top_k(hs, alive_h, h), "hidden": top_k(ms, alive_m, m)}
             for (hs, ms), (alive_h, alive_m), (h, m) in zip(heads.scores(), heads._alive, widths)]
    kept = heads.decide(1)
    heads.prune_event(physical=False)  # the multi-process path: mask now ...
    heads.shrink()  # ... shrink at the end of the stage
    torch.manual_seed(200 + rank)
    cnn = timm.create_model("resnet10t", pretrained=False, num_classes=10).eval()
    crop = build_pruner({"name": "precropping", "iterations": 3, "input_size": 32, "score": "snip", "batch_size": 2})
    crop.attach(cnn)
    result = {"local": local, "kept": kept, "vit_widths": read_widths(model), "cnn_widths": read_widths(cnn),
              "cnn_edits": crop.finalize(cnn)}
    return result


def test_ranks_keep_the_same_heads_units_and_channels(tmp_path):
    r0, r1 = run_on_ranks(_worker, tmp_path)
    assert r0["local"] != r1["local"], "the ranks' own choices should differ (different weights)"
    assert r0["kept"] == r1["kept"] == r0["local"]  # rank 0 decided for everyone
    assert r0["vit_widths"] == r1["vit_widths"]
    assert r0["vit_widths"]["attrs"]["blocks.0.attn"]["num_heads"] == 2
    assert r0["cnn_widths"] == r1["cnn_widths"]
    assert r0["cnn_edits"] and r0["cnn_edits"] == r1["cnn_edits"]
