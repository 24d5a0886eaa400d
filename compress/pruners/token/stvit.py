"""STViT / STViT-R (Chang et al., CVPR 2023): a few semantic tokens instead of all image tokens.

Two consecutive blocks ``[b, b+1]`` of a pretrained timm ViT become the Semantic Token Generation
Module (STGM), with those blocks' own weights:

- layer 1: queries = the prefix tokens plus P, the patch map adaptively max-pooled to
  sqrt(K) x sqrt(K) centres (as the released code pools); keys/values = all tokens X entering it.
- layer 2: queries = the prefix tokens plus S1 + G (G: learnable global centres, small Gaussian
  init, optional); keys/values = concat(prefix + S1, image tokens X).

Each STGM layer is attention (q from the query tokens, k/v from the key/value tokens, through slices
of the block's own ``qkv`` weight so no unused projection is computed; forward hooks on ``attn.qkv``
therefore do not fire there) plus MLP, with the block's norms, residuals (on the queries, so S1 + G
is the residual stream of layer 2), LayerScale and drop-path. After the STGM the remaining blocks run on the K
semantic tokens (+ prefix) only: physically fewer tokens, fused SDPA. The classifier is the model's
own head (CLS token, or the mean over the semantic tokens for global-average-pool models).

STViT-R (``recover_at``): before block ``recover_at`` a recovery layer (a copy of that block)
restores the full map: queries = the image tokens X stored at the STGM, keys/values = the current
(semantic + prefix) tokens; attention + MLP. ``state.index`` is -1 for semantic tokens (no single
original position) and the identity again after recovery.

New parameters (G, the recovery layer) live in ``model.stvit`` so ``state_dict`` and exports hold
them; the spec re-attaches the pruner on load (``replay_on_load``) and the weights fill them in.
The method needs training: run it in ``distill``/``finetune`` stages with the pruner attached.
See docs/methods.md §3. Written from the paper notes and that spec (no code reuse).
"""
from __future__ import annotations

import copy
import math
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from compress import tokens
from compress.errors import CompressError
from compress.pruners.base import PrunerConfig
from compress.pruners.token.base import TokenPruner
from compress.registry import register_pruner

DEFAULT_SIDE = 4  # 4 x 4 = 16 semantic tokens, the paper's DeiT setting
IMAGE_KEY = "stvit_image"  # state.extras: the image tokens entering the STGM (B x N x C)


# ---- the method's pieces, as plain functions of timm submodules -------------------------------


def pool_centres(patches: torch.Tensor, grid: Tuple[int, int], side: int) -> torch.Tensor:
    """Spatial initial centres: adaptive max pooling of the patch map (B x H*W x C) to side x side."""
    B, M, C = patches.shape
    h, w = grid
    if M != h * w:
        raise CompressError(f"stvit: expected {h}x{w} = {h * w} patch tokens at the STGM, got {M}")
    fmap = patches.transpose(1, 2).reshape(B, C, h, w)
    return F.adaptive_max_pool2d(fmap, side).flatten(2).transpose(1, 2)


def cross_attention(attn: nn.Module, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """timm ``Attention`` with q from ``queries`` and k/v from ``context`` (both already normed).

    Uses the q rows and the k/v rows of the block's ``qkv`` weight separately, then the block's own
    q/k norms, fused SDPA (with its dropout in train mode), ``norm``, ``proj`` and ``proj_drop``.
    """
    B, Nq, _ = queries.shape
    Nk = context.shape[1]
    H, hd, d = attn.num_heads, attn.head_dim, attn.attn_dim
    w, b = attn.qkv.weight, attn.qkv.bias
    q = F.linear(queries, w[:d], None if b is None else b[:d]).reshape(B, Nq, H, hd).transpose(1, 2)
    kv = F.linear(context, w[d:], None if b is None else b[d:]).reshape(B, Nk, 2, H, hd).permute(2, 0, 3, 1, 4)
    k, v = kv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = out.transpose(1, 2).reshape(B, Nq, d)
    return attn.proj_drop(attn.proj(attn.norm(out)))


def cross_layer(block: nn.Module, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """One transformer layer whose queries attend to ``context``: the block's pre-norm residual
    attention and MLP (LayerScale, drop-path), returning updated ``queries``."""
    attn = cross_attention(block.attn, block.norm1(queries), block.norm1(context))
    y = queries + block.drop_path1(block.ls1(attn))
    return y + block.drop_path2(block.ls2(block.mlp(block.norm2(y))))


def cross_layer_macs(n_q: int, n_kv: int, dim: int, hidden: int) -> float:
    """MACs of ``cross_layer``: q + proj + MLP on the queries, k/v on the context, attention between."""
    return n_q * 2 * dim * dim + n_kv * 2 * dim * dim + 2 * n_q * n_kv * dim + n_q * 2 * dim * hidden


class SemanticModules(nn.Module):
    """The parameters STViT adds to the model (``model.stvit``): global centres and the recovery layer."""

    def __init__(self, num_semantic: int, dim: int, global_centres: bool, recovery: Optional[nn.Module]):
        super().__init__()
        if global_centres:
            self.global_centres = nn.Parameter(torch.empty(1, num_semantic, dim))
            nn.init.trunc_normal_(self.global_centres, std=0.02)
        else:
            self.global_centres = None
        self.recovery = recovery


# ---- config -----------------------------------------------------------------------------------


class STViTConfig(PrunerConfig):
    stgm_block: Optional[int] = Field(
        None, ge=0, description="first of the two blocks that become the STGM (default: depth // 3, as DeiT's 4 of 12)"
    )
    num_semantic: Optional[int] = Field(
        None, gt=0, description="semantic tokens K, a square number (default 16 = 4x4 pooled centres, fewer if that is "
        "over a quarter of the patch tokens)"
    )
    target_gmacs_ratio: Optional[float] = Field(
        None, gt=0, le=1, description="budget instead of stgm_block: the blocks' MACs relative to dense; picks the STGM position"
    )
    global_centres: bool = Field(True, description="learnable global centres G added to the STGM's second-layer queries")
    recover_at: Optional[int] = Field(
        None, ge=1, description="STViT-R: restore the full token map before this block (a copy of it is the recovery layer)"
    )

    @model_validator(mode="after")
    def _check(self):
        if self.stgm_block is not None and self.target_gmacs_ratio is not None:
            raise ValueError("give either stgm_block or target_gmacs_ratio, not both")
        if self.num_semantic is not None and math.isqrt(self.num_semantic) ** 2 != self.num_semantic:
            raise ValueError(f"num_semantic must be a square number (side x side pooled centres), got {self.num_semantic}")
        return self


@register_pruner("stvit")
class STViT(TokenPruner):
    """Semantic tokens from a two-layer STGM made of pretrained blocks; optional STViT-R recovery."""

    name = "stvit"
    Config = STViTConfig

    # -- planning ---------------------------------------------------------------------------
    def _macs(self, geometry: Dict[str, Any], b: int) -> float:
        """Blocks' MACs under an STGM at ``b`` (plus recovery), relative to dense."""
        d, h, P, N = geometry["dim"], geometry["mlp_hidden"], geometry["num_prefix"], geometry["num_patches"]
        depth, r = geometry["depth"], self.config.recover_at
        n0, s = P + N, P + self.num_semantic
        total = b * cross_layer_macs(n0, n0, d, h)
        total += cross_layer_macs(s, n0, d, h) + cross_layer_macs(s, s + N, d, h)
        end = depth if r is None else r
        total += (end - b - 2) * cross_layer_macs(s, s, d, h)
        if r is not None:
            total += cross_layer_macs(N, s, d, h) + (depth - r) * cross_layer_macs(n0, n0, d, h)
        return total / (depth * cross_layer_macs(n0, n0, d, h))

    def plan(self, geometry: Dict[str, Any]) -> None:
        cfg, depth, grid = self.config, geometry["depth"], self.grid
        if cfg.num_semantic is not None:
            side = math.isqrt(cfg.num_semantic)
            if side > min(grid):
                raise ValueError(f"num_semantic {cfg.num_semantic} needs a {side}x{side} pooling of a {grid[0]}x{grid[1]} patch map")
        else:
            side = max(1, min(DEFAULT_SIDE, math.isqrt(geometry["num_patches"] // 4)))
        self.num_semantic = side * side
        last = depth - 2 if cfg.recover_at is None else cfg.recover_at - 2  # the STGM must end before recovery
        if cfg.recover_at is not None and cfg.recover_at >= depth:
            raise ValueError(f"recover_at {cfg.recover_at} is past the last block of a {depth}-block model")
        if last < 0:
            raise ValueError(f"a {depth}-block model has no room for the two STGM blocks" + (
                f" before recover_at {cfg.recover_at}" if cfg.recover_at is not None else ""))
        if cfg.target_gmacs_ratio is not None:
            b = min(range(last + 1), key=lambda i: abs(self._macs(geometry, i) - cfg.target_gmacs_ratio))
        else:
            b = cfg.stgm_block if cfg.stgm_block is not None else min(depth // 3, last)
            if b > last:
                raise ValueError(f"stgm_block {b}: the STGM (blocks {b}, {b + 1}) must end before "
                                 + (f"recover_at {cfg.recover_at}" if cfg.recover_at is not None else f"block {depth}"))
        self.stgm_block, self.side = b, side

    def pinned(self) -> Dict[str, Any]:
        return {"stgm_block": self.stgm_block, "num_semantic": self.num_semantic, "target_gmacs_ratio": None}

    def expected_tokens(self) -> list:
        """Query tokens entering each block (the STGM's first layer counts its full input)."""
        g, b, r = self.geometry, self.stgm_block, self.config.recover_at
        n0, s = g["num_patches"] + g["num_prefix"], g["num_prefix"] + self.num_semantic
        return [n0 if i <= b or (r is not None and i >= r) else s for i in range(g["depth"])]

    def expected_macs_ratio(self) -> float:
        return self._macs(self.geometry, self.stgm_block)

    # -- attach / detach ------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        if getattr(model, "_compress_tokens", None) is not None:
            raise CompressError("this model already has a token pruner attached; detach it first")
        if getattr(model, "stvit", None) is not None:
            raise CompressError("this model already has STViT modules (model.stvit); detach first")
        self.geometry = tokens.vit_geometry(model, f"pruner {self.name!r}")
        self.grid = tuple(int(v) for v in model.patch_embed.grid_size)
        self.plan(self.geometry)
        if any(getattr(blk.attn, "gate", None) is not None for blk in model.blocks):
            raise CompressError("stvit does not support gated attention")
        r = self.config.recover_at
        recovery = copy.deepcopy(model.blocks[r]) if r is not None else None
        ref = next(model.parameters())
        modules = SemanticModules(self.num_semantic, self.geometry["dim"], self.config.global_centres, recovery)
        model.stvit = modules.to(device=ref.device, dtype=ref.dtype).train(model.training)
        self.added = model.stvit
        try:
            tokens.patch(model, self)
        except CompressError:
            self.detach(model)
            raise

    def external_parameters(self, model: nn.Module):
        """The STGM and recovery layers use ``qkv.weight``/``bias`` (and G) directly, inside the forward of the
        block they replace: under ZeRO-3 that block must gather them."""
        b, r = self.stgm_block, self.config.recover_at
        pairs = []
        for i in (b, b + 1):
            qkv = model.blocks[i].attn.qkv
            pairs += [(model.blocks[i], p) for p in (qkv.weight, qkv.bias) if p is not None]
        if model.stvit.global_centres is not None:
            pairs.append((model.blocks[b + 1], model.stvit.global_centres))
        if r is not None:
            qkv = model.stvit.recovery.attn.qkv
            pairs += [(model.blocks[r], p) for p in (qkv.weight, qkv.bias) if p is not None]
        return pairs

    def detach(self, model: nn.Module) -> None:
        tokens.remove_patch(model)
        if "stvit" in model._modules:
            delattr(model, "stvit")
        self.added = None

    # -- per forward ----------------------------------------------------------------------
    def run_block(self, layer, block, x, state):
        b, P = self.stgm_block, state.num_prefix
        if layer == b:  # STGM layer 1: pooled centres attend to all tokens
            state.extras[IMAGE_KEY] = x[:, P:]
            queries = torch.cat([x[:, :P], pool_centres(x[:, P:], self.grid, self.side)], dim=1)
            out = cross_layer(block, queries, x)
            state.index = torch.cat([state.index[:, :P], state.index.new_full((x.shape[0], self.num_semantic), -1)], 1)
            return out
        if layer == b + 1:  # STGM layer 2: S1 + G attend to S1 and the image tokens
            g = self.added.global_centres
            queries = x if g is None else torch.cat([x[:, :P], x[:, P:] + g], dim=1)
            image = state.extras[IMAGE_KEY] if self.config.recover_at is not None else state.extras.pop(IMAGE_KEY)
            context = torch.cat([x, image], dim=1)
            return cross_layer(block, queries, context)
        return None

    def enter_block(self, layer, x, state):
        if layer != self.config.recover_at:
            return x
        image = state.extras.pop(IMAGE_KEY)
        restored = cross_layer(self.added.recovery, image, x)
        P = state.num_prefix
        state.index = torch.arange(P + image.shape[1], device=x.device).unsqueeze(0).expand(x.shape[0], -1)
        return torch.cat([x[:, :P], restored], dim=1)
