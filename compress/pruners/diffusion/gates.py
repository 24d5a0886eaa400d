"""APTP's prunable structure of a diffusers ``UNet2DConditionModel`` and the hooks that gate it.

Width groups (one gate per group, per sample):
- ``resnet``: channel groups of a ``ResnetBlock2D`` (conv1 out / temb out / norm2 / conv2 in), one per
  GroupNorm group of ``norm2``, so removing a group leaves the other groups' statistics unchanged.
- ``heads``: attention heads of an ``Attention`` (self and cross).
- ``ff``: groups of the GEGLU feed-forward's inner dimension.
Depth gates: the last ResNet (+ its Transformer2DModel) of every down/up block with two or more layers;
off, the pair becomes identity on the hidden state (an up block still consumes its skip connection).

Masks multiply the input of the layer that reads the gated channels (conv2, ``to_out[0]``, ``net[2]``):
zeroing them there is exactly what removing them does, so a sliced expert equals the masked UNet.
MACs per gate are measured once with ``FlopCounterMode`` per module (every gated cost is linear in its
gates), which gives the differentiable MACs ratio of the resource loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn as nn


@dataclass
class Group:
    kind: str  # resnet | heads | ff
    path: str  # module path inside the UNet
    n: int  # gates
    unit: int  # channels per gate
    pair: Optional[int] = None  # index of the depth gate whose pair holds it
    macs: float = 0.0  # MACs per gate (batch 1)


@dataclass
class Pair:
    block: str  # down_blocks.i / up_blocks.i
    layer: int
    resnet: str
    attention: Optional[str]
    fixed_macs: float = 0.0  # the pair's MACs that no width gate scales


@dataclass
class Structure:
    groups: List[Group] = field(default_factory=list)
    pairs: List[Pair] = field(default_factory=list)
    total_macs: float = 0.0
    prunable_macs: float = 0.0

    @property
    def width_dim(self) -> int:
        return sum(g.n for g in self.groups)


def ff_groups(inner: int, wanted: int) -> int:
    return math.gcd(inner, wanted)


def find_structure(unet: nn.Module, ff_gate_groups: int = 32) -> Structure:
    """The gate groups and depth pairs of ``unet`` (MACs filled in by ``measure_structure``)."""
    from diffusers.models.attention import FeedForward
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    s = Structure()
    for kind in ("down_blocks", "up_blocks"):
        for i, block in enumerate(getattr(unet, kind)):
            resnets = getattr(block, "resnets", [])
            if len(resnets) >= 2:
                attns = getattr(block, "attentions", None)
                s.pairs.append(Pair(f"{kind}.{i}", len(resnets) - 1, f"{kind}.{i}.resnets.{len(resnets) - 1}",
                                    f"{kind}.{i}.attentions.{len(resnets) - 1}" if attns else None))
    for path, m in unet.named_modules():
        pair = next((k for k, p in enumerate(s.pairs)
                     if path == p.resnet or (p.attention and path.startswith(p.attention + "."))), None)
        if isinstance(m, ResnetBlock2D) and m.time_embedding_norm == "default":
            s.groups.append(Group("resnet", path, m.norm2.num_groups, m.conv1.out_channels // m.norm2.num_groups, pair))
        elif isinstance(m, Attention) and m.heads > 1:
            s.groups.append(Group("heads", path, m.heads, m.to_q.out_features // m.heads, pair))
        elif isinstance(m, FeedForward) and hasattr(m.net[0], "proj"):
            inner = m.net[2].in_features
            k = ff_groups(inner, ff_gate_groups)
            s.groups.append(Group("ff", path, k, inner // k, pair))
    return s


def _flops_by_module(unet: nn.Module, example) -> Dict[str, float]:
    from torch.utils.flop_counter import FlopCounterMode

    from compress.measure import register_cpu_sdpa_formula

    register_cpu_sdpa_formula()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        unet(*example)
    out = {}
    for name, ops in counter.get_flop_counts().items():
        key = name.split(".", 1)[1] if "." in name else ""
        out[key] = sum(ops.values()) / 2
    return out


def measure_structure(s: Structure, unet: nn.Module, example) -> None:
    """MACs per gate and per pair at batch 1 (``example`` = (x, t, cond) for ``unet(*example)``)."""
    macs = _flops_by_module(unet, example)
    for g in s.groups:
        if g.kind == "resnet":
            gated = sum(macs.get(f"{g.path}.{c}", 0.0) for c in ("conv1", "conv2", "time_emb_proj"))
        else:
            gated = macs.get(g.path, 0.0)
        g.macs = gated / g.n
    for k, p in enumerate(s.pairs):
        inside = [g for g in s.groups if g.pair == k]
        whole = macs.get(p.resnet, 0.0) + (macs.get(p.attention, 0.0) if p.attention else 0.0)
        p.fixed_macs = max(0.0, whole - sum(g.macs * g.n for g in inside))
    s.total_macs = macs.get("", sum(v for k, v in macs.items() if k and "." not in k))
    s.prunable_macs = sum(g.macs * g.n for g in s.groups) + sum(p.fixed_macs for p in s.pairs)


def unet_structure(model: nn.Module, ff_gate_groups: int, pruner: str):
    """(unet, its gate groups with MACs measured at batch 1) of a text-to-image model; other models are refused,
    naming ``pruner``."""
    from compress.errors import CompressError

    unet = getattr(model, "unet", None)
    if unet is None or not hasattr(unet, "down_blocks") or not hasattr(model, "encode_prompts"):
        raise CompressError(f"{pruner} prunes the UNet of a text-to-image model (model.name: unet_small or "
                            "sd_pipeline)")
    s = find_structure(unet, ff_gate_groups)
    example = (torch.randn(1, *model.latent_shape()), torch.tensor([500]),
               torch.randn(1, model.text.max_length, model.text.dim))
    measure_structure(s, unet, example)
    return unet, s


def macs_ratio(s: Structure, width: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """Differentiable prunable-MACs ratio per sample from gates (B, width_dim) and (B, n_pairs)."""
    per_group, start = [], 0
    for g in s.groups:
        on = width[:, start:start + g.n].sum(1) * g.macs
        if g.pair is not None:
            on = on * depth[:, g.pair]
        per_group.append(on)
        start += g.n
    total = torch.stack(per_group, 1).sum(1)
    if s.pairs:
        total = total + (depth * torch.tensor([p.fixed_macs for p in s.pairs], device=depth.device)).sum(1)
    return total / s.prunable_macs


class GateHooks:
    """Forward hooks that apply per-sample gates to the UNet; ``set(width, depth)`` before a forward,
    ``set(None, None)`` for the full model. Removable with ``remove``."""

    def __init__(self, unet: nn.Module, s: Structure):
        self.s = s
        self.width: Optional[torch.Tensor] = None
        self.depth: Optional[torch.Tensor] = None
        self.handles = []
        mods = dict(unet.named_modules())
        start = 0
        for g in s.groups:
            m = mods[g.path]
            target = {"resnet": lambda m: m.conv2, "heads": lambda m: m.to_out[0], "ff": lambda m: m.net[2]}[g.kind](m)
            self.handles.append(target.register_forward_pre_hook(self._width_hook(start, g)))
            start += g.n
        for k, p in enumerate(s.pairs):
            self.handles.append(mods[p.resnet].register_forward_hook(self._depth_resnet(k, mods[p.resnet])))
            if p.attention:
                self.handles.append(mods[p.attention].register_forward_hook(self._depth_attention(k)))

    def set(self, width: Optional[torch.Tensor], depth: Optional[torch.Tensor]) -> None:
        self.width, self.depth = width, depth

    def _width_hook(self, start: int, g: Group):
        def hook(module, args):
            if self.width is None:
                return None
            x = args[0]
            gates = self.width[:, start:start + g.n].repeat_interleave(g.unit, dim=1).to(x.dtype)
            gates = gates.view(gates.shape[0], -1, 1, 1) if x.dim() == 4 else gates.unsqueeze(1)
            if gates.shape[0] != x.shape[0]:  # classifier-free guidance doubles the batch
                gates = gates.repeat(x.shape[0] // gates.shape[0], *([1] * (gates.dim() - 1)))
            return (x * gates, *args[1:])

        return hook

    def _gate(self, k: int, x: torch.Tensor) -> Optional[torch.Tensor]:
        if self.depth is None:
            return None
        d = self.depth[:, k].to(x.dtype)
        if d.shape[0] != x.shape[0]:
            d = d.repeat(x.shape[0] // d.shape[0])
        return d.view(-1, *([1] * (x.dim() - 1)))

    def _depth_resnet(self, k: int, resnet: nn.Module):
        def hook(module, args, out):
            d = self._gate(k, out)
            if d is None:
                return None
            return d * out + (1 - d) * args[0][:, : out.shape[1]]

        return hook

    def _depth_attention(self, k: int):
        def hook(module, args, out):
            h = out[0] if isinstance(out, tuple) else out.sample
            d = self._gate(k, h)
            if d is None:
                return None
            mixed = d * h + (1 - d) * args[0]
            return (mixed,) if isinstance(out, tuple) else type(out)(sample=mixed)

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
