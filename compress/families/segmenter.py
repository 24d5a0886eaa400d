"""Segmenters (``compress.models.segmenter``): a timm ViT backbone plus heads; token pruners patch the backbone and
plan on its geometry, width pruners prune its blocks."""
from __future__ import annotations

import torch.nn as nn

from compress.families.base import Family
from compress.families.vit import is_vit, vit_blocks, vit_geometry
from compress.registry import register_family


@register_family("segmenter")
class Segmenter(Family):
    name = "segmenter"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return callable(getattr(model, "forward_maps", None)) and is_vit(getattr(model, "backbone", None))

    @classmethod
    def token_host(cls, model: nn.Module) -> nn.Module:
        return model.backbone

    @classmethod
    def geometry(cls, model: nn.Module):
        return vit_geometry(model.backbone)

    @classmethod
    def blocks(cls, model: nn.Module):
        return [(f"backbone.{name}", attn, mlp) for name, attn, mlp in vit_blocks(model.backbone)]
