"""``TokenPruner``: a pruner that is also the per-forward ``TokenPolicy`` of the patched model."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress import tokens
from compress.families import Family, family_of
from compress.pruners.base import Pruner


class TokenPruner(Pruner, tokens.TokenPolicy):
    kind = "token"
    targets = "vit"
    replay_on_load = True  # token pruners hold no weights: re-attach them from their spec

    def plan(self, geometry: Dict[str, Any]) -> None:
        """Turn the config (schedule or budget) into per-layer decisions for this model."""

    def host(self, model: nn.Module) -> nn.Module:
        """The timm ViT inside ``model`` whose blocks this pruner patches (the model family says which)."""
        host = family_of(model, default=Family).token_host(model)  # no family: the model, refused just below
        tokens.require_vit(host, f"pruner {self.name!r}")
        return host

    def attach(self, model: nn.Module) -> None:
        host = self.host(model)
        self.geometry = tokens.vit_geometry(host, f"pruner {self.name!r}")
        self.plan(self.geometry)
        tokens.patch(host, self)

    def detach(self, model: nn.Module) -> None:
        tokens.remove_patch(self.host(model))

    def pinned(self) -> Dict[str, Any]:
        """Config values that reproduce the current plan whatever the defaults of a later version are
        (a resolved budget, a default schedule); ``spec`` writes them into exports once attached."""
        return {}

    def spec(self) -> Dict[str, Any]:
        spec = super().spec()
        if getattr(self, "geometry", None) is not None:
            spec.update(self.pinned())
        return spec

    def expected_tokens(self) -> list:
        """Token counts entering each block under this plan (int or (n_attn, n_mlp))."""
        raise NotImplementedError

    def constant_for_budget(self, geometry: Dict[str, Any], candidates, target: float) -> int:
        """The amount (the same in every block) whose schedule's MACs ratio is nearest ``target``; needs
        ``_counts(geometry, per_block_amounts)``. The ratio falls monotonically with the amount."""
        depth = geometry["depth"]
        return min(candidates, key=lambda k: abs(
            tokens.schedule_macs_ratio(geometry, self._counts(geometry, [k] * depth)) - target))

    def expected_macs_ratio(self) -> float:
        return tokens.schedule_macs_ratio(self.geometry, self.expected_tokens())


def log_probs(model: nn.Module, batches: List[torch.Tensor]) -> List[torch.Tensor]:
    """``model``'s log-probabilities on each batch (float32): the reference a schedule search compares with."""
    return [F.log_softmax(model(b).float(), -1) for b in batches]


def mean_kl(model: nn.Module, batches: List[torch.Tensor], reference: List[torch.Tensor]) -> float:
    """KL(reference || model) per image over ``batches`` (``reference``: ``log_probs`` of the dense model): how far
    a schedule moves the outputs, without labels."""
    return kl_and_error(model, batches, reference)[0]


def kl_and_error(model: nn.Module, batches: List[torch.Tensor], reference: List[torch.Tensor],
                 labels: Optional[List[torch.Tensor]] = None) -> Tuple[float, Optional[float]]:
    """(``mean_kl``, top-1 error on ``labels`` or None without them) in one pass: a labelled search scores schedules
    by the error, which is what top-1 measures, and breaks its ties by the KL."""
    kl = wrong = 0.0
    for i, (b, d) in enumerate(zip(batches, reference)):
        lp = F.log_softmax(model(b).float(), -1)
        kl += F.kl_div(lp, d, log_target=True, reduction="sum").item()
        if labels is not None:
            wrong += (lp.argmax(-1) != labels[i].to(lp.device)).sum().item()
    n = sum(len(b) for b in batches)
    return kl / n, (None if labels is None else wrong / n)
