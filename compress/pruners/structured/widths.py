"""Widths of a model's layers as JSON, and the two ways they change.

* ``keep_heads`` / ``keep_hidden`` / ``DG`` groups remove chosen channels (by index) from a live model,
  through torch-pruning's pruning functions, so the surviving weights are kept.
* ``apply_widths`` replays recorded widths on a fresh base model (``compress.load``): it only needs
  the shapes to fit the strict safetensors load, so it narrows every layer to its first ``n`` channels
  and lets the loaded weights fill them. No pickles, only the JSON written by ``changed_widths``.

Edits have the form ``{"modules": {name: {"type": "Linear", "in": 96, "out": 192}}, "attrs": {name:
{"num_heads": 2, "attn_dim": 64}}}``; only layers whose width differs from the base model appear.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from compress.errors import CompressError

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)


# ---- reading -------------------------------------------------------------------------------------


def layer_width(module: nn.Module) -> Optional[Dict[str, Any]]:
    """The width of one conv / linear / norm layer as JSON, or None for other modules."""
    if isinstance(module, nn.Linear):
        return {"type": "Linear", "in": module.in_features, "out": module.out_features}
    if isinstance(module, nn.Conv2d):
        return {"type": "Conv2d", "in": module.in_channels, "out": module.out_channels, "groups": module.groups}
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        return {"type": "BatchNorm", "out": module.num_features}
    if isinstance(module, nn.LayerNorm):
        return {"type": "LayerNorm", "out": int(module.normalized_shape[-1])}
    if isinstance(module, nn.GroupNorm):
        return {"type": "GroupNorm", "out": module.num_channels}
    return None


def read_widths(model: nn.Module) -> Dict[str, Any]:
    """Widths of every conv / linear / norm layer, plus the head counts of timm attention modules."""
    modules = {name: w for name, m in model.named_modules() if (w := layer_width(m)) is not None}
    attrs = {name: {"num_heads": m.num_heads, "attn_dim": m.attn_dim} for name, m in vit_attentions(model)}
    return {"modules": modules, "attrs": attrs}


def changed_widths(before: Dict[str, Any], model: nn.Module) -> Dict[str, Any]:
    """The edits that turn a model with widths ``before`` into ``model`` (empty when nothing changed)."""
    now = read_widths(model)
    out: Dict[str, Any] = {}
    for key in ("modules", "attrs"):
        diff = {n: w for n, w in now[key].items() if before[key].get(n) != w}
        if diff:
            out[key] = diff
    return out


# ---- replaying recorded widths on a fresh model --------------------------------------------------


def _narrow_param(p: Optional[nn.Parameter], sizes: Sequence[int]) -> Optional[nn.Parameter]:
    if p is None:
        return None
    data = p.data
    for dim, n in enumerate(sizes):
        data = data.narrow(dim, 0, n)
    return nn.Parameter(data.clone(), requires_grad=p.requires_grad)


def narrow_layer(module: nn.Module, width: Dict[str, Any], name: str) -> None:
    """Shrink ``module`` in place to ``width`` (its first channels); weights are placeholders."""
    have = layer_width(module)
    if have is None or have["type"] != width.get("type"):
        raise CompressError(f"edits.modules.{name}: expected a {width.get('type')} layer, the base model has "
                            f"{type(module).__name__}")
    if any(width.get(k, 0) > have.get(k, 0) for k in ("in", "out")):
        raise CompressError(f"edits.modules.{name}: width {width} is wider than the base layer {have}")
    out = width["out"]
    if isinstance(module, nn.Linear):
        module.weight = _narrow_param(module.weight, (out, width["in"]))
        module.bias = _narrow_param(module.bias, (out,))
        module.in_features, module.out_features = width["in"], out
    elif isinstance(module, nn.Conv2d):
        groups = width.get("groups", module.groups)
        module.weight = _narrow_param(module.weight, (out, width["in"] // groups))
        module.bias = _narrow_param(module.bias, (out,))
        module.in_channels, module.out_channels, module.groups = width["in"], out, groups
    else:
        module.weight = _narrow_param(module.weight, (out,))
        module.bias = _narrow_param(module.bias, (out,))
        if isinstance(module, nn.LayerNorm):
            module.normalized_shape = (out,)
        elif isinstance(module, nn.GroupNorm):
            module.num_channels = out
        else:
            module.num_features = out
            for buf in ("running_mean", "running_var"):
                if getattr(module, buf, None) is not None:
                    setattr(module, buf, getattr(module, buf)[:out].clone())


def apply_widths(model: nn.Module, edits: Dict[str, Any]) -> None:
    """Replay ``changed_widths`` output on a fresh base model (used by ``apply_edits``)."""
    unknown = set(edits) - {"modules", "attrs"}
    if unknown:
        raise CompressError(f"edits: unknown entries {sorted(unknown)} (expected 'modules', 'attrs')")
    named = dict(model.named_modules())
    for name, width in edits.get("modules", {}).items():
        if name not in named:
            raise CompressError(f"edits.modules.{name}: no such module in {type(model).__name__}")
        narrow_layer(named[name], width, name)
    for name, attrs in edits.get("attrs", {}).items():
        if name not in named:
            raise CompressError(f"edits.attrs.{name}: no such module in {type(model).__name__}")
        set_heads(named[name], attrs["num_heads"])


# ---- timm ViT blocks -------------------------------------------------------------------------------


def vit_attentions(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    from timm.layers import Attention

    return [(n, m) for n, m in model.named_modules() if isinstance(m, Attention)]


def vit_blocks(model: nn.Module) -> List[Tuple[str, nn.Module, nn.Module]]:
    """(block name, attention, MLP) of every prunable block, as the model's family declares them."""
    from compress.families import family_of
    from compress.families.vit import ViT

    return family_of(model, default=ViT).blocks(model)  # no family: ViT's check says what is missing


def set_heads(attn: nn.Module, num_heads: int) -> None:
    """Keep timm ``Attention``'s bookkeeping consistent with its (narrower) layers."""
    attn.num_heads = num_heads
    attn.attn_dim = num_heads * attn.head_dim  # head_dim and scale are unchanged: whole heads go


def _removed(total: int, kept: Iterable[int]) -> List[int]:
    kept = set(int(k) for k in kept)
    return [i for i in range(total) if i not in kept]


def keep_heads(attn: nn.Module, kept: Sequence[int]) -> None:
    """Remove every head of a timm ``Attention`` not in ``kept`` (q, k and v rows, proj columns)."""
    import torch_pruning as tp

    hd, dim = attn.head_dim, attn.attn_dim
    gone_heads = _removed(attn.num_heads, kept)
    if not gone_heads:
        return
    channels = [h * hd + j for h in gone_heads for j in range(hd)]
    tp.prune_linear_out_channels(attn.qkv, [s * dim + c for s in range(3) for c in channels])
    tp.prune_linear_in_channels(attn.proj, channels)
    if isinstance(attn.norm, nn.LayerNorm):
        tp.prune_layernorm_out_channels(attn.norm, channels)
    if attn.gate is not None:
        tp.prune_linear_out_channels(attn.gate, channels)
    set_heads(attn, attn.num_heads - len(gone_heads))


def keep_hidden(mlp: nn.Module, kept: Sequence[int]) -> None:
    """Remove every MLP hidden unit not in ``kept`` (fc1 rows, fc2 columns, the hidden norm)."""
    import torch_pruning as tp

    gone = _removed(mlp.fc1.out_features, kept)
    if not gone:
        return
    tp.prune_linear_out_channels(mlp.fc1, gone)
    if isinstance(mlp.norm, nn.LayerNorm):
        tp.prune_layernorm_out_channels(mlp.norm, gone)
    tp.prune_linear_in_channels(mlp.fc2, gone)


# ---- optimizers that still hold the old tensors ----------------------------------------------------


def param_names(model: nn.Module) -> Dict[str, nn.Parameter]:
    return dict(model.named_parameters())


def swap_optimizer_params(optimizers: Sequence[torch.optim.Optimizer], before: Dict[str, nn.Parameter],
                          model: nn.Module) -> int:
    """Point the optimizers at the model's new (narrower) parameters; their old state is dropped.

    ``before`` is ``param_names(model)`` taken before the edit. Returns how many tensors were swapped.
    """
    now = param_names(model)
    old_to_new = {id(p): now[n] for n, p in before.items() if n in now and now[n] is not p}
    for opt in optimizers:
        for group in opt.param_groups:
            group["params"] = [old_to_new.get(id(p), p) for p in group["params"]]
        for p in [p for p in opt.state if id(p) in old_to_new]:
            del opt.state[p]
    return len(old_to_new)
