"""Under DDP every rank must prune the same weights. Two CPU processes (gloo) start from deliberately different
weights; the pruners decide on rank 0 and broadcast, so the masks match across ranks (and rank 1's own local
decision, which would differ, is overridden)."""
import compress  # noqa: F401  (first: torchvision guard before timm)

import torch
from ranks import run_on_ranks


def _worker(rank: int, world: int) -> dict:
    import timm
    import torch.distributed as dist

    from compress.pruners.base import build_pruner
    from compress.pruners.weight import masks as M

    results = {}
    for spec in ({"name": "magnitude", "sparsity": 0.7}, {"name": "magnitude", "sparsity": 0.7, "scope": "global"},
                 {"name": "issp", "sparsity": 0.8, "alpha": 0.5}):
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                                  embed_dim=64, num_heads=2, num_classes=6)
        with torch.no_grad():  # make the ranks' weights differ before any decision
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(100 + rank)) * 0.05)
        layers = M.prunable_layers(model, ["*"], M.DEFAULT_EXCLUDE)
        local = M.layer_masks(layers, spec["sparsity"]) if spec.get("scope") != "global" else \
            M.global_masks(layers, spec["sparsity"])  # what this rank would choose on its own
        pruner = build_pruner(spec)
        pruner.attach(model)  # magnitude one-shot decides here (rank 0's masks broadcast)
        if spec["name"] == "issp":
            pruner.after_optimizer_step()  # one shrink: its selection is rank 0's too
        flat = torch.cat([pruner.masks[n].reshape(-1) for n in pruner.layers]).to(torch.uint8)
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        local_flat = torch.cat([local[n].reshape(-1) for n in pruner.layers]).to(torch.uint8)
        results[spec["name"] + "_" + spec.get("scope", "layer")] = {
            "same_across_ranks": all(torch.equal(g, gathered[0]) for g in gathered),
            "local_differs": not torch.equal(local_flat, flat),
            "pruned": int(flat.sum()),
        }
    return results


def test_masks_match_across_ranks_with_different_weights(tmp_path):
    r0, r1 = run_on_ranks(_worker, tmp_path)
    assert set(r0) == {"magnitude_layer", "magnitude_global", "issp_layer"}
    for name in r0:
        assert r0[name]["same_across_ranks"] and r1[name]["same_across_ranks"], name
        assert not r0[name]["local_differs"], name  # rank 0's masks are its own decision
        assert r1[name]["local_differs"], name  # rank 1 alone would have chosen otherwise: the broadcast mattered
        assert r0[name]["pruned"] == r1[name]["pruned"] > 0
