"""The single-architecture baseline for APTP: structured magnitude pruning of the same gate groups (ResNet
channel groups, attention heads, GEGLU groups) into one narrower UNet for every prompt, at a MACs target.

A group unit's score is the L1 norm of the weights it owns (rows it writes, columns it reads), divided by
the mean over its layer so layers of different sizes compete fairly, and by its MACs so cheap units are
not removed for nothing; units go lowest score first until the UNet's MACs reach the target (at least
one unit per layer stays). Depth pairs are kept. The decision is taken at attach (one shot, from the
weights as they are, like APTP's ``magnitude`` baseline) and the model is sliced at once; a later
``finetune``/``distill`` stage recovers it.
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch
import torch.nn as nn
from pydantic import Field

from compress.errors import CompressError
from compress.pruners.base import Pruner, PrunerConfig
from compress.pruners.diffusion.gates import Group, find_structure, unet_structure
from compress.pruners.diffusion.slicing import slice_unet
from compress.registry import register_pruner


class SingleArchConfig(PrunerConfig):
    target_macs_ratio: float = Field(0.6, gt=0, le=1, description="UNet MACs relative to dense")
    ff_gate_groups: int = Field(32, gt=0)


def _unit_norms(m: nn.Module, g: Group) -> torch.Tensor:
    """L1 norm of the weights of each of the ``g.n`` units of module ``m``."""
    def rows(w):  # (out, ...) -> per output channel
        return w.detach().abs().flatten(1).sum(1)

    def cols(w):  # (out, in, ...) -> per input channel
        return w.detach().abs().transpose(0, 1).flatten(1).sum(1)

    if g.kind == "resnet":
        per = rows(m.conv1.weight) + cols(m.conv2.weight)
    elif g.kind == "heads":
        per = rows(m.to_q.weight) + rows(m.to_k.weight) + rows(m.to_v.weight) + cols(m.to_out[0].weight)
    else:
        inner = m.net[2].in_features
        w = rows(m.net[0].proj.weight)
        per = w[:inner] + w[inner:] + cols(m.net[2].weight)
    return per.view(g.n, g.unit).sum(1)


@register_pruner("unet_magnitude")
class SingleArch(Pruner):
    """single-architecture baseline: structured magnitude pruning of APTP's gate groups to one UNet"""

    name = "unet_magnitude"
    kind = "structured"
    targets = "unet"
    Config = SingleArchConfig

    def __init__(self, config=None, **params):
        super().__init__(config, **params)
        self.keep: Dict[str, List[int]] = {}

    def attach(self, model: nn.Module) -> None:
        unet, s = unet_structure(model, self.config.ff_gate_groups, "unet_magnitude")
        mods = dict(unet.named_modules())
        cands = []
        for gi, g in enumerate(s.groups):
            norms = _unit_norms(mods[g.path], g)
            norms = norms / norms.mean().clamp(min=1e-12)
            cands += [(float(v) / max(g.macs, 1.0), gi, i) for i, v in enumerate(norms)]
        cut = s.total_macs * (1 - self.config.target_macs_ratio)
        left = [g.n for g in s.groups]
        removed = {gi: set() for gi in range(len(s.groups))}
        for _, gi, i in sorted(cands):
            if cut <= 0:
                break
            if left[gi] > 1:
                removed[gi].add(i)
                left[gi] -= 1
                cut -= s.groups[gi].macs
        if cut > 0:
            raise CompressError(f"unet_magnitude.target_macs_ratio: {self.config.target_macs_ratio} is out of reach "
                                "by width alone")
        self.keep = {g.path: [i for i in range(g.n) if i not in removed[gi]] for gi, g in enumerate(s.groups)}
        slice_unet(unet, s, self.keep, [])
        self.model = model

    def detach(self, model: nn.Module) -> None:
        raise CompressError("unet_magnitude slices the UNet; it cannot be detached")

    def finalize(self, model: nn.Module) -> Dict[str, Any]:
        return {"keep": self.keep, "ff_gate_groups": self.config.ff_gate_groups}

    @classmethod
    def apply_edits(cls, model: nn.Module, edits: Dict[str, Any]) -> None:
        if "keep" not in edits:
            raise CompressError("edits: unet_magnitude edits have no 'keep'")
        s = find_structure(model.unet, int(edits.get("ff_gate_groups", 32)))
        unknown = set(edits["keep"]) - {g.path for g in s.groups}
        if unknown:
            raise CompressError(f"edits: keep names layers this UNet does not have (e.g. {sorted(unknown)[0]})")
        slice_unet(model.unet, s, {k: list(v) for k, v in edits["keep"].items()}, [])

    def state_dict(self) -> Dict[str, Any]:
        return {"keep": self.keep}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume: attach decided from the weights it saw (a fresh model's); rebuild the recorded widths."""
        keep = {k: list(v) for k, v in (state.get("keep") or {}).items()}
        model = getattr(self, "model", None)
        if keep and keep != self.keep and model is not None:
            unet = type(model.unet).from_config(model.unet.config)
            self.apply_edits_to(unet, keep)
            model.unet = unet
            self.keep = keep

    def apply_edits_to(self, unet: nn.Module, keep: Dict[str, List[int]]) -> None:
        slice_unet(unet, find_structure(unet, self.config.ff_gate_groups), keep, [])
