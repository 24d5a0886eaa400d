"""Plain-ViT semantic segmenters on any timm ViT backbone (Segmenter, Strudel et al. ICCV'21).

``model.name: segmenter`` with ``model.kwargs.backbone: <timm ViT name>``: one registered builder
instead of a ``segmenter_<timm name>`` per backbone, because the registry maps fixed names and the
export stores the builder's kwargs (the backbone among them), so ``compress.load`` rebuilds any
backbone from one entry.

- The backbone is timm's own ``VisionTransformer`` built with ``dynamic_img_size`` (position
  embeddings resampled on the fly for any input) and ``img_size`` = the training crop (a checkpoint's
  embeddings are resampled to it once, by timm's ``checkpoint_filter_fn``). Features come from timm's
  ``forward_features`` / ``forward_intermediates``; this module never copies timm's forward.
- Decode head: per-token linear (Segmenter "linear") by default, or a small mask transformer
  (``head: mask``). Auxiliary per-token linear heads grade the tokens leaving the blocks in
  ``aux_blocks`` (0-based); they are trained with the loss weight ``aux_loss_weight`` and are what
  DToP (``compress/pruners/token/dtop.py``) uses to let confident tokens exit early.
- ``model.checkpoint`` may hold a full segmenter or only an ImageNet backbone (timm keys such as
  ``blocks.0.attn.qkv.weight``): ``adapt_checkpoint`` maps the latter under ``backbone.``, resamples
  the position embeddings, drops the classifier and keeps the heads' fresh initialisation.

Inputs whose sides are not multiples of the patch size are padded (bottom/right) and the logits
cropped back. ``forward`` returns B x classes x H x W logits.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress.errors import CompressError
from compress.registry import register_model

HEADS = ("linear", "mask")


class LinearHead(nn.Module):
    """Segmenter's linear decoder: class logits per token (B x N x D -> B x N x classes). ``norm`` for
    tokens taken from inside the backbone, which have not passed its final norm."""

    def __init__(self, dim: int, num_classes: int, norm: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()
        self.proj = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.proj(self.norm(tokens))


class MaskTransformerHead(nn.Module):
    """Segmenter's mask transformer, small: learnable class embeddings attend jointly with the patch
    tokens through a few timm ``Block``s; logits = normalised patch features x normalised class
    features. Works on any subset of tokens (``valid`` masks padding as attention keys), so DToP can
    run it on the tokens that are still active."""

    def __init__(self, dim: int, num_classes: int, layers: int = 2, heads: int = 3):
        super().__init__()
        from timm.models.vision_transformer import Block

        self.num_classes = num_classes
        self.proj_in = nn.Linear(dim, dim)
        self.cls_emb = nn.Parameter(torch.zeros(1, num_classes, dim))
        nn.init.trunc_normal_(self.cls_emb, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.mask_norm = nn.LayerNorm(num_classes)

    def forward(self, tokens: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, N, _ = tokens.shape
        x = torch.cat([self.proj_in(tokens), self.cls_emb.expand(B, -1, -1)], dim=1)
        mask = None
        if valid is not None and not bool(valid.all()):
            keys = torch.cat([valid, valid.new_ones(B, self.num_classes)], dim=1)
            mask = keys[:, None, None, :].expand(B, 1, x.shape[1], x.shape[1])
        for blk in self.blocks:
            x = blk(x, attn_mask=mask) if mask is not None else blk(x)
        x = self.norm(x)
        patches, classes = x[:, :N], x[:, N:]
        masks = F.normalize(patches, dim=-1) @ F.normalize(classes, dim=-1).transpose(1, 2)
        return self.mask_norm(masks)


class Segmenter(nn.Module):
    """A timm ViT + a decode head + auxiliary heads after ``aux_blocks``. See the module docstring."""

    def __init__(self, backbone: str = "deit_tiny_patch16_224", num_classes: int = 150, img_size: int = 224,
                 aux_blocks: Sequence[int] = (), head: str = "linear", head_layers: int = 2,
                 aux_loss_weight: float = 0.4, drop_path_rate: float = 0.1,
                 backbone_kwargs: Optional[Dict[str, Any]] = None):
        super().__init__()
        import timm

        if head not in HEADS:
            raise CompressError(f"model.kwargs.head: {head!r} is not a segmenter head (one of: {', '.join(HEADS)})")
        if not timm.is_model(backbone):
            raise CompressError(f"model.kwargs.backbone: {backbone!r} is not a timm model")
        size = tuple(img_size) if isinstance(img_size, (list, tuple)) else (int(img_size), int(img_size))
        self.backbone = timm.create_model(backbone, pretrained=False, num_classes=0, global_pool="", img_size=size,
                                          dynamic_img_size=True, drop_path_rate=drop_path_rate,
                                          **dict(backbone_kwargs or {}))
        if not isinstance(getattr(self.backbone, "blocks", None), nn.Sequential):
            raise CompressError(f"model.kwargs.backbone: {backbone} is not a plain ViT with .blocks")
        depth = len(self.backbone.blocks)
        aux = sorted(int(b) for b in aux_blocks)
        bad = [b for b in aux if not 0 <= b < depth - 1]
        if bad or len(set(aux)) != len(aux):
            raise CompressError(f"model.kwargs.aux_blocks: {list(aux_blocks)} must be distinct block indices in "
                                f"0..{depth - 2} (the last block, {depth - 1}, feeds the decode head)")
        dim = self.backbone.embed_dim
        self.num_classes = num_classes
        self.aux_blocks: List[int] = aux
        self.aux_loss_weight = aux_loss_weight
        self.patch_size = tuple(self.backbone.patch_embed.patch_size)
        self.num_prefix = int(getattr(self.backbone, "num_prefix_tokens", 1))
        if head == "mask":
            self.decode_head = MaskTransformerHead(dim, num_classes, head_layers, self.backbone.blocks[0].attn.num_heads)
        else:
            self.decode_head = LinearHead(dim, num_classes, norm=False)  # after the backbone's final norm
        self.aux_heads = nn.ModuleList(LinearHead(dim, num_classes) for _ in aux)
        cfg = dict(getattr(self.backbone, "pretrained_cfg", None) or {})
        self.pretrained_cfg = {"input_size": (3, *size), "mean": cfg.get("mean", (0.485, 0.456, 0.406)),
                               "std": cfg.get("std", (0.229, 0.224, 0.225)), "interpolation": "bilinear",
                               "crop_pct": 1.0, "num_classes": num_classes}

    # -- geometry ---------------------------------------------------------------------------
    def _pad(self, x: torch.Tensor):
        ph, pw = self.patch_size
        H, W = x.shape[-2:]
        pad_h, pad_w = (-H) % ph, (-W) % pw
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return x, (H, W), (x.shape[-2] // ph, x.shape[-1] // pw)

    @staticmethod
    def to_grid(token_logits: torch.Tensor, grid) -> torch.Tensor:
        """B x (gh*gw) x C -> B x C x gh x gw."""
        B, _, C = token_logits.shape
        return token_logits.transpose(1, 2).reshape(B, C, grid[0], grid[1])

    def upsample(self, grid_logits: torch.Tensor, size) -> torch.Tensor:
        """Token-grid logits -> pixel logits of the (unpadded) input ``size``."""
        ph, pw = self.patch_size
        full = F.interpolate(grid_logits, size=(grid_logits.shape[-2] * ph, grid_logits.shape[-1] * pw),
                             mode="bilinear", align_corners=False)
        return full[..., : size[0], : size[1]]

    # -- forward ----------------------------------------------------------------------------
    def token_pruner(self):
        """The token policy patched into the backbone (DToP), or None for the dense model."""
        rt = getattr(self.backbone, "_compress_tokens", None)
        return rt.policy if rt is not None else None

    def forward_maps(self, x: torch.Tensor, aux: bool = True) -> List[torch.Tensor]:
        """Token-grid logits (B x C x gh x gw) of every head, auxiliary heads first, decode head last.
        ``aux=False`` (dense inference) skips the auxiliary heads; a token pruner always needs them."""
        x, _, grid = self._pad(x)
        policy = self.token_pruner()
        if policy is not None and hasattr(policy, "segment"):
            return policy.segment(self, x, grid)
        P = self.num_prefix
        if aux and self.aux_blocks:
            final, inter = self.backbone.forward_intermediates(x, indices=self.aux_blocks, norm=False, output_fmt="NLC")
            maps = [self.to_grid(h(t), grid) for h, t in zip(self.aux_heads, inter)]
        else:
            final, maps = self.backbone.forward_features(x), []
        maps.append(self.to_grid(self.decode_head(final[:, P:]), grid))
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        return self.upsample(self.forward_maps(x, aux=False)[-1], size)

    # -- checkpoints --------------------------------------------------------------------------
    def adapt_checkpoint(self, state: Dict[str, torch.Tensor], source: str) -> Dict[str, torch.Tensor]:
        """A full segmenter checkpoint passes unchanged; an ImageNet checkpoint of the backbone alone is
        moved under ``backbone.``, its position embeddings resampled to ``img_size`` and its classifier
        dropped, and the heads keep their fresh initialisation (logged)."""
        if any(k.startswith(("backbone.", "decode_head.")) for k in state):
            return state
        import importlib

        bb = self.backbone
        filter_fn = getattr(importlib.import_module(type(bb).__module__), "checkpoint_filter_fn", None)
        if filter_fn is not None:
            state = filter_fn(state, bb)
        own = bb.state_dict()
        classifier = [k for k in state if k not in own and k.split(".")[0] in ("head", "head_dist", "fc_norm")]
        state = {k: v for k, v in state.items() if k not in classifier}
        out = {f"backbone.{k}": v for k, v in state.items()}
        fresh = {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}
        out.update(fresh)
        logging.getLogger("compress").info("model.checkpoint: %s is a backbone checkpoint; decode and auxiliary heads "
                                           "start from their initialisation", source)
        return out


@register_model("segmenter")
def segmenter(pretrained: bool = False, **kwargs) -> Segmenter:
    """``model.name: segmenter``; kwargs: ``backbone`` (timm ViT name), ``num_classes``, ``img_size`` (the
    training crop), ``aux_blocks``, ``head`` (linear | mask), ``head_layers``, ``aux_loss_weight``,
    ``drop_path_rate``, ``backbone_kwargs`` (passed to timm, e.g. ``{depth: 4}`` for tests)."""
    if pretrained:
        raise CompressError("model.pretrained: the segmenter has no hub weights; set model.checkpoint to an "
                            "ImageNet backbone checkpoint (e.g. deit_tiny_patch16_224.pth) or a segmenter export's "
                            "model.safetensors")
    return Segmenter(**kwargs)


# the registry's generated test builds registered models with these (a 2-block backbone, 32 px)
segmenter.test_kwargs = {"num_classes": 5, "img_size": 32, "aux_blocks": [0], "backbone_kwargs": {"depth": 2}}
