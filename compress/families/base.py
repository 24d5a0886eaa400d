"""The family protocol and the lookup pruners use (``family_of``)."""
from __future__ import annotations

from typing import Any, ClassVar, Dict, List, Optional, Tuple

import torch.nn as nn

from compress.errors import CompressError


class Family:
    """Subclasses set ``name`` and implement ``matches``; the rest is what the family's pruners use."""

    name: ClassVar[str] = "?"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether ``model`` belongs to this family."""
        raise NotImplementedError

    @classmethod
    def token_host(cls, model: nn.Module) -> nn.Module:
        """The module whose blocks a token pruner patches (default: the model itself; a segmenter: its backbone)."""
        return model

    @classmethod
    def geometry(cls, model: nn.Module) -> Dict[str, Any]:
        """Depth, widths, token counts: what schedules and budgets are planned from."""
        raise CompressError(f"model family {cls.name!r} declares no token geometry")

    @classmethod
    def blocks(cls, model: nn.Module) -> List[Tuple[str, nn.Module, nn.Module]]:
        """(name, attention, MLP) of every block whose heads and hidden units can be pruned."""
        raise CompressError(f"model family {cls.name!r} declares no prunable attention/MLP blocks")


def family_of(model: nn.Module, who: str = "model", default: Optional[type] = None) -> type:
    """The registered family ``model`` belongs to (the first that matches, in name order); ``default`` when none
    does, or, without one, an error naming ``who`` and the model's class."""
    from compress.registry import FAMILIES

    for _, family in FAMILIES.items():
        if family.matches(model):
            return family
    if default is not None:
        return default
    raise CompressError(f"{who}: no model family knows {type(model).__module__}.{type(model).__name__} "
                        f"(known: {', '.join(FAMILIES.names())})")
