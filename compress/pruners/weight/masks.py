"""Shared pieces of unstructured weight pruning: which layers, which weights, applying, syncing, packing.

A mask is a bool tensor shaped like the weight, True where the weight is *pruned*. Selections are
deterministic (stable sort, ties broken by position) so every rank and every rerun agree.
"""
from __future__ import annotations

import fnmatch
import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from pydantic import Field, field_validator, model_validator

from compress import zero
from compress.distributed import world_size
from compress.errors import CompressError
from compress.pruners.base import PrunerConfig

Masks = Dict[str, torch.Tensor]  # layer name -> bool "pruned" mask shaped like layer.weight

DEFAULT_EXCLUDE = ["patch_embed.*", "head", "head.*", "head_dist", "fc", "classifier", "classifier.*"]


class WeightPrunerConfig(PrunerConfig):
    """Options every weight pruner shares."""

    sparsity: float = Field(0.9, ge=0, lt=1, description="(final) fraction of weights pruned in every prunable layer")
    n_m: Optional[Tuple[int, int]] = Field(None, description="[N, M]: prune the N smallest of every M consecutive "
                                                             "input weights instead (sparsity = N/M); [2, 4] = GPU 2:4")
    cap: float = Field(0.995, gt=0, le=1, description="never prune more than this fraction of any one layer")
    include: List[str] = Field(default_factory=lambda: ["*"], description="glob patterns of prunable module names")
    exclude: List[str] = Field(default_factory=lambda: list(DEFAULT_EXCLUDE),
                               description="glob patterns never pruned (default: patch embedding and classifier)")

    @field_validator("n_m")
    @classmethod
    def _n_m(cls, v):
        if v is not None and not (0 < v[0] < v[1]):
            raise ValueError("must be [N, M] with 0 < N < M")
        return v

    @model_validator(mode="after")
    def _sparsity_of_n_m(self):
        if self.n_m is not None:
            implied = self.n_m[0] / self.n_m[1]
            if "sparsity" in self.model_fields_set and abs(self.sparsity - implied) > 1e-9:
                raise ValueError(f"n_m {list(self.n_m)} prunes {implied:.4g} of the weights but sparsity is "
                                 f"{self.sparsity}; leave sparsity out or set it to {implied:.4g}")
            self.sparsity = implied
        return self


# -- which layers -----------------------------------------------------------------------------------


def prunable_layers(model: nn.Module, include: Sequence[str], exclude: Sequence[str]) -> Dict[str, nn.Module]:
    """``name -> module`` for every nn.Linear / nn.Conv2d selected by the glob patterns."""
    layers = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in include) and not any(fnmatch.fnmatchcase(name, p) for p in exclude):
            if module.weight.numel() == 0:
                raise CompressError(f"pruner: {name}.weight is partitioned (DeepSpeed ZeRO-3); weight pruners need "
                                    "whole weights: use ddp or deepspeed_stage_2")
            layers[name] = module
    if not layers:
        raise CompressError(f"pruner.include/exclude: no nn.Linear or nn.Conv2d layer matches (include {list(include)}, "
                            f"exclude {list(exclude)})")
    return layers


# -- which weights ----------------------------------------------------------------------------------


def prune_count(n: int, sparsity: float, cap: float = 0.995) -> int:
    """ceil(p * n) weights, at most floor(cap * n) (ISS-P's cap, so no layer dies). ``round`` guards float noise
    such as 0.7 * 100 = 70.00000000000001."""
    return min(math.ceil(round(sparsity * n, 6)), math.floor(round(cap * n, 6)))


def smallest_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """True at the ``k`` smallest entries of ``score`` (ties: lower flat index first)."""
    flat = score.reshape(-1)
    if k <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    if k >= flat.numel():
        return torch.ones_like(score, dtype=torch.bool)
    # kthvalue is linear time (ISS-P re-selects every step; a full sort per layer was the bottleneck);
    # entries equal to the threshold are taken in index order, as a stable sort would.
    threshold = flat.kthvalue(k).values
    mask = flat < threshold
    ties = (flat == threshold).nonzero().squeeze(1)[: k - int(mask.sum())]
    mask[ties] = True
    return mask.view_as(score)


def _rows(weight: torch.Tensor) -> torch.Tensor:
    """Weights as (out, in): N:M groups run along the input dimension, as GPU 2:4 kernels expect."""
    return weight.reshape(weight.shape[0], -1)


def n_m_mask(weight: torch.Tensor, n: int, m: int, name: str = "layer") -> torch.Tensor:
    """True at the ``n`` smallest |w| of every ``m`` consecutive input weights."""
    rows = _rows(weight)
    if rows.shape[1] % m:
        raise CompressError(f"pruner.n_m: {name} has {rows.shape[1]} inputs per output, not a multiple of M={m}; "
                            "exclude it (pruner.exclude) or choose another M")
    groups = rows.detach().abs().reshape(-1, m)
    order = torch.argsort(groups, dim=1, stable=True)[:, :n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order, True)
    return mask.view_as(weight)


def layer_masks(layers: Dict[str, nn.Module], sparsity: float, n_m: Optional[Tuple[int, int]] = None,
                cap: float = 0.995) -> Masks:
    """Per-layer magnitude selection: in each layer the ceil(p * n) smallest |w| (or an N:M pattern)."""
    masks = {}
    for name, layer in layers.items():
        w = weight_of(layer)
        if n_m is not None:
            masks[name] = n_m_mask(w, n_m[0], n_m[1], name)
        else:
            masks[name] = smallest_mask(w.abs(), prune_count(w.numel(), sparsity, cap))
    return masks


def global_masks(layers: Dict[str, nn.Module], sparsity: float, cap: float = 0.995) -> Masks:
    """Global magnitude selection: the ceil(p * N) smallest |w| over all layers together; a layer that would lose
    more than ``cap`` of its weights keeps its largest ones (so the total can end a little under the target)."""
    names = list(layers)
    scores = [weight_of(layers[n]).abs().reshape(-1) for n in names]
    flat = smallest_mask(torch.cat(scores).float(), prune_count(sum(s.numel() for s in scores), sparsity, 1.0))
    masks, start = {}, 0
    for name, s in zip(names, scores):
        m = flat[start:start + s.numel()]
        start += s.numel()
        limit = prune_count(s.numel(), 1.0, cap)
        if int(m.sum()) > limit:
            m = smallest_mask(s, limit)
        masks[name] = m.view(zero.shape(layers[name].weight))
    return masks


# -- applying -----------------------------------------------------------------------------------------


def weight_of(layer: nn.Module) -> torch.Tensor:
    """A layer's whole weight, detached: the fp32 master copy under DeepSpeed (gathered under ZeRO-3; a
    collective), the parameter itself otherwise."""
    w = layer.weight
    return zero.read(w) if zero.has_master(w) or zero.partitioned(w) else w.detach()


@torch.no_grad()
def apply_masks(layers: Dict[str, nn.Module], masks: Masks) -> None:
    """Hard zeros at the pruned positions (in DeepSpeed's master copy too, or the next step undoes them)."""
    for name, mask in masks.items():
        w = layers[name].weight
        if zero.has_master(w):
            zero.write(w, zero.read(w).masked_fill_(mask.to(w.device), 0))
        else:
            w.masked_fill_(mask.to(w.device), 0)


@torch.no_grad()
def shrink(layers: Dict[str, nn.Module], masks: Masks, alpha: float) -> None:
    """ISS-P's soft shrinkage: multiply exactly the selected weights by ``alpha`` (master copy included)."""
    for name, mask in masks.items():
        w = layers[name].weight
        full = zero.read(w) if zero.has_master(w) else w
        value = torch.where(mask.to(full.device), full * alpha, full)
        zero.write(w, value) if zero.has_master(w) else w.copy_(value)


def layer_sparsity(layers: Dict[str, nn.Module]) -> Dict[str, float]:
    return {n: 1.0 - int(torch.count_nonzero(m.weight)) / m.weight.numel() for n, m in layers.items()}


# -- every rank the same --------------------------------------------------------------------------------


def broadcast_masks(masks: Masks, src: int = 0) -> Masks:
    """Rank ``src``'s masks on every rank (one flat uint8 broadcast); unchanged outside torch.distributed."""
    if world_size() == 1:
        return masks
    names = list(masks)
    flat = torch.cat([masks[n].reshape(-1).to(torch.uint8) for n in names])
    torch.distributed.broadcast(flat, src=src)
    out, start = {}, 0
    for n in names:
        k = masks[n].numel()
        out[n] = flat[start:start + k].view(masks[n].shape).bool()
        start += k
    return out


def decide(select, *args, **kwargs) -> Masks:
    """Run a selection (``layer_masks`` / ``global_masks``) and make rank 0's answer everyone's."""
    return broadcast_masks(select(*args, **kwargs))


# -- compact storage ------------------------------------------------------------------------------------

VALUES = ".sparse_values"  # the nonzero weights, in row-major order
BITS = ".sparse_mask"  # bit-packed nonzero pattern, uint8, 8 weights per byte, most significant bit first
_BIT = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)])
    return (flat.view(-1, 8) * _BIT).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    return ((packed.reshape(-1, 1) & _BIT) != 0).reshape(-1)[:numel]


def packed_bytes(weight: torch.Tensor) -> int:
    """Bytes of ``weight`` stored as nonzero values + bit mask."""
    return int(torch.count_nonzero(weight)) * weight.element_size() + (weight.numel() + 7) // 8


def pack_tensors(state: Dict[str, torch.Tensor], keys: Iterable[str]) -> Dict[str, torch.Tensor]:
    """Replace each ``key`` by ``key.sparse_values`` + ``key.sparse_mask`` (new dict; others untouched)."""
    keys = set(keys)
    out = {}
    for k, v in state.items():
        if k in keys:
            nz = v != 0
            out[k + VALUES] = v[nz].contiguous()
            out[k + BITS] = pack_bits(nz)
        else:
            out[k] = v
    return out


def unpack_tensors(state: Dict[str, torch.Tensor], shapes: Dict[str, Sequence[int]]) -> Dict[str, torch.Tensor]:
    """Inverse of ``pack_tensors``; ``shapes`` maps each packed key to its dense shape."""
    out = dict(state)
    for k, shape in shapes.items():
        if k in out and k + VALUES not in out:
            continue  # stored dense (e.g. packed by no one, or already restored by another pruner)
        if k + VALUES not in out or k + BITS not in out:
            raise CompressError(f"checkpoint: model.safetensors lacks {k}{VALUES} / {k}{BITS}")
        values, bits = out.pop(k + VALUES), out.pop(k + BITS)
        numel = math.prod(shape)
        nz = unpack_bits(bits, numel)
        if int(nz.sum()) != values.numel():
            raise CompressError(f"checkpoint: {k}: {values.numel()} stored values but the mask has {int(nz.sum())}")
        dense = torch.zeros(numel, dtype=values.dtype)
        dense[nz] = values
        out[k] = dense.view(*shape)
    return out


# -- GPU 2:4 --------------------------------------------------------------------------------------------


def is_2_4(weight: torch.Tensor) -> bool:
    """At most 2 nonzeros in every 4 consecutive input weights."""
    rows = _rows(weight)
    return rows.shape[1] % 4 == 0 and bool(((rows.reshape(-1, 4) != 0).sum(1) <= 2).all())


def to_semi_structured(model: nn.Module) -> List[str]:
    """Swap the weights of 2:4-sparse nn.Linear layers for ``torch.sparse.to_sparse_semi_structured`` tensors, so
    CUDA runs them with sparse tensor-core kernels (fp16/bf16, Ampere or newer). Returns the converted layer names."""
    from torch.sparse import to_sparse_semi_structured

    converted = []
    for name, layer in model.named_modules():
        if isinstance(layer, nn.Linear) and layer.weight.is_cuda and is_2_4(layer.weight):
            layer.weight = nn.Parameter(to_sparse_semi_structured(layer.weight.detach()), requires_grad=False)
            converted.append(name)
    return converted
