"""timm vision transformers (ViT, DeiT, DeiT-III, registers, the quick-start ViT): where the blocks are, the token
geometry and the cost model that token pruners, the heads/MLP pruners and the MAC budgets plan with. The token
mechanism itself (the reversible class swap of the blocks) is ``compress/tokens.py``."""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch.nn as nn

from compress.errors import CompressError
from compress.families.base import Family
from compress.registry import register_family


def is_vit(model: nn.Module) -> bool:
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    blocks = getattr(model, "blocks", None)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    return (isinstance(blocks, nn.Sequential) and len(blocks) > 0 and grid is not None
            and all(isinstance(b, Block) and isinstance(getattr(b, "attn", None), Attention) for b in blocks))


def require_vit(model: nn.Module, who: str = "token pruning") -> None:
    """Say what is needed, naming ``who`` and the model, before anything fails deep inside on another
    architecture (a CNN, a Mamba)."""
    if not is_vit(model):
        raise CompressError(f"{who} works on timm vision transformers (patch_embed + blocks of timm Block/Attention: "
                            f"vit_*, deit_*, quickstart_vit, ...), not on {type(model).__name__}")


def vit_geometry(model: nn.Module, who: str = "token pruning") -> Dict[str, Any]:
    """Depth, width, MLP width, token count and prefix count of a timm ViT (for schedules)."""
    require_vit(model, who)
    blocks = model.blocks
    dim = blocks[0].norm1.weight.shape[0] if hasattr(blocks[0].norm1, "weight") else model.embed_dim
    num_prefix = int(getattr(model, "num_prefix_tokens", 1))
    grid = model.patch_embed.grid_size
    return {
        "depth": len(blocks),
        "dim": dim,
        "mlp_hidden": blocks[0].mlp.fc1.out_features,
        "num_prefix": num_prefix,
        "num_patches": int(grid[0] * grid[1]),
        # the head reads the prefix tokens alone: after the last attention the patch tokens are dead weight
        "head_reads_prefix": getattr(model, "global_pool", "token") == "token" and num_prefix > 0,
    }


def vit_blocks(model: nn.Module) -> List[Tuple[str, nn.Module, nn.Module]]:
    """(block name, attention, MLP) for every transformer block of a timm VisionTransformer."""
    from timm.layers import Attention, Mlp

    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "patch_embed"):
        raise CompressError(f"model: {type(model).__name__} is not a timm VisionTransformer (no blocks/patch_embed)")
    out = []
    for i, block in enumerate(blocks):
        attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
        if not isinstance(attn, Attention) or type(mlp) is not Mlp or not isinstance(mlp.fc1, nn.Linear):
            raise CompressError(f"model: blocks.{i} is not a timm Attention + Mlp block "
                                f"({type(attn).__name__}, {type(mlp).__name__}); only those can be pruned")
        out.append((f"blocks.{i}", attn, mlp))
    return out


def tokens_in(model: nn.Module) -> int:
    """Tokens a block of the dense model runs on: the patches plus the prefix (class, distillation, registers)."""
    n = getattr(model.patch_embed, "num_patches", None)
    if n is None:
        raise CompressError("model: cannot read patch_embed.num_patches (needed for target_gmacs_ratio)")
    return int(n) + int(getattr(model, "num_prefix_tokens", 1))


def block_macs(n_attn, n_mlp, dim: int, hidden: int, width: int = None, gated: bool = False):
    """MACs per image of one ViT block: qkv (and a gate) + proj on ``n_attn`` tokens of ``width`` attention
    channels (default ``dim``), q@k and attn@v, the MLP on ``n_mlp`` tokens. Token counts may be tensors."""
    width = dim if width is None else width
    return n_attn * dim * width * (4 + int(gated)) + 2 * n_attn * n_attn * width + n_mlp * 2 * dim * hidden


@register_family("vit")
class ViT(Family):
    name = "vit"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_vit(model)

    @classmethod
    def geometry(cls, model: nn.Module) -> Dict[str, Any]:
        return vit_geometry(model)

    @classmethod
    def blocks(cls, model: nn.Module):
        return vit_blocks(model)
