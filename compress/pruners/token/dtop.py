"""DToP (Tang et al., ICCV 2023): dynamic token pruning for plain-ViT segmenters by early exit.

The segmenter's auxiliary heads (``model.kwargs.aux_blocks``) split the backbone into stages. Where a
stage ends, its head grades every active token (class probabilities, softmax of its logits):

1. candidates E = the active tokens whose top class probability is above p0 (``threshold``);
2. for every class predicted in E, its ``top_k`` most confident candidates stay active (ties: the
   lower token position first), so each class keeps context;
3. the rest of E exits: its stage logits are frozen in a canvas at the tokens' original positions;
4. later blocks run on the remaining tokens only (physically fewer: gathered, as in ``tokens.py``);
5. the final map takes the decode head's logits at active tokens and the frozen logits elsewhere
   (for per-token heads the paper finalises early predictions directly).

Decisions are made without gradient; the heads' logits keep theirs, so every head is trained on the
map it produces (the canvas so far plus its own tokens). Active in training and inference.

Per-image counts differ, so a batch is ragged. ``ragged: pad`` (default) keeps one tensor padded to
the largest count and masks the padding as attention keys through the patched attention's additive
bias (fused SDPA with a mask); a batch without padding (always at batch 1) runs unmasked.
``ragged: loop`` runs each image's tokens through the blocks one image at a time, as the official
code does. ``tools/bench_dtop_camvid.py`` measures both.

Patching reuses ``compress/tokens.py`` (class swap of timm's blocks, ``state.index`` = the kept-token
index map); the pruner holds no weights, so exports re-attach it from its spec. See
docs/methods.md §1; written from that spec, no code reuse.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, field_validator
from timm.models.vision_transformer import Block

from compress import tokens
from compress.errors import CompressError
from compress.pruners.base import PrunerConfig
from compress.pruners.token.base import TokenPruner
from compress.registry import register_pruner


# ---- the exit rule and the token bookkeeping, as plain functions ------------------------------------


def exit_mask(probs: torch.Tensor, active: torch.Tensor, threshold: float, top_k: int) -> torch.Tensor:
    """Which tokens exit: active, top probability > ``threshold``, and not among the ``top_k`` most
    confident such tokens of their predicted class in their image (ties: lower position kept first).

    ``probs``: B x N x C class probabilities; ``active``: B x N bool. Returns B x N bool."""
    conf, label = probs.max(-1)
    cand = active & (conf > threshold)
    if top_k <= 0 or not bool(cand.any()):
        return cand
    score = torch.where(cand, conf, conf.new_full((), -1.0))
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    cand_sorted = cand.gather(1, order)
    onehot = F.one_hot(label.gather(1, order), probs.shape[-1]) * cand_sorted[..., None]
    rank = (onehot.cumsum(1) * onehot).sum(-1)  # 1-based rank of a candidate within its class
    keep = torch.zeros_like(cand).scatter(1, order, cand_sorted & (rank <= top_k))
    return cand & ~keep


def scatter_tokens(canvas: Optional[torch.Tensor], pos: torch.Tensor, values: torch.Tensor,
                   valid: Optional[torch.Tensor], num_positions: int) -> torch.Tensor:
    """``canvas`` (B x M x C, or zeros) with ``values`` (B x n x C) written at positions ``pos`` (B x n);
    padding (``valid`` False) is dropped. Out of place, so gradients reach both."""
    B, n, C = values.shape
    if canvas is None and valid is None and n == num_positions:
        ident = torch.arange(n, device=pos.device)
        if bool((pos == ident).all()):
            return values
    if canvas is None:
        canvas = values.new_zeros(B, num_positions, C)
    target = pos if valid is None else torch.where(valid, pos, torch.full_like(pos, num_positions))
    buf = torch.cat([canvas, canvas.new_zeros(B, 1, C)], dim=1)
    buf = buf.scatter(1, target[..., None].expand(-1, -1, C), values)
    return buf[:, :num_positions]


def gather_kept(x: torch.Tensor, index: torch.Tensor, keep: torch.Tensor, num_prefix: int):
    """Keep the prefix tokens and the patch tokens where ``keep`` (B x n), in original order, padded to the
    largest count. Returns (tokens, index with -1 at padding, valid B x K or None when nothing is padded)."""
    P, D = num_prefix, x.shape[-1]
    counts = keep.sum(1)
    K = int(counts.max()) if keep.numel() else 0
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :K]
    valid = torch.arange(K, device=x.device)[None, :] < counts[:, None]
    patches = x[:, P:].gather(1, order[..., None].expand(-1, -1, D))
    idx = torch.where(valid, index[:, P:].gather(1, order), torch.full_like(order, -1))
    return (torch.cat([x[:, :P], patches], 1), torch.cat([index[:, :P], idx], 1),
            None if bool(valid.all()) else valid)


@dataclass
class _Forward:
    """Scratch space of one segmenter forward."""

    seg: nn.Module
    grid: tuple
    canvas: Optional[torch.Tensor] = None  # B x Np x C: logits of exited tokens at their positions
    valid: Optional[torch.Tensor] = None  # B x n: real (True) vs padding among the current patch tokens
    maps: List[torch.Tensor] = field(default_factory=list)  # each stage head's full map
    exited: List[torch.Tensor] = field(default_factory=list)  # per stage: B tokens that exited there
    stage_map: Optional[torch.Tensor] = None  # B x Np: the stage where each token exited, -1 if it never did


# ---- the pruner -------------------------------------------------------------------------------------


class DToPConfig(PrunerConfig):
    threshold: Union[float, List[float]] = Field(
        0.9, description="p0: a token exits when an auxiliary head's top class probability exceeds it; one value "
        "or one per auxiliary head (1.0: that head never prunes)")
    top_k: int = Field(5, ge=0, description="the k most confident exiting tokens of each predicted class keep computing")
    ragged: Literal["pad", "loop"] = Field(
        "pad", description="ragged batches: pad + attention-key mask, or one image at a time")

    @field_validator("threshold")
    @classmethod
    def _range(cls, v):
        for t in v if isinstance(v, list) else [v]:
            if not 0 < t <= 1:
                raise ValueError(f"thresholds are probabilities in (0, 1], got {t}")
        return v


@register_pruner("dtop")
class DToP(TokenPruner):
    """DToP (ICCV'23): early exit of confident tokens at a segmenter's auxiliary heads; trained."""

    targets = "segmenter"

    name = "dtop"
    Config = DToPConfig
    prop_attn = True  # padding (size 0) becomes a -inf key bias in the patched attention

    def attach(self, model: nn.Module) -> None:
        from compress.models.segmenter import Segmenter

        if not isinstance(model, Segmenter) or not model.aux_blocks:
            raise CompressError("dtop needs a segmenter with auxiliary heads (model.name: segmenter, "
                                "model.kwargs.aux_blocks: e.g. [5, 7])")
        t = self.config.threshold
        self.thresholds = list(t) if isinstance(t, list) else [t] * len(model.aux_blocks)
        if len(self.thresholds) != len(model.aux_blocks):
            raise CompressError(f"threshold: {len(self.thresholds)} values for {len(model.aux_blocks)} auxiliary heads "
                                f"(aux_blocks {model.aux_blocks})")
        self.stage_at = {b + 1: m for m, b in enumerate(model.aux_blocks)}  # block entered -> stage that ends there
        host = self.host(model)
        self.geometry = tokens.vit_geometry(host)
        self._run: Optional[_Forward] = None
        self.last: Dict[str, Any] = {}
        tokens.patch(host, self)

    def trace_problem(self) -> Optional[str]:
        return ("its exits depend on each image's confidences, so the number of tokens each block runs on is "
                "known only at run time")

    def expected_tokens(self) -> list:
        raise CompressError("dtop's token counts depend on the image; measure them (segmenter forward, last_exits)")

    def forward_figures(self) -> Dict[str, torch.Tensor]:
        """% of each image's tokens that exited early in the last forward, in all and per stage."""
        if not getattr(self, "last", None):
            return {}
        exited = self.last["exit_fraction"] * 100
        return {"exit_fraction": exited.sum(1), "exit_fraction_stages": exited}

    # -- per forward ---------------------------------------------------------------------------
    def segment(self, seg: nn.Module, x: torch.Tensor, grid: tuple) -> List[torch.Tensor]:
        """The segmenter's forward with early exits: every head's token-grid map (aux first, final last)."""
        run = self._run = _Forward(seg=seg, grid=grid)
        try:
            final = seg.backbone.forward_features(x)
        finally:
            self._run = None
        state = seg.backbone._compress_tokens.state
        P, Np = seg.num_prefix, grid[0] * grid[1]
        logits = seg.decode_head(final[:, P:], run.valid)
        full = scatter_tokens(run.canvas, state.index[:, P:] - P, logits, run.valid, Np)
        exited = torch.stack(run.exited, 1).float() / Np  # B x stages
        self.last = {"exit_fraction": exited.detach().cpu(), "tokens": Np, "grid": tuple(grid),
                     "exit_stage": run.stage_map.view(-1, *grid).cpu()}
        return run.maps + [seg.to_grid(full, grid)]

    def enter_block(self, layer: int, x: torch.Tensor, state) -> torch.Tensor:
        m = self.stage_at.get(layer)
        run = self._run
        if m is None or run is None:
            return x
        seg, P, Np = run.seg, state.num_prefix, run.grid[0] * run.grid[1]
        pos = state.index[:, P:] - P
        logits = seg.aux_heads[m](x[:, P:])
        run.canvas = scatter_tokens(run.canvas, pos, logits, run.valid, Np)
        run.maps.append(seg.to_grid(run.canvas, run.grid))
        active = run.valid if run.valid is not None else torch.ones(pos.shape, dtype=torch.bool, device=x.device)
        with torch.no_grad():
            out = exit_mask(logits.detach().float().softmax(-1), active, self.thresholds[m], self.config.top_k)
        run.exited.append(out.sum(1))
        if run.stage_map is None:
            run.stage_map = torch.full((x.shape[0], Np), -1, dtype=torch.long, device=x.device)
        where = torch.where(out, pos, torch.full_like(pos, Np))  # padding and staying tokens go to a spare slot
        spare = torch.cat([run.stage_map, run.stage_map.new_full((x.shape[0], 1), -1)], 1)
        run.stage_map = spare.scatter(1, where, torch.full_like(where, m))[:, :Np]
        x, state.index, run.valid = gather_kept(x, state.index, active & ~out, P)
        padded = run.valid is not None and self.config.ragged == "pad"
        state.size = torch.cat([x.new_ones(x.shape[0], P), run.valid.to(x.dtype)], 1) if padded else None
        return x

    def run_block(self, layer: int, block: nn.Module, x: torch.Tensor, state) -> Optional[torch.Tensor]:
        run = self._run
        if self.config.ragged != "loop" or run is None or run.valid is None:
            return None
        block.attn._compress_request = block.attn._compress_bias = None
        P, N = state.num_prefix, x.shape[1]
        counts = (P + run.valid.sum(1)).tolist()
        outs = [F.pad(Block.forward(block, x[b:b + 1, :n]), (0, 0, 0, N - n)) for b, n in enumerate(counts)]
        return torch.cat(outs, 0)
