"""PreCropping (Cai et al., arXiv 2203.02549 v1): prune channels at initialisation to the layer-wise
densities of a pruning-at-initialisation method, then train the narrower dense model normally.

``attach`` shrinks the model at once (see docs/methods.md §6):

1. Layer-wise densities d_l from a PAI score (``pai_scores``: SynFlow by default, SNIP or GraSP)
   with the global density ``density``. The first conv / patch embedding and the classifier are kept
   dense and are not ranked. A channel-pruned layer cannot vanish, so densities are floored at
   ``min_density`` (SynFlow empties e.g. 1x1 shortcut convs, whose single-layer paths carry little flow).
2. Channel ratios. Channels joined by residual adds (or depthwise convs) form one group with one
   ratio r_g: torch-pruning's dependency graph finds the groups of a CNN; for a timm ViT the groups
   are each block's heads and each block's MLP hidden units (the residual stream keeps its width).
   A layer's density is about r_in * r_out, so we solve log r_in + log r_out = log d_l for all
   layers at once by least squares weighted by the layers' sizes, with 0 < r_g <= 1 (the exact rule
   of the paper is not published; this is our reading). For a ViT this gives each group the
   size-weighted geometric mean of its layers' densities.
3. Widths C'_g = round(r_g * C_g) to a multiple of ``round_to`` (heads: whole heads), at least one
   channel, at most the full width. The first C'_g channels of every group stay (at initialisation
   which ones does not matter; that is the paper's claim) and, with ``reinit``, the model's own
   initialiser runs again so fan-in-scaled inits match the new widths.

The decision is taken on rank 0 and broadcast when a process group exists; the runner attaches
before the strategy starts, where every rank computes the same deterministic decision from the same
seeded initialisation, and the ``setup`` callback checks that all ranks' widths agree.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Dict, List, Literal, Optional, Tuple

import torch
import torch.nn as nn
from pydantic import Field

from compress import distributed
from compress.errors import CompressError
from compress.pruners.base import Pruner, PrunerConfig, StageRun
from compress.pruners.structured import pai_scores
from compress.pruners.structured.heads import round_width
from compress.pruners.structured.widths import (
    apply_widths, changed_widths, keep_heads, keep_hidden, read_widths, vit_blocks,
)
from compress.registry import register_pruner


class PreCroppingConfig(PrunerConfig):
    density: float = Field(0.5, gt=0, le=1, description="fraction of the ranked weights the PAI method keeps")
    score: Literal["synflow", "snip", "grasp"] = "synflow"
    iterations: int = Field(100, ge=1, description="SynFlow rounds (exponential schedule)")
    batch_size: int = Field(16, ge=1, description="SNIP/GraSP: size of the fixed-seed random batch")
    input_size: Optional[int] = Field(None, gt=0, description="image side for the score pass (default: the model's)")
    round_to: int = Field(8, ge=1, description="channel / MLP widths are multiples of this (or the full width)")
    min_density: float = Field(0.05, gt=0, le=1, description="floor of a layer's density in the width solve")
    reinit: bool = Field(True, description="run the model's initialiser again after cropping")


# ---- units: groups of channels that share one ratio, and the layers that connect them ---------------


class Units:
    """``groups``: key -> (full width, rounding multiple); ``layers``: (name, numel, in key, out key)."""

    def __init__(self):
        self.groups: Dict[str, Tuple[int, int]] = {}
        self.layers: List[Tuple[str, int, Optional[str], Optional[str]]] = []


def _is_vit(model: nn.Module) -> bool:
    return hasattr(model, "blocks") and hasattr(model, "patch_embed")


def vit_units(model: nn.Module, round_to: int) -> Units:
    u = Units()
    for name, attn, mlp in vit_blocks(model):
        heads, hidden = f"{name}.heads", f"{name}.hidden"
        u.groups[heads] = (attn.num_heads, 1)
        u.groups[hidden] = (mlp.fc1.out_features, round_to)
        u.layers += [(f"{name}.attn.qkv", attn.qkv.weight.numel(), None, heads),
                     (f"{name}.attn.proj", attn.proj.weight.numel(), heads, None),
                     (f"{name}.mlp.fc1", mlp.fc1.weight.numel(), None, hidden),
                     (f"{name}.mlp.fc2", mlp.fc2.weight.numel(), hidden, None)]
        if attn.gate is not None:
            u.layers.append((f"{name}.attn.gate", attn.gate.weight.numel(), None, heads))
    return u


def stem_and_classifier(model: nn.Module) -> Tuple[nn.Module, nn.Module]:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(classifier, nn.Linear):
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        classifier = linears[-1] if linears else None
    if not convs or classifier is None:
        raise CompressError(f"model: {type(model).__name__} has no first conv / linear classifier to keep")
    return convs[0], classifier


def cnn_graph(model: nn.Module, side: int):
    """torch-pruning's dependency graph and its channel groups (stem and classifier outputs excluded)."""
    import torch_pruning as tp

    stem, classifier = stem_and_classifier(model)
    was = model.training
    graph = tp.DependencyGraph().build_dependency(model.eval(), example_inputs=torch.randn(1, 3, side, side), verbose=False)
    model.train(was)
    groups = list(graph.get_all_groups(ignored_layers=[stem, classifier], root_module_types=(nn.Conv2d, nn.Linear)))
    return graph, groups


def cnn_units(model: nn.Module, groups, round_to: int) -> Units:
    u = Units()
    names = {m: n for n, m in model.named_modules()}
    stem, classifier = stem_and_classifier(model)
    ins: Dict[str, str] = {}
    outs: Dict[str, str] = {}
    for gi, group in enumerate(groups):
        key = f"group{gi}"
        u.groups[key] = (len(group[0].idxs), round_to)
        for dep, _ in group:
            mod = dep.target.module
            if not isinstance(mod, (nn.Conv2d, nn.Linear)) or mod is stem or mod is classifier:
                continue
            handler = getattr(dep.handler, "__name__", "")
            depthwise = isinstance(mod, nn.Conv2d) and mod.groups > 1 and mod.groups == mod.in_channels
            if handler == "prune_out_channels":
                outs[names[mod]] = key
                if depthwise:
                    ins[names[mod]] = key
            elif handler == "prune_in_channels":
                ins[names[mod]] = key
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)) and mod is not stem and mod is not classifier:
            u.layers.append((name, mod.weight.numel(), ins.get(name), outs.get(name)))
    return u


# ---- densities -> ratios -> widths --------------------------------------------------------------------


def solve_ratios(units: Units, dens: Dict[str, float], iters: int = 50) -> Dict[str, float]:
    """Least squares in log space: log r_in + log r_out ~ log d_l per layer (weight sqrt(numel)),
    with each group's ratio in [1 / width, 1] (bounds enforced by fixing violators and re-solving)."""
    keys = list(units.groups)
    col = {k: i for i, k in enumerate(keys)}
    rows, rhs, wts = [], [], []
    for name, numel, gin, gout in units.layers:
        idx = [col[g] for g in {gin, gout} if g is not None]
        if not idx:
            continue
        coeff = torch.zeros(len(keys), dtype=torch.float64)
        for i in idx:
            coeff[i] += 2.0 if gin == gout else 1.0  # depthwise: one group on both sides
        rows.append(coeff)
        rhs.append(math.log(max(dens[name], 1e-12)))
        wts.append(math.sqrt(numel))
    x = torch.zeros(len(keys), dtype=torch.float64)
    if not rows:
        return {k: 1.0 for k in keys}
    a, b, w = torch.stack(rows), torch.tensor(rhs, dtype=torch.float64), torch.tensor(wts, dtype=torch.float64)
    lower = torch.tensor([-math.log(units.groups[k][0]) for k in keys], dtype=torch.float64)
    fixed = a.abs().sum(0) == 0  # groups no ranked layer touches stay at full width
    for _ in range(iters):
        free = ~fixed
        if free.any():
            sol = torch.linalg.lstsq((a[:, free] * w[:, None]), ((b - a[:, fixed] @ x[fixed]) * w)[:, None]).solution[:, 0]
            x[free] = sol
        high, low = free & (x > 0), free & (x < lower)
        if not (high.any() or low.any()):
            break
        x[high], x[low] = 0.0, lower[low]
        fixed = fixed | high | low
    return {k: float(math.exp(v)) for k, v in zip(keys, x)}


def widths_from_ratios(units: Units, ratios: Dict[str, float]) -> Dict[str, int]:
    return {k: round_width(ratios[k] * full, full, multiple) for k, (full, multiple) in units.groups.items()}


# ---- the pruner ---------------------------------------------------------------------------------------

_CACHE: Dict[str, Tuple[Dict[str, int], Dict[str, float], Dict[str, float]]] = {}  # decision by (config, weights fingerprint): the runner attaches twice


def _fingerprint(model: nn.Module, spec: Dict[str, Any]) -> str:
    h = hashlib.sha1(json.dumps(spec, sort_keys=True).encode())
    with torch.no_grad():
        for n, p in model.named_parameters():
            h.update(f"{n}{tuple(p.shape)}{float(p.double().sum()):.12e}{float(p.double().abs().sum()):.12e}".encode())
    return h.hexdigest()


@register_pruner("precropping")
class PreCroppingPruner(Pruner):
    """PreCropping: channel/head/MLP widths from pruning-at-init densities (SynFlow/SNIP/GraSP), cropped at once."""

    name = "precropping"
    kind = "structured"
    Config = PreCroppingConfig

    def __init__(self, config=None, **params):
        super().__init__(config, **params)
        self._model: Optional[nn.Module] = None
        self._base: Optional[Dict[str, Any]] = None
        self.densities: Dict[str, float] = {}
        self.ratios: Dict[str, float] = {}
        self.widths: Dict[str, int] = {}
        self.units: Optional[Units] = None

    def _input_shape(self, model: nn.Module) -> Tuple[int, int, int]:
        from timm.data import resolve_data_config

        c, h, w = resolve_data_config({}, model=model)["input_size"]
        if self.config.input_size is not None:
            h = w = self.config.input_size
        return (c, h, w)

    def _densities(self, model: nn.Module, layers: List[str]) -> Dict[str, float]:
        cfg, shape = self.config, self._input_shape(model)
        if cfg.score == "synflow":
            return pai_scores.synflow(model, layers, cfg.density, shape, cfg.iterations, pai_scores.default_device())
        num_classes = getattr(model, "num_classes", None) or stem_and_classifier(model)[1].out_features
        batch = pai_scores.random_batch(shape, num_classes, cfg.batch_size)
        fn = pai_scores.snip if cfg.score == "snip" else pai_scores.grasp
        return fn(model, layers, cfg.density, batch, pai_scores.default_device())

    def plan(self, model: nn.Module, groups=None) -> Dict[str, int]:
        """Widths per channel group (rank 0's decision, broadcast); also keeps densities and ratios."""
        units = vit_units(model, self.config.round_to) if _is_vit(model) else cnn_units(model, groups, self.config.round_to)
        self.units = units

        def decide():
            raw = self._densities(model, [name for name, *_ in units.layers])
            dens = {n: max(d, self.config.min_density) for n, d in raw.items()}
            ratios = solve_ratios(units, dens)
            return widths_from_ratios(units, ratios), dens, ratios

        key = _fingerprint(model, self.spec())
        if key not in _CACHE:
            _CACHE.clear()
            _CACHE[key] = distributed.decide_on_rank0(decide)
        widths, self.densities, self.ratios = (dict(d) for d in _CACHE[key])
        return widths

    def attach(self, model: nn.Module) -> None:
        """Crop ``model`` now: compute densities, widths, shrink it physically and re-initialise it."""
        self._model = model
        self._base = read_widths(model)
        if _is_vit(model):
            self.widths = self.plan(model)
            for name, attn, mlp in vit_blocks(model):
                keep_heads(attn, range(self.widths[f"{name}.heads"]))
                keep_hidden(mlp, range(self.widths[f"{name}.hidden"]))
        else:
            graph, groups = cnn_graph(model, min(self._input_shape(model)[1], 64))
            self.widths = self.plan(model, groups)
            for gi, group in enumerate(groups):
                full, keep = len(group[0].idxs), self.widths[f"group{gi}"]
                if keep < full:
                    dep = group[0].dep
                    graph.get_pruning_group(dep.target.module, dep.handler, list(range(keep, full))).prune()
        if self.config.reinit:
            reinitialise(model)

    def detach(self, model: nn.Module) -> None:
        """Nothing to undo: the cropped widths are the model's architecture from now on."""

    def stage_setup(self, run: StageRun) -> None:
        if self._model is not None and not distributed.same_on_all_ranks(read_widths(run.model)):
            raise CompressError("precropping: the ranks cropped the model to different widths")

    def finalize(self, model: nn.Module) -> Dict[str, Any]:
        return changed_widths(self._base, model)

    @classmethod
    def apply_edits(cls, model: nn.Module, edits: Dict[str, Any]) -> None:
        apply_widths(model, edits)

    def state_dict(self) -> Dict[str, Any]:
        return {"edits": changed_widths(self._base, self._model) if self._model is not None else {}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if self._model is not None and "edits" in state and state["edits"] != changed_widths(self._base, self._model):
            raise CompressError("precropping: resumed widths differ from the run's (was the model or seed changed?)")


def reinitialise(model: nn.Module) -> None:
    """The model's own initialiser (timm ``init_weights``), else each layer's ``reset_parameters``."""
    if hasattr(model, "init_weights"):
        model.init_weights()
        return
    for m in model.modules():
        if hasattr(m, "reset_parameters") and m is not model:
            m.reset_parameters()
