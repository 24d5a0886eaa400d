"""Vision Mamba (``compress.models.vim``): its layers, token geometry and per-token cost model (declared with the
model, ``vim_geometry`` and ``layer_macs_per_token``). Its token mechanism is ToP-ViM's (``pruners/token/top_vim``)."""
from __future__ import annotations

import torch.nn as nn

from compress.families.base import Family
from compress.registry import register_family


@register_family("vim")
class Vim(Family):
    name = "vim"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from compress.models.vim import VisionMamba

        return isinstance(model, VisionMamba)

    @classmethod
    def geometry(cls, model: nn.Module):
        from compress.models.vim import vim_geometry

        return vim_geometry(model)
