"""Physical slicing of a diffusers UNet to one expert's gates: narrower diffusers modules, no masks.

``keep`` maps a group path to the kept gate indices; ``skip`` lists depth pairs that are removed (they
become parameter-free ``SkipResnet``/``SkipAttention``). The same call rebuilds the architecture on load
from the recorded edits (then the weights load strictly), so nothing is pickled.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn

from compress.pruners.diffusion.gates import Structure


class SkipResnet(nn.Module):
    """A removed last ResNet of a block: passes the hidden state (drops an up block's skip connection)."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.out_channels = out_channels

    def forward(self, x, temb=None, *args, **kwargs):
        return x[:, : self.out_channels]


class SkipAttention(nn.Module):
    """A removed Transformer2DModel: identity, in the tuple form diffusers' blocks unpack."""

    def forward(self, hidden_states, *args, return_dict: bool = False, **kwargs):
        return (hidden_states,)


def _linear(old: nn.Linear, rows=None, cols=None) -> nn.Linear:
    w = old.weight.data
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    new = nn.Linear(w.shape[1], w.shape[0], bias=old.bias is not None)
    new.weight.data.copy_(w)
    if old.bias is not None:
        new.bias.data.copy_(old.bias.data[rows] if rows is not None else old.bias.data)
    return new


def _conv(old: nn.Conv2d, out_idx=None, in_idx=None) -> nn.Conv2d:
    w = old.weight.data
    w = w[out_idx] if out_idx is not None else w
    w = w[:, in_idx] if in_idx is not None else w
    new = nn.Conv2d(w.shape[1], w.shape[0], old.kernel_size, old.stride, old.padding, bias=old.bias is not None)
    new.weight.data.copy_(w)
    if old.bias is not None:
        new.bias.data.copy_(old.bias.data[out_idx] if out_idx is not None else old.bias.data)
    return new


def _channels(kept: List[int], unit: int) -> torch.Tensor:
    return torch.tensor([k * unit + j for k in kept for j in range(unit)], dtype=torch.long)


def slice_resnet(m: nn.Module, kept: List[int], unit: int) -> None:
    idx = _channels(kept, unit)
    m.conv1 = _conv(m.conv1, out_idx=idx)
    if m.time_emb_proj is not None:
        m.time_emb_proj = _linear(m.time_emb_proj, rows=idx)
    norm = nn.GroupNorm(len(kept), len(idx), eps=m.norm2.eps, affine=m.norm2.affine)
    if m.norm2.affine:
        norm.weight.data.copy_(m.norm2.weight.data[idx])
        norm.bias.data.copy_(m.norm2.bias.data[idx])
    m.norm2 = norm
    m.conv2 = _conv(m.conv2, in_idx=idx)


def slice_heads(m: nn.Module, kept: List[int], unit: int) -> None:
    idx = _channels(kept, unit)
    m.to_q = _linear(m.to_q, rows=idx)
    m.to_k = _linear(m.to_k, rows=idx)
    m.to_v = _linear(m.to_v, rows=idx)
    m.to_out[0] = _linear(m.to_out[0], cols=idx)
    m.heads = len(kept)
    m.inner_dim = len(idx)
    if hasattr(m, "inner_kv_dim"):
        m.inner_kv_dim = len(idx)


def slice_ff(m: nn.Module, kept: List[int], unit: int) -> None:
    idx = _channels(kept, unit)
    inner = m.net[2].in_features
    m.net[0].proj = _linear(m.net[0].proj, rows=torch.cat([idx, idx + inner]))  # GEGLU: [hidden | gate]
    m.net[2] = _linear(m.net[2], cols=idx)


SLICERS = {"resnet": slice_resnet, "heads": slice_heads, "ff": slice_ff}


def slice_unet(unet: nn.Module, s: Structure, keep: Dict[str, List[int]], skip: List[int]) -> nn.Module:
    """Slice ``unet`` in place to ``keep``/``skip`` (see the module docstring); returns it."""
    mods = dict(unet.named_modules())
    skipped = {s.pairs[k].resnet for k in skip} | {s.pairs[k].attention for k in skip if s.pairs[k].attention}
    for g in s.groups:
        if g.path in keep and len(keep[g.path]) < g.n and not any(g.path == p or g.path.startswith(p + ".")
                                                                   for p in skipped):
            SLICERS[g.kind](mods[g.path], sorted(keep[g.path]), g.unit)
    for k in skip:
        p = s.pairs[k]
        parent = mods[p.block]
        parent.resnets[p.layer] = SkipResnet(mods[p.resnet].out_channels)
        if p.attention:
            parent.attentions[p.layer] = SkipAttention()
    return unet


def keep_from_gates(s: Structure, width: torch.Tensor, depth: torch.Tensor):
    """(keep, skip) of one hard gate vector (width_dim,), (n_pairs,)."""
    keep, start = {}, 0
    for g in s.groups:
        on = [i for i in range(g.n) if width[start + i] > 0.5]
        keep[g.path] = on or [int(width[start:start + g.n].argmax())]  # never a zero-width layer
        start += g.n
    skip = [k for k in range(len(s.pairs)) if depth[k] <= 0.5]
    return keep, skip
