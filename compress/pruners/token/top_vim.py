"""ToP-ViM (Zhan et al., NeurIPS 2024): token pruning for Vision Mamba, with pruning-aware hidden-state alignment.

After chosen layers (1-based, "after layer l") the patch tokens are ranked and the top ``keep_ratio`` kept:

- **Importance** (§4.2): per token, the channel sum of the layer's SSM outputs clipped at zero,
  S_t = 1/2 * sum_c [max(y_fwd[c, t], 0) + max(y_bwd[c, t], 0)], both directions' gated scan outputs taken in
  sequence order. (The released code sums the *unclipped* backward output, read in flipped order; ``clip:
  false`` gives the unclipped sum of both directions.) ``mode: random`` drops tokens at random instead (baseline).
- **Order**: the kept patches are sorted back into spatial (scan) order and the class token is re-inserted at
  index k // 2 of the k kept patches, i.e. in the middle, as Vim places it (hustvl: ``num_patches // 2``).
- **Physically fewer tokens**: both the mixer output and the fp32 residual stream are gathered, so every later
  layer computes on fewer tokens.
- **Hidden-state alignment** (§4.1): removing tokens makes each survivor's predecessor in the scan a token that
  was several steps away, so the state reaches it having evolved over one step instead of several. The form
  implemented here (the paper's equations could not be read; see docs/methods.md §8) treats the pruned positions
  as time that still passes: each kept token is held over the gap of g pruned positions before it (in that scan
  direction, counted in the original patch order from a position map of kept token -> original position), i.e.
  the scan runs as if the gap's positions were copies of the kept token, computed exactly in one step
  (the scan op's ``hold``, s = 1 + g):
  h_t = exp(s delta_t A) h_prev + [expm1(s delta_t A) / expm1(delta_t A)] delta_t B_t u_t.
  The pruned tokens' projections, conv and delta are never computed (that is the saving). On CPU the decay
  exp(s delta A) of every step comes from s*delta at no extra cost, but each held step (a gap before it) needs a
  second exp and its own input factor, and a large share of the tokens are held; on Vim-T at keep 0.8
  (0.861 of the GMACs) the aligned model ran at 0.95-0.98x dense's speed against naive dropping's 1.14-1.17x
  (``compress bench`` on recipes/vim_t_topvim.yaml, one thread), so that recipe defaults to ``align: false``. On
  CUDA the kernel runs over the expanded sequence (only the scan, ~16 % of a Vim-T layer's MACs, at full length).
  ``align: false`` turns it off (naive ViT-style dropping).
- ``align: previous``: the other reading of the alignment, the gap filled from the kept token *before* it, whose
  output is read at its own step and whose state is carried across the gap (the scan's ``hold_from='previous'``:
  exact, one plain scan with a combined delta on CPU, token pairs through the held scan for gradients and on CUDA).
- ``clip: mean`` clips the mean of the two directions' outputs (what enters out_proj) instead of each.
  Measured zero-shot on a small CIFAR-10 Vim (tools/results/vim_topvim_cifar10.md, KL to dense, 600-step model):
  next is closer to dense than naive in all six settings (by 2-10 %) and the closest form in four; previous is
  behind next in four of six; clipping each direction beats clipping the mean in all six. Stretching the step,
  delta -> s delta in decay and input (Mamba's Euler discretisation of the hold, which the kernel would run at the
  pruned length), is the furthest from dense; stretching only the decay (a gap adds no input) is level with naive.
  So the defaults stay ``align: true`` (= next) and ``clip: true`` (= each).

Defaults: pruning after layers 10 and 20 of a 24-layer Vim at keep 0.8 (for other depths the same relative
positions), the schedule issue 13 names as the released one; docs/methods.md §8 reads the released code
(``layernum % 5 == 0``, 5 <= layernum < 20) as after layers 5, 10 and 15: ``prune_layers: [5, 10, 15]`` gives that.
``target_gmacs_ratio`` solves one keep ratio for all pruning layers instead. The released code also forces an odd
token count; here the class token simply goes at index k // 2 of the k kept patches, as Vim places it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional, Union

import torch
import torch.nn as nn
from pydantic import Field, field_validator, model_validator

from compress.errors import CompressError
from compress.models.vim import VisionMamba, layer_macs_per_token, vim_geometry
from compress.pruners.base import Pruner, PrunerConfig
from compress.registry import register_pruner
from compress.tokens import solve_monotone, take_rows

RELEASED_LAYERS = (10, 20)  # of 24
DEFAULT_KEEP = 0.8


class TopVimConfig(PrunerConfig):
    prune_layers: Optional[List[int]] = Field(
        None, description="1-based layers after which tokens are pruned (default: 10 and 20 of 24, scaled to depth)")
    keep_ratio: Optional[float] = Field(
        None, gt=0, le=1, description="fraction of the patch tokens kept at each pruning layer (default 0.8)")
    target_gmacs_ratio: Optional[float] = Field(
        None, gt=0, le=1, description="budget instead of keep_ratio: the layers' MACs relative to dense")
    align: Union[bool, Literal["next", "previous"]] = Field(
        True, description="pruning-aware hidden-state alignment: 'next' (= true) holds each kept token over the pruned "
                          "gap before it (read at its last copy); 'previous' lets the kept token before a gap carry "
                          "its state across it (read at its own step); false = naive dropping")
    mode: Literal["importance", "random"] = Field("importance", description="rank by clipped SSM output, or random")
    clip: Union[bool, Literal["each", "mean"]] = Field(
        True, description="clip channel values at 0 before summing them into the importance: 'each' (= true) clips "
                          "each direction's scan output, 'mean' clips their mean (what enters out_proj)")

    @property
    def align_form(self) -> Optional[str]:
        """'next', 'previous', or None (no alignment)."""
        return {True: "next", False: None}.get(self.align, self.align)

    @field_validator("prune_layers")
    @classmethod
    def _layers(cls, v):
        if v is not None:
            if not v:
                raise ValueError("give at least one layer")
            if any(x < 1 for x in v):
                raise ValueError("layers are 1-based: pruning happens after layer l >= 1")
            if len(set(v)) != len(v):
                raise ValueError("a layer is listed twice")
            v = sorted(v)
        return v

    @model_validator(mode="after")
    def _exclusive(self):
        if self.keep_ratio is not None and self.target_gmacs_ratio is not None:
            raise ValueError("give only one of keep_ratio, target_gmacs_ratio")
        return self


def default_layers(depth: int) -> List[int]:
    """The released schedule (after layers 10 and 20 of 24) at the same relative depth."""
    if depth == 24:
        return list(RELEASED_LAYERS)
    return sorted({min(max(round(depth * l / 24), 1), depth - 1) for l in RELEASED_LAYERS}) if depth > 1 else []


def kept_counts(num_patches: int, n_prunes: int, keep: float) -> List[int]:
    """Patch tokens left after each pruning layer (at least one)."""
    out, n = [], num_patches
    for _ in range(n_prunes):
        n = max(1, int(round(keep * n)))
        out.append(n)
    return out


def tokens_per_layer(depth: int, num_patches: int, layers: List[int], kept: List[int]) -> List[int]:
    """Tokens (patches + class) entering each layer."""
    counts, n, j = [], num_patches + 1, 0
    for i in range(depth):
        counts.append(n)
        if j < len(layers) and layers[j] == i + 1:
            n = kept[j] + 1
            j += 1
    return counts


# ---- the method's pieces, as plain tensor functions --------------------------------------------------------------


def importance(y_f: torch.Tensor, y_b: torch.Tensor, clip=True) -> torch.Tensor:
    """(B, D, L) scan outputs of both directions, in sequence order -> (B, L) token scores. ``clip``: True / 'each'
    (each direction clipped at 0), 'mean' (their mean clipped, what enters out_proj), False (no clipping)."""
    if clip == "mean":
        return ((y_f.float() + y_b.float()) / 2).clamp(min=0).sum(1)
    if clip:
        y_f, y_b = y_f.clamp(min=0), y_b.clamp(min=0)
    return (y_f.float().sum(1) + y_b.float().sum(1)) / 2


def select(scores: torch.Tensor, cls: int, k: int) -> torch.Tensor:
    """Sequence indices (B, k + 1) to keep: the top-k patches (never the class token at ``cls``) in their
    original order, with the class token inserted at index k // 2."""
    B, n = scores.shape
    dev = scores.device
    patch_pos = torch.cat([torch.arange(cls, device=dev), torch.arange(cls + 1, n, device=dev)])
    top = scores[:, patch_pos].topk(k, dim=1).indices.sort(dim=1).values
    kept = patch_pos[top]  # (B, k) sequence positions, ascending
    mid = torch.full((B, 1), cls, dtype=kept.dtype, device=dev)
    return torch.cat([kept[:, : k // 2], mid, kept[:, k // 2:]], dim=1)


def gap_holds(index: torch.Tensor, cls: int, cls_orig: int, num_patches: int):
    """Steps each token is held: 1 + (pruned patches skipped just before it), for the forward and the backward scan,
    both (B, n) in sequence order. ``index`` holds each token's position in the original sequence; the class
    token (at ``cls``) gets 1 and is transparent to the patch gaps."""
    patches = torch.cat([index[:, :cls], index[:, cls + 1:]], dim=1)
    q = patches - (patches > cls_orig).long()  # original patch ordinal 0..M-1, ascending along the sequence
    B = q.shape[0]
    before = torch.cat([q.new_full((B, 1), -1), q[:, :-1]], dim=1)
    after = torch.cat([q[:, 1:], q.new_full((B, 1), num_patches)], dim=1)
    fwd = (q - before).clamp(min=1).float()  # 1 + gap
    bwd = (after - q).clamp(min=1).float()
    one = fwd.new_ones(B, 1)
    return (torch.cat([fwd[:, :cls], one, fwd[:, cls:]], dim=1), torch.cat([bwd[:, :cls], one, bwd[:, cls:]], dim=1))


def gather_tokens(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``t[b, idx[b]]`` (B, K, C): one index_select (``compress.tokens.take_rows``)."""
    return take_rows(t, idx)


# ---- the patched model -------------------------------------------------------------------------------------------


@dataclass
class PruneTrace:
    """What the last forward did, for tests and reports."""

    index: Optional[torch.Tensor] = None  # (B, n) original sequence position of every final token
    cls: int = 0  # index of the class token in the final sequence
    counts: list = field(default_factory=list)  # tokens entering each layer


class TopVimVisionMamba(VisionMamba):
    """``VisionMamba`` whose layer loop prunes tokens after the planned layers (class swapped in by ``attach``)."""

    _top_vim: "TopVim"

    def forward_layers(self, hidden: torch.Tensor):
        p = self._top_vim
        B, n0, _ = hidden.shape
        cls, cls_orig, num_patches = self.cls_position, self.cls_position, n0 - 1
        index = torch.arange(n0, device=hidden.device).unsqueeze(0).expand(B, n0)
        trace = PruneTrace()
        residual, holds, j = None, None, 0
        form = p.config.align_form
        for i, layer in enumerate(self.layers):
            trace.counts.append(hidden.shape[1])
            prune = j < len(p.layers) and p.layers[j] == i + 1
            k = p.kept[j] if prune else None
            prune = prune and k < hidden.shape[1] - 1
            want_scan = prune and p.config.mode == "importance"
            out, residual = layer(hidden, residual, hold=holds, return_scan=want_scan, hold_from=form or "next")
            hidden, y = (out[0], out[1:]) if want_scan else (out, None)
            if j < len(p.layers) and p.layers[j] == i + 1:
                j += 1
            if not prune:
                continue
            if y is not None:
                scores = importance(*y, clip=p.config.clip)
            else:
                scores = torch.rand(B, hidden.shape[1], device=hidden.device)
            keep = select(scores, cls, k)
            hidden, residual, index = gather_tokens(hidden, keep), gather_tokens(residual, keep), index.gather(1, keep)
            cls = k // 2
            if form is not None:
                fwd, bwd = gap_holds(index, cls, cls_orig, num_patches)
                # 'previous': in each direction a token carries the gap that follows it there, i.e. the gap before
                # it in the other direction
                holds = (fwd, bwd) if form == "next" else (bwd, fwd)
        trace.index, trace.cls = index, cls
        p.trace = trace
        return hidden, residual, cls


# ---- the pruner ---------------------------------------------------------------------------------------------------


@register_pruner("top_vim")
class TopVim(Pruner):
    """ToP-ViM token pruning for Vision Mamba: clipped SSM-output importance, order kept, hidden-state alignment."""

    name = "top_vim"
    kind = "token"
    targets = "vim"
    replay_on_load = True  # holds no weights: re-attached from its spec
    Config = TopVimConfig

    def __init__(self, config=None, **params):
        super().__init__(config, **params)
        self.geometry = None
        self.trace: Optional[PruneTrace] = None

    # -- planning -------------------------------------------------------------------------------------------------
    def plan(self, g: dict) -> None:
        cfg, depth = self.config, g["depth"]
        layers = list(cfg.prune_layers) if cfg.prune_layers is not None else default_layers(depth)
        past = [l for l in layers if l >= depth]
        if past:
            raise ValueError(f"prune_layers: layer {past[0]} is past the last layer that has a successor (the model "
                             f"has {depth} layers; pruning after layer l needs 1 <= l <= {depth - 1})")
        self.layers = layers
        if cfg.target_gmacs_ratio is not None:
            ratio = lambda keep: self.macs_ratio(g, layers, kept_counts(g["num_patches"], len(layers), keep))  # noqa: E731
            if cfg.target_gmacs_ratio < ratio(1e-9):
                raise ValueError(f"target_gmacs_ratio: {cfg.target_gmacs_ratio} is below what pruning after layers "
                                 f"{layers} can reach ({ratio(1e-9):.3f}); prune earlier or at more layers")
            self.keep = round(solve_monotone(ratio, cfg.target_gmacs_ratio, 0.0, 1.0), 4)
        else:
            self.keep = cfg.keep_ratio if cfg.keep_ratio is not None else DEFAULT_KEEP
        self.kept = kept_counts(g["num_patches"], len(layers), self.keep)

    @staticmethod
    def macs_ratio(g: dict, layers: List[int], kept: List[int]) -> float:
        """The layers' MACs relative to dense (every Vim layer costs the same per token)."""
        counts = tokens_per_layer(g["depth"], g["num_patches"], layers, kept)
        return sum(counts) / (g["depth"] * (g["num_patches"] + 1))

    def expected_tokens(self) -> List[int]:
        return tokens_per_layer(self.geometry["depth"], self.geometry["num_patches"], self.layers, self.kept)

    def expected_macs_ratio(self) -> float:
        return self.macs_ratio(self.geometry, self.layers, self.kept)

    def expected_layer_macs(self) -> int:
        """MACs of all layers per image under this plan (analytic)."""
        return layer_macs_per_token(self.geometry) * sum(self.expected_tokens())

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        if isinstance(model, TopVimVisionMamba):
            raise CompressError("top_vim: this model already has a token pruner attached; detach it first")
        if type(model) is not VisionMamba:
            raise CompressError(f"top_vim: needs a Vision Mamba (a vim_* model), got {type(model).__name__}")
        g = vim_geometry(model)
        self.plan(g)
        self.geometry = g
        model.__class__ = TopVimVisionMamba
        model._top_vim = self

    def detach(self, model: nn.Module) -> None:
        if isinstance(model, TopVimVisionMamba):
            model.__class__ = VisionMamba
            model.__dict__.pop("_top_vim", None)

    def spec(self) -> dict:
        spec = super().spec()
        if self.geometry is not None:  # pin the resolved plan against later changes of the defaults
            spec.update(prune_layers=list(self.layers), keep_ratio=self.keep, target_gmacs_ratio=None)
        return spec

    def __repr__(self) -> str:
        if self.geometry is None:
            return super().__repr__()
        return (f"TopVim(after layers {self.layers}, keep {self.keep}, patches {self.kept}, align={self.config.align}, "
                f"mode={self.config.mode}, ~{self.expected_macs_ratio():.2f} of the layers' MACs)")
